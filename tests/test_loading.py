import logging

import pytest
import torch
from core_models import TinyLM, reference_tiny_lm, save_state

from hf_bigmodel import (
    CheckpointMismatchError,
    init_empty_weights,
    load_checkpoint_in_model,
)
from hf_bigmodel.load.loading import OFFLOAD_ATTR

IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])


def empty_lm(**kwargs) -> TinyLM:
    with init_empty_weights():
        return TinyLM(**kwargs)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("target", ["file", "folder"])
def test_loads_every_layout_exactly(tmp_path, fmt, shards, target):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path, shards=shards, fmt=fmt)
    files = sorted(p for p in tmp_path.iterdir())
    if target == "folder":
        path = tmp_path
    elif shards == 1:
        path = files[0]
    else:
        path = next(p for p in files if p.name.endswith(".index.json"))
    model = empty_lm()
    load_checkpoint_in_model(model, path)
    assert torch.equal(model(IDS), ref(IDS))
    assert model.head.weight is model.embed.weight
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_safetensors_preferred_in_a_folder_with_both(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path, fmt="safetensors")
    save_state(reference_tiny_lm(seed=1), tmp_path, fmt="torch")
    model = empty_lm()
    load_checkpoint_in_model(model, tmp_path)
    assert torch.equal(model(IDS), ref(IDS))


def test_dtype_cast_and_fp32_kept_modules(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path)
    model = empty_lm()
    load_checkpoint_in_model(model, tmp_path, dtype=torch.bfloat16, keep_in_fp32_modules=["norm"])
    assert model.blocks[0].fc1.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale.dtype == torch.bfloat16
    assert model.norm.weight.dtype == torch.float32
    assert torch.equal(model.blocks[1].fc2.weight, ref.blocks[1].fc2.weight.to(torch.bfloat16))


def test_no_dtype_takes_the_models_dtype(tmp_path):
    ref = reference_tiny_lm().to(torch.float16)
    save_state(ref, tmp_path)
    model = empty_lm()  # float32 skeleton, like load_state_dict into a float32 model
    load_checkpoint_in_model(model, tmp_path)
    assert model.embed.weight.dtype == torch.float32
    assert torch.equal(model.embed.weight, ref.embed.weight.float())


def test_missing_keys_are_all_reported_at_load_time(tmp_path, caplog):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    for key in ("blocks.1.fc1.weight", "blocks.3.scale", "norm.bias"):
        del state[key]
    save_file(state, tmp_path / "model.safetensors")
    model = empty_lm()
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(model, tmp_path)
    # blocks.3.scale is a buffer built in __init__: it has a value, so only strict=True refuses it
    assert set(info.value.missing_keys) == {"blocks.1.fc1.weight", "norm.bias"}
    assert "Missing key(s)" in str(info.value) and "norm.bias" in str(info.value)
    assert all(p.device.type == "meta" for p in model.parameters())  # untouched
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(model, tmp_path, strict=True)
    assert set(info.value.missing_keys) == {"blocks.1.fc1.weight", "blocks.3.scale", "norm.bias"}


def test_unexpected_keys_warn_or_fail_with_strict(tmp_path, caplog):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    state["extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="Unexpected key.*extra.weight"):
        load_checkpoint_in_model(empty_lm(), tmp_path, strict=True)
    model = empty_lm()
    with caplog.at_level(logging.WARNING, logger="hf_bigmodel"):
        load_checkpoint_in_model(model, tmp_path)
    assert "extra.weight" in caplog.text
    assert torch.equal(model(IDS), ref(IDS))


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    save_state(reference_tiny_lm(dim=8), tmp_path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint_in_model(empty_lm(dim=16), tmp_path)
    assert ("embed.weight", (50, 8), (50, 16)) in info.value.mismatched_keys
    assert "blocks.0.fc1.weight: checkpoint [16, 8] vs model [32, 16]" in str(info.value)
    assert "(+" in str(info.value)  # long lists are cut


def test_missing_key_with_a_real_value_is_kept_unless_strict(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    del state["norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    model = reference_tiny_lm(seed=3)  # a real model: norm.weight keeps its value
    load_checkpoint_in_model(model, tmp_path)
    assert torch.equal(model.norm.weight, reference_tiny_lm(seed=3).norm.weight)
    with pytest.raises(CheckpointMismatchError, match="norm.weight"):
        load_checkpoint_in_model(reference_tiny_lm(seed=3), tmp_path, strict=True)


def test_disk_entries_of_safetensors_are_not_copied(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt", shards=2)
    model = empty_lm()
    device_map = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "blocks.3": "cpu",
                  "norm": "cpu", "head": "cpu"}
    load_checkpoint_in_model(model, tmp_path / "ckpt", device_map=device_map)
    weights = getattr(model, OFFLOAD_ATTR)
    assert set(weights.disk) == {f"blocks.{i}.{n}.{p}" for i in (1, 2) for n in ("fc1", "fc2") for p in ("weight", "bias")}
    assert all(ref_.entry.path.startswith(str(tmp_path / "ckpt")) for ref_ in weights.disk.values())
    assert model.blocks[1].fc1.weight.device.type == "meta"
    assert torch.equal(model.blocks[1].scale, ref.blocks[1].scale)  # buffers of disk modules stay in RAM


def test_torch_checkpoint_disk_entries_go_to_the_offload_folder_once(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt", fmt="torch", shards=2)
    device_map = {"embed": "cpu", "blocks": "disk", "norm": "cpu", "head": "cpu"}
    offload = tmp_path / "offload"
    model = empty_lm()
    load_checkpoint_in_model(model, tmp_path / "ckpt", device_map=device_map, offload_folder=offload)
    files = sorted(p.name for p in offload.iterdir())
    assert "index.json" in files and any(f.endswith(".safetensors") for f in files)
    mtimes = {p.name: p.stat().st_mtime_ns for p in offload.iterdir() if p.suffix == ".safetensors"}
    load_checkpoint_in_model(empty_lm(), tmp_path / "ckpt", device_map=device_map, offload_folder=offload)
    assert {p.name: p.stat().st_mtime_ns for p in offload.iterdir() if p.suffix == ".safetensors"} == mtimes
