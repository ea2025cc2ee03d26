"""A model as it was before dispatch or offload changed it, put back exactly when they fail half way.

Dispatch and ``disk_offload`` change a model in several steps: tensors moved or replaced by meta
placeholders, entries added to its weights map, hooks attached, ``hf_device_map`` set. A failure in
any step (a full disk, a missing device, an interrupt) must leave the model as it was, never with
weights on the meta device and no way back. :class:`ModelState` records, by reference (no tensor is
copied), what those steps change, and :meth:`ModelState.restore` puts it back.

>>> model = nn.Linear(2, 2)
>>> weight = model.weight
>>> state = ModelState.capture(model)
>>> model.weight = nn.Parameter(torch.empty(2, 2, device="meta"))
>>> state.restore()
>>> model.weight is weight and model.weight.device.type
'cpu'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..load.loading import OFFLOAD_ATTR
from ..model.tensors import ModelTensor, model_tensors, put_tensor, restore_data
from ..storage.weights_map import DiskRef, WeightsMap
from .model_device import DEVICE_ATTR

__all__ = ["HOOK_ATTRS", "ModelState"]

#: What ``add_hook_to_module`` keeps in a module's ``__dict__``.
HOOK_ATTRS = ("_hf_hook", "_old_forward", "forward", "_hf_hook_had_instance_forward")
#: What dispatch sets on the model itself.
_MODEL_ATTRS = (OFFLOAD_ATTR, "hf_device_map", "device", DEVICE_ATTR)
_MISSING = object()


@dataclass
class ModelState:
    """Every slot's tensor (and a parameter's data), every module's hook attributes, the model's dispatch
    attributes and the contents of its weights map, as they were when captured."""

    model: nn.Module
    tensors: list[tuple[ModelTensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    hooks: list[tuple[nn.Module, dict[str, Any]]] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: tuple[WeightsMap, dict[str, torch.Tensor], dict[str, DiskRef]] | None = None
    cls: type[nn.Module] | None = None  # dispatch may swap it (model_device)

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        state = cls(model)
        for slot in model_tensors(model, persistent_only=False).values():
            tensor = slot.tensor
            state.tensors.append((slot, tensor, None if slot.is_buffer else tensor.data))
        for module in model.modules():
            state.hooks.append((module, {k: module.__dict__[k] for k in HOOK_ATTRS if k in module.__dict__}))
        state.attrs = {k: model.__dict__.get(k, _MISSING) for k in _MODEL_ATTRS}
        state.cls = type(model)
        weights = state.attrs[OFFLOAD_ATTR]
        if isinstance(weights, WeightsMap):
            state.weights = (weights, dict(weights.memory), dict(weights.disk))
        return state

    def restore(self) -> None:
        """Put everything captured back (tensors are the very objects captured, on their devices)."""
        for slot, tensor, data in self.tensors:
            put_tensor(slot, tensor)
            if data is not None:
                restore_data(tensor, data)  # a move replaces a parameter's data in place
        for module, saved in self.hooks:
            for key in HOOK_ATTRS:
                module.__dict__.pop(key, None)
            module.__dict__.update(saved)
        for key, value in self.attrs.items():
            self.model.__dict__.pop(key, None)
            if value is not _MISSING:
                self.model.__dict__[key] = value
        if self.cls is not None:
            self.model.__class__ = self.cls
        if self.weights is not None:
            weights, memory, disk = self.weights
            weights.memory.clear()
            weights.memory.update(memory)
            weights.disk.clear()
            weights.disk.update(disk)
