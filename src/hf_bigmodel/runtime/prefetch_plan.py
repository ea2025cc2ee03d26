"""What prefetching will do, planned (pure): which offloaded weights are fetched together, and the memory
the prefetch window will hold for a device map.

Hooks (at run time) or modules (at plan time) are *units*: ``(device-map entry, module, bytes)``. An
entry over :data:`GROUP_BYTES` is cut into blocks (its children, e.g. ``{"": "disk"}`` into layers);
consecutive units of one block form a group, and small neighbouring groups of one entry are merged up
to :data:`MERGE_BYTES`. The :class:`~hf_bigmodel.runtime.prefetch.Prefetcher` fetches those groups, within
its window (:mod:`.prefetch_window`); :func:`plan_prefetch` tells, from a device map and a meta model,
the memory that will take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..model.naming import is_within, join, owner, parent
from ..model.reads import row_readable
from ..plan.devices import Device, torch_device
from ..plan.placement import Placement
from ..storage.direct_io import ALIGNMENT
from .prefetch_window import Window, prefetch_memory, prefetch_window

__all__ = ["GROUP_BYTES", "MERGE_BYTES", "PlannedPrefetch", "cut_groups", "find_blocks", "plan_prefetch",
           "prefetch_headroom", "rounded_buffer"]

#: A device-map entry (or module) holding more than this is cut into its children (``{"": "disk"}``
#: into layers); a decoder layer below it stays whole, so its inner execution order never matters.
GROUP_BYTES = 128 * 2**20
#: Consecutive small blocks of one entry (norms, small layers) are fetched together up to this size.
MERGE_BYTES = 32 * 2**20
#: Host buffers are sized in multiples of this (a huge page): groups of one shape share buffers.
ROUND = 2 * 2**20


def rounded_buffer(nbytes: int) -> int:
    """The size of the buffer a group of ``nbytes`` is given: a multiple of 2 MiB, or of a page when smaller.

    >>> rounded_buffer(5000), rounded_buffer(3 * 2**20 + 1) // 2**20
    (8192, 4)
    """
    unit = ROUND if nbytes >= ROUND else ALIGNMENT
    return -(-nbytes // unit) * unit


@dataclass(frozen=True)
class PlannedPrefetch:
    """The memory prefetching will hold while a dispatched model runs: at most ``total`` bytes on ``device``.

    ``device`` is the main device: host RAM on a CPU run (the buffers disk weights are read into), the
    GPU on a CUDA run (the groups read ahead). ``groups`` is how many groups a forward fetches,
    ``largest`` the modules of the largest (``largest_bytes``), ``window`` what is read ahead.
    """

    device: Device
    window: Window
    window_text: str
    groups: int
    largest: tuple[str, ...]
    largest_bytes: int
    total: int


def plan_prefetch(
    model: nn.Module,
    device_map: Mapping[str, Device],
    *,
    sizes: Mapping[str, int],
    prefetch: int | str | None = None,
    offload_buffers: bool = False,
) -> PlannedPrefetch | None:
    """What prefetching will hold for ``model`` (meta is fine) dispatched with ``device_map``, planned.

    ``sizes`` is :func:`~hf_bigmodel.model.sizes.compute_module_sizes` in the load dtype; ``prefetch`` and
    ``offload_buffers`` are dispatch's arguments. The groups are the ones the
    :class:`~hf_bigmodel.runtime.prefetch.Prefetcher` cuts in model order, and the total is its own bound
    (:func:`~hf_bigmodel.runtime.prefetch_window.prefetch_memory`) over their buffer sizes. On a CPU run
    each disk tensor is read at aligned offsets, so its room is counted rounded up to
    :data:`~hf_bigmodel.storage.direct_io.ALIGNMENT` plus a page: the total is an upper bound for a
    checkpoint stored in the load dtype (one stored in another dtype also needs room for the cast copy).
    On a CUDA run the groups' own bytes are counted, on the GPU. ``None`` when nothing would be
    prefetched (off, nothing streamed, a main device other than CPU or CUDA).

    >>> from hf_bigmodel.model.sizes import compute_module_sizes
    >>> model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    >>> planned = plan_prefetch(model, {"0": 0, "1": "disk"}, sizes=compute_module_sizes(model), prefetch=2)
    >>> planned.device, planned.groups, planned.largest, planned.largest_bytes
    (0, 1, ('1',), 263168)
    """
    window = prefetch_window(prefetch)
    placement = Placement.of(device_map)
    if window.off or torch_device(placement.main).type not in ("cpu", "cuda"):
        return None
    on_cpu = placement.main == "cpu"
    units: list[tuple[str, str, int]] = []
    room: list[int] = []  # what each unit takes in a buffer (CPU) or on the device (CUDA)
    holders: dict[int, int] = {}  # id of a parameter -> modules holding it (a tied one: several)
    for _, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)] = holders.get(id(param), 0) + 1
    for name, module in model.named_modules():
        key = owner(name, device_map)
        if key is None or not placement.is_offloaded(device_map[key]):
            continue
        leaves = [leaf for leaf, _ in module.named_parameters(recurse=False)]
        if device_map[key] == "disk" and row_readable(module, leaves) and holders[id(module.weight)] == 1:
            continue  # an embedding on disk reads its batch's rows itself, in no group (a tied one: whole)
        leaves += [leaf for leaf, _ in module.named_buffers(recurse=False)] if offload_buffers else []
        found = [sizes[join(name, leaf)] for leaf in leaves if join(name, leaf) in sizes]  # tied: counted once
        if sum(found):
            units.append((key, name, sum(found)))
            room.append(sum(-(-n // ALIGNMENT) * ALIGNMENT + ALIGNMENT for n in found) if on_cpu else sum(found))
    if not units:
        return None
    groups = cut_groups([(key, block, size) for (key, _, size), block in zip(units, find_blocks(units))])
    held = [sum(room[i] for i in members) for members in groups]
    buffers = [rounded_buffer(n) for n in held] if on_cpu else held  # host buffers are rounded up
    largest = max(range(len(groups)), key=lambda g: buffers[g])
    return PlannedPrefetch(placement.main, window, window.describe(buffers), len(groups),
                           tuple(units[i][1] for i in groups[largest]), buffers[largest],
                           prefetch_memory(buffers, window))


def prefetch_headroom(prefetch: int | str | None = None, *, offload_buffers: bool = False
                      ) -> Callable[[nn.Module, Mapping[str, Device], Mapping[str, int]], int]:
    """``resolve_device_map``'s ``main_headroom`` for dispatch with ``prefetch``: what the prefetcher holds on
    the main device for a planned device map (:func:`plan_prefetch`'s total). The planner counts it on an
    accelerator only (:mod:`hf_bigmodel.plan.headroom`)."""

    def headroom(model: nn.Module, device_map: Mapping[str, Device], sizes: Mapping[str, int]) -> int:
        planned = plan_prefetch(model, device_map, sizes=sizes, prefetch=prefetch, offload_buffers=offload_buffers)
        return 0 if planned is None else planned.total

    return headroom


def find_blocks(units: Sequence[tuple[str, str, int]]) -> list[str]:
    """For each ``(device-map entry, module, bytes)`` unit: the largest module around it, inside its entry,
    holding <= GROUP_BYTES.

    A decoder layer mapped as one entry stays one block; ``{"model.layers": "disk"}`` or ``{"": "disk"}``
    is cut at the layers (or deeper, until a block fits), never in the middle of a small module.
    """
    totals: dict[tuple[str, str], int] = {}
    for key, prefix, size in units:
        if not is_within(prefix, key):
            continue
        probe = prefix
        while True:
            totals[key, probe] = totals.get((key, probe), 0) + size
            if probe == key:
                break
            probe = parent(probe)
    blocks: list[str] = []
    for key, prefix, _ in units:
        block = key
        if is_within(prefix, key):
            depth = key.count(".") + 1 if key else 0
            parts = prefix.split(".") if prefix else []
            while block != prefix and totals[key, block] > GROUP_BYTES:
                depth += 1
                block = ".".join(parts[:depth])
        blocks.append(block)
    return blocks


def cut_groups(units: Sequence[tuple[str, str, int]]) -> list[list[int]]:
    """``(entry, block, bytes)`` units in fetch order -> groups of their indices: consecutive units of one
    block, then consecutive small groups of one entry merged up to MERGE_BYTES."""
    runs: list[list[int]] = []
    for i, (_, block, _) in enumerate(units):
        if runs and units[runs[-1][-1]][1] == block:
            runs[-1].append(i)
        else:
            runs.append([i])
    merged: list[list[int]] = []
    size = 0
    for run in runs:
        run_size = sum(units[i][2] for i in run)
        if merged and units[merged[-1][0]][0] == units[run[0]][0] and size + run_size <= MERGE_BYTES:
            merged[-1].extend(run)
            size += run_size
        else:
            merged.append(list(run))
            size = run_size
    return merged
