"""Resolving user-spelled dtypes and deciding which tensors are cast."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import DtypeError, summarize

__all__ = ["FLOAT8", "check_cast", "resolve_dtype", "target_dtype", "matches_module"]

#: The 8-bit float dtypes this torch has. Their values mean something only with the scales stored beside
#: them, so they are never cast to or from another dtype implicitly.
FLOAT8 = frozenset(getattr(torch, name) for name in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name))

_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``, ``"fp16"``, ``"torch.float16"`` or ``torch.float16`` -> ``torch.float16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _ALIASES:
            return _ALIASES[key]
    raise ValueError(
        f"Unknown dtype {dtype!r}: use a torch.dtype or one of {', '.join(sorted(_ALIASES))}."
    )


def matches_module(name: str, patterns: Sequence[str]) -> bool:
    """True when tensor ``name`` lies in a module named by one of ``patterns``.

    A pattern matches whole dotted components anywhere in the name, so ``"wo"`` matches
    ``"encoder.block.0.layer.1.DenseReluDense.wo.weight"`` and ``"lm_head"`` matches ``"lm_head.weight"``,
    but ``"wo"`` does not match ``"two.weight"``.
    """
    if not patterns:
        return False
    padded = f".{name}."
    return any(f".{p.strip('.')}." in padded for p in patterns)


def target_dtype(
    name: str,
    tensor_dtype: torch.dtype,
    dtype: torch.dtype | None,
    keep_in_fp32_modules: Sequence[str] = (),
) -> torch.dtype:
    """The dtype a checkpoint tensor ends up in.

    Only floating-point tensors are cast, and only when ``dtype`` is given; tensors of modules named in
    ``keep_in_fp32_modules`` then go to float32 instead.
    """
    if not tensor_dtype.is_floating_point or dtype is None or tensor_dtype in FLOAT8:
        return tensor_dtype
    if keep_in_fp32_modules and matches_module(name, keep_in_fp32_modules):
        return torch.float32
    return dtype


def check_cast(dtype: torch.dtype, tensors: Mapping[str, torch.dtype], *, source: str = "the checkpoint") -> None:
    """Refuse a ``dtype`` that cannot hold floating-point weights (``int8``, ``uint8``, ``bool``, complex...).

    ``dtype`` applies to floating-point tensors only (:func:`target_dtype`); ``tensors`` maps names to their
    dtype in ``source``. Casting floats to an integer type would truncate every weight to a few values
    and fail later inside a forward, so it raises :class:`~hf_bigmodel.errors.DtypeError` now, naming them.

    >>> check_cast(torch.bfloat16, {"w": torch.float32})
    >>> check_cast(torch.int8, {"w": torch.float32})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_bigmodel.errors.DtypeError: dtype=torch.int8 cannot hold the floating-point weights of the checkpoint ...
    """
    if dtype.is_floating_point:
        return
    floats = [name for name, kind in tensors.items() if kind.is_floating_point and kind not in FLOAT8]
    if floats:
        raise DtypeError(
            f"dtype={dtype} cannot hold the floating-point weights of {source} ({len(floats)} tensor(s): "
            f"{summarize(floats, 5)}). The dtype option sets the floating-point type the weights are loaded "
            "in: pass torch.float16, torch.bfloat16 or torch.float32 (quantising to integers needs a quantiser).",
            dtype=dtype, names=floats,
        )
