"""The load plan (load/load_plan.py): which checkpoint key fills which model tensor, where, in which dtype, and
how, decided from headers alone on meta models; every mismatch found before anything is read."""

from __future__ import annotations

import pytest
import torch
from core_models import TinyLM
from test_dispatch_plan import no_data_touched

from hf_bigmodel import CheckpointMismatchError, init_empty_weights
from hf_bigmodel.load.load_plan import LoadPlan, plan_load
from hf_bigmodel.model.tensors import model_tensors
from hf_bigmodel.storage.checkpoint import TensorInfo
from hf_bigmodel.storage.safetensors_io import TensorEntry


def _meta_lm() -> TinyLM:
    with init_empty_weights():
        return TinyLM()


def _infos(model, *, safetensors=True, drop=(), rename=lambda k: k, dtype=None, shapes=None, files=2):
    """Checkpoint headers for ``model``'s state dict (tied duplicates left out, as savers do)."""
    infos: dict[str, TensorInfo] = {}
    seen: set[int] = set()
    names = [n for n, t in model.state_dict(keep_vars=True).items() if not (id(t) in seen or seen.add(id(t)))]
    for i, name in enumerate(n for n in names if n not in drop):
        tensor = model.state_dict(keep_vars=True)[name]
        key, file = rename(name), f"ckpt/model-{i % files}.safetensors"
        shape = (shapes or {}).get(name, tuple(tensor.shape))
        kind = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        entry = TensorEntry(file, key, kind, shape, 0, 0) if safetensors else None
        infos[key] = TensorInfo(key, shape, kind, file if safetensors else file.replace("safetensors", "bin"), entry)
    return infos


def _plan(model, infos, **kwargs) -> LoadPlan:
    slots = model_tensors(model)
    with no_data_touched():
        return plan_load(slots, infos, path="ckpt", **kwargs)


def test_keys_match_by_renaming_and_tied_names_share_the_stored_one():
    model = _meta_lm()
    plan = _plan(model, _infos(model, rename=lambda n: "transformer." + n),
                 key_mapping=lambda k: k.removeprefix("transformer."))
    assert set(plan.matches) == set(model_tensors(model)) - {"head.weight"}
    assert plan.matches["norm.weight"].key == "transformer.norm.weight"
    assert plan.ties == {"head.weight": "embed.weight"}  # the checkpoint stores one name of the tie
    assert plan.unexpected == [] and plan.missing == []
    assert "23 tensor(s) matched (23 renamed)" in str(plan)
    by_file = plan.by_file
    assert set(by_file) == {"ckpt/model-0.safetensors", "ckpt/model-1.safetensors"}
    assert by_file["ckpt/model-0.safetensors"]["transformer.embed.weight"] == "embed.weight"


def test_dropped_unexpected_and_missing_keys():
    model = TinyLM()  # real values: a tensor the checkpoint lacks keeps its own
    infos = _infos(model, drop={"norm.bias"})
    infos["extra.weight"] = TensorInfo("extra.weight", (2,), torch.float32, "ckpt/model-0.safetensors")
    infos["skip.me"] = TensorInfo("skip.me", (2,), torch.float32, "ckpt/model-0.safetensors")
    plan = _plan(model, infos, key_mapping=lambda k: None if k == "skip.me" else k)
    assert plan.unexpected == ["extra.weight"] and plan.missing == ["norm.bias"]
    with pytest.raises(CheckpointMismatchError) as info:
        _plan(model, infos, key_mapping=lambda k: None if k == "skip.me" else k, strict=True)
    assert "extra.weight" in str(info.value) and "norm.bias" in str(info.value)


def test_every_mismatch_is_reported_at_once():
    model = _meta_lm()
    infos = _infos(model, drop={"norm.bias"}, shapes={"blocks.0.fc1.weight": (3, 3)})
    embed = infos["embed.weight"]
    infos["embed.weight"] = TensorInfo(embed.key, embed.shape, torch.int64, embed.file, None)
    with pytest.raises(CheckpointMismatchError) as info:
        _plan(model, infos)
    text = str(info.value)
    assert "norm.bias" in text and "blocks.0.fc1.weight" in text and "checkpoint [3, 3] vs model [32, 16]" in text
    assert "embed.weight: checkpoint torch.int64 cannot become model torch.float32" in text


def test_destinations_dtypes_and_how_each_tensor_is_taken():
    model = _meta_lm()
    device_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "blocks.3": "cpu",
                  "norm": "disk", "head": "cpu"}
    infos = _infos(model, dtype=torch.float16)
    plan = _plan(model, infos, device_map=device_map, dtype=torch.bfloat16, keep_in_fp32_modules=["norm"])
    assert plan.dest["blocks.1.fc1.weight"] == "disk" and plan.dest["blocks.1.scale"] == "cpu"  # buffers stay
    assert plan.devices["head.weight"] == "cpu" and "head.weight" not in plan.dest  # a tied alias: not read
    assert plan.dtypes["blocks.0.fc1.weight"] == torch.bfloat16 and plan.dtypes["norm.weight"] == torch.float32
    disk = [n for n, d in plan.dest.items() if d == "disk"]
    assert plan.referenced == disk and plan.converted == []  # safetensors: read in place, never copied
    assert set(plan.read) == set(plan.dest) - set(disk) and plan.offloads
    buffers = _plan(model, infos, device_map=device_map, offload_buffers=True)
    assert buffers.dest["blocks.1.scale"] == "disk" and buffers.dtypes["blocks.1.scale"] == torch.float32
    torch_file = _plan(model, _infos(model, safetensors=False), device_map=device_map)
    assert torch_file.converted == disk and torch_file.referenced == []  # converted once into the folder
    kept = _plan(model, infos)  # no device map: tensors stay where they are (meta ones on the CPU)
    assert set(kept.devices.values()) == {"cpu"} and not kept.offloads
    assert kept.dtypes["embed.weight"] == torch.float32  # no dtype: the model's own


def test_conversions_make_tensors_from_several_keys_and_are_referenced_in_place_on_disk():
    from hf_bigmodel.load.conversions import Conversion, Part

    model = _meta_lm()
    infos = _infos(model, drop={"blocks.0.fc1.weight"})
    for key in ("fc1.top", "fc1.bottom"):  # fc1.weight [32, 16] in two halves
        infos[key] = TensorInfo(key, (16, 16), torch.float32, "ckpt/model-0.safetensors",
                                TensorEntry("ckpt/model-0.safetensors", key, torch.float32, (16, 16), 0, 1024))
    halves = tuple(Part(k, "blocks.0.fc1.weight", (rows, (0, 16)), ((0, 16), (0, 16)))
                   for k, rows in (("fc1.top", (0, 16)), ("fc1.bottom", (16, 32))))
    fused = Conversion(("fc1.top", "fc1.bottom"), ("blocks.0.fc1.weight",), parts=halves, label="halves")
    plan = _plan(model, infos, conversions=[fused], dtype=torch.bfloat16)
    assert plan.made == {"blocks.0.fc1.weight": fused} and "fc1.top" not in plan.unexpected
    assert plan.source_files == {"fc1.top": "ckpt/model-0.safetensors", "fc1.bottom": "ckpt/model-0.safetensors"}
    assert plan.dtypes["blocks.0.fc1.weight"] == torch.bfloat16 and plan.fused == {}  # read, built in RAM
    on_disk = _plan(model, infos, conversions=[fused], device_map={"": "disk"})
    assert set(on_disk.fused) == {"blocks.0.fc1.weight"} and "blocks.0.fc1.weight" not in on_disk.converted
    short = Conversion(("fc1.top",), ("blocks.0.fc1.weight",), parts=halves[:1], label="half")
    with pytest.raises(CheckpointMismatchError, match="half fills 256 of its 512 elements"):
        _plan(model, infos, conversions=[short])
