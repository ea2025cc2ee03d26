"""Dispatch: place a loaded model on its devices and attach the hooks that stream offloaded weights.

A device-map value says where a module's weights are *stored*. Accelerator-mapped modules store and
run there. ``"disk"`` modules (and ``"cpu"`` ones when an accelerator is the main device) are
*offloaded*: their weights live in a :class:`~hf_bigmodel.storage.offload_folder.WeightsMap` and reach the main device
just before the module runs. When the whole model sits on one device, no hook is attached at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from ..errors import DeviceMapError, summarize
from ..load.loading import OFFLOAD_ATTR, load_checkpoint
from ..model.tensors import ModelTensor, model_tensors, move_tensor, put_tensor, set_tensor
from ..plan.device_map import check_device_map, resolve_device_map
from ..plan.devices import Device, device_rank, is_present, torch_device
from ..plan.placement import Placement
from ..storage.offload_folder import INDEX_NAME, OffloadFolder, load_offload_index
from ..storage.weights_map import DiskRef, WeightsMap
from .dispatch_plan import DispatchPlan, plan_dispatch
from .embedding_rows import EmbeddingRowsHook, reads_by_row
from .hook_protocol import ModelHook, add_hook_to_module, hooks_of
from .hooks import AlignDevicesHook, strip_hooks
from .model_device import set_model_device
from .pinned import pin_blocks
from .prefetch import Prefetcher
from .prefetch_plan import prefetch_headroom
from .prefetch_window import Window, prefetch_window
from .rollback import ModelState
from .streaming import StreamedWeights

__all__ = [
    "dispatch_model",
    "load_checkpoint_and_dispatch",
    "register_dispatch_step",
]

logger = logging.getLogger(__name__)

if TYPE_CHECKING:

    class _DispatchedModel(nn.Module):
        """For the type checker: the attributes ``_finish`` sets on a dispatched model."""

        hf_device_map: dict[str, Device]


def _check_present(devices: set[Device]) -> None:
    absent = sorted((d for d in devices if not is_present(d)), key=device_rank)
    if absent:
        raise DeviceMapError(
            f"The device map uses {summarize(map(repr, absent))}, which this machine does not have "
            f"(CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}). "
            "Plan again with max_memory for the devices you have, e.g. device_map='auto'."
        )


#: Called with every dispatched model, last (integrations register what their libraries expect).
_DISPATCH_STEPS: list[Callable[[nn.Module], None]] = []


def register_dispatch_step(step: Callable[[nn.Module], None]) -> None:
    """Call ``step(model)`` at the end of every dispatch (once hooks and ``hf_device_map`` are in place).

    An integration uses it for what its library expects of a dispatched model. Registering the same
    step twice has no effect.
    """
    if step not in _DISPATCH_STEPS:
        _DISPATCH_STEPS.append(step)


def _finish(model: nn.Module, device_map: Mapping[str, Device], main: Device) -> None:
    dispatched = cast("_DispatchedModel", model)
    dispatched.hf_device_map = dict(device_map)
    set_model_device(model, torch_device(main))  # input.to(model.device), also once the first weight is offloaded
    for step in _DISPATCH_STEPS:
        step(model)




def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, int | str | torch.device],
    main_device: int | str | torch.device | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    offload_index: Mapping[str, DiskRef] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    *,
    prefetch: int | str | None = None,
) -> nn.Module:
    """Place ``model`` per ``device_map`` and hook offloaded modules so they run on the main device.

    ``main_device`` runs everything stored on ``"cpu"``/``"disk"`` (default: the first accelerator in the
    map, else CPU). Offloaded weights come from what :func:`load_checkpoint_in_model` recorded, from
    ``state_dict``, or from the offload folder ``offload_dir``. ``skip_keys`` names inputs/outputs left
    where they are (e.g. ``"past_key_values"``); modules of ``preload_module_classes`` get all their
    subtree's weights at once. With everything on one device no hook is attached unless ``force_hooks``.
    ``prefetch`` is how far ahead offloaded weights are fetched: a size (``"256MiB"``: the bytes read ahead), a
    number of groups, or 0 (off: each module reads its weights when it runs); None: ``$HF_BIGMODEL_PREFETCH``,
    else twice the median group's bytes (:mod:`hf_bigmodel.runtime.prefetch_window`).

    Example::

        model = dispatch_model(model, {"embed": 0, "layers": "cpu", "head": "disk"}, offload_dir="offload")
    """
    return _dispatch(
        model, device_map, main_device=main_device, state_dict=state_dict, offload_dir=offload_dir,
        offload_index=offload_index, offload_buffers=offload_buffers, skip_keys=skip_keys,
        preload_module_classes=preload_module_classes, force_hooks=force_hooks, prefetch=prefetch,
    )


def _dispatch(
    model: nn.Module,
    device_map: Mapping[str, int | str | torch.device],
    *,
    main_device: int | str | torch.device | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    offload_index: Mapping[str, DiskRef] | None = None,
    offload_buffers: bool = False,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    offload_cpu: bool | None = None,
    prefetch: int | str | None = None,
) -> nn.Module:
    """Plan (:func:`~.dispatch_plan.plan_dispatch`, every check before any change), then apply the plan.

    The hooks of an earlier dispatch are replaced, not stacked (other hooks stay). Whatever fails leaves
    the model as it was (:class:`~.rollback.ModelState`), earlier hooks included.
    """
    state = ModelState.capture(model)
    new_hooks: list[nn.Module] = []
    try:
        window = prefetch_window(prefetch)
        dm = check_device_map(model, device_map)
        _check_present(set(dm.values()))
        weights, given = _collect_weights(model, offload_dir, offload_index, state_dict)
        placement = Placement.of(dm, main_device=main_device, offload_cpu=offload_cpu)
        _check_present({placement.main})
        slots = model_tensors(model, persistent_only=False)
        plan = plan_dispatch(
            model, placement, slots, weights, given=given, offload_buffers=offload_buffers,
            preload_module_classes=preload_module_classes or (), force_hooks=force_hooks,
            pin=torch.cuda.is_available() and isinstance(placement.main, int), can_write=offload_dir is not None,
        )
        earlier = strip_hooks(model, AlignDevicesHook)  # replaced below; their tensors stay placeholders
        if plan.hooked:
            _apply(model, plan, slots, weights, offload_dir, new_hooks, skip_keys=skip_keys,
                   offload_buffers=offload_buffers, window=window)
        else:
            _apply_unhooked(model, plan, slots, weights, dm)
        _finish(model, dm, placement.main)
    except BaseException:
        for module in new_hooks:
            _close_fetchers(module)
        state.restore()
        raise
    for hook in earlier:
        _close_fetchers(hook)
    if plan.hooked:
        logger.info("Dispatched %s: %d offloaded group(s) streamed to %s", type(model).__name__, len(plan.units),
                    placement.main)
    return model


def _close_fetchers(of: nn.Module | ModelHook) -> None:
    """Stop the prefetcher of a hook (or of a module's hooks) that will not run again."""
    for hook in hooks_of(of) if isinstance(of, nn.Module) else [of]:
        fetcher = getattr(hook, "fetcher", None)
        if fetcher is not None:
            fetcher.close()


def _apply_unhooked(model: nn.Module, plan: DispatchPlan, slots: Mapping[str, ModelTensor], weights: WeightsMap,
                    dm: Mapping[str, Device]) -> None:
    """Everything on one device and no hook: the model holds every weight itself; a weights map left from an
    earlier load or dispatch no longer describes it and is dropped."""
    target = torch_device(next(iter(dm.values())))
    for name in plan.fill:
        set_tensor(slots[name], weights[name].to(target))
    model.to(target)
    if all(slot.tensor.device.type != "meta" for slot in slots.values()):
        model.__dict__.pop(OFFLOAD_ATTR, None)


def _apply(
    model: nn.Module, plan: DispatchPlan, slots: Mapping[str, ModelTensor], weights: WeightsMap,
    offload_dir: str | os.PathLike[str] | None, added: list[nn.Module], *,
    skip_keys: str | Sequence[str] | None, offload_buffers: bool, window: Window,
) -> None:
    """Place resident tensors, stage streamed ones (the offload folder written), attach the hooks."""
    folder = None
    if plan.to_write:
        assert offload_dir is not None  # plan_dispatch checked it
        folder = OffloadFolder(offload_dir)
        folder.prepare()
    _place_resident(plan, slots, weights)
    _stage_streamed(plan, slots, weights, folder)
    _attach_hooks(model, plan, weights, added, skip_keys=skip_keys, offload_buffers=offload_buffers, window=window)
    setattr(model, OFFLOAD_ATTR, weights)


def _collect_weights(
    model: nn.Module,
    offload_dir: str | os.PathLike[str] | None,
    offload_index: Mapping[str, DiskRef] | None,
    state_dict: Mapping[str, torch.Tensor] | None,
) -> tuple[WeightsMap, set[str]]:
    """The weights map dispatch serves from (what loading recorded, plus what the caller hands over), and
    the names handed over: their values win over what the model holds (e.g. buffers built in __init__)."""
    recorded = getattr(model, OFFLOAD_ATTR, None)
    weights: WeightsMap = recorded if recorded is not None else WeightsMap()
    given: set[str] = set()
    if offload_index is not None:
        weights.disk.update(offload_index)
        given.update(offload_index)
    elif recorded is None and offload_dir is not None and (Path(offload_dir) / INDEX_NAME).is_file():
        # The folder serves only what the model lacks: meta tensors, and the buffers of a model built empty
        # (their values come from __init__). Parameters the model holds are its own, whatever an earlier run
        # (maybe of another model) left in the folder.
        slots = model_tensors(model, persistent_only=False)
        built_empty = any(not s.is_buffer and s.tensor.device.type == "meta" for s in slots.values())
        empty = {n: tuple(s.tensor.shape) for n, s in slots.items()
                 if s.tensor.device.type == "meta" or (built_empty and s.is_buffer)}
        if empty:
            for name, ref in load_offload_index(offload_dir, expected=empty).items():
                if name in empty:
                    weights.disk.setdefault(name, ref)
                    given.add(name)
    if state_dict:
        weights.memory.update(state_dict)
        given.update(state_dict)
    return weights, given


def _place_resident(plan: DispatchPlan, slots: Mapping[str, ModelTensor], weights: WeightsMap) -> None:
    """Resident tensors to their execution device (from the weights map, or moved); tied ones shared again."""
    fill = set(plan.fill)
    for name, device in plan.resident.items():
        if name in fill:
            set_tensor(slots[name], weights[name].to(torch_device(device)))
        else:
            move_tensor(slots[name], torch_device(device))
    for alias, source in plan.share.items():
        put_tensor(slots[alias], slots[source].tensor)


def _stage_streamed(
    plan: DispatchPlan, slots: Mapping[str, ModelTensor], weights: WeightsMap, folder: OffloadFolder | None
) -> None:
    """Every streamed tensor into the weights map: RAM copies, tied aliases, offload-folder files; pinned."""
    in_ram: dict[int, torch.Tensor] = {}  # id(model tensor) -> its RAM copy: tied names share one
    for name in plan.to_ram:
        tensor = slots[name].tensor
        if id(tensor) not in in_ram:
            in_ram[id(tensor)] = tensor.detach().to("cpu")
        weights.memory[name] = in_ram[id(tensor)]
    if folder is not None:
        for names in plan.to_write.values():  # one file per module
            weights.disk.update(folder.write({n: slots[n].tensor.detach().to("cpu") for n in names}))
    for name, partner in plan.alias.items():  # a partner is held, written, or an alias staged before
        if weights.is_on_disk(partner):
            weights.disk[name] = weights.disk[partner]
        else:
            weights.memory[name] = weights.memory[partner]
    if folder is not None:
        folder.write_index(weights.disk)
    if plan.pin:  # page-locked RAM copies to the GPU asynchronously; tied names keep sharing one copy
        pin_blocks(weights, plan.pin_blocks)  # one exactly sized arena per device-map block
        pinned: dict[int, torch.Tensor] = {}
        for name in plan.streamed:  # what an arena could not take (non-contiguous tensors)
            t = weights.memory.get(name)
            if t is not None and not t.is_pinned():
                if id(t) not in pinned:
                    pinned[id(t)] = t.pin_memory()
                weights.memory[name] = pinned[id(t)]


def _attach_hooks(
    model: nn.Module, plan: DispatchPlan, weights: WeightsMap, added: list[nn.Module], *,
    skip_keys: str | Sequence[str] | None, offload_buffers: bool, window: Window,
) -> None:
    """The root hook (inputs to the main device, outputs back), one offloading hook per unit, the
    prefetcher they share, and, for model parallelism, input hooks; ``added`` lists the hooked modules."""
    main = plan.placement.main
    add_hook_to_module(model, AlignDevicesHook(main, io_same_device=True, skip_keys=skip_keys), append=True)
    added.append(model)
    unit_hooks: list[AlignDevicesHook] = []
    for unit in plan.units:
        module = model.get_submodule(unit.prefix) if unit.prefix else model
        # An embedding reads its batch's rows itself: never prefetched (not in a group).
        by_row = unit.by_row and reads_by_row(module, list(unit.names), weights)
        hook = (EmbeddingRowsHook if by_row else AlignDevicesHook)(
            unit.device, offload=True, weights_map=weights, offload_buffers=offload_buffers, skip_keys=skip_keys,
            prefix=unit.prefix, tensor_names=unit.local_names,
        )
        add_hook_to_module(module, hook, append=True)
        added.append(module)
        if by_row:
            _say_rows(unit.names[0], weights, plan.streamed)
        unit_hooks.append(hook)
    fetched = [i for group in plan.groups for i in group]  # units read ahead, group by group
    position = {unit: k for k, unit in enumerate(fetched)}
    streams: list[StreamedWeights] = []
    for i in fetched:
        stream = unit_hooks[i].stream
        assert stream is not None  # each unit streams some tensors from ``weights``
        streams.append(stream)
    fetcher = Prefetcher.create(streams, [[position[i] for i in group] for group in plan.groups], window=window,
                                device=torch_device(main))
    for i in fetched:
        unit_hooks[i].fetcher = fetcher
    for module_name, device in plan.input_hooks:
        module = model.get_submodule(module_name)
        add_hook_to_module(module, AlignDevicesHook(device, skip_keys=skip_keys), append=True)
        added.append(module)


def _say_rows(name: str, weights: WeightsMap, streamed: Mapping[str, Device]) -> None:
    ref = weights.disk[name]
    tied = sorted(n for n in streamed if n != name and weights.disk.get(n) == ref)
    if tied:
        logger.info("%s is read by row (only the rows of each batch's tokens); %s, tied to it, still reads the "
                    "whole matrix at every forward", name, ", ".join(tied))
    else:
        logger.info("%s is read by row (only the rows of each batch's tokens)", name)


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    device_map: str | Mapping[str, int | str | torch.device] | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_buffers: bool = False,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool | None = None,
    skip_keys: str | Sequence[str] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    *,
    prefetch: int | str | None = None,
) -> nn.Module:
    """Plan (for a strategy string), load ``checkpoint`` into the empty ``model``, and dispatch it.

    ``device_map`` is ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, a dict, or None
    (load only). Disk-offloaded weights of a safetensors checkpoint are read in place; ``offload_folder``
    is needed only for other formats. If anything fails, the model is left without hooks.

    Example::

        with init_empty_weights():
            model = MyModel()
        model = load_checkpoint_and_dispatch(model, "ckpt/", device_map="auto", max_memory={"cpu": "2GiB"})
        output = model(input.to(model.device.type))
    """
    if broadcast_from_rank0:
        raise ValueError("broadcast_from_rank0 is not supported by hf_bigmodel; leave it False.")
    if isinstance(device_map, str) or (device_map is not None and not isinstance(device_map, Mapping)):
        device_map = resolve_device_map(
            model, device_map, max_memory=max_memory, no_split_module_classes=no_split_module_classes,
            dtype=dtype, offload_buffers=offload_buffers,
            main_headroom=prefetch_headroom(prefetch, offload_buffers=offload_buffers),
        )
    report = load_checkpoint(
        model, checkpoint, device_map=device_map, offload_folder=offload_folder, dtype=dtype,
        offload_buffers=offload_buffers, strict=strict,
    )
    if report.weights:
        setattr(model, OFFLOAD_ATTR, report.weights)
    if device_map is None:
        return model
    return _dispatch(
        model, device_map, offload_dir=offload_folder,
        offload_buffers=offload_buffers, skip_keys=skip_keys, preload_module_classes=preload_module_classes,
        force_hooks=force_hooks, prefetch=prefetch,
    )
