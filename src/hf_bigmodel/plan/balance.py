"""Budgets that spread a model evenly over several accelerators, and the largest block a plan must move.

:func:`get_balanced_memory` lowers the budgets of all accelerators but the last so that the sequential
planner (:mod:`.planner`) fills them about equally; :func:`get_max_layer_size` finds the largest leaf or
no-split block (the room an offloaded layer needs where it runs).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..model.naming import join
from ..model.sizes import compute_module_sizes, format_size
from .devices import Device, is_offload_target
from .memory import get_max_memory

__all__ = ["get_balanced_memory", "get_max_layer_size"]

logger = logging.getLogger(__name__)


def class_names(classes: Iterable[str] | str | None) -> set[str]:
    """``no_split_module_classes`` as a set, whichever form it came in (None, one name, several)."""
    if classes is None:
        return set()
    return {classes} if isinstance(classes, str) else set(classes)


def get_max_layer_size(
    modules: Sequence[tuple[str, nn.Module]],
    module_sizes: Mapping[str, int],
    no_split_module_classes: Iterable[str] | str | None,
) -> tuple[int, list[str]]:
    """Largest leaf module or no-split block among ``modules`` (searched recursively), with its name(s).

    >>> get_max_layer_size([("", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))],
    ...                    {"": 120, "0": 80, "1": 40}, [])
    (80, ['0'])
    """
    no_split = class_names(no_split_module_classes)
    best, names = 0, []
    stack = list(reversed(modules))
    while stack:
        name, module = stack.pop()
        children = [(k, m) for k, m in module._modules.items() if m is not None]
        if not children or type(module).__name__ in no_split:
            size = module_sizes.get(name, 0)
            if size > best:
                best, names = size, [name]
            elif size == best:
                names.append(name)
        else:
            stack.extend((join(name, k), m) for k, m in reversed(children))
    return best, names


def get_balanced_memory(
    model: nn.Module,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    low_zero: bool = False,
    tensor_sizes: Mapping[str, int] | None = None,
) -> dict[Device, int]:
    """Lower accelerator budgets so a sequential plan spreads the model evenly over them.

    Every accelerator but the last gets at most ``ceil(model / n) + largest layer`` (the layer term lets
    each device fill to its share despite indivisible blocks); the last keeps its full budget as slack.
    ``low_zero`` leaves the first accelerator only what the others cannot hold (room for generation
    outputs). With fewer than two accelerators the budgets come back unchanged.

    Example::

        get_balanced_memory(model, {0: "20GiB", 1: "20GiB", "cpu": "64GiB"})
        # {0: 7516192768, 1: 21474836480, 'cpu': 68719476736} for a 13 GiB model with 0.5 GiB blocks
    """
    budgets = get_max_memory(max_memory, check_devices=False)
    accelerators = [d for d, size in budgets.items() if not is_offload_target(d) and size > 0]
    if len(accelerators) < 2:
        return budgets
    sizes = compute_module_sizes(model, dtype, special_dtypes, tensor_sizes=tensor_sizes)
    total = sizes.get("", 0)
    largest, _ = get_max_layer_size([("", model)], sizes, no_split_module_classes)
    shares = len(accelerators) - 1 if low_zero else len(accelerators)
    target = -(-total // shares) + largest
    balanced = dict(budgets)
    for device in accelerators[:-1]:
        balanced[device] = min(budgets[device], target)
    if low_zero:
        first = accelerators[0]
        elsewhere = sum(balanced[d] for d in accelerators[1:])
        balanced[first] = min(budgets[first], max(total - elsewhere, 0))
    logger.debug("Balanced budgets for %s: %s", type(model).__name__,
                 {d: format_size(v) for d, v in balanced.items()})
    return balanced
