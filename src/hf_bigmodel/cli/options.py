"""Reading the options the commands share: ``--max-memory DEVICE=SIZE`` and ``--dtype``.

Mistakes raise :class:`~hf_bigmodel.cli.parser.UsageError` (exit status 2) naming the option and the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.dtypes import resolve_dtype
from ..model.sizes import parse_size
from ..plan.devices import Device, device_rank, normalize_device
from .parser import UsageError

__all__ = ["parse_dtype", "parse_max_memory", "typed_max_memory", "usage_error"]


def usage_error(message: str) -> UsageError:
    """The exception for a command-line mistake; ``main`` prints it as one line and exits with 2."""
    return UsageError(message)


def _split_max_memory(values: Sequence[str]) -> dict[str, str]:
    """``["cpu=2GiB", "0=10GiB,1=10GiB"]`` -> ``{"cpu": "2GiB", "0": "10GiB", "1": "10GiB"}`` as typed."""
    raw: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, size = item.partition("=")
            key, size = key.strip(), size.strip()
            if not sep or not key or not size:
                raise usage_error(
                    f"argument --max-memory: {item!r} is not DEVICE=SIZE; write e.g. 'cpu=2GiB' or '0=10GiB' "
                    "(0 is GPU 0)."
                )
            if key in raw:
                raise usage_error(f"argument --max-memory: {key!r} is given twice ({raw[key]!r} and {size!r}).")
            raw[key] = size
    return raw


def parse_max_memory(values: Sequence[str]) -> dict[Device, int] | None:
    """``["cpu=2GiB", "0=10GiB,1=10GiB"]`` -> ``{0: 10737418240, 1: ..., "cpu": 2147483648}``; ``[]`` -> ``None``.

    Devices are not checked against this machine (planning for a GPU you do not have is allowed;
    loading checks them). Raises :class:`UsageError` for a missing ``=``, a repeated device,
    an unknown device or an unreadable size.

    >>> parse_max_memory(["cpu=1GiB", "0=2GiB"])
    {0: 2147483648, 'cpu': 1073741824}
    """
    raw = _split_max_memory(values)
    if not raw:
        return None
    parsed: dict[Device, int] = {}
    typed: dict[Device, str] = {}
    for key, size in raw.items():
        try:
            device = normalize_device(key, what="device")
            nbytes = parse_size(size, what=f"size for {key!r}")
        except ValueError as err:  # DeviceMapError is a ValueError too
            raise usage_error(f"argument --max-memory: {err}") from None
        if device in typed:
            raise usage_error(f"argument --max-memory: {typed[device]!r} and {key!r} name the same device; give one.")
        parsed[device], typed[device] = nbytes, key
    return dict(sorted(parsed.items(), key=lambda kv: device_rank(kv[0])))


def typed_max_memory(values: Sequence[str]) -> dict[Device, str]:
    """The sizes as typed, by device: ``["cuda:0=10gb"]`` -> ``{0: "10gb"}`` (call after :func:`parse_max_memory`).

    >>> typed_max_memory(["cuda:0=10gb,cpu=2GiB"])
    {0: '10gb', 'cpu': '2GiB'}
    """
    return {normalize_device(key): size for key, size in _split_max_memory(values).items()}


#: What ``--dtype`` accepts: a cast to any of these keeps the weights' values (up to rounding).
LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def parse_dtype(text: str | None) -> torch.dtype | str | None:
    """``"fp16"`` -> ``torch.float16``; ``"auto"`` stays ``"auto"``; ``None`` stays ``None``.

    >>> parse_dtype("bf16")
    torch.bfloat16
    """
    if text is None:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        dtype = resolve_dtype(text)
    except ValueError:
        dtype = None
    if dtype not in LOAD_DTYPES:
        raise usage_error(
            f"argument --dtype: {text!r} is not a dtype weights can be loaded in; use float16 (fp16), bfloat16 "
            "(bf16), float32 (fp32), float64, or auto (the checkpoint's). Integer and 8-bit float weights need "
            "a quantizer's scales, which no plain cast applies."
        )
    return dtype
