"""The hooks that place a dispatched model's weights and inputs (the protocol is :mod:`.hook_protocol`'s).

:class:`AlignDevicesHook` is the workhorse: it moves inputs to the module's execution device and, for
offloaded modules, brings their weights there just before forward and releases them right after.
:class:`CpuOffload` keeps a whole model in RAM and moves it to the execution device when it runs;
:func:`strip_hooks` and :func:`remove_hook_from_submodules` take them off again. The protocol's names
(``ModelHook``, ``add_hook_to_module``, ...) are importable from here too, as from accelerate's ``hooks``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..load.loading import OFFLOAD_ATTR
from ..model.tensors import ModelTensor, model_tensors, module_slots, move_tensor, put_tensor, set_tensor
from ..plan.devices import Device, torch_device
from ..storage.weights_map import WeightsMap
from .hook_protocol import (
    ModelHook,
    SequentialHook,
    add_hook_to_module,
    hooks_of,
    remove_hook_from_module,
    unwrap_forward,
)
from .model_device import reset_model_device
from .placeholders import StreamedSlot, plain
from .streaming import StreamedUnit, WeightsFetcher

if TYPE_CHECKING:
    from .hook_protocol import _HookedModule

__all__ = [
    "AlignDevicesHook",
    "CpuOffload",
    "ModelHook",
    "SequentialHook",
    "UserCpuOffloadHook",
    "add_hook_to_module",
    "move_direct_tensors",
    "remove_hook_from_module",
    "remove_hook_from_submodules",
    "hooks_of",
    "send_to_device",
    "strip_hooks",
]


def strip_hooks(model: nn.Module, kind: type[ModelHook]) -> list[ModelHook]:
    """Take every hook of ``kind`` off ``model`` and its submodules without detaching it; other hooks stay.

    A detached offloading hook reads its weights back into RAM; a stripped one leaves its modules'
    tensors on the meta device (plain placeholders of the weight's kind, no longer refusing to be computed
    with: the weights are in a weights map kept elsewhere), for dispatch to replace it. Returns the hooks
    taken (their prefetchers still running: the caller closes them).
    """
    taken: list[ModelHook] = []
    for module in model.modules():
        chain = hooks_of(module)
        kept = [h for h in chain if not isinstance(h, kind)]
        if len(kept) == len(chain):
            continue
        for hook in chain:
            if isinstance(hook, kind):
                taken.append(hook)
                for streamed in getattr(hook, "slots", ()):
                    put_tensor(streamed.slot, streamed.placeholder)
        if not kept:
            unwrap_forward(module)
        else:
            cast("_HookedModule", module)._hf_hook = kept[0] if len(kept) == 1 else SequentialHook(*kept)
    return taken


def remove_hook_from_submodules(module: nn.Module) -> None:
    """Detach every hook of ``module`` and its submodules and give back a plain, complete model in RAM.

    Offloaded weights come back to RAM (tied names sharing one tensor again), whether a hook held them
    or loading left them in the model's weights map (``"disk"`` entries of a device map without
    dispatch). The weights map and ``hf_device_map``, which no longer describe the model, are dropped:
    ``disk_offload`` or ``dispatch_model`` afterwards start from the plain model, and transformers'
    ``generate`` does not go looking for hooks.

    Example::

        model = load_checkpoint_and_dispatch(model, "ckpt/", device_map={"": "disk"})
        remove_hook_from_submodules(model)   # every weight in RAM, forward untouched
    """
    remove_hook_from_module(module, recurse=True)
    weights = module.__dict__.pop(OFFLOAD_ATTR, None)
    if isinstance(weights, WeightsMap):
        _fill_from(module, weights)
    module.__dict__.pop("hf_device_map", None)
    reset_model_device(module)


def _fill_from(model: nn.Module, weights: WeightsMap) -> None:
    """Every meta slot the weights map holds, read into RAM; names sharing one entry (tied) share one tensor."""
    first: dict[int, torch.Tensor] = {}
    for name, slot in model_tensors(model, persistent_only=False).items():
        entry: object = weights.memory[name] if name in weights.memory else weights.disk.get(name)
        if entry is None:
            continue
        held = first.get(id(entry))
        if held is not None and isinstance(held, nn.Parameter) and not slot.is_buffer:
            put_tensor(slot, held)  # one parameter again, as before dispatch
        elif slot.tensor.device.type == "meta":
            first[id(entry)] = set_tensor(slot, weights[name].to("cpu"), like=plain(slot.tensor))
        else:
            first.setdefault(id(entry), slot.tensor)


def send_to_device(obj: Any, device: torch.device, skip_keys: Sequence[str] | str | None = None,
                   non_blocking: bool = False) -> Any:
    """Move every tensor in nested tuples/lists/dicts to ``device``, keeping container types.

    Dict entries named in ``skip_keys`` (e.g. ``"past_key_values"``) are left where they are.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(skip_keys, str):
        skip_keys = [skip_keys]
    if isinstance(obj, (list, tuple)):
        moved = [send_to_device(o, device, skip_keys, non_blocking) for o in obj]
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*moved)
        try:
            return type(obj)(moved)
        except TypeError:
            return moved if isinstance(obj, list) else tuple(moved)
    if isinstance(obj, Mapping):
        items = {k: (v if skip_keys and k in skip_keys else send_to_device(v, device, skip_keys, non_blocking))
                 for k, v in obj.items()}
        mapping_type: Any = type(obj)  # a concrete mapping class; the abstract Mapping takes no arguments
        try:
            return mapping_type(items)
        except TypeError:
            return items
    return obj


def _packed_view(obj: Any) -> Any:
    """A contiguous tensor as a view with the packed strides; anything else as it is.

    A slice such as ``hidden[:, -1:, :]`` is contiguous but keeps the stride of its size-1 dimension;
    handed to a bfloat16 ``linear`` on the CPU, torch copies the whole weight for it (a 125 MiB
    transient for a 32000 x 2048 head, on top of the memory budget). The view costs nothing.

    >>> x = torch.zeros(1, 32, 8)[:, -1:, :]
    >>> x.stride(), _packed_view(x).stride()
    ((256, 8, 1), (8, 8, 1))
    """
    if not isinstance(obj, torch.Tensor) or obj.dim() < 2 or not obj.is_contiguous():
        return obj
    packed = obj.view(-1).view(obj.shape)
    return obj if packed.stride() == obj.stride() else packed


def _find_device(obj: Any) -> torch.device | None:
    if isinstance(obj, torch.Tensor):
        return obj.device
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for o in obj:
            device = _find_device(o)
            if device is not None:
                return device
    return None


class AlignDevicesHook(ModelHook):
    """Run a module on ``execution_device``; with ``offload``, stream its weights from ``weights_map``.

    ``weights_map`` maps *full* tensor names (``prefix`` + local name) to tensors, reading disk ones on
    access (:class:`hf_bigmodel.storage.offload_folder.WeightsMap`). With ``place_submodules`` the hook manages the
    tensors of the whole subtree (for modules whose children's weights are used without calling them).
    With ``io_same_device`` outputs go back to the device the inputs came from. ``tied_params_map`` is
    accepted for accelerate compatibility and unused: tied names share one entry of the weights map, which
    the hook (and the prefetcher) read once.
    """

    def __init__(
        self,
        execution_device: Device | torch.device | None = None,
        offload: bool = False,
        io_same_device: bool = False,
        weights_map: Mapping[str, torch.Tensor] | None = None,
        offload_buffers: bool = False,
        place_submodules: bool = False,
        skip_keys: Sequence[str] | str | None = None,
        tied_params_map: dict[str, torch.Tensor] | None = None,
        *,
        prefix: str = "",
        tensor_names: Sequence[str] | None = None,
        move_inputs: bool = True,
    ) -> None:
        self.execution_device = torch_device(execution_device) if execution_device is not None else None
        self.offload = offload
        self.io_same_device = io_same_device
        self.weights_map = weights_map
        self.offload_buffers = offload_buffers
        self.place_submodules = place_submodules
        self.skip_keys = skip_keys
        self.prefix = prefix
        self.tensor_names = list(tensor_names) if tensor_names is not None else None
        self.move_inputs = move_inputs
        self.slots: list[StreamedSlot] = []
        self.input_device: torch.device | None = None
        #: What a prefetcher needs from this hook (set by ``init_hook`` when it streams from a WeightsMap).
        self.stream: StreamedUnit | None = None
        #: Supplies the weights ahead of time (dispatch sets the model's prefetcher), or None.
        self.fetcher: WeightsFetcher | None = None
        self._resident = False

    def __repr__(self) -> str:
        return (f"AlignDevicesHook(execution_device={self.execution_device}, offload={self.offload}, "
                f"io_same_device={self.io_same_device}, tensors={len(self.slots)})")

    def _managed_names(self, module: nn.Module) -> list[str]:
        if self.tensor_names is not None:
            return self.tensor_names
        names = [n for n, _ in module.named_parameters(recurse=self.place_submodules)]
        if self.offload_buffers:
            names += [n for n, _ in module.named_buffers(recurse=self.place_submodules)]
        return names

    def init_hook(self, module: nn.Module) -> nn.Module:
        if not self.offload:
            if self.execution_device is not None:
                for sub in module.modules() if self.place_submodules else [module]:
                    move_direct_tensors(sub, self.execution_device)
            return module
        dot = f"{self.prefix}." if self.prefix else ""
        for local in self._managed_names(module):
            owner, _, leaf = local.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            slot = StreamedSlot(ModelTensor(sub, leaf, leaf in sub._buffers), dot + local)
            slot.release()
            self.slots.append(slot)
        if isinstance(self.weights_map, WeightsMap) and self.execution_device is not None and self.slots:
            self.stream = StreamedUnit(self.prefix, tuple(s.name for s in self.slots), self.weights_map,
                                       self.execution_device)
        if not self.offload_buffers and self.execution_device is not None:
            for sub in (module.modules() if self.place_submodules else [module]):
                for tensor_slot in module_slots(sub):
                    if tensor_slot.is_buffer:
                        move_tensor(tensor_slot, self.execution_device)
        return module

    def load_weights(self) -> list[torch.Tensor]:
        """This hook's tensors on the execution device, in slot order (tied names share one copy)."""
        assert self.weights_map is not None and self.execution_device is not None
        seen: dict[int, torch.Tensor] = {}
        values = []
        disk = getattr(self.weights_map, "disk", None)
        memory = getattr(self.weights_map, "memory", None)
        for slot in self.slots:
            source: Any = None
            if memory is not None and slot.name in memory:
                source = memory[slot.name]
            elif disk is not None and slot.name in disk:
                source = disk[slot.name]
            key = id(source) if source is not None else None
            if key is not None and key in seen:
                values.append(seen[key])
                continue
            value = self.weights_map[slot.name].to(self.execution_device, non_blocking=True)
            if key is not None:
                seen[key] = value
            values.append(value)
        return values

    def materialize(self) -> None:
        values = self.fetcher.take(self.stream) if self.fetcher is not None and self.stream is not None else None
        if values is None:
            values = self.load_weights()
        for slot, value in zip(self.slots, values):
            slot.set(value)
        self._resident = True

    def release(self) -> None:
        if self._resident:
            for slot in self.slots:
                slot.release()
            self._resident = False

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.io_same_device:
            self.input_device = _find_device([args, kwargs])
        if self.offload and self.slots:
            self.materialize()
            if self.execution_device is not None and self.execution_device.type == "cpu":
                args = tuple(_packed_view(a) for a in args)
                kwargs = {k: _packed_view(v) for k, v in kwargs.items()}
        if self.execution_device is None or not self.move_inputs:
            return args, kwargs
        return (send_to_device(args, self.execution_device),
                send_to_device(kwargs, self.execution_device, skip_keys=self.skip_keys))

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.release()
        if self.fetcher is not None and self.stream is not None:
            self.fetcher.done_with(self.stream)
        if self.io_same_device and self.input_device is not None:
            output = send_to_device(output, self.input_device, skip_keys=self.skip_keys)
        return output

    def on_error(self, module: nn.Module) -> None:
        self.release()

    def detach_hook(self, module: nn.Module) -> nn.Module:
        """Leave a plain, working module: offloaded tensors are brought back into RAM for good."""
        if self.fetcher is not None:  # its reader thread stops; the other hooks it served load on their own
            self.fetcher.close()
            self.fetcher = None
        if self.offload and self.weights_map is not None:
            shared: dict[int, torch.Tensor] = {}
            for slot in self.slots:
                value = self.weights_map[slot.name]
                slot.set(shared.setdefault(id(value), value.to("cpu")))
            self.slots = []
        return module


def move_direct_tensors(module: nn.Module, device: torch.device) -> None:
    """Move ``module``'s own parameters and buffers (not its children's) to ``device``, keeping ties."""
    for slot in module_slots(module):
        move_tensor(slot, device)


class CpuOffload(ModelHook):
    """Keep a whole model on CPU; move it to ``execution_device`` when it runs (and its predecessor back)."""

    def __init__(self, execution_device: Device | torch.device | None = None,
                 prev_module_hook: UserCpuOffloadHook | None = None) -> None:
        self.execution_device = torch_device(execution_device if execution_device is not None else
                                             (0 if torch.cuda.is_available() else "cpu"))
        self.prev_module_hook = prev_module_hook

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module.to("cpu")

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.prev_module_hook is not None:
            self.prev_module_hook.offload()
        module.to(self.execution_device)
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)


class UserCpuOffloadHook:
    """Handle returned by ``cpu_offload_with_hook``: ``offload()`` sends the model back to CPU, ``remove()``
    unhooks it."""

    def __init__(self, model: nn.Module, hook: CpuOffload) -> None:
        self.model = model
        self.hook = hook

    def offload(self) -> None:
        self.hook.init_hook(self.model)

    def remove(self) -> None:
        remove_hook_from_module(self.model)
