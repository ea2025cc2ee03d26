"""The memory each device offers: budgets parsed from ``max_memory``, or measured on this machine."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..env import text as env_text
from ..errors import DeviceMapError, InvalidMaxMemoryError
from ..model.sizes import parse_size
from .devices import Device, device_rank, is_present, local_devices, normalize_device

__all__ = ["available_memory", "get_max_memory"]


#: Limits at or above this are "no limit" (cgroup v1 writes 2**63 rounded down to a page).
_NO_LIMIT = 1 << 60


def _cgroup_available(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the memory cgroups of this process still allow: the least ``limit - usage`` over its own cgroup and
    every ancestor (a parent's limit binds its children too); None when none sets a limit.

    The process's cgroup comes from ``/proc/self/cgroup`` (v2's ``0::/path``, v1's ``memory`` line), looked up
    under ``root``: a process in a child cgroup (a job runner's, a container without a cgroup namespace) is
    limited by that child, not by the root's files. A path the mount does not show (a container that mounts
    only its own cgroup) ends at the mount's own files, which are then that cgroup's.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    places: list[tuple[Path, str, str, str]] = []
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:
            unified = root if (root / "cgroup.controllers").exists() else root / "unified"
            places.append((unified, path, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            places.append((root / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    least: int | None = None
    for base, path, limit_name, usage_name in places:
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            folder = base.joinpath(*parts[:depth])
            try:
                raw = (folder / limit_name).read_text().strip()
                if raw == "max" or int(raw) >= _NO_LIMIT:
                    continue
                left = max(int(raw) - int((folder / usage_name).read_text().strip()), 0)
            except (OSError, ValueError):
                continue
            least = left if least is None else min(least, left)
    return least


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
        budgets: dict[Device, int] = {d: available_memory(d) for d in local_devices()}
        cap = env_text("HF_BIGMODEL_MAX_CPU_MEMORY")
        if cap is not None:
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
        if check_devices and not is_present(device):
            raise InvalidMaxMemoryError(
                f"A memory budget is given for {key!r}, but this machine has no such device "
                f"(found: {', '.join(map(repr, local_devices()))}). Remove that entry.",
                key=key,
                value=value,
            )
        if device in parsed:
            raise InvalidMaxMemoryError(f"max_memory gives {key!r} twice (as {device!r}).", key=key, value=value)
        parsed[device] = size
    return dict(sorted(parsed.items(), key=lambda kv: device_rank(kv[0])))

