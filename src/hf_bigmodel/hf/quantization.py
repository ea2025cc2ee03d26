"""Quantized models through transformers' own quantizers (``HfQuantizer``), as ``from_pretrained`` runs them.

A checkpoint whose config has a ``quantization_config`` (pre-quantized), or a call with
``quantization_config=`` (quantize while loading), gets transformers' quantizer for that method, and the
load runs its steps in ``from_pretrained``'s order: ``validate_environment`` and ``update_dtype`` before
anything is read, ``preprocess_model`` on the empty model (quantized module classes), its weight
conversions and quantize-on-load operations while shards stream (:mod:`hf_bigmodel.hf.conversions`), and
``postprocess_model`` at the end. Quantized values stay quantized wherever they are kept.

Only the methods this library has been checked with are accepted (:data:`SUPPORTED_METHODS`); any other
is refused before anything is downloaded or read, naming the method and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedQuantizationError

__all__ = ["SUPPORTED_METHODS", "make_quantizer", "quantization_method"]

#: ``quant_method`` values loaded here exactly as ``from_pretrained`` loads them, and why each is safe.
SUPPORTED_METHODS = {
    "fp8": "fine-grained fp8 (dequantized while loading where the hardware has no fp8, as transformers does)",
    "torchao": "torchao (pre-quantized checkpoints, or quantization_config=TorchAoConfig(...) while loading)",
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

    quantizer, _, _ = get_hf_quantizer(config, requested, None, True, {})
    return quantizer
