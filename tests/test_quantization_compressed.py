"""compressed-tensors checkpoints through transformers' quantizer, compared with from_pretrained exactly.

The checkpoint is made here as compressed-tensors writes one: a tiny Llama's linear layers quantized to
int8 per channel with compressed-tensors' own functions, compressed (``pack-quantized``) and its config
written by its ``ModelCompressor``.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading")
pytest.importorskip("compressed_tensors")

from test_quantization import assert_same
from tiny_models import save_tiny_llama

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import UnsupportedQuantizationError


def save_compressed(plain: Path, out: Path) -> Path:
    """``plain`` rewritten as a compressed-tensors int8 (per output channel) checkpoint in ``out``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(plain)
    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):  # what a calibration would set: each row's range
                w = module.weight
                scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), weights)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(plain / "config.json", out / "config.json")
    compressor.update_config(str(out))
    return out


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    return save_compressed(save_tiny_llama(root / "plain", with_tokenizer=False).path, root / "int8")


def test_compressed_checkpoint_loads_compressed_as_from_pretrained(compressed: Path) -> None:
    ref = transformers.AutoModelForCausalLM.from_pretrained(compressed)
    ours = load_pretrained_dispatched(compressed, device_map="cpu")
    packed = ours.model.layers[0].mlp.up_proj.weight_packed
    assert packed.dtype == torch.int32 and packed.device.type == "cpu"  # compressed bytes until the first forward
    assert ours.hf_quantizer.quantization_config.quant_method == "compressed-tensors"
    assert_same(ours, ref)  # the first forward decompresses both in place


def test_compressed_checkpoint_decompressed_while_loading_offloads(compressed: Path, tmp_path: Path) -> None:
    def config() -> object:
        return transformers.CompressedTensorsConfig(dequantize=True)

    ref = transformers.AutoModelForCausalLM.from_pretrained(compressed, quantization_config=config())
    ours = load_pretrained_dispatched(compressed, quantization_config=config(), offload_folder=tmp_path / "o",
                                      device_map={"": "cpu", "model.layers.1": "disk"})
    assert ours._hf_bigmodel_weights.disk["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32
    assert_same(ours, ref)


def test_compressed_modules_spread_over_devices_are_refused_before_loading(compressed: Path, tmp_path: Path) -> None:
    """compressed-tensors' first forward would fail on streamed weights, after the whole load."""
    with pytest.raises(UnsupportedQuantizationError, match=r"decompresses the whole model.*dequantize=True"):
        load_pretrained_dispatched(compressed, device_map={"": "cpu", "model.layers.1": "disk"},
                                   offload_folder=tmp_path / "o")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_method_whose_package_is_missing_is_refused_naming_it(compressed: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in list(sys.modules) if m.startswith("compressed_tensors")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if not installed
    with pytest.raises(UnsupportedQuantizationError, match=r"'compressed-tensors', whose package is not installed"):
        load_pretrained_dispatched(compressed, device_map="cpu")
