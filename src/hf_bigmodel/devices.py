"""Devices: one normal form for the names users write, and the memory each device offers.

A device-map value is normalised to an ``int`` (a CUDA index), ``"cpu"``, ``"disk"``, ``"mps"`` or
``"<type>:<index>"`` for other accelerators, exactly the values accelerate puts in ``hf_device_map``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .errors import DeviceMapError, InvalidMaxMemoryError
from .sizes import parse_size

__all__ = [
    "Device",
    "normalize_device",
    "torch_device",
    "is_offload_target",
    "device_rank",
    "available_memory",
    "get_max_memory",
]

Device = int | str


def normalize_device(device: int | str | torch.device, *, what: str = "device") -> Device:
    """``torch.device("cuda:1")``, ``"cuda:1"``, ``"1"`` and ``1`` all become ``1``; ``"cpu"`` stays ``"cpu"``."""
    if isinstance(device, bool):
        raise DeviceMapError(f"Invalid {what}: {device!r}.")
    if isinstance(device, int):
        if device < 0:
            raise DeviceMapError(f"Invalid {what}: GPU index {device} is negative.")
        return device
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise DeviceMapError(f"Invalid {what}: {device!r} is not a device (use an int GPU index, 'cpu' or 'disk').")
    text = device.strip().lower()
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk", "mps", "meta"):
        if text == "meta":
            raise DeviceMapError(f"Invalid {what}: 'meta' holds no data; use a GPU index, 'cpu' or 'disk'.")
        return text
    if text == "cuda":
        return 0
    kind, _, index = text.partition(":")
    if kind == "cuda" and index.isdigit():
        return int(index)
    if kind in ("xpu", "npu", "mlu", "musa", "hpu") and (not index or index.isdigit()):
        return f"{kind}:{index or 0}"
    if kind == "mps" and index in ("", "0"):
        return "mps"
    raise DeviceMapError(
        f"Invalid {what}: {device!r} is not a device. Use a GPU index (0, 'cuda:1'), 'mps', 'cpu' or 'disk'."
    )


def torch_device(device: Device | torch.device) -> torch.device:
    """The ``torch.device`` that computes for a device-map value (``0`` -> ``cuda:0``)."""
    device = normalize_device(device)
    if device == "disk":
        raise DeviceMapError("'disk' stores weights; it cannot run a module. Use the execution device instead.")
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def is_offload_target(device: Device) -> bool:
    """``"cpu"`` and ``"disk"`` store weights for an accelerator; they are never the fast tier."""
    return device in ("cpu", "disk")


def device_rank(device: Device) -> tuple[int, int]:
    """Sort key: accelerators by index, then mps/others, then cpu, then disk."""
    if isinstance(device, int):
        return (0, device)
    if device == "cpu":
        return (2, 0)
    if device == "disk":
        return (3, 0)
    _, _, index = device.partition(":")
    return (1, int(index) if index.isdigit() else 0)


def _cgroup_available() -> int | None:
    """Bytes the memory cgroup of this process still allows, when it sets a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            if raw == "max":
                continue
            limit = int(raw)
            if limit >= 1 << 60:
                continue
            with open(usage_file) as f:
                usage = int(f.read().strip())
            return max(limit - usage, 0)
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: Device) -> int:
    """Free bytes on ``device`` right now (RAM honours a cgroup memory limit)."""
    if isinstance(device, int):
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device == "cpu":
        import psutil

        free = int(psutil.virtual_memory().available)
        cgroup = _cgroup_available()
        return min(free, cgroup) if cgroup is not None else free
    if device == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory())
    kind, _, index = device.partition(":")
    module = getattr(torch, kind, None)
    if module is not None and hasattr(module, "mem_get_info"):
        return int(module.mem_get_info(int(index or 0))[0])
    raise InvalidMaxMemoryError(f"Cannot measure free memory on {device!r}; give max_memory for it explicitly.")


def _present(device: Device) -> bool:
    if isinstance(device, int):
        return torch.cuda.is_available() and device < torch.cuda.device_count()
    if device in ("cpu", "disk"):
        return True
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    kind, _, index = device.partition(":")
    module = getattr(torch, kind, None)
    return bool(module is not None and module.is_available() and int(index or 0) < module.device_count())


def _local_devices() -> list[Device]:
    devices: list[Device] = []
    if torch.cuda.is_available():
        devices.extend(range(torch.cuda.device_count()))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def get_max_memory(
    max_memory: Mapping[int | str, int | str] | None = None, *, check_devices: bool = True
) -> dict[Device, int]:
    """Budgets in bytes per device, fastest first.

    ``None`` measures what is free on every local device (GPUs, mps, RAM under any cgroup limit).
    Otherwise every key is normalised (``"cuda:1"`` -> ``1``) and every value parsed (``"10GiB"``); a
    negative or unreadable value, an unknown device or (with ``check_devices``) one this machine lacks
    raises :class:`InvalidMaxMemoryError` naming it. ``HF_BIGMODEL_MAX_CPU_MEMORY`` caps the default RAM.

    >>> get_max_memory({"cuda:1": "10GiB", "cpu": "500MB"}, check_devices=False)
    {1: 10737418240, 'cpu': 500000000}
    """
    if max_memory is None:
        budgets: dict[Device, int] = {d: available_memory(d) for d in _local_devices()}
        cap = os.environ.get("HF_BIGMODEL_MAX_CPU_MEMORY")
        if cap:
            budgets["cpu"] = min(budgets["cpu"], parse_size(cap, what="HF_BIGMODEL_MAX_CPU_MEMORY"))
        return budgets
    if not isinstance(max_memory, Mapping):
        raise InvalidMaxMemoryError(
            f"max_memory must be a dict such as {{0: '10GiB', 'cpu': '30GiB'}}, got {type(max_memory).__name__}."
        )
    parsed: dict[Device, int] = {}
    for key, value in max_memory.items():
        try:
            device = normalize_device(key, what="max_memory key")
        except DeviceMapError as err:
            raise InvalidMaxMemoryError(str(err), key=key, value=value) from None
        try:
            size = parse_size(value, what=f"max_memory[{key!r}]")
        except ValueError as err:
            raise InvalidMaxMemoryError(str(err), key=key, value=value) from None
        if check_devices and not _present(device):
            raise InvalidMaxMemoryError(
                f"max_memory names {key!r}, but this machine has no such device "
                f"(found: {', '.join(map(repr, _local_devices()))}). Remove that entry.",
                key=key,
                value=value,
            )
        if device in parsed:
            raise InvalidMaxMemoryError(f"max_memory gives {key!r} twice (as {device!r}).", key=key, value=value)
        parsed[device] = size
    return dict(sorted(parsed.items(), key=lambda kv: device_rank(kv[0])))
