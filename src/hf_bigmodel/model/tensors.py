"""The tensors of a model: one index by full name, and the one way to put a tensor into a module slot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelTensor", "model_tensors", "set_tensor"]


@dataclass(frozen=True)
class ModelTensor:
    """One entry of a model's state dict: the module holding it, the attribute name, and its kind."""

    module: nn.Module
    leaf: str
    is_buffer: bool

    @property
    def tensor(self) -> torch.Tensor:
        store = self.module._buffers if self.is_buffer else self.module._parameters
        return store[self.leaf]  # type: ignore[return-value]



def model_tensors(model: nn.Module, *, persistent_only: bool = True) -> dict[str, ModelTensor]:
    """Every parameter (tied aliases included) and buffer of ``model``, by full name."""
    result: dict[str, ModelTensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for leaf, param in module._parameters.items():
            if param is not None:
                result[dot + leaf] = ModelTensor(module, leaf, False)
        skip = module._non_persistent_buffers_set if persistent_only else set()
        for leaf, buf in module._buffers.items():
            if buf is not None and leaf not in skip:
                result[dot + leaf] = ModelTensor(module, leaf, True)
    return result



def set_tensor(slot: ModelTensor, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` in ``slot`` (a parameter keeps its class and requires_grad); returns what was stored."""
    if slot.is_buffer:
        slot.module._buffers[slot.leaf] = value
        return value
    old = slot.module._parameters[slot.leaf]
    requires_grad = bool(old is not None and old.requires_grad and value.is_floating_point())
    cls = type(old) if old is not None and type(old) is not nn.Parameter else nn.Parameter
    try:
        param = cls(value, requires_grad=requires_grad)
    except TypeError:
        param = nn.Parameter(value, requires_grad=requires_grad)
    slot.module._parameters[slot.leaf] = param
    return param

