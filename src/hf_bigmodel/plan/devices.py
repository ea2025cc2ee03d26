"""Devices: one normal form for the names users write, and the memory each device offers.

A device-map value is normalised to an ``int`` (a CUDA index), ``"cpu"``, ``"disk"``, ``"mps"`` or
``"<type>:<index>"`` for other accelerators, exactly the values accelerate puts in ``hf_device_map``.
"""

from __future__ import annotations

import torch

from ..errors import DeviceMapError

__all__ = [
    "Device",
    "normalize_device",
    "torch_device",
    "is_offload_target",
    "device_rank",
    "is_present",
    "local_devices",
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






def is_present(device: Device) -> bool:
    """Whether this machine has ``device`` (``"cpu"`` and ``"disk"`` always)."""
    if isinstance(device, int):
        return torch.cuda.is_available() and device < torch.cuda.device_count()
    if device in ("cpu", "disk"):
        return True
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    kind, _, index = device.partition(":")
    module = getattr(torch, kind, None)
    return bool(module is not None and module.is_available() and int(index or 0) < module.device_count())


def local_devices() -> list[Device]:
    """The devices of this machine that compute: GPUs by index, mps, then the CPU."""
    devices: list[Device] = []
    if torch.cuda.is_available():
        devices.extend(range(torch.cuda.device_count()))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


