"""Device-map planning: where each module's weights are stored, decided from sizes and budgets alone.

Planning is pure. It reads shapes and dtypes (meta tensors are fine), never allocates and never touches
files. Devices are filled in budget order (GPUs by index, other accelerators, ``"cpu"``, then
``"disk"``, unlimited unless ``max_memory`` gives it a budget). Room for the largest offloaded layer is
kept on the execution device only when something is actually offloaded, unlike accelerate, which always
reserves it.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import Advice, BigModelWarning, DeviceMapError, summarize
from ..model.naming import is_within, join, owner, parent
from ..model.sizes import compute_module_sizes, format_size
from ..model.tensors import model_tensors, tie_groups
from .balance import class_names
from .devices import Device, device_rank
from .memory import get_max_memory
from .placement import Placement, main_device_of

__all__ = ["infer_auto_device_map", "plan_device_map"]

logger = logging.getLogger(__name__)

_MAX_ROUNDS = 32  # re-plans while the reservation grows; then reserve for the worst case


class _Tree:
    """Names, sizes and ties of one model, indexed once per planning call.

    An *item* is a module name or a tensor name; the planner places items, splitting a module item into
    its direct tensors and children when it does not fit.
    """

    def __init__(
        self,
        model: nn.Module,
        no_split: set[str],
        dtype: str | torch.dtype | None,
        special_dtypes: Mapping[str, str | torch.dtype] | None,
        offload_buffers: bool,
        tensor_sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.no_split = no_split
        self.pinned: dict[str, Device] = {}  # items placed before the walk (plan_device_map's ``pinned``)
        self.offload_buffers = offload_buffers
        self.pieces: dict[str, list[str]] = {}  # module -> direct tensors, then children
        self.order: dict[str, int] = {}  # registration order of every module and tensor name
        self.tensors: dict[str, bool] = {}  # tensor name -> is a buffer
        self.tensor_id: dict[str, int] = {}
        direct: dict[str, list[str]] = defaultdict(list)  # module -> its own tensors, parameters first
        index = model_tensors(model, persistent_only=False)
        for full, slot in index.items():
            direct[parent(full)].append(full)
            self.tensors[full], self.tensor_id[full] = slot.is_buffer, id(slot.tensor)
        for name, module in self.modules.items():
            self.order[name] = len(self.order)
            self.pieces[name] = list(direct.get(name, ()))
            for full in self.pieces[name]:
                self.order[full] = len(self.order)
            self.pieces[name] += [join(name, key) for key, sub in module._modules.items() if sub is not None]
        # Placement sizes count a shared tensor once (under its first name); layer sizes count it fully.
        self.size = compute_module_sizes(model, dtype, special_dtypes, tensor_sizes=tensor_sizes)
        self.buffer_size = compute_module_sizes(model, dtype, special_dtypes, buffers_only=True,
                                                tensor_sizes=tensor_sizes)
        first_size: dict[int, int] = {}
        self.full_size: dict[str, int] = {}
        for tname, tid in self.tensor_id.items():
            first_size.setdefault(tid, self.size.get(tname, 0))
            self.full_size[tname] = max(first_size[tid], self.size.get(tname, 0))
        self.tie_group: dict[str, list[str]] = {}
        self.ties_within: dict[str, list[str]] = defaultdict(list)  # item -> tied names inside it
        for group in tie_groups(index):
            for tname in group:
                self.tie_group[tname] = group
                self.ties_within[""].append(tname)
                prefix = tname
                while prefix:
                    self.ties_within[prefix].append(tname)
                    prefix = parent(prefix)

    def splittable(self, name: str) -> bool:
        module = self.modules.get(name)
        return (
            module is not None
            and any(sub is not None for sub in module._modules.values())
            and type(module).__name__ not in self.no_split
        )

    def holds_pinned(self, names: Iterable[str]) -> bool:
        """True when one of these items contains a pinned item (so it must be split, not placed whole)."""
        return any(pin != name and is_within(pin, name) for name in names for pin in self.pinned)

    def cost(self, names: Iterable[str], offloaded: bool) -> int:
        """Bytes these items take on a device; buffers of offloaded items stay on the execution device."""
        total = 0
        for name in names:
            total += self.size.get(name, 0)
            if offloaded and not self.offload_buffers:
                total -= self.buffer_size.get(name, 0)
        return total

    def _moved_bytes(self, tensor: str) -> int:
        return 0 if self.tensors[tensor] and not self.offload_buffers else self.full_size[tensor]

    def _within(self, name: str) -> Iterator[str]:
        for piece in self.pieces.get(name, ()):
            yield from [piece] if piece in self.tensors else self._within(piece)

    def _layers(self, name: str) -> Iterator[tuple[str, str]]:
        """``(layer, tensor)`` pairs under a module item: a layer is what one hook brings to the executor."""
        if not self.splittable(name):
            yield from ((name, tensor) for tensor in self._within(name))
            return
        for piece in self.pieces[name]:
            yield from [(name, piece)] if piece in self.tensors else self._layers(piece)

    def offload_need(self, placement: Mapping[str, Device], offloaded: Collection[Device]) -> tuple[int, str]:
        """Room the execution device needs for offloaded items: the largest layer plus kept buffers."""
        layers: dict[str, dict[int, int]] = defaultdict(dict)
        kept_buffers = 0
        for name, device in placement.items():
            if device not in offloaded:
                continue
            if not self.offload_buffers:
                kept_buffers += self.buffer_size.get(name, 0)
            pairs = [(parent(name), name)] if name in self.tensors else self._layers(name)
            for layer, tensor in pairs:
                layers[layer][self.tensor_id[tensor]] = self._moved_bytes(tensor)
        if not layers:
            return 0, ""
        largest = max(layers, key=lambda n: sum(layers[n].values()))
        return sum(layers[largest].values()) + kept_buffers, largest


class _Queue:
    """Items still to place in walk order; splitting replaces an item by its pieces in place.

    Stored reversed, so taking the head and splitting it (nearly every step) cost O(pieces).
    """

    def __init__(self, tree: _Tree, names: list[str]) -> None:
        self.tree = tree
        self.stack = names[::-1]
        self.members = set(names)

    def names(self) -> list[str]:
        return self.stack[::-1]

    def split(self, name: str) -> None:
        at = len(self.stack) - 1
        while self.stack[at] != name:
            at -= 1
        pieces = self.tree.pieces[name]
        self.stack[at : at + 1] = pieces[::-1]
        self.members.discard(name)
        self.members.update(pieces)

    def take(self, names: Iterable[str]) -> None:
        for name in names:
            if self.stack[-1] == name:
                self.stack.pop()
            else:
                self.stack.remove(name)
            self.members.discard(name)

    def group(self, name: str) -> list[str]:
        """``name`` plus every queued item holding a parameter tied to one inside the group."""
        group, seen = [name], {name}
        for item in group:  # grows while iterating: a transitive closure
            for tied in self.tree.ties_within.get(item, ()):
                for partner in self.tree.tie_group[tied]:
                    holder = owner(partner, self.members)
                    if holder is not None and holder not in seen:
                        seen.add(holder)
                        group.append(holder)
        return group


def _assign(
    tree: _Tree,
    devices: list[Device],
    limits: Mapping[Device, int | None],
    offloaded: set[Device],
    *,
    fallback: bool,
    log: Callable[..., None],
) -> dict[str, Device]:
    """One greedy pass: place, split or move on, item by item. Pinned items are placed first."""
    queue = _Queue(tree, tree.pieces[""] if tree.splittable("") else [""])
    placement: dict[str, Device] = dict(tree.pinned)
    used = dict.fromkeys(devices, 0)
    for item, device in tree.pinned.items():
        used[device] += tree.cost([item], device in offloaded)
        room = limits[device]
        if room is not None and used[device] > room:
            raise _no_room(tree, [item], used, limits, offloaded)
    index = 0

    def put(group: list[str], device: Device, cost: int) -> None:
        for item in group:
            placement[item] = device
        queue.take(group)
        used[device] += cost
        log("Placing %s (%s) on %r.", summarize(group), format_size(cost), device)

    while queue.stack:
        device, name = devices[index], queue.stack[-1]
        if name in tree.pinned:
            queue.take([name])
            continue
        room = limits[device]
        group = queue.group(name)
        if tree.holds_pinned(group):  # placed piece by piece around the pinned item inside
            queue.split(next(item for item in group if tree.holds_pinned([item])))
            continue
        cost = tree.cost(group, device in offloaded)
        if room is None or used[device] + cost <= room:
            put(group, device, cost)
            continue
        log("%s needs %s but %r has %s left.", summarize(group), format_size(cost), device,
            format_size(room - used[device]))
        splittable = [item for item in group if tree.splittable(item)]
        if splittable:
            target = name if name in splittable else max(splittable, key=lambda n: tree.size.get(n, 0))
            log("Splitting %s.", target or "the model")
            queue.split(target)
            continue
        if fallback and used[device] == 0:
            found = _search(queue, queue.names(), {*group, *tree.pinned}, room, device in offloaded)
            if found is not None:
                log("Fallback: %r had nothing that fits in order; taking a later item.", device)
                put(found, device, tree.cost(found, device in offloaded))
                continue
        log("Nothing more goes on %r (%s used of %s).", device, format_size(used[device]), format_size(room))
        index += 1
        if index == len(devices):
            raise _no_room(tree, queue.names(), used, limits, offloaded)
    return placement


def _no_room(
    tree: _Tree, left: list[str], used: Mapping[Device, int], limits: Mapping[Device, int | None],
    offloaded: set[Device],
) -> DeviceMapError:
    """Every device is full (``"disk"`` has a budget too) and ``left`` is still unplaced: say by how much."""
    short = tree.cost(left, "disk" in offloaded)
    budgets = ", ".join(f"{d!r}: {format_size(used[d])} of {format_size(limit)}"
                        for d, limit in limits.items() if limit is not None)
    return DeviceMapError(
        f"The model does not fit in max_memory: {format_size(short)} of weights (in {summarize(left, 5)}) are left "
        f"once every device is full ({budgets}; room kept for offloaded layers included). Raise max_memory for "
        "a device (e.g. 'disk'), or load in a smaller dtype.",
        modules=left,
    )


def _search(queue: _Queue, names: list[str], exclude: set[str], room: int, offloaded: bool) -> list[str] | None:
    """First item (splitting where needed, depth first) whose group fits in ``room``; fallback allocation."""
    for name in names:
        group = queue.group(name)
        if exclude.intersection(group):
            continue
        if not queue.tree.holds_pinned(group) and queue.tree.cost(group, offloaded) <= room:
            return group
        if queue.tree.splittable(name):
            saved = (list(queue.stack), set(queue.members))
            queue.split(name)
            found = _search(queue, queue.tree.pieces[name], exclude, room, offloaded)
            if found is not None:
                return found
            queue.stack, queue.members = saved
    return None


def _clean(placement: Mapping[str, Device], tree: _Tree) -> dict[str, Device]:
    """Merge items: each key becomes the highest module whose whole subtree sits on one device."""
    under: dict[str, set[Device]] = defaultdict(set)
    for name, device in placement.items():
        prefix = name
        while True:
            under[prefix].add(device)
            if not prefix:
                break
            prefix = parent(prefix)
    merged: dict[str, Device] = {}
    for name, device in placement.items():
        top = name
        while top and len(under[parent(top)]) == 1:
            top = parent(top)
        merged[top] = device
    return dict(sorted(merged.items(), key=lambda kv: tree.order.get(kv[0], -1)))


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[int | str, int | str] | None = None,
    no_split_module_classes: Iterable[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
    tensor_sizes: Mapping[str, int] | None = None,
) -> dict[str, Device]:
    """Map module (or tensor) names to devices so that every budget in ``max_memory`` holds.

    Modules are walked in registration order; one that does not fit where room is left is split into its
    direct tensors and children (unless its class is in ``no_split_module_classes``), otherwise planning
    moves to the next device. Tied parameters always land together. When anything is offloaded (to
    ``"cpu"`` while an accelerator exists, or to ``"disk"``), the execution device (the first accelerator,
    else the CPU) keeps room for the largest offloaded layer plus, unless ``offload_buffers``, the
    buffers of offloaded modules. ``"disk"`` is the last resort, unlimited unless ``max_memory`` gives it
    a budget; a model that does not fit then raises :class:`~hf_bigmodel.errors.DeviceMapError` naming
    the shortfall. ``fallback_allocation`` lets a device that would stay empty take a later item that fits.
    ``verbose`` logs each decision at INFO level on the ``hf_bigmodel.plan.planner`` logger.
    ``tensor_sizes``: bytes of tensors whose loaded form differs from their dtype (quantized weights).

    Example::

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        infer_auto_device_map(model, {0: "10GiB", "cpu": "30GiB"}, no_split_module_classes=["LlamaDecoderLayer"])
        # {"model.embed_tokens": 0, "model.layers.0": 0, ..., "model.layers.31": "cpu", "lm_head": "cpu"}
    """
    budgets = get_max_memory(max_memory, check_devices=False)
    return plan_device_map(
        model, budgets, no_split_module_classes=no_split_module_classes, dtype=dtype, special_dtypes=special_dtypes,
        verbose=verbose, clean_result=clean_result, offload_buffers=offload_buffers,
        fallback_allocation=fallback_allocation, tensor_sizes=tensor_sizes,
    )


def plan_device_map(
    model: nn.Module,
    budgets: Mapping[Device, int],
    *,
    no_split_module_classes: Iterable[str] | str | None = None,
    dtype: str | torch.dtype | None = None,
    special_dtypes: Mapping[str, str | torch.dtype] | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
    tensor_sizes: Mapping[str, int] | None = None,
    pinned: Mapping[str, Device] | None = None,
) -> dict[str, Device]:
    """:func:`infer_auto_device_map` for budgets already in bytes (``{0: 10**9, "cpu": ...}``): pure.

    Nothing here measures the machine or touches a device. The main device (which runs offloaded
    weights, and keeps room for them) follows :class:`~hf_bigmodel.plan.placement.Placement`'s rule:
    the first accelerator the plan uses, else the CPU. An accelerator whose budget cannot hold anything
    once that room is kept is left out, and the plan then runs on the CPU, as dispatch would.
    ``pinned`` (``{module or tensor name: device}``) places those items first, whatever their order; the
    modules holding them are split around them, so none may lie inside a no-split module.
    """
    tree = _Tree(model, class_names(no_split_module_classes), dtype, special_dtypes, offload_buffers, tensor_sizes)
    log = logger.info if verbose else logger.debug
    devices = sorted((d for d in budgets if d != "disk"), key=device_rank) + ["disk"]
    tree.pinned = _checked_pins(tree, pinned or {}, devices)
    reserve = 0
    for _ in range(_MAX_ROUNDS):
        main = main_device_of(d for d in devices if d == "disk" or budgets[d] > 0)
        placement = _assign_with_reserve(tree, devices, budgets, main, reserve, fallback_allocation, log)
        used_main = Placement.of(placement).main
        if used_main != main:  # the accelerator got nothing: drop it, and plan for the device that runs instead
            log("%r receives nothing once room for offloaded layers is kept; planning without it.", main)
            devices = [d for d in devices if d != main]
            reserve = 0
            continue
        offloaded = Placement.of(placement).offload_targets
        need, layer = tree.offload_need(placement, offloaded)
        if need <= reserve:
            break
        log("Offloading happened: re-planning with %s kept free on %r for %s.", format_size(need), main,
            layer or "the model")
        reserve = need
    else:
        main = main_device_of(devices)
        reserve, _ = tree.offload_need({"": "disk"}, {"disk"})
        placement = _assign_with_reserve(tree, devices, budgets, main, reserve, fallback_allocation, log)
    final = Placement.of(placement)
    need, layer = tree.offload_need(placement, final.offload_targets)
    if final.main in budgets and need > budgets[final.main]:  # only when even an empty main device is too small
        warnings.warn(BigModelWarning(
            f"Offloaded weights run on {final.main!r}, which needs {format_size(need)} free for the largest "
            f"offloaded layer ({layer or 'the model'}) and kept buffers, but its budget is only "
            f"{format_size(budgets[final.main])}. Running will likely exceed it.",
            advice=[Advice("Raise its budget ({}), or load in a smaller dtype.", "max_memory",
                           f"{{{final.main!r}: ...}}"),
                    Advice("Or pass {} to stream the buffers too.", "offload_buffers", "True")],
        ), stacklevel=3)
    if clean_result:
        return _clean(placement, tree)
    return dict(sorted(placement.items(), key=lambda kv: tree.order.get(kv[0], -1)))


def _checked_pins(tree: _Tree, pinned: Mapping[str, Device], devices: Sequence[Device]) -> dict[str, Device]:
    """``pinned`` in walk order, refused (``ValueError``) where an item cannot be placed apart from the rest."""
    for name, device in pinned.items():
        if name not in tree.order or device not in devices:
            raise ValueError(f"cannot pin {name!r} to {device!r}: no such item, or no budget for that device")
        above = [a for a, module in tree.modules.items()
                 if a != name and is_within(name, a) and type(module).__name__ in tree.no_split]
        if above:
            raise ValueError(f"cannot pin {name!r}: it lies inside {above[0] or 'the model'!r}, which is not split")
    return dict(sorted(pinned.items(), key=lambda kv: tree.order[kv[0]]))


def _assign_with_reserve(
    tree: _Tree, devices: list[Device], budgets: Mapping[Device, int], main: Device, reserve: int,
    fallback: bool, log: Callable[..., None],
) -> dict[str, Device]:
    """One greedy pass with ``reserve`` bytes kept free on ``main`` for offloaded layers."""
    limits = {d: budgets.get(d) if d == "disk" else max(budgets[d] - (reserve if d == main else 0), 0)
              for d in devices}
    offloaded: set[Device] = {"disk"} if main == "cpu" else {"disk", "cpu"}
    return _assign(tree, devices, limits, offloaded, fallback=fallback, log=log)
