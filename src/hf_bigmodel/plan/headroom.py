"""Room on the accelerator for what runs beside the weights: a plan re-made until it fits ``max_memory``.

The planner keeps room on the main device for the largest offloaded layer, as accelerate does: enough for
hooks that bring one layer at a time. Dispatch's prefetcher holds more there on a GPU: the group in use
and the groups read ahead (``hf-bigmodel plan`` prints it). :func:`fit_headroom` checks a strategy's plan
against the device's budget with that headroom counted, and plans again with the budget lowered by the
excess until it fits, so ``max_memory={0: "20GiB"}`` bounds what the GPU holds while the model runs.

On a CPU run the headroom is not counted here: the prefetch buffers come beside the ``"cpu"`` budget, by
the memory formula in the README (``runtime baseline + dispatch + cpu budget + largest offloaded group +
window + activations``), so the headroom callable is not asked for a plan that runs on the CPU.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping

from torch import nn

from ..errors import Advice, BigModelWarning
from ..model.sizes import format_size
from .devices import Device, is_offload_target
from .placement import Placement

__all__ = ["Headroom", "fit_headroom"]

logger = logging.getLogger(__name__)

#: ``headroom(model, device_map, sizes)``: bytes the main device holds beside the weights placed there.
Headroom = Callable[[nn.Module, Mapping[str, Device], Mapping[str, int]], int]

_ROUNDS = 8
_STEP = 2**20  # the budget is lowered by whole MiB


def fit_headroom(model: nn.Module, plan: Callable[[Mapping[Device, int]], dict[str, Device]],
                 budgets: Mapping[Device, int], headroom: Headroom, *, sizes: Mapping[str, int],
                 kept_buffers: Mapping[str, int] | None) -> dict[str, Device]:
    """``plan(budgets)``, re-made with a lower budget on its main device while weights placed there, the
    buffers of offloaded modules kept there (``kept_buffers``: their sizes, None when they are offloaded too)
    and ``headroom`` exceed that device's budget. Only the last plan's warnings are given; a plan that
    still does not fit after a few rounds is returned with a warning of its own."""
    limits = dict(budgets)
    for _ in range(_ROUNDS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            device_map = plan(limits)
        main, excess = _excess(model, device_map, budgets, headroom, sizes, kept_buffers)
        if excess <= 0 or limits.get(main, 0) == 0:
            break
        lowered = max(limits[main] - math.ceil(excess / _STEP) * _STEP, 0)
        logger.info("Prefetching needs %s more on %r than max_memory leaves beside the weights: planning with "
                    "%s there instead of %s.", format_size(excess), main, format_size(lowered),
                    format_size(limits[main]))
        limits[main] = lowered
    for warning in caught:
        warnings.warn(warning.message, stacklevel=4)
    if excess > 0 and limits.get(main, 0) > 0:
        warnings.warn(BigModelWarning(
            f"The plan still needs {format_size(excess)} more on {main!r} than max_memory gives it once the "
            "prefetch buffers are counted.",
            advice=[Advice("Read less ahead: {} (HF_BIGMODEL_PREFETCH=0 turns prefetching off).", "prefetch",
                           "'64MiB'"),
                    Advice("Or raise its budget ({}).", "max_memory", f"{{{main!r}: ...}}")]), stacklevel=4)
    return device_map


def _excess(model: nn.Module, device_map: Mapping[str, Device], budgets: Mapping[Device, int], headroom: Headroom,
            sizes: Mapping[str, int], kept_buffers: Mapping[str, int] | None) -> tuple[Device, int]:
    """The plan's main device and the bytes by which it overflows its budget (<= 0: it fits)."""
    placement = Placement.of(device_map)
    main = placement.main
    if is_offload_target(main) or main not in budgets:
        return main, 0
    extra = headroom(model, device_map, sizes)
    if extra <= 0:
        return main, 0
    placed = sum(sizes.get(key, 0) for key, device in device_map.items() if device == main)
    kept = sum((kept_buffers or {}).get(key, 0) for key, device in device_map.items()
               if placement.is_offloaded(device))
    return main, placed + kept + extra - budgets[main]
