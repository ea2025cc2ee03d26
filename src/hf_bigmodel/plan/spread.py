"""Disk blocks spread among the RAM ones: interchangeable blocks trade places so that reads never pause.

The planner's walk fills RAM in model order: the first decoder layers stay in RAM and the later ones
are read from disk at every forward. While the model computes from RAM (the first layers, after the
output head, the sampling and the embedding rows of the step before), the prefetcher reads ahead only
what its window holds, and then the disk idles: on the development machine (a 1B Llama, 5 of 18
layers in RAM) 40 ms of a 620 ms decode forward, 5-7%, while the floor counts every one of them.

Repeated blocks (siblings of one class whose tensors have the same names, shapes and planned bytes:
``model.layers.0`` ... ``model.layers.17``) are interchangeable: any of them can be the one kept in RAM
without changing what a device holds. :func:`spread_offloaded` keeps how many of them each of RAM and
disk holds and spreads the fewer kind evenly among the others (``cpu disk disk disk cpu disk ...``), so
no stretch without a disk read is longer than a block or two, which the window covers. Blocks on an
accelerator are left where they are, and so is any family with a tied tensor or one another module's
forward reads directly. The ``device_map`` strategies go through here; ``infer_auto_device_map`` keeps
accelerate's plan.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping

from torch import nn

from ..model.naming import is_within, parent
from ..model.reads import placed_with_others
from .devices import Device

__all__ = ["kept_among_disk", "spread_offloaded", "spread_positions"]

logger = logging.getLogger(__name__)

_KINDS = ("cpu", "disk")


def spread_positions(count: int, among: int) -> list[int]:
    """``count`` positions out of ``among``, evenly spaced and centred (none at an end unless they must be).

    >>> spread_positions(5, 18), spread_positions(1, 4), spread_positions(3, 3)
    ([1, 5, 9, 12, 16], [2], [0, 1, 2])
    """
    if count <= 0:
        return []
    step = among / count
    return [int((i + 0.5) * step) for i in range(count)]  # steps of >= 1: all different, all < among


def _families(model: nn.Module, device_map: Mapping[str, Device], sizes: Mapping[str, int]) -> list[list[str]]:
    """Device-map entries that are interchangeable blocks, by family, in model order."""
    modules = dict(model.named_modules())
    families: dict[tuple, list[str]] = defaultdict(list)
    for name in device_map:
        module = modules.get(name)
        if module is None or not name:
            continue
        signature = tuple((leaf, tuple(t.shape), t.dtype) for leaf, t in module.state_dict(keep_vars=True).items())
        if signature:
            families[(parent(name), type(module), sizes.get(name, 0), signature)].append(name)
    order = {name: i for i, name in enumerate(modules)}
    return [sorted(names, key=order.__getitem__) for names in families.values() if len(names) > 1]


def _mixed_families(model: nn.Module, device_map: Mapping[str, Device],
                    sizes: Mapping[str, int]) -> list[tuple[list[str], list[str]]]:
    """(RAM or disk members, those in RAM) of each family that can be spread and has blocks in both."""
    if not all(kind in set(device_map.values()) for kind in _KINDS):
        return []
    pinned = placed_with_others(model)
    found = []
    for family in _families(model, device_map, sizes):
        if any(is_within(tensor, name) for name in family for tensor in pinned):
            continue
        members = [name for name in family if device_map[name] in _KINDS]
        kept = [name for name in members if device_map[name] == "cpu"]
        if kept and len(kept) < len(members):
            found.append((members, kept))
    return found


def kept_among_disk(model: nn.Module, device_map: Mapping[str, Device], sizes: Mapping[str, int]) -> list[str]:
    """The interchangeable blocks ``device_map`` keeps in RAM while others of their family are on disk."""
    return [name for _, kept in _mixed_families(model, device_map, sizes) for name in kept]


def spread_offloaded(model: nn.Module, device_map: Mapping[str, Device], sizes: Mapping[str, int]) -> dict[str, Device]:
    """``device_map`` with each family of interchangeable blocks' RAM and disk places spread (module docstring).

    ``sizes``: ``compute_module_sizes`` of the model as planned (blocks of a family must weigh the same).
    """
    result = dict(device_map)
    for members, kept in _mixed_families(model, result, sizes):
        fewer = "cpu" if 2 * len(kept) <= len(members) else "disk"
        count = len(kept) if fewer == "cpu" else len(members) - len(kept)
        chosen = set(spread_positions(count, len(members)))
        other = "disk" if fewer == "cpu" else "cpu"
        spread = {name: fewer if i in chosen else other for i, name in enumerate(members)}
        if any(result[name] != device for name, device in spread.items()):
            logger.info("Spread the %d of %d %s blocks of %s kept in RAM among those read from disk: %s.",
                        len(kept), len(members), type(model.get_submodule(members[0])).__name__,
                        parent(members[0]) or "the model", ", ".join(n for n in members if spread[n] == "cpu"))
            result.update(spread)
    return result
