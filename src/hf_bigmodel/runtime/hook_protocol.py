"""The hook protocol: code that runs around a module's ``forward`` without changing the model's code.

``add_hook_to_module`` wraps one module's ``forward``; a :class:`ModelHook` sees the inputs before it
runs (``pre_forward``), the output after (``post_forward``), and gets ``on_error`` when forward raises.
The attribute names (``_hf_hook``, ``_old_forward``) are accelerate's, so code in transformers that
looks for them keeps working. The hooks that move and offload weights are :mod:`.hooks`'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:

    class _HookedModule(nn.Module):
        """For the type checker: the attributes ``add_hook_to_module`` keeps on a module."""

        _hf_hook: ModelHook
        _hf_hook_had_instance_forward: bool
        _old_forward: Callable[..., Any]

__all__ = [
    "ModelHook",
    "SequentialHook",
    "add_hook_to_module",
    "hooks_of",
    "remove_hook_from_module",
    "unwrap_forward",
]


class ModelHook:
    """Base hook: override any of the five steps. ``no_grad`` runs the forward under ``torch.no_grad``."""

    no_grad = False

    def init_hook(self, module: nn.Module) -> nn.Module:
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def on_error(self, module: nn.Module) -> None:
        """Forward raised: undo what ``pre_forward`` took (weights brought to the device...)."""

    def detach_hook(self, module: nn.Module) -> nn.Module:
        return module


class SequentialHook(ModelHook):
    """Several hooks on one module: pre_forward in order, post_forward in reverse."""

    def __init__(self, *hooks: ModelHook) -> None:
        self.hooks = list(hooks)

    def init_hook(self, module: nn.Module) -> nn.Module:
        for hook in self.hooks:
            module = hook.init_hook(module)
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        for hook in self.hooks:
            args, kwargs = hook.pre_forward(module, *args, **kwargs)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        for hook in reversed(self.hooks):
            output = hook.post_forward(module, output)
        return output

    def on_error(self, module: nn.Module) -> None:
        for hook in reversed(self.hooks):
            hook.on_error(module)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        for hook in self.hooks:
            module = hook.detach_hook(module)
        return module


def add_hook_to_module(module: nn.Module, hook: ModelHook, append: bool = False) -> nn.Module:
    """Wrap ``module.forward`` with ``hook`` (replacing an existing hook, or chaining after it with ``append``).

    Example::

        class Log(ModelHook):
            def pre_forward(self, module, *args, **kwargs):
                print(type(module).__name__); return args, kwargs
        add_hook_to_module(model.layer, Log())
    """
    existing = module.__dict__.get("_hf_hook")
    if existing is not None:
        if append:
            module = hook.init_hook(module)
            chain = existing.hooks if isinstance(existing, SequentialHook) else [existing]
            cast("_HookedModule", module)._hf_hook = SequentialHook(*chain, hook)
            return module
        remove_hook_from_module(module)
    hooked = cast("_HookedModule", module)
    hooked._hf_hook_had_instance_forward = "forward" in module.__dict__
    old_forward = module.forward
    hooked._old_forward = old_forward
    module = hook.init_hook(module)
    cast("_HookedModule", module)._hf_hook = hook

    def new_forward(module: _HookedModule, *args: Any, **kwargs: Any) -> Any:
        active = module._hf_hook
        args, kwargs = active.pre_forward(module, *args, **kwargs)
        try:
            if active.no_grad:
                with torch.no_grad():
                    output = module._old_forward(*args, **kwargs)
            else:
                output = module._old_forward(*args, **kwargs)
        except BaseException:
            active.on_error(module)
            raise
        return active.post_forward(module, output)

    module.forward = functools.update_wrapper(
        functools.partial(new_forward, cast("_HookedModule", module)), old_forward
    )
    return module


def remove_hook_from_module(module: nn.Module, recurse: bool = False) -> nn.Module:
    """Detach the hook of ``module`` (and of all submodules with ``recurse``), restoring its ``forward``."""
    hook = module.__dict__.get("_hf_hook")
    if hook is not None:
        hook.detach_hook(module)
    unwrap_forward(module)
    if recurse:
        for child in module.children():
            remove_hook_from_module(child, recurse=True)
    return module


def unwrap_forward(module: nn.Module) -> None:
    """Take the hook off ``module`` and give it back its own ``forward`` (the hook itself is left as it is)."""
    module.__dict__.pop("_hf_hook", None)
    if "_old_forward" in module.__dict__:
        if module.__dict__.pop("_hf_hook_had_instance_forward", False):
            module.forward = cast("_HookedModule", module)._old_forward
        else:
            module.__dict__.pop("forward", None)
        del module._old_forward


def hooks_of(module: nn.Module) -> list[ModelHook]:
    """The hooks on ``module`` itself, a chain's one by one (empty: none)."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    return list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]
