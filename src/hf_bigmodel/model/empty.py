"""Empty skeletons: build a model of any size on the meta device (or straight on a given device)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager

import torch
from torch import nn

from .tensors import ModelTensor, put_tensor, set_tensor

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

    With ``include_buffers=True`` the device also becomes torch's default device, so intermediate
    tensors built in ``__init__`` are created there directly. On the meta device, transformers models
    skip their weight initialisation of modules that hold only meta tensors (it would compute nothing).

    Example::

        with init_on_device("cuda:0"):
            layer = nn.Linear(4096, 4096)   # allocated on the GPU, never on CPU
    """
    if isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    original_register_parameter = nn.Module.register_parameter
    original_register_buffer = nn.Module.register_buffer

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original_register_parameter(module, name, param)
        if param is not None and param.device != device:
            # Keeps the Parameter subclass and its extra attributes (quantised or sharded params carry some).
            set_tensor(ModelTensor(module, name, False), param.to(device))

    def register_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        original_register_buffer(module, name, tensor, persistent=persistent)
        if tensor is not None and tensor.device != device:
            put_tensor(ModelTensor(module, name, True), tensor.to(device))

    replacements: dict[str, Callable[..., None]] = {"register_parameter": register_parameter}
    if include_buffers:
        replacements["register_buffer"] = register_buffer
    for method, replacement in replacements.items():  # setattr: mypy cannot type a function put over a method
        setattr(nn.Module, method, replacement)
    try:
        with ExitStack() as stack:
            if include_buffers:
                stack.enter_context(device)
            if device.type == "meta":
                for factory in _META_BUILD_CONTEXTS:
                    stack.enter_context(factory())
            yield
    finally:
        nn.Module.register_parameter = original_register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = original_register_buffer  # type: ignore[method-assign]
