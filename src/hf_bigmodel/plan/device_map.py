"""The ``device_map`` argument: a strategy name, one device or a dict, turned into a checked plan.

:func:`resolve_device_map` accepts every form the public calls take (``"auto"``, ``"balanced"``,
``"balanced_low_0"``, ``"sequential"``, ``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``, ``torch.device``, or
``{module name: device}``); strategies are planned by :mod:`.planning`, dicts are validated against the
model by :func:`check_device_map`, which reports every problem at once.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import DeviceMapError, summarize
from ..model.naming import owner, parent
from ..model.sizes import compute_module_sizes
from ..model.tensors import model_tensors
from .balance import class_names, get_balanced_memory
from .devices import Device, normalize_device
from .headroom import Headroom, fit_headroom
from .memory import get_max_memory
from .planner import plan_device_map
from .rows_on_disk import rows_on_disk
from .spread import spread_offloaded

__all__ = ["STRATEGIES", "check_device_map", "resolve_device_map"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(
    model: nn.Module,
    device_map: str | int | torch.device | Mapping[str, int | str | torch.device],
    *,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    offload_buffers: bool = False,
    check_devices: bool = True,
    tensor_sizes: Mapping[str, int] | None = None,
    main_headroom: Headroom | None = None,
) -> dict[str, Device]:
    """Turn any accepted ``device_map`` into a validated ``{name: device}`` dict.

    ``"auto"`` (same as ``"balanced"``), ``"balanced_low_0"`` and ``"sequential"`` plan with
    :func:`infer_auto_device_map` (the balanced ones after :func:`get_balanced_memory`), then move to disk
    the embeddings that read by row there, where the plan uses the disk and that keeps later layers off
    it (:mod:`.rows_on_disk`), and spread the repeated blocks read from disk among those kept in RAM
    (:mod:`.spread`); a single device
    (``0``, ``"cpu"``, ``"cuda:1"``, ``torch.device``) maps the whole model there; a dict is checked
    with :func:`check_device_map`. ``check_devices`` makes ``max_memory`` entries for absent devices fail.
    ``tensor_sizes`` gives the planner the bytes of quantized weights (their dtype and shape do not say).
    ``main_headroom(model, plan, sizes)``: bytes the plan's main device holds beside its weights while the
    model runs (dispatch's prefetch buffers on a GPU); a strategy's plan is made again with a smaller
    budget there until weights, kept buffers and that headroom fit the ``max_memory`` of that device.

    >>> resolve_device_map(nn.Linear(2, 2), "cuda:1")
    {'': 1}
    """
    if isinstance(device_map, Mapping):
        return check_device_map(model, device_map)
    if isinstance(device_map, str) and device_map.strip().lower() in STRATEGIES:
        strategy = device_map.strip().lower()
        budgets: Mapping[Device, int] = get_max_memory(max_memory, check_devices=check_devices)
        sizes = compute_module_sizes(model, dtype, special_dtypes, tensor_sizes=tensor_sizes)

        def plan(limits: Mapping[Device, int]) -> dict[str, Device]:
            if strategy != "sequential":
                limits = get_balanced_memory(model, limits, no_split_module_classes, dtype, special_dtypes,
                                             low_zero=strategy == "balanced_low_0", tensor_sizes=tensor_sizes)
            planned = rows_on_disk(
                model, lambda pinned: plan_device_map(
                    model, limits, no_split_module_classes=no_split_module_classes, dtype=dtype,
                    special_dtypes=special_dtypes, offload_buffers=offload_buffers, tensor_sizes=tensor_sizes,
                    pinned=pinned),
                no_split=class_names(no_split_module_classes), sizes=sizes, tensor_sizes=tensor_sizes)
            return spread_offloaded(model, planned, sizes)

        if main_headroom is None:
            return plan(budgets)
        buffers = compute_module_sizes(model, dtype, special_dtypes, buffers_only=True, tensor_sizes=tensor_sizes)
        return fit_headroom(model, plan, budgets, main_headroom, sizes=sizes,
                            kept_buffers=None if offload_buffers else buffers)
    if isinstance(device_map, (int, str, torch.device)) and not isinstance(device_map, bool):
        try:
            return {"": normalize_device(device_map, what="device_map")}
        except DeviceMapError:
            if not isinstance(device_map, str):
                raise
    raise DeviceMapError(
        f"Unknown device_map {device_map!r}. Use one of {', '.join(map(repr, STRATEGIES))}, a single device "
        "(0, 'cuda:1', 'mps', 'cpu', 'disk'), or a dict mapping module names to devices."
    )


def check_device_map(model: nn.Module, device_map: Mapping[str, int | str | torch.device]) -> dict[str, Device]:
    """Validate a user device map against ``model`` and return it with normalised values.

    Every key must name a module, parameter or buffer; every parameter and persistent buffer must be
    covered by a key (the most specific one wins); every value must be a device. All problems are
    reported in one :class:`DeviceMapError`.

    >>> check_device_map(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), {"0": "cuda:0", "1": "cpu"})
    {'0': 0, '1': 'cpu'}
    """
    if not isinstance(device_map, Mapping):
        raise DeviceMapError(f"device_map must be a dict of module name -> device, got {type(device_map).__name__}.")
    index = model_tensors(model, persistent_only=False)
    names = {prefix for prefix, _ in model.named_modules(remove_duplicate=False)} | set(index)
    required = [name for name, slot in index.items() if slot.persistent]
    problems: list[str] = []
    culprits: list[str] = []
    unknown: list[str] = []
    normalized: dict[str, Device] = {}
    for key, value in device_map.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is a {type(key).__name__}; keys are module names such as 'model.layers.0'.")
            culprits.append(str(key))
            continue
        if key not in names:
            unknown.append(key)
        try:
            normalized[key] = normalize_device(value, what=f"device for {key!r}")
        except DeviceMapError as err:
            problems.append(str(err))
            culprits.append(key)
    if unknown:
        shown: list[str] = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1) if len(shown) < 10 else []
            shown.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        problems.append(
            f"{len(unknown)} key(s) name no module, parameter or buffer of {type(model).__name__}: "
            f"{summarize(shown)}. Keys are names from model.named_modules() or model.named_parameters()."
        )
        culprits.extend(unknown)
    covered = {k for k in device_map if isinstance(k, str)}
    uncovered = [t for t in required if owner(t, covered) is None]
    if uncovered:
        homes = list(dict.fromkeys(parent(t) or "''" for t in uncovered))
        problems.append(
            f"{len(uncovered)} tensor(s) have no device: {summarize(uncovered)}. Add their module(s) "
            f"({summarize(homes)}) to the device map, or a '' entry as the default for everything else."
        )
        culprits.extend(uncovered)
    if problems:
        raise DeviceMapError("Invalid device_map:\n  - " + "\n  - ".join(problems), modules=culprits)
    return normalized
