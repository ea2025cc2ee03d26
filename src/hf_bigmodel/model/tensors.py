"""The tensors of a model: one index by full name, and the one way to put a tensor into a module slot.

Every other module reads a model's parameters and buffers through :func:`model_tensors` and changes
them through the functions here; none writes ``module._parameters[...]`` or ``module._buffers[...]``
itself (``tests/test_layering.py`` checks it). A parameter put in a slot keeps the class of the one it
replaces (a ``Parameter`` subclass), its extra attributes and its ``requires_grad`` flag.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ModelTensor",
    "distinct_tensors",
    "model_tensors",
    "module_slots",
    "move_tensor",
    "put_tensor",
    "restore_data",
    "set_tensor",
    "tie_groups",
    "with_slot_class",
]


@dataclass(frozen=True)
class ModelTensor:
    """One parameter or buffer slot of a model: the module holding it, the attribute name, and its kind."""

    module: nn.Module
    leaf: str
    is_buffer: bool
    #: False for a buffer registered with ``persistent=False`` (not in the state dict).
    persistent: bool = True

    @property
    def tensor(self) -> torch.Tensor:
        store = self.module._buffers if self.is_buffer else self.module._parameters
        return store[self.leaf]  # type: ignore[return-value]


def model_tensors(model: nn.Module, *, persistent_only: bool = True) -> dict[str, ModelTensor]:
    """Every parameter (tied aliases included) and buffer of ``model``, by full name, in registration order.

    A module's parameters come before its buffers, then its children's. ``persistent_only`` leaves out
    buffers registered with ``persistent=False``.

    >>> sorted(model_tensors(nn.Sequential(nn.Linear(2, 2))))
    ['0.bias', '0.weight']
    """
    result: dict[str, ModelTensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for leaf, param in module._parameters.items():
            if param is not None:
                result[dot + leaf] = ModelTensor(module, leaf, False)
        transient = module._non_persistent_buffers_set
        for leaf, buf in module._buffers.items():
            if buf is not None and not (persistent_only and leaf in transient):
                result[dot + leaf] = ModelTensor(module, leaf, True, leaf not in transient)
    return result


def distinct_tensors(index: Mapping[str, ModelTensor]) -> dict[str, torch.Tensor]:
    """Each tensor of ``index`` once, under its first name: parameters first, then buffers.

    The order and names are those of ``named_parameters()`` followed by ``named_buffers()``.
    """
    result: dict[str, torch.Tensor] = {}
    for want_buffers in (False, True):
        seen: set[int] = set()
        for name, slot in index.items():
            if slot.is_buffer is want_buffers:
                tensor = slot.tensor
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    result[name] = tensor
    return result


def tie_groups(index: Mapping[str, ModelTensor]) -> list[list[str]]:
    """Groups of parameter names that share one ``Parameter`` object, each sorted, sorted by first name."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, slot in index.items():
        if not slot.is_buffer:
            groups[id(slot.tensor)].append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


def with_slot_class(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a parameter like ``like`` (same class, extra attributes, ``requires_grad``); a buffer as is.

    ``like`` is the tensor the slot held (a ``Parameter`` or not). ``requires_grad`` is kept only for
    floating-point and complex values, the only ones that can require gradients.

    >>> class Tagged(nn.Parameter): pass
    >>> old = Tagged(torch.zeros(2)); old.tag = "q"
    >>> new = with_slot_class(torch.ones(2), old)
    >>> type(new).__name__, new.tag, new.requires_grad
    ('Tagged', 'q', True)
    """
    if not isinstance(like, nn.Parameter):
        return value
    requires_grad = bool(like.requires_grad and (value.is_floating_point() or value.is_complex()))
    cls = type(like)
    if not issubclass(cls, nn.Parameter):  # a tensor subclass held as a parameter (quantized weights): its data
        param = nn.Parameter(value, requires_grad=requires_grad)  # makes the class, not the placeholder's
    else:
        try:
            param = cls(value, requires_grad=requires_grad)
        except TypeError:  # a subclass whose constructor takes other arguments: keep what the data needs
            param = nn.Parameter(value, requires_grad=requires_grad)
    # The placeholder's tags (never the value's own state: a tensor subclass keeps its inner tensors there).
    extra = {k: v for k, v in like.__dict__.items() if k not in param.__dict__}
    if extra:
        param.__dict__.update(extra)
    return param


def set_tensor(slot: ModelTensor, value: torch.Tensor, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """Put ``value`` in ``slot``, as a parameter like the current one (or ``like``); returns what was stored.

    A parameter keeps its class, extra attributes and ``requires_grad`` (see :func:`with_slot_class`).
    """
    stored = with_slot_class(value, like if like is not None else slot.tensor) if not slot.is_buffer else value
    put_tensor(slot, stored)
    return stored


def put_tensor(slot: ModelTensor, stored: torch.Tensor) -> None:
    """Put ``stored`` in ``slot`` as it is: a tensor taken from a slot, or returned by :func:`set_tensor`.

    For tied aliases (one object in several slots), placeholders and restoring what a slot held.
    """
    store = slot.module._buffers if slot.is_buffer else slot.module._parameters
    store[slot.leaf] = stored  # type: ignore[assignment]


def move_tensor(slot: ModelTensor, device: torch.device) -> None:
    """Move ``slot``'s tensor to ``device`` (nothing for meta tensors); a parameter stays the same object.

    The parameter keeps its identity (its ``.data`` is replaced), so tied slots stay tied.
    """
    tensor = slot.tensor
    if tensor.device == device or tensor.device.type == "meta":
        return
    if slot.is_buffer:
        put_tensor(slot, tensor.to(device))
    else:
        tensor.data = tensor.data.to(device)


def restore_data(param: torch.Tensor, data: torch.Tensor) -> None:
    """Give ``param`` back the data it held before a :func:`move_tensor` (the same object, its old storage)."""
    param.data = data


def module_slots(module: nn.Module, *, buffers: bool = True) -> Iterable[ModelTensor]:
    """``module``'s own parameter (and buffer) slots, not its children's."""
    for leaf, param in module._parameters.items():
        if param is not None:
            yield ModelTensor(module, leaf, False)
    if buffers:
        for leaf, buf in module._buffers.items():
            if buf is not None:
                yield ModelTensor(module, leaf, True, leaf not in module._non_persistent_buffers_set)
