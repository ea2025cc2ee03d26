"""Byte sizes: parsing and formatting budgets, and measuring modules without touching their data.

Everything here works on meta tensors, so a model of any size can be measured for free.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from .dtypes import FLOAT8, resolve_dtype
from .tensors import distinct_tensors, model_tensors, tie_groups

__all__ = [
    "parse_size",
    "is_bits",
    "format_size",
    "dtype_byte_size",
    "compute_module_sizes",
    "find_tied_parameters",
]

_DECIMAL = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}
_BINARY = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40, "PI": 2**50}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | float | str, *, what: str = "size") -> int:
    """Turn ``1024``, ``"500MB"``, ``"10GiB"`` or ``"1.5 GiB"`` into a number of bytes.

    Decimal units are powers of ten (``"10GB"`` is 10**9 bytes), binary units powers of two
    (``"10GiB"`` is 10 * 2**30). Like accelerate, ``"Gb"``/``"Mb"``/``"Kb"`` (lower-case b) are bits.

    >>> parse_size("1.5GiB")
    1610612736
    >>> parse_size("500MB")
    500000000

    Raises ``ValueError`` naming ``what`` and the value for anything else (negative, NaN, ``"lots"``).
    """
    if isinstance(value, bool):
        raise ValueError(f"Invalid {what}: {value!r} is a bool, not a byte count.")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"Invalid {what}: {value!r} is not a finite number of bytes.")
        if value < 0:
            raise ValueError(f"Invalid {what}: {value!r} is negative; give a byte count >= 0 such as 2**30 or '1GiB'.")
        return _bounded(value, value, what)
    if not isinstance(value, str):
        raise ValueError(f"Invalid {what}: expected bytes (int) or a string like '10GiB', got {type(value).__name__}.")
    match = _SIZE_RE.match(value)
    if match is None:
        if value.strip().startswith("-"):
            raise ValueError(f"Invalid {what}: {value!r} is negative; give a size >= 0 such as '1GiB'.")
        raise ValueError(
            f"Invalid {what}: cannot read {value!r} as a size. Use bytes (1073741824) or a number with a unit: "
            "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)."
        )
    number, unit = float(match.group(1)), match.group(2)
    bits = _is_bit_unit(unit)
    key = unit.upper()
    if key.endswith("B"):
        key = key[:-1]
    if key in _BINARY:
        factor = _BINARY[key]
    elif key in _DECIMAL:
        factor = _DECIMAL[key]
    else:
        raise ValueError(
            f"Invalid {what}: unknown unit {unit!r} in {value!r}. "
            "Use B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2)."
        )
    return _bounded(number * factor / (8 if bits else 1), value, what)


def _short(value: object) -> str:
    if isinstance(value, int) and value > 10**30:  # repr of a 5,000-digit integer raises ValueError
        return f"an integer of {value.bit_length()} bits"
    return repr(value)[:48]


#: No device holds more bytes than this (16 EiB); a larger "size" is a typo or an attempt at infinity.
MAX_SIZE = 2**64


def _bounded(size: float, value: object, what: str) -> int:
    if size > MAX_SIZE or (isinstance(size, float) and not math.isfinite(size)):
        raise ValueError(
            f"Invalid {what}: {_short(value)} is more bytes than any device holds (over 16 EiB). Give the real "
            "size, or leave the device out of max_memory to use what it has."
        )
    return int(size)


def _is_bit_unit(unit: str) -> bool:
    return len(unit) == 2 and unit[1] == "b" and unit[0].upper() in "KMGT"


def is_bits(value: int | float | str) -> bool:
    """Whether :func:`parse_size` reads ``value`` in bits (``"10Gb"``, ``"10gb"``), accelerate's convention.

    >>> is_bits("10gb"), is_bits("10GB"), is_bits(1024)
    (True, False, False)
    """
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    return match is not None and _is_bit_unit(match.group(2))


def format_size(num_bytes: int | float) -> str:
    """``1610612736`` -> ``"1.50 GiB"``: binary units, as memory is measured.

    >>> format_size(1610612736)
    '1.50 GiB'
    """
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def dtype_byte_size(dtype: torch.dtype) -> float:
    """Bytes per element of ``dtype`` (fractional for sub-byte types such as ``torch.bool`` bit-packing)."""
    if dtype == torch.bool:
        return 1.0
    return float(dtype.itemsize)


def _tensor_size(tensor: torch.Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and tensor.is_floating_point() and tensor.dtype not in FLOAT8:  # fp8 is never cast
        return int(tensor.numel() * dtype_byte_size(dtype))
    return int(tensor.numel() * dtype_byte_size(tensor.dtype))


def compute_module_sizes(
    model: nn.Module,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    buffers_only: bool = False,
    tensor_sizes: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Bytes held by every submodule (and by the model, under ``""``), parameters and buffers counted.

    ``dtype`` is the dtype floating-point tensors will be cast to (float8 ones keep theirs);
    ``special_dtypes`` overrides it per tensor name (e.g. modules kept in float32), and ``tensor_sizes``
    gives the bytes of tensors whose loaded form is not their dtype times their shape (quantized weights).
    A tied tensor is counted once, under its first name.

    >>> sizes = compute_module_sizes(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), dtype=torch.float16)
    >>> sizes[""], sizes["0"], sizes["1.weight"]
    (60, 40, 16)
    """

    target = resolve_dtype(dtype) if dtype is not None else None
    special = {k: resolve_dtype(v) for k, v in (special_dtypes or {}).items()}
    sizes: dict[str, int] = defaultdict(int)
    index = model_tensors(model, persistent_only=False)
    if buffers_only:
        index = {name: slot for name, slot in index.items() if slot.is_buffer}
    for name, tensor in distinct_tensors(index).items():
        size = tensor_sizes[name] if tensor_sizes and name in tensor_sizes else \
            _tensor_size(tensor, special.get(name, target))
        parts = name.split(".")
        sizes[""] += size
        for i in range(1, len(parts) + 1):
            sizes[".".join(parts[:i])] += size
    return dict(sizes)


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor, e.g. ``[["lm_head.weight", "wte.weight"]]``.

    Works on meta models: ties are found by identity of the ``Parameter`` objects.

    >>> model = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    >>> model["head"].weight = model["embed"].weight
    >>> find_tied_parameters(model)
    [['embed.weight', 'head.weight']]
    """
    return tie_groups(model_tensors(model, persistent_only=False))
