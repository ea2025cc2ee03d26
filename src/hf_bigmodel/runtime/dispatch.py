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

from ..errors import CheckpointMismatchError, DeviceMapError, OffloadError, summarize
from ..load.loading import OFFLOAD_ATTR, load_checkpoint
from ..model.naming import lookup, owner, parent
from ..model.sizes import find_tied_parameters
from ..model.tensors import ModelTensor, model_tensors, move_tensor, put_tensor, set_tensor
from ..plan.device_map import check_device_map, resolve_device_map
from ..plan.devices import Device, device_rank, is_present, torch_device
from ..plan.placement import Placement
from ..storage.offload_folder import INDEX_NAME, OffloadFolder, load_offload_index
from ..storage.weights_map import DiskRef, WeightsMap
from .embedding_rows import EmbeddingRowsHook, reads_by_row
from .hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
from .pinned import pin_blocks
from .prefetch import Prefetcher
from .prefetch_window import prefetch_window

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
        device: torch.device


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
    if not hasattr(model, "device"):
        dispatched.device = torch_device(main)  # lets plain modules do input.to(model.device)
    for step in _DISPATCH_STEPS:
        step(model)




def _fill_from_weights(name: str, slot: ModelTensor, weights: WeightsMap, device: torch.device) -> None:
    set_tensor(slot, weights[name].to(device))


def _no_data_error(names: list[str]) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        missing=names,
        hint="  These tensors are still on the meta device (no data): load a checkpoint into the model first "
        "(load_checkpoint_in_model / load_checkpoint_and_dispatch), or pass state_dict= / offload_dir=.",
    )


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
    window = prefetch_window(prefetch)
    dm = check_device_map(model, device_map)
    _check_present(set(dm.values()))
    recorded = getattr(model, OFFLOAD_ATTR, None)
    weights: WeightsMap = recorded if recorded is not None else WeightsMap()
    # Values the caller hands over win over what the model holds (e.g. buffers built in __init__).
    given: set[str] = set()
    if offload_index is not None:
        weights.disk.update(offload_index)
        given.update(offload_index)
    elif recorded is None and offload_dir is not None and (Path(offload_dir) / INDEX_NAME).is_file():
        shapes = {n: tuple(s.tensor.shape) for n, s in model_tensors(model, persistent_only=False).items()}
        for name, ref in load_offload_index(offload_dir, expected=shapes).items():
            weights.disk.setdefault(name, ref)
            given.add(name)
    if state_dict:
        weights.memory.update(state_dict)
        given.update(state_dict)

    placement = Placement.of(dm, main_device=main_device, offload_cpu=offload_cpu)
    main = placement.main
    _check_present({main})
    offloaded, execution = placement.is_offloaded, placement.execution_device

    slots = model_tensors(model, persistent_only=False)
    devices = set(dm.values())
    if not force_hooks and len(devices) == 1 and not offloaded(next(iter(devices))):
        target = torch_device(next(iter(devices)))
        empty = [n for n, s in slots.items() if s.tensor.device.type == "meta" and n not in weights]
        if empty:
            raise _no_data_error(empty)
        for name, slot in slots.items():
            if slot.tensor.device.type == "meta" or name in given:
                _fill_from_weights(name, slot, weights, target)
        model.to(target)
        _finish(model, dm, main)
        return model

    # Decide each tensor's fate before changing anything.
    where = {name: lookup(name, dm) for name in slots}
    streamed = {n for n, d in where.items() if offloaded(d) and (not slots[n].is_buffer or offload_buffers)}
    ties = find_tied_parameters(model)
    for group in ties:  # an offloaded alias of a resident tensor on the same device simply shares it
        resident = [n for n in group if n not in streamed]
        if resident:
            for name in group:
                if name in streamed and execution(where[name]) == execution(where[resident[0]]):
                    streamed.discard(name)
    partners = {n: g for g in ties for n in g}

    def has_data(name: str) -> bool:
        if name in weights or slots[name].tensor.device.type != "meta":
            return True
        return any(p in weights or slots[p].tensor.device.type != "meta" for p in partners.get(name, ()))

    empty = [n for n in slots if not has_data(n)]
    if empty:
        raise _no_data_error(empty)
    to_write = {n for n in streamed if n not in weights and where[n] == "disk" and not slots[n].is_buffer
                and slots[n].tensor.device.type != "meta"}  # a meta name is tied to a held one: it shares its entry
    folder = None
    if to_write:
        if offload_dir is None:
            raise OffloadError(
                f"The device map puts {len(to_write)} tensor(s) that are in memory on 'disk' "
                f"({summarize(sorted(to_write), 3)}); pass offload_dir= so they can be written there."
            )
        folder = OffloadFolder(offload_dir)
        folder.prepare()

    pin = torch.cuda.is_available() and isinstance(main, int)
    added: list[nn.Module] = []
    try:
        # Resident tensors go to their device now.
        for name, slot in slots.items():
            if name not in streamed:
                if slot.tensor.device.type == "meta" or name in given:
                    _fill_from_weights(name, slot, weights, torch_device(execution(where[name])))
                else:
                    move_tensor(slot, torch_device(execution(where[name])))
        for group in ties:
            for name in group:
                if name not in streamed:
                    for other in group:
                        if other in streamed or other == name:
                            continue
                        s = slots[other]
                        if s.tensor is not slots[name].tensor and execution(where[other]) == execution(where[name]):
                            put_tensor(s, slots[name].tensor)
        # Streamed tensors must be in the weights map (in RAM or on disk).
        pending: dict[str, dict[str, torch.Tensor]] = {}
        in_ram: dict[int, torch.Tensor] = {}  # id(resident tensor) -> its RAM copy: tied names share one
        for name in streamed:
            if name in weights:
                continue
            tensor = slots[name].tensor
            if tensor.device.type == "meta":
                partner = next((p for p in partners[name] if p in weights), None)
                if partner is None:  # tied to a tensor resident on another device: copy it from there
                    holder = next(p for p in partners[name] if slots[p].tensor.device.type != "meta")
                    weights.memory[name] = slots[holder].tensor.detach()
                elif weights.is_on_disk(partner):
                    weights.disk[name] = weights.disk[partner]
                else:
                    weights.memory[name] = weights.memory[partner]
            elif name in to_write:
                pending.setdefault(parent(name), {})[name] = tensor.detach().to("cpu")
            else:
                if id(tensor) not in in_ram:
                    in_ram[id(tensor)] = tensor.detach().to("cpu")
                weights.memory[name] = in_ram[id(tensor)]
        if folder is not None:
            for group_tensors in pending.values():
                weights.disk.update(folder.write(group_tensors))
            folder.write_index(weights.disk)
        if pin:  # page-locked RAM copies to the GPU asynchronously; tied names keep sharing one copy
            blocks: dict[str, list[str]] = {}
            for name in [n for n in slots if n in streamed]:  # model order; one exactly sized arena per block
                blocks.setdefault(str(owner(name, dm)), []).append(name)
            pin_blocks(weights, blocks)
            pinned: dict[int, torch.Tensor] = {}
            for name in streamed:  # what an arena could not take (non-contiguous tensors)
                t = weights.memory.get(name)
                if t is not None and not t.is_pinned():
                    if id(t) not in pinned:
                        pinned[id(t)] = t.pin_memory()
                    weights.memory[name] = pinned[id(t)]

        root_hook = AlignDevicesHook(main, io_same_device=True, skip_keys=skip_keys)
        add_hook_to_module(model, root_hook, append=True)
        added.append(model)
        units = _units(model, streamed, dm, preload_module_classes or ())
        shared: dict[str, torch.Tensor] = {}
        unit_hooks: list[tuple[str, AlignDevicesHook]] = []
        for unit, names in units.items():
            module = model.get_submodule(unit) if unit else model
            dot = len(unit) + 1 if unit else 0
            by_row = reads_by_row(module, names, weights)  # reads its batch's rows itself: never prefetched
            hook = (EmbeddingRowsHook if by_row else AlignDevicesHook)(
                execution(where[names[0]]), offload=True, weights_map=weights, offload_buffers=offload_buffers,
                skip_keys=skip_keys, tied_params_map=shared, prefix=unit, tensor_names=[n[dot:] for n in names],
            )
            add_hook_to_module(module, hook, append=True)
            added.append(module)
            if not by_row:
                unit_hooks.append((str(owner(names[0], dm)), hook))
            else:
                _say_rows(names[0], weights, streamed)
        fetcher = Prefetcher.create(unit_hooks, window=window, device=torch_device(main))
        for _, hook in unit_hooks:
            hook.fetcher = fetcher
        executions = {execution(d) for d in devices}
        if len(executions) > 1:  # model parallel: each mapped module pulls its inputs to its device
            for key, device in dm.items():
                module_name = key if _is_module(model, key) else parent(key)
                if module_name:
                    module = model.get_submodule(module_name)
                    add_hook_to_module(module, AlignDevicesHook(execution(device), skip_keys=skip_keys), append=True)
                    added.append(module)
    except BaseException:
        for module in added:
            remove_hook_from_module(module)  # closes the prefetcher too
        raise
    setattr(model, OFFLOAD_ATTR, weights)
    _finish(model, dm, main)
    logger.info("Dispatched %s: %d offloaded group(s) streamed to %s", type(model).__name__, len(units), main)
    return model


def _say_rows(name: str, weights: WeightsMap, streamed: set[str]) -> None:
    ref = weights.disk[name]
    tied = sorted(n for n in streamed if n != name and weights.disk.get(n) == ref)
    if tied:
        logger.info("%s is read by row (only the rows of each batch's tokens); %s, tied to it, still reads the "
                    "whole matrix at every forward", name, ", ".join(tied))
    else:
        logger.info("%s is read by row (only the rows of each batch's tokens)", name)


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _units(
    model: nn.Module, streamed: set[str], device_map: Mapping[str, Device], preload: Sequence[str]
) -> dict[str, list[str]]:
    """Group streamed tensors by the module whose forward needs them (in model order).

    A tensor belongs to its direct owner, unless an ancestor inside the same device-map entry is of a
    ``preload_module_classes`` class: that ancestor then fetches its whole subtree at once.
    """
    preload_at: dict[str, str] = {}
    if preload:
        for name, module in model.named_modules():
            if type(module).__name__ in preload:
                preload_at.setdefault(name, name)
    units: dict[str, list[str]] = {}
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    for name in sorted(streamed, key=lambda n: (order.get(parent(n), 0), n)):
        unit = parent(name)
        probe = unit
        while preload_at and probe:
            if probe in preload_at and lookup(probe, device_map) == lookup(name, device_map):
                unit = probe
            probe = parent(probe)
        units.setdefault(unit, []).append(name)
    return units


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
