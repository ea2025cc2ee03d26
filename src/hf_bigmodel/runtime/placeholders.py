"""Idle placeholders of offloaded weights: meta tensors that refuse to take part in a computation.

While its module is not running, an offloaded weight's slot holds a placeholder on the meta device (its
shape, dtype and kind, no data). torch does not always refuse a meta tensor next to real ones:
``torch.mm(x, meta)`` and ``F.linear(x, meta)`` on CPU return a tensor of whatever memory held, silently.
A forward that reads a weight in a way dispatch could not see (:mod:`hf_bigmodel.model.reads`) would then
compute garbage. The placeholder here is an instance of a subclass of the weight's own class (an
``nn.Parameter`` stays one, a ``Parameter`` subclass stays that subclass) whose ``__torch_function__``
raises :class:`~hf_bigmodel.errors.OffloadedWeightUseError` naming the weight when an operation mixes it
with a tensor holding data. Operations on placeholders alone (its shape, dtype, ``.to(dtype)``, a
transpose) work and give placeholders, so a later mix is caught too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from ..errors import Advice, OffloadedWeightUseError
from ..model.tensors import ModelTensor, put_tensor, set_tensor, with_slot_class

__all__ = ["OffloadedPlaceholder", "StreamedSlot", "idle_placeholder", "plain"]

_NAME = "_hf_bigmodel_offloaded"


class OffloadedPlaceholder(torch.Tensor):
    """A meta tensor standing for an offloaded weight while its module is not running (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if any(t.device.type != "meta" for t in leaves):
                raise _use_error(func, leaves)
            result = func(*args, **kwargs)
        if isinstance(result, torch.Tensor) and not isinstance(result, OffloadedPlaceholder):
            name = next((t.__dict__.get(_NAME) for t in leaves if _NAME in t.__dict__), None)
            result = result.as_subclass(OffloadedPlaceholder)
            result.__dict__[_NAME] = name
        return result


@functools.cache
def _placeholder_class(cls: type[torch.Tensor]) -> type[torch.Tensor]:
    """The placeholder class for tensors of class ``cls`` (a subclass of both)."""
    if cls is torch.Tensor:
        return OffloadedPlaceholder
    return type(f"Offloaded{cls.__name__}", (OffloadedPlaceholder, cls), {"_weight_class": cls})


def idle_placeholder(like: torch.Tensor, name: str) -> torch.Tensor:
    """A placeholder for tensor ``name``: meta, like ``like`` (meta) in class, attributes and ``requires_grad``.

    A tensor subclass that wraps inner tensors (torchao's quantized weights) cannot be re-classed: its meta
    instance is the placeholder, and its own operations refuse its meta inner tensors next to real ones.
    """
    like = plain(like)
    if is_traceable_wrapper_subclass(like):
        return like
    placeholder = torch.Tensor._make_subclass(_placeholder_class(type(like)), like, like.requires_grad)
    placeholder.__dict__.update(like.__dict__)
    placeholder.__dict__[_NAME] = name
    return placeholder


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or for a placeholder a meta tensor of the weight's own class (as before it was one)."""
    if not isinstance(tensor, OffloadedPlaceholder):
        return tensor
    cls = getattr(type(tensor), "_weight_class", torch.Tensor)
    with torch._C.DisableTorchFunctionSubclass():
        unwrapped = torch.Tensor._make_subclass(cls, tensor, tensor.requires_grad)
    unwrapped.__dict__.update({k: v for k, v in tensor.__dict__.items() if k != _NAME})
    return unwrapped


def _use_error(func: Callable[..., Any], tensors: list[torch.Tensor]) -> OffloadedWeightUseError:
    names = sorted({str(t.__dict__[_NAME]) for t in tensors if t.__dict__.get(_NAME)})
    devices = sorted({str(t.device) for t in tensors if t.device.type != "meta"})
    what = ", ".join(names) or "an offloaded weight"
    return OffloadedWeightUseError(
        f"{what} took part in a computation ({getattr(func, '__name__', func)} with a tensor on "
        f"{', '.join(devices)}) while it was offloaded: a module reads it without calling the module that "
        "holds it, in a way dispatch could not see from the code, so it was never brought in.",
        names=names, advice=[Advice("Name the class of the module that reads it in {}, so that module brings "
                                    "its whole subtree at once.", "preload_module_classes", "['MyBlock']")],
    )


class StreamedSlot:
    """One tensor an offloading hook manages: its module slot, its full name, and its idle placeholder.

    ``placeholder`` is a meta tensor like the original (for a parameter: same class, extra attributes and
    ``requires_grad``); every value the hook puts in the slot is made like it. While idle the slot holds
    ``idle``, the same as an :class:`OffloadedPlaceholder` that refuses to be computed with.

    A module may recast its own weights while the placeholder is in the slot (switch_transformers' router
    runs ``self.classifier.to(torch.float32)`` in its forward; ``model.to(torch.float16)`` does it too):
    the placeholder then has another floating-point dtype than the weights map's, and values are delivered
    cast to it, as the module would hold them had it kept its weights.
    """

    __slots__ = ("dtype", "idle", "name", "placeholder", "slot")

    def __init__(self, slot: ModelTensor, name: str) -> None:
        self.slot, self.name = slot, name
        current = plain(slot.tensor)  # an earlier hook's idle placeholder: the weight's own kind
        self.placeholder = current if current.device.type == "meta" else with_slot_class(
            current.detach().to("meta"), current)
        self.idle = idle_placeholder(self.placeholder, name)
        #: The dtype the slot held when the hook took it over.
        self.dtype = self.placeholder.dtype

    def set(self, value: torch.Tensor) -> None:
        current = self.slot.tensor
        if current is not self.idle and current.device.type == "meta":
            self.idle = idle_placeholder(current, self.name)  # the module put a recast placeholder in the slot
        wanted = self.idle.dtype
        if wanted != self.dtype and wanted.is_floating_point and value.is_floating_point():
            value = value.to(wanted)
        set_tensor(self.slot, value, like=self.placeholder)

    def release(self) -> None:
        put_tensor(self.slot, self.idle)
