"""Model families :func:`~hf_bigmodel.hf.pretrained.load_pretrained_dispatched` knows: a registry of
:class:`~hf_bigmodel.hf.pretrained.PretrainedLoader` subclasses and the built-in ones for Hugging Face libraries.

Selection (:func:`select_loader`): the call's ``loader=``, else the latest registered loader whose
``can_load(config)`` is true, else :class:`DiffusersLoader` for a config with ``_class_name``, else
:class:`TransformersLoader`. Nothing here imports transformers or diffusers until a loader builds a
model, so ``import hf_bigmodel`` works without them.

- :class:`TransformersLoader` (``hf_bigmodel.hf.transformers``): ``config.json`` with
  ``architectures``/``model_type``, transformers 5 construction rules.
- :class:`DiffusersLoader` (``hf_bigmodel.hf.diffusers``): ``config.json`` with
  ``_class_name``, e.g. a pipeline component loaded with ``subfolder="unet"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .diffusers import DiffusersLoader
from .loader import PretrainedLoader
from .transformers import TransformersLoader

__all__ = ["DiffusersLoader", "TransformersLoader", "register_loader", "select_loader", "unregister_loader"]

_LOADERS: list[type[PretrainedLoader]] = []


def register_loader(cls: type[PretrainedLoader]) -> type[PretrainedLoader]:
    """Make :func:`~hf_bigmodel.load_pretrained_dispatched` use ``cls`` for configs its ``can_load`` accepts.

    Usable as a decorator. Registered loaders are asked latest first, before the built-in ones.

    Example::

        @register_loader
        class TinyMLPLoader(PretrainedLoader):
            @classmethod
            def can_load(cls, config):
                return config.get("family") == "tinymlp"
    """
    if not (isinstance(cls, type) and issubclass(cls, PretrainedLoader)):
        raise TypeError(f"register_loader() takes a PretrainedLoader subclass, not {cls!r}.")
    if cls not in _LOADERS:
        _LOADERS.append(cls)
    return cls


def unregister_loader(cls: type[PretrainedLoader]) -> None:
    """Undo :func:`register_loader` (nothing happens if ``cls`` is not registered)."""
    if cls in _LOADERS:
        _LOADERS.remove(cls)


def select_loader(
    loader: PretrainedLoader | type[PretrainedLoader] | None, config: Mapping[str, Any]
) -> PretrainedLoader:
    """The loader for a model whose ``config.json`` holds ``config`` (see the module docstring for the order).

    >>> type(select_loader(None, {"_class_name": "UNet2DConditionModel"})).__name__
    'DiffusersLoader'
    """
    if isinstance(loader, PretrainedLoader):
        return loader
    if isinstance(loader, type) and issubclass(loader, PretrainedLoader):
        return loader()
    if loader is not None:
        raise TypeError(f"loader= takes a PretrainedLoader subclass or instance, not {loader!r}.")
    for cls in reversed(_LOADERS):
        if cls.can_load(config):
            return cls()
    if DiffusersLoader.can_load(config):
        return DiffusersLoader()
    return TransformersLoader()
