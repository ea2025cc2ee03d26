"""What dispatch will do, decided before it does anything: a :class:`DispatchPlan`.

The plan is computed from the model's tensor index, the :class:`~hf_bigmodel.plan.placement.Placement`
of the device map, and which names the weights map already holds. It reads shapes, dtypes, devices and
tie identities, never tensor data, so it works on meta models and can be printed and tested on its own.
:func:`~hf_bigmodel.runtime.dispatch.dispatch_model` then applies it.

Per tensor the plan says:

- *resident*: it stays in its module slot, on its execution device; its value is taken from the
  weights map (``fill``: the slot is empty, or the caller handed a value over) or moved there;
- tied aliases on the same execution device share one tensor (``share``);
- *streamed*: it lives in the weights map and reaches the main device when its module runs. What the
  model holds is copied to RAM (``to_ram``, tied names sharing one copy), written to the offload folder
  (``to_write``, ``"disk"`` entries), or taken from a tied partner (``alias``); RAM copies
  are page-locked when the main device is a GPU (``pin``);
- streamed tensors are grouped into hook *units* (the module whose forward needs them), and units into
  prefetch *groups* (:mod:`.prefetch_plan`), fetched at once.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import CheckpointMismatchError, OffloadError, summarize
from ..model.naming import lookup, owner, parent
from ..model.reads import direct_reads, row_readable
from ..model.tensors import ModelTensor, tie_groups
from ..plan.devices import Device
from ..plan.placement import Placement
from ..storage.weights_map import DiskTensor, WeightsMap
from .prefetch_plan import cut_groups, find_blocks

__all__ = ["DispatchPlan", "HookUnit", "plan_dispatch"]


@dataclass(frozen=True)
class HookUnit:
    """The streamed tensors one offloading hook brings to ``device`` before module ``prefix`` runs."""

    prefix: str
    #: The device-map entry the module belongs to.
    key: str
    names: tuple[str, ...]
    device: Device
    #: An embedding whose weight stays a plain byte range on disk: it reads its batch's rows itself
    #: (:mod:`.embedding_rows`) and is in no prefetch group.
    by_row: bool = False

    @property
    def local_names(self) -> list[str]:
        """``names`` relative to the module."""
        dot = len(self.prefix) + 1 if self.prefix else 0
        return [name[dot:] for name in self.names]


@dataclass
class DispatchPlan:
    """Where every tensor of a model goes, and the hooks that make it run (see the module docstring)."""

    placement: Placement
    #: False: the whole model runs on one device, where it is stored; no hook is attached.
    hooked: bool
    #: Resident tensor -> its execution device.
    resident: dict[str, Device] = field(default_factory=dict)
    #: Resident tensors whose value comes from the weights map.
    fill: list[str] = field(default_factory=list)
    #: Resident tied alias -> the name whose tensor it shares (same execution device).
    share: dict[str, str] = field(default_factory=dict)
    #: Streamed tensor -> where it is stored (``"cpu"`` or ``"disk"``).
    streamed: dict[str, Device] = field(default_factory=dict)
    #: Streamed tensors the model holds, copied to RAM for the weights map.
    to_ram: list[str] = field(default_factory=list)
    #: Module -> its streamed tensors the model holds, written to the offload folder.
    to_write: dict[str, list[str]] = field(default_factory=dict)
    #: Streamed tied alias with no value of its own -> the partner in the weights map it reuses.
    alias: dict[str, str] = field(default_factory=dict)
    #: Page-lock the RAM copies (the main device is a GPU).
    pin: bool = False
    #: Device-map entry -> its streamed tensors, in model order: one page-locked arena each when pinning.
    pin_blocks: dict[str, list[str]] = field(default_factory=dict)
    units: list[HookUnit] = field(default_factory=list)
    #: Indices into ``units`` the prefetcher fetches at once, in model order.
    groups: list[list[int]] = field(default_factory=list)
    #: Model parallelism: module -> the execution device its inputs are moved to.
    input_hooks: list[tuple[str, Device]] = field(default_factory=list)

    def __str__(self) -> str:
        main = self.placement.main
        if not self.hooked:
            return f"DispatchPlan: everything on {main!r}, {len(self.fill)} tensor(s) filled, no hooks"
        sources: dict[Device, int] = {}
        for device in self.streamed.values():
            sources[device] = sources.get(device, 0) + 1
        streamed = ", ".join(f"{n} from {d!r}" for d, n in sorted(sources.items(), key=lambda kv: str(kv[0])))
        lines = [
            f"DispatchPlan: main device {main!r}; {len(self.resident)} resident tensor(s) ({len(self.fill)} "
            f"filled, {len(self.share)} shared), {len(self.streamed)} streamed ({streamed or 'none'})",
            f"  to RAM {len(self.to_ram)}{' (pinned)' if self.pin else ''}, to write "
            f"{sum(map(len, self.to_write.values()))}, tied aliases {len(self.alias)}",
        ]
        group_of = {u: g for g, members in enumerate(self.groups) for u in members}
        lines += [f"  hook {u.prefix or '<root>'} [{u.key or '<root>'}] -> {u.device!r}: {len(u.names)} tensor(s), "
                  + ("read by row" if u.by_row else f"prefetch group {group_of.get(i)}")
                  for i, u in enumerate(self.units)]
        lines += [f"  inputs of {m} -> {d!r}" for m, d in self.input_hooks]
        return "\n".join(lines)


def plan_dispatch(
    model: nn.Module,
    placement: Placement,
    slots: Mapping[str, ModelTensor],
    held: WeightsMap,
    *,
    given: Collection[str] = (),
    offload_buffers: bool = False,
    preload_module_classes: Sequence[str] = (),
    force_hooks: bool = False,
    pin: bool = False,
    can_write: bool = True,
) -> DispatchPlan:
    """The plan for dispatching ``model`` (its tensors ``slots``) per ``placement``; touches no tensor data.

    ``held``: the weights map so far (only its names, shapes and dtypes are read); ``given``: names whose
    value the caller handed over (they win over what the model holds). ``can_write``: an offload folder
    was given. Raises :class:`CheckpointMismatchError` for tensors with no value anywhere, and
    :class:`OffloadError` for tensors to write when there is no folder, before anything is changed.
    """
    devices = set(placement.device_map.values())
    if not force_hooks and len(devices) == 1 and not placement.is_offloaded(next(iter(devices))):
        empty = [n for n, s in slots.items() if _is_meta(s) and n not in held]
        if empty:
            raise _no_data_error(empty)
        device = next(iter(devices))
        fill = [n for n, s in slots.items() if _is_meta(s) or n in given]
        return DispatchPlan(placement, hooked=False, resident=dict.fromkeys(slots, device), fill=fill)

    stored = {name: lookup(name, placement.device_map) for name in slots}
    runs_on = {name: placement.execution_device(device) for name, device in stored.items()}
    streamed = {n: d for n, d in stored.items()
                if placement.is_offloaded(d) and (not slots[n].is_buffer or offload_buffers)}
    ties = tie_groups(slots)
    for group in ties:  # an offloaded alias of a resident tensor on the same device simply shares it
        resident = [n for n in group if n not in streamed]
        for name in group if resident else ():
            if name in streamed and runs_on[name] == runs_on[resident[0]]:
                del streamed[name]
    partners = {n: g for g in ties for n in g}
    empty = [n for n in slots if not any(p in held or not _is_meta(slots[p]) for p in partners.get(n, [n]))]
    if empty:
        raise _no_data_error(empty)

    plan = DispatchPlan(placement, hooked=True, pin=pin)
    plan.streamed = {n: d for n, d in stored.items() if n in streamed}  # model order
    for name, slot in slots.items():
        if name not in streamed:
            plan.resident[name] = runs_on[name]
            if _is_meta(slot) or name in given:
                plan.fill.append(name)
    for group in ties:  # each resident name shares the tensor of the group's first one on its device
        for name in group:
            if name in plan.resident and name not in plan.share:
                for other in group:
                    if other != name and other in plan.resident and other not in plan.share \
                            and runs_on[other] == runs_on[name]:
                        plan.share[other] = name
    _plan_streamed(plan, slots, held, partners)
    for name in plan.streamed if pin else ():
        plan.pin_blocks.setdefault(str(owner(name, placement.device_map)), []).append(name)
    if plan.to_write and not can_write:
        names = [n for names in plan.to_write.values() for n in names]
        raise OffloadError(
            f"The device map puts {len(names)} tensor(s) that are in memory on 'disk' "
            f"({summarize(sorted(names), 3)}); pass offload_dir= so they can be written there."
        )
    plan.units = _units(model, plan.streamed, placement, runs_on, preload_module_classes)
    plan.units = [replace(u, by_row=_reads_by_row(model, u, plan, held)) for u in plan.units]
    plan.groups = _groups(plan, slots, held)
    if len(placement.execution_devices) > 1:
        plan.input_hooks = _input_hooks(model, placement)
    return plan


def _is_meta(slot: ModelTensor) -> bool:
    return slot.tensor.device.type == "meta"


def _groups(plan: DispatchPlan, slots: Mapping[str, ModelTensor], held: WeightsMap) -> list[list[int]]:
    """The prefetch groups (indices into ``plan.units``) of the units read ahead: all but those read by row.

    Blocks and groups as :mod:`.prefetch_plan` cuts them, over the bytes each unit brings, in model order.
    """
    fetched = [i for i, u in enumerate(plan.units) if not u.by_row]
    units = [(plan.units[i].key, plan.units[i].prefix, _unit_bytes(plan.units[i], plan, slots, held)) for i in fetched]
    groups = cut_groups([(key, block, size) for (key, _, size), block in zip(units, find_blocks(units))])
    return [[fetched[k] for k in group] for group in groups]


def _source(name: str, plan: DispatchPlan) -> str:
    """The name whose entry of the weights map ``name`` will share (itself unless a tied alias)."""
    while name in plan.alias:
        name = plan.alias[name]
    return name


def _reads_by_row(model: nn.Module, unit: HookUnit, plan: DispatchPlan, held: WeightsMap) -> bool:
    """Whether the unit's module can read its weight by row: a plain byte range once staged."""
    module = model.get_submodule(unit.prefix) if unit.prefix else model
    if not row_readable(module, unit.names):
        return False
    name = _source(unit.names[0], plan)
    if any(name in names for names in plan.to_write.values()):
        return True  # written to the offload folder as one byte range
    return held.is_on_disk(name) and type(held.disk[name]) is DiskTensor


def _unit_bytes(unit: HookUnit, plan: DispatchPlan, slots: Mapping[str, ModelTensor], held: WeightsMap) -> int:
    """Bytes a unit brings, from the weights map's specs, or the model's tensors that will be staged."""
    total = 0
    for name in unit.names:
        source = _source(name, plan)
        if source in held:
            shape, dtype = held.spec(source)
        else:
            tensor = slots[source].tensor
            shape, dtype = tuple(tensor.shape), tensor.dtype
        total += dtype.itemsize * math.prod(shape)
    return total


def _plan_streamed(
    plan: DispatchPlan, slots: Mapping[str, ModelTensor], held: Collection[str], partners: Mapping[str, list[str]]
) -> None:
    """Where each streamed tensor the weights map lacks gets its value from."""
    will_hold = set(held)
    for name, device in plan.streamed.items():
        if name in held:
            continue
        partner = next((p for p in partners.get(name, ()) if p in will_hold), None)
        if _is_meta(slots[name]) or (partner is not None and plan.streamed.get(partner) == device):
            # a tied name with no value of its own, or one stored like a partner: one entry for the group
            plan.alias[name] = partner if partner is not None else next(p for p in partners[name] if p in will_hold)
        elif device == "disk" and not slots[name].is_buffer:
            plan.to_write.setdefault(parent(name), []).append(name)
        else:
            plan.to_ram.append(name)
        will_hold.add(name)


def _units(
    model: nn.Module, streamed: Mapping[str, Device], placement: Placement, runs_on: Mapping[str, Device],
    preload: Sequence[str],
) -> list[HookUnit]:
    """Group streamed tensors by the module whose forward needs them (in model order).

    A tensor belongs to its direct owner, or to the outermost module whose forward reads it without
    calling its owner (:func:`~hf_bigmodel.model.reads.direct_reads`: ``nn.MultiheadAttention`` reading
    ``out_proj.weight``), so that module's hook brings it for its whole forward. An ancestor of that module
    inside the same device-map entry that is of a ``preload_module_classes`` class takes it instead, with
    its whole subtree.
    """
    device_map = placement.device_map
    preload_at: set[str] = set()
    order: dict[str, int] = {}
    for i, (name, module) in enumerate(model.named_modules()):
        order[name] = i
        if preload and type(module).__name__ in preload:
            preload_at.add(name)
    reads = direct_reads(model) if streamed else {}
    readers = {tensor: module for module, tensors in reads.items() for tensor in tensors}
    units: dict[str, list[str]] = {}
    for name in sorted(streamed, key=lambda n: (order.get(parent(n), 0), n)):
        unit = readers.get(name, parent(name))
        probe = unit
        while preload_at and probe:
            if probe in preload_at and lookup(probe, device_map) == lookup(name, device_map):
                unit = probe
            probe = parent(probe)
        units.setdefault(unit, []).append(name)
    return [HookUnit(unit, str(owner(names[0], device_map)), tuple(names), runs_on[names[0]])
            for unit, names in sorted(units.items(), key=lambda item: order.get(item[0], 0))]


def _input_hooks(model: nn.Module, placement: Placement) -> list[tuple[str, Device]]:
    """Model parallelism: each mapped module pulls its inputs to its execution device."""
    modules = {name for name, _ in model.named_modules(remove_duplicate=False)}
    hooks = []
    for key, device in placement.device_map.items():
        module_name = key if key in modules else parent(key)
        if module_name:
            hooks.append((module_name, placement.execution_device(device)))
    return hooks


def _no_data_error(names: list[str]) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        missing=names,
        hint="  These tensors are still on the meta device (no data): load a checkpoint into the model first "
        "(load_checkpoint_in_model / load_checkpoint_and_dispatch), or pass state_dict= / offload_dir=.",
    )
