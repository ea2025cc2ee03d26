"""A dispatched model's ``device``: where its offloaded weights run, not its first weight's placeholder.

transformers' and diffusers' models answer ``model.device`` with the device of their first parameter.
Once that parameter is offloaded (an input embedding on disk, or ``max_memory={"cpu": 0}``) its slot holds
a meta placeholder, and code that moves tensors to ``model.device`` sends them to meta: transformers'
assisted generation moves the draft's candidate tokens there and the next forward fails. Dispatch gives
such a model the main execution device instead, as it gives a plain module a ``device`` attribute.

A ``device`` property belongs to the class, so the model's class is swapped for a subclass that only
overrides that property (same name, module and qualified name, so ``isinstance`` and
``type(model).__name__`` are unchanged, ``type(model) is LlamaForCausalLM`` is not: :func:`own_class`
gives the class the model was built as); :func:`reset_model_device` swaps it back when the hooks are
removed. A model whose ``device`` already names a real device is left alone.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["DEVICE_ATTR", "own_class", "reset_model_device", "set_model_device"]

#: Where a dispatched model keeps the device its ``device`` property answers (in its ``__dict__``).
DEVICE_ATTR = "_hf_bigmodel_device"
_BASE = "_hf_bigmodel_base"


_REPORTING: dict[type[nn.Module], type[nn.Module]] = {}


def _reporting(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with a ``device`` property that answers the device dispatch recorded on the instance (one
    subclass per class)."""
    if cls in _REPORTING:
        return _REPORTING[cls]

    def device(self: nn.Module) -> torch.device:
        return self.__dict__[DEVICE_ATTR]

    device.__doc__ = "The device the dispatched model runs on (its offloaded weights are brought there)."
    made = _REPORTING[cls] = type(cls.__name__, (cls,), {
        "device": property(device), _BASE: cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__})
    return made


def set_model_device(model: nn.Module, device: torch.device) -> None:
    """Make ``model.device`` answer ``device`` where it would otherwise name the meta device (or is missing)."""
    cls = type(model)
    if _BASE in cls.__dict__:  # dispatched before: record the new device
        model.__dict__[DEVICE_ATTR] = device
        return
    found = inspect.getattr_static(cls, "device", None)
    if found is None:
        if "device" not in model.__dict__:
            model.__dict__["device"] = device  # a plain module: lets it do input.to(model.device)
        return
    if not isinstance(found, property):
        return
    try:
        current = model.device
    except (StopIteration, AttributeError, RuntimeError):  # no parameter at all, or a property that fails
        current = None
    if isinstance(current, torch.device) and current.type != "meta":
        return
    model.__dict__[DEVICE_ATTR] = device
    model.__class__ = _reporting(cls)


def reset_model_device(model: nn.Module) -> None:
    """Undo :func:`set_model_device`'s class swap (the model's own ``device`` answers again)."""
    base = type(model).__dict__.get(_BASE)
    if base is not None:
        model.__class__ = base
    model.__dict__.pop(DEVICE_ATTR, None)


def own_class(model: nn.Module) -> type[nn.Module]:
    """The class ``model`` was built as, also while :func:`set_model_device` has swapped it."""
    cls = type(model)
    base: type[nn.Module] | None = cls.__dict__.get(_BASE)
    return base if base is not None else cls
