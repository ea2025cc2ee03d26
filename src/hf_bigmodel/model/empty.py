"""Empty skeletons: build a model of any size on the meta device (or straight on a given device)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import nn

from .tensors import ModelTensor, set_tensor

__all__ = ["init_empty_weights", "init_on_device", "register_meta_build_context"]

#: Contexts entered while a model is built on the meta device (integrations register theirs).
_META_BUILD_CONTEXTS: list[Callable[[], AbstractContextManager[object]]] = []


def register_meta_build_context(factory: Callable[[], AbstractContextManager[object]]) -> None:
    """Enter ``factory()`` whenever a model is built on the meta device (:func:`init_empty_weights`).

    An integration uses it to skip work that computes nothing on meta tensors, e.g. a library's own weight
    initialisation. Registering the same factory twice has no effect.
    """
    if factory not in _META_BUILD_CONTEXTS:
        _META_BUILD_CONTEXTS.append(factory)


@contextmanager
def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
    """Build models whose parameters live on the meta device: no memory, whatever their size.

    Buffers stay real (on CPU) unless ``include_buffers=True``, because many models compute them in
    ``__init__`` (position ids, rotary frequencies) and a checkpoint may not carry them.

    Example::

        with init_empty_weights():
            model = MyModel(...)          # instant, 0 bytes
        model = load_checkpoint_and_dispatch(model, "ckpt/", device_map="auto")
    """
    with init_on_device(torch.device("meta"), include_buffers=bool(include_buffers)):
        yield


@contextmanager
def init_on_device(device: torch.device | str | int, include_buffers: bool | None = None) -> Iterator[None]:
    """Create every parameter (and, with ``include_buffers``, every buffer) registered inside on ``device``.

    With ``include_buffers=True`` the model is built inside torch's device context: parameters, buffers and
    intermediate tensors of ``__init__`` are created there directly, and nothing of ``nn.Module`` is
    replaced (as accelerate does on torch >= 2). Without it, ``register_parameter`` moves parameters as
    they are registered (keeping their class and attributes) and buffers stay where they are built. On the
    meta device, transformers models skip their weight initialisation of modules that hold only meta
    tensors (it would compute nothing).

    Example::

        with init_on_device("cuda:0"):
            layer = nn.Linear(4096, 4096)   # allocated on the GPU, never on CPU
    """
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if include_buffers:  # torch's device context creates every tensor there: nothing of nn.Module is replaced
        with device, _meta_build(device):
            yield
        return
    original_register_parameter = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original_register_parameter(module, name, param)
        if param is not None and param.device != device:
            # Keeps the Parameter subclass and its extra attributes (quantised or sharded params carry some).
            set_tensor(ModelTensor(module, name, False), param.to(device))

    setattr(nn.Module, "register_parameter", register_parameter)  # noqa: B010  (mypy: a function over a method)
    try:
        with _meta_build(device):
            yield
    finally:
        nn.Module.register_parameter = original_register_parameter  # type: ignore[method-assign]


@contextmanager
def _meta_build(device: torch.device) -> Iterator[None]:
    """The registered meta-build contexts, entered when building on the meta device."""
    with ExitStack() as stack:
        if device.type == "meta":
            for factory in _META_BUILD_CONTEXTS:
                stack.enter_context(factory())
        yield
