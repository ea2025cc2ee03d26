"""Embeddings on disk first: a plan that spills to disk puts there the embeddings that read by row.

A plain ``nn.Embedding`` offloaded to disk reads only the rows of its batch's ids (dispatch gives it an
``EmbeddingRowsHook``): a decode step reads one row per sequence, a few KiB, where the planner's walk,
which fills the fastest devices in model order, keeps the input embedding (the model's first and often
one of its largest tensors: 125 MiB for a 32k vocabulary of width 2048 in bf16, 1 GiB for 128k x 4096)
on the GPU or in RAM. Once some weights go to disk anyway, moving the embedding there frees that room
for decoder layers that would otherwise be read from disk at every forward.

:func:`rows_on_disk` takes a strategy's plan and tries each such embedding, largest first, pinned to
disk: it keeps the move only when the weights planned on disk *besides* the pinned embeddings shrink
(the freed room took a later layer), so a plan never gets worse by bytes read per forward. It leaves
alone an embedding whose weight is tied (an output head multiplies by the whole matrix), read by
another module's forward without calling it, quantized, or inside a no-split block, and any plan that
puts nothing on disk. ``infer_auto_device_map`` itself keeps accelerate's plan; the ``device_map``
strategies (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) go through here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping

from torch import nn

from ..errors import DeviceMapError
from ..model.naming import is_within, join, lookup, parent
from ..model.reads import placed_with_others, row_readable
from ..model.sizes import format_size
from .devices import Device

__all__ = ["row_embeddings", "rows_on_disk"]

logger = logging.getLogger(__name__)

#: ``plan(pinned)``: the strategy's plan with those items pinned (raises DeviceMapError when they do not fit).
Planner = Callable[[Mapping[str, Device]], dict[str, Device]]


def row_embeddings(model: nn.Module, tensor_sizes: Mapping[str, int] | None = None) -> list[str]:
    """Names of the embeddings that read only their batch's rows when on disk (model order): plain
    ``nn.Embedding`` forwards whose weight is not tied, not read by another module's forward, not quantized."""
    excluded = placed_with_others(model) | set(tensor_sizes or ())  # quantized: their sizes are given
    found = []
    for name, module in model.named_modules():
        own = [join(name, leaf) for leaf, _ in module.named_parameters(recurse=False)]
        own += [join(name, leaf) for leaf, _ in module.named_buffers(recurse=False)]
        if own and row_readable(module, own) and own[0] not in excluded:
            found.append(name)
    return found


def _movable(model: nn.Module, name: str, device_map: Mapping[str, Device], no_split: set[str]) -> bool:
    """Not on disk yet, and no no-split module holds it (the planner can place it apart)."""
    if lookup(join(name, "weight"), device_map) in (None, "disk"):
        return False
    while name:
        name = parent(name)
        if type(model.get_submodule(name)).__name__ in no_split:
            return False
    return True


def rows_on_disk(model: nn.Module, plan: Planner, *, no_split: set[str], sizes: Mapping[str, int],
                 tensor_sizes: Mapping[str, int] | None = None) -> dict[str, Device]:
    """The strategy's plan (``plan({})``), with row-read embeddings moved to disk where that leaves fewer other
    bytes on disk (module docstring). ``sizes``: ``compute_module_sizes`` of the model as planned. Only
    the chosen plan's warnings are given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        best = plan({})
    kept = list(caught)
    candidates: list[str] = []
    if "disk" in best.values():
        candidates = [name for name in row_embeddings(model, tensor_sizes) if _movable(model, name, best, no_split)]
    pinned: dict[str, Device] = {}
    best_disk = _other_disk_bytes(best, sizes, pinned)
    for name in sorted(candidates, key=lambda n: -sizes.get(n, 0)):
        trial = {**pinned, name: "disk"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                candidate = plan(trial)
            except DeviceMapError:  # a disk budget too small for it: keep the embedding where it was
                continue
        disk = _other_disk_bytes(candidate, sizes, trial)
        if disk < best_disk:
            logger.info("Planned %s (%s) on disk, where it reads only its batch's rows: %s less of the other "
                        "weights on disk.", name, format_size(sizes.get(name, 0)), format_size(best_disk - disk))
            best, best_disk, pinned, kept = candidate, disk, trial, list(caught)
    for warning in kept:
        warnings.warn(warning.message, stacklevel=3)
    return best


def _other_disk_bytes(device_map: Mapping[str, Device], sizes: Mapping[str, int], pinned: Mapping[str, Device]) -> int:
    """Bytes ``device_map`` puts on disk, leaving out the pinned items (also inside an entry that holds them:
    ``{"model": "disk"}`` once every layer went to disk with the embedding)."""
    total = 0
    for key, device in device_map.items():
        if device == "disk" and not any(is_within(key, pin) for pin in pinned):
            total += sizes.get(key, 0) - sum(sizes.get(pin, 0) for pin in pinned if is_within(pin, key))
    return total

