"""Quantized models through transformers' own quantizers (``HfQuantizer``), as ``from_pretrained`` runs them.

A checkpoint whose config has a ``quantization_config`` (pre-quantized), or a call with
``quantization_config=`` (quantize while loading), gets transformers' quantizer for that method, and the
load runs its steps in ``from_pretrained``'s order: ``validate_environment`` and ``update_dtype`` before
anything is read, ``preprocess_model`` on the empty model (quantized module classes), its weight
conversions and quantize-on-load operations while shards stream (:mod:`hf_bigmodel.hf.conversions`), and
``postprocess_model`` at the end. Quantized values stay quantized wherever they are kept.

compressed-tensors checkpoints load through its package (``pip install compressed-tensors``) as
``from_pretrained`` loads them: compressed modules that decompress the whole model in place on the first
forward (through compressed-tensors' own offloading, which cannot run on weights this library streams, so
such a model must fit on one device), or, with ``CompressedTensorsConfig(dequantize=True)``, decompressed
while loading into a plain model that offloads like any other (:func:`check_placement`).

Only the methods this library has been checked with are accepted (:data:`SUPPORTED_METHODS`); any other
is refused before anything is downloaded or read, naming the method and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import Advice, UnsupportedQuantizationError, summarize
from ..load.conversions import Conversion
from ..model.tensors import model_tensors
from ..plan.devices import Device
from ..storage.checkpoint import TensorInfo
from ..storage.weights_map import flatten_subclass

__all__ = ["SUPPORTED_METHODS", "check_placement", "make_quantizer", "quantization_method", "quantized_sizes"]

#: ``quant_method`` values loaded here exactly as ``from_pretrained`` loads them, and why each is safe.
SUPPORTED_METHODS = {
    "fp8": "fine-grained fp8 (dequantized while loading where the hardware has no fp8, as transformers does)",
    "torchao": "torchao (pre-quantized checkpoints, or quantization_config=TorchAoConfig(...) while loading)",
    "compressed-tensors": "compressed-tensors (its package installed; offloaded only when decompressed while "
                          "loading: quantization_config=CompressedTensorsConfig(dequantize=True))",
}


def quantization_method(config: Any) -> str | None:
    """The ``quant_method`` of a quantization config (a dict or a transformers config object), or None."""
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, Mapping) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    return str(method) if method is not None else "unknown"


def _refuse(method: str, where: str, name: str) -> UnsupportedQuantizationError:
    supported = "; ".join(f"{m!r}: {why}" for m, why in SUPPORTED_METHODS.items())
    return UnsupportedQuantizationError(
        f"{name!r} is quantized with {method!r} ({where}), which hf_bigmodel does not load: a wrong load would "
        f"compute silently wrong outputs, so nothing was loaded. Supported: {supported}. Load this model with "
        "transformers' from_pretrained(device_map=...), or use a non-quantized checkpoint (and pass "
        "quantization_config=TorchAoConfig(...) to quantize it while loading).",
        method=method,
    )


def make_quantizer(config: Any, requested: Any, name: str) -> Any:
    """transformers' ``HfQuantizer`` for ``config`` (pre-quantized) and/or ``requested`` (quantize on load).

    Returns None when neither asks for quantization. Raises :class:`UnsupportedQuantizationError` for a
    method outside :data:`SUPPORTED_METHODS`, before anything is read. ``config`` gets its
    ``quantization_config`` set as ``from_pretrained`` sets it.
    """
    stored = getattr(config, "quantization_config", None)
    if stored is None and hasattr(config, "get_text_config"):
        stored = getattr(config.get_text_config(decoder=True), "quantization_config", None)
    for value, where in ((stored, "its config.json quantization_config"), (requested, "quantization_config=")):
        method = quantization_method(value)
        if method is not None and method not in SUPPORTED_METHODS:
            raise _refuse(method, where, name)
    if stored is None and requested is None:
        return None
    from transformers.quantizers.auto import get_hf_quantizer

    try:
        quantizer, _, _ = get_hf_quantizer(config, requested, None, True, {})
    except ImportError as err:  # the method's package is not installed here
        method = quantization_method(requested if requested is not None else stored)
        raise UnsupportedQuantizationError(
            f"{name!r} is quantized with {method!r}, whose package is not installed here ({err}). Nothing was "
            f"loaded. Install it (pip install 'hf_bigmodel[quantization]' installs torchao, accelerate and "
            "compressed-tensors).", method=method,
        ) from err
    return quantizer


def check_placement(quantizer: Any, device_map: Mapping[str, Device], name: str) -> None:
    """Refuse, before anything is read, a device map the quantized modules cannot run under.

    compressed-tensors' compressed modules (``dequantize=False``, its default) decompress the whole model in
    place on the first forward, moving weights with compressed-tensors' own offloading: that works for a
    model on one device and fails (after loading) on weights split across devices or streamed from disk.
    """
    if quantizer is None or quantization_method(quantizer.quantization_config) != "compressed-tensors":
        return
    devices = sorted({str(d) for d in device_map.values()})
    if getattr(quantizer.quantization_config, "dequantize", False) or (len(devices) == 1 and devices != ["disk"]):
        return
    raise UnsupportedQuantizationError(
        f"{name!r} is a compressed-tensors checkpoint loaded compressed, and the device map spreads it over "
        f"{summarize(devices)}: compressed-tensors decompresses the whole model in place on its first forward, "
        "through its own offloading, which cannot move weights hf_bigmodel streams or splits across devices "
        "(it fails on the first forward). Nothing was loaded.",
        method="compressed-tensors",
        advice=[Advice("Pass {} to decompress while loading (a plain model, offloaded like any other),",
                       "quantization_config", "CompressedTensorsConfig(dequantize=True)"),
                Advice("or give the whole model one device with {}.", "device_map", "'cpu'")],
    )


def quantized_sizes(model: nn.Module, quantizer: Any, conversions: Sequence[Conversion],
                    infos: Mapping[str, TensorInfo]) -> dict[str, int]:
    """Bytes each quantized weight takes once loaded, where its placeholder's dtype and shape do not say.

    A pre-quantized weight made from checkpoint tensors (torchao's ``weight_qdata`` and ``weight_scale``...)
    takes what they take (their headers); a weight quantized while loading takes what quantizing a meta
    tensor of its shape makes (torchao: the exact bytes, scales included), else transformers' estimate
    (``param_element_size``). Dequantized weights (fp8 on a machine without fp8) take their dtype's bytes.
    """
    if quantizer is None or getattr(quantizer.quantization_config, "dequantize", False):
        return {}
    made_from = {conv.targets[0]: conv.sources for conv in conversions if len(conv.targets) == 1}
    sizes: dict[str, int] = {}
    measured: dict[tuple[tuple[int, ...], torch.dtype], int | None] = {}
    for name, slot in model_tensors(model).items():
        if not quantizer.param_needs_quantization(model, name):
            continue
        if quantizer.pre_quantized:
            if name in made_from:
                sizes[name] = sum(math.prod(infos[k].shape) * infos[k].dtype.itemsize for k in made_from[name])
            continue
        tensor = slot.tensor
        key = (tuple(tensor.shape), tensor.dtype)
        if key not in measured:
            measured[key] = _meta_quantized_bytes(quantizer, tensor)
        size = measured[key]
        sizes[name] = size if size is not None else int(tensor.numel() * quantizer.param_element_size(model, name,
                                                                                                       tensor))
    return sizes


def _meta_quantized_bytes(quantizer: Any, tensor: torch.Tensor) -> int | None:
    """The bytes torchao's quantization of a linear weight like ``tensor`` holds, found on the meta device."""
    if quantization_method(quantizer.quantization_config) != "torchao" or tensor.ndim != 2:
        return None
    from torchao.quantization import FqnToConfig, quantize_

    config = quantizer.quantization_config.get_apply_tensor_subclass()
    if isinstance(config, FqnToConfig):  # per-module configs: transformers' estimate
        return None
    linear = nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta", dtype=tensor.dtype)
    try:
        quantize_(linear, config)
    except Exception:  # noqa: BLE001  (a method that cannot run on meta tensors: transformers' estimate)
        return None
    parts = flatten_subclass(linear.weight)
    return None if parts is None else sum(t.numel() * t.element_size() for t in parts[0].values())
