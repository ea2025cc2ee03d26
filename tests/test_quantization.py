"""Quantized models through transformers' quantizers, compared with from_pretrained exactly.

Fine-grained fp8 checkpoints (dense and MoE, made here the way fp8 checkpoints store them: fp8 weights and
one float32 ``weight_scale_inv`` per block) are dequantized while loading where the machine has no fp8
(as transformers does on CPU), and on disk as their module reads the fp8 bytes; torchao int8 weight-only quantizes while loading and loads pre-quantized
checkpoints; offloaded to disk, its weights stay int8 there (the inner tensors of torchao's tensor subclass),
rebuilt as a module runs. Any other method is refused before anything is read.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")

from moe_models import save_moe
from tiny_models import save_tiny_llama

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import UnsupportedQuantizationError
from hf_bigmodel.model.tensors import distinct_tensors, model_tensors
from hf_bigmodel.runtime.placeholders import plain
from hf_bigmodel.storage.weights_map import BuiltDiskTensor, flatten_subclass

PROMPT = torch.tensor([[1, 7, 12, 30, 4, 9, 100, 64]])
BLOCK = 8


def quantize_fp8(path: Path) -> Path:
    """Rewrite a saved model as a fine-grained fp8 checkpoint: linear weights in float8_e4m3fn, block scales."""
    file = path / "model.safetensors"
    state = load_file(file)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
        if value.ndim != 2 or not key.endswith(".weight") or any(s in key for s in skip) \
                or value.shape[0] % BLOCK or value.shape[1] % BLOCK:
            out[key] = value
            continue
        rows, cols = value.shape
        blocks = value.float().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        out[key] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        out[key + "_scale_inv"] = scale
    save_file(out, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def assert_same(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    # an offloaded parameter, idle, is a placeholder: plain() gives it back as the weight's own kind
    assert [(n, type(plain(p)), p.dtype, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, type(p), p.dtype, tuple(p.shape)) for n, p in ref.named_parameters()]
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, ref(PROMPT).logits, rtol=0, atol=0)
    greedy = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    assert torch.equal(ours.generate(PROMPT, **greedy), ref.generate(PROMPT, **greedy))


@pytest.fixture(scope="module")
def fp8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("accelerate")  # transformers' fp8 quantizer insists on it
    root = tmp_path_factory.mktemp("fp8")
    return {"llama": quantize_fp8(save_tiny_llama(root / "llama", with_tokenizer=False).path),
            "qwen3_moe": quantize_fp8(save_moe("qwen3_moe", root / "qwen3_moe", shard_size=None).path)}


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fp8_checkpoints_are_dequantized_as_from_pretrained(fp8: dict[str, Path], family: str,
                                                             tmp_path: Path) -> None:
    path = fp8[family]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert not hasattr(ref.config, "quantization_config")  # dequantized: a plain model
    assert_same(load_pretrained_dispatched(path, device_map="cpu"), ref)
    ours = load_pretrained_dispatched(path, device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    assert not list((tmp_path / "offload").glob("*.safetensors"))  # nothing dequantized is written
    assert_same(ours, ref)


def test_fp8_weights_on_disk_stay_fp8_and_are_dequantized_as_they_run(fp8: dict[str, Path]) -> None:
    """A disk module reads the checkpoint's fp8 bytes and scales in place (a quarter of the fp32 bytes), and
    transformers' dequantization runs as it is read."""
    ours = load_pretrained_dispatched(fp8["qwen3_moe"], device_map={"": "cpu", "model.layers.1": "disk"})
    weights = ours._hf_bigmodel_weights.disk
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.experts.gate_up_proj"):
        ref = weights[name]
        assert isinstance(ref, BuiltDiskTensor) and ref.dtype == torch.float32, name
        stored = {part.entry.dtype for _, part in ref.parts}
        assert stored == {torch.float8_e4m3fn, torch.float32}, name  # fp8 values, float32 block scales
        assert all(Path(part.entry.path).parent == fp8["qwen3_moe"] for _, part in ref.parts)  # read in place
        assert ref.nbytes < math.prod(ref.shape) * 4 / 3  # read per forward: about a quarter of the fp32 bytes
    assert_same(ours, transformers.AutoModelForCausalLM.from_pretrained(fp8["qwen3_moe"]))


def test_fp8_scales_are_applied_not_dropped(fp8: dict[str, Path]) -> None:
    """The bug this fixes: weight_scale_inv ignored and fp8 values cast as if unscaled."""
    ours = load_pretrained_dispatched(fp8["llama"], device_map="cpu")
    stored = load_file(fp8["llama"] / "model.safetensors")
    q = stored["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(ours.model.layers[0].mlp.up_proj.weight, q.to(torch.float32))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("plain") / "llama", with_tokenizer=False).path


def _int8() -> object:
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


PART_DISK = {"": "cpu", "model.layers.1": "disk"}


@pytest.fixture(scope="module")
def int8(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``llama`` quantized by from_pretrained and saved: a torchao checkpoint."""
    path = tmp_path_factory.mktemp("int8") / "int8"
    transformers.AutoModelForCausalLM.from_pretrained(llama, quantization_config=_int8(),
                                                      dtype=torch.bfloat16).save_pretrained(path)
    return path


def assert_quantized_on_disk(model: torch.nn.Module, name: str, folder: Path) -> None:
    """``name`` is offloaded as its int8 bytes (torchao's Int8Tensor's inner tensors) in the offload folder."""
    ref = model._hf_bigmodel_weights.disk[name]
    assert isinstance(ref, BuiltDiskTensor) and ref.kind.endswith(".Int8Tensor") and ref.dtype == torch.bfloat16
    parts = dict(ref.parts)
    assert parts["qdata"].entry.dtype == torch.int8 and Path(parts["qdata"].entry.path).parent == folder
    assert parts["qdata"].nbytes == math.prod(ref.shape)  # one byte per weight, plus a scale per row
    assert ref.nbytes == sum(p.nbytes for p in parts.values()) < math.prod(ref.shape) * 2  # fewer than bf16
    assert model.get_submodule(name.rpartition(".")[0]).weight.device.type == "meta"  # streamed, not resident


@pytest.mark.parametrize("device_map", ["cpu", PART_DISK], ids=["ram", "part-on-disk"])
def test_torchao_int8_quantizes_while_loading_as_from_pretrained(llama: Path, tmp_path: Path,
                                                                 device_map: object) -> None:
    """Quantized while loading: int8 in RAM, and written as int8 for a disk module (rebuilt when it runs)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(llama, quantization_config=_int8(), dtype=torch.bfloat16)
    ours = load_pretrained_dispatched(llama, quantization_config=_int8(), dtype=torch.bfloat16,
                                      device_map=device_map, offload_folder=tmp_path / "offload")
    weight = ours.model.layers[0].mlp.up_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8  # quantized bytes in RAM
    assert ours.hf_quantizer.quantization_config.quant_method == "torchao"
    if device_map == PART_DISK:
        assert_quantized_on_disk(ours, "model.layers.1.mlp.up_proj.weight", tmp_path / "offload")
    assert_same(ours, ref)


@pytest.mark.parametrize("device_map", ["cpu", PART_DISK], ids=["ram", "part-on-disk"])
def test_torchao_pre_quantized_checkpoint_loads_as_from_pretrained(int8: Path, tmp_path: Path,
                                                                   device_map: object) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(int8)
    ours = load_pretrained_dispatched(int8, device_map=device_map, offload_folder=tmp_path / "offload")
    if device_map == PART_DISK:
        assert_quantized_on_disk(ours, "model.layers.1.self_attn.q_proj.weight", tmp_path / "offload")
    assert_same(ours, ref)


def _loaded_bytes(tensor: torch.Tensor) -> int:
    parts = flatten_subclass(tensor)  # a quantized weight: its inner tensors hold its bytes
    tensors = [tensor] if parts is None else list(parts[0].values())
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("source", ["quantized while loading", "pre-quantized"])
def test_the_planner_counts_the_bytes_quantized_weights_take(llama: Path, int8: Path, tmp_path: Path,
                                                             source: str) -> None:
    """int8 weights (and their scales) are planned at the bytes they take once quantized, not as bfloat16:
    a budget of exactly the quantized model keeps it whole in RAM, one byte less offloads part of it."""
    path, kwargs = llama, {"quantization_config": _int8(), "dtype": torch.bfloat16}
    if source == "pre-quantized":
        path, kwargs = int8, {}
    whole = load_pretrained_dispatched(path, device_map="cpu", **kwargs)
    tensors = distinct_tensors(model_tensors(whole, persistent_only=False))
    planned = sum(_loaded_bytes(t) for t in tensors.values())
    assert planned < sum(t.numel() * 2 for t in tensors.values()) * 0.9  # well under the bfloat16 size
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    for budget, offloads in ((planned, False), (planned - 1, True)):
        ours = load_pretrained_dispatched(path, max_memory={"cpu": budget}, offload_folder=tmp_path / str(budget),
                                          **kwargs)
        assert ("disk" in ours.hf_device_map.values()) == offloads, (budget, ours.hf_device_map)
    assert_same(ours, ref)  # the part on disk stays int8 and computes the same


def test_hf_bigmodel_plan_of_a_pre_quantized_checkpoint_is_the_plan_a_load_makes(int8: Path, tmp_path: Path,
                                                                                  capsys, hub) -> None:
    """``hf-bigmodel plan`` counts int8 weights at the bytes their checkpoint holds (headers read, no weight),
    as loading does; a Hub repo's headers are not fetched: it says its sizes are the dtype's (an overestimate)."""
    from hf_bigmodel.cli import main

    whole = load_pretrained_dispatched(int8, device_map="cpu")
    tensors = model_tensors(whole, persistent_only=False)
    weights = sum(_loaded_bytes(tensors[name].tensor) for name in dict(whole.named_parameters()))
    # Buffers are planned in the load dtype (the float32 rotary table too, as for any model).
    buffers = sum(b.numel() * torch.bfloat16.itemsize for b in whole.buffers())
    budget = (weights + buffers) // 2
    capsys.readouterr()
    assert main(["plan", str(int8), "--max-memory", f"cpu={budget}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_size"] == weights + buffers and not report["quantized_sizes_unknown"]
    ours = load_pretrained_dispatched(int8, max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    assert report["device_map"] == ours.hf_device_map and "disk" in report["device_map"].values()

    hub.add_repo("org/int8", int8)
    assert main(["plan", "org/int8", "--max-memory", f"cpu={budget}", "--json"]) == 0
    out, err = capsys.readouterr()
    remote = json.loads(out)
    assert remote["quantized_sizes_unknown"] and remote["total_size"] > weights + buffers
    assert "quantized" in err and "dtype's size" in err
    assert hub.downloaded_files() == ["config.json"]
    assert main(["plan", "org/int8", "--max-memory", f"cpu={budget}"]) == 0
    assert "quantized weights counted at this dtype's size" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["config", "argument"])
def test_other_methods_are_refused_before_anything_is_read(llama: Path, tmp_path: Path, where: str) -> None:
    folder = tmp_path / "bnb"
    folder.mkdir()
    config = json.loads((llama / "config.json").read_text())
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    kwargs = {}
    if where == "config":
        config["quantization_config"] = bnb
    else:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_4bit=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")  # never opened
    with pytest.raises(UnsupportedQuantizationError, match="'bitsandbytes'.*from_pretrained") as err:
        load_pretrained_dispatched(folder, device_map="cpu", **kwargs)
    assert err.value.method == "bitsandbytes"
    assert isinstance(err.value, ValueError)


def test_a_quantize_operation_that_fails_here_fails_the_load_naming_it(llama: Path) -> None:
    """torchao int4 needs kernels this CPU build lacks: from_pretrained fails, and so does the load, loudly."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int4WeightOnlyConfig

    from hf_bigmodel.errors import CheckpointError

    config = transformers.TorchAoConfig(Int4WeightOnlyConfig(group_size=16))
    try:
        transformers.AutoModelForCausalLM.from_pretrained(llama, quantization_config=config, dtype=torch.bfloat16)
    except RuntimeError:
        pass
    else:
        pytest.skip("this machine has torchao's int4 kernels")
    with pytest.raises(CheckpointError, match="TorchAoQuantize.*Nothing was loaded"):
        load_pretrained_dispatched(llama, quantization_config=transformers.TorchAoConfig(
            Int4WeightOnlyConfig(group_size=16)), dtype=torch.bfloat16, device_map="cpu")


def test_fp8_tensors_without_their_quantizer_are_refused_not_cast(fp8: dict[str, Path], tmp_path: Path) -> None:
    """An fp8 checkpoint whose config lost its quantization_config: loading it unscaled would be silently wrong."""
    from hf_bigmodel.errors import CheckpointMismatchError

    folder = tmp_path / "no-config"
    folder.mkdir()
    for file in fp8["llama"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"float8_e4m3fn.*fp8 ones not at all"):
        load_pretrained_dispatched(folder, device_map="cpu")
