"""The steps of a pretrained load as a subclassable :class:`PretrainedLoader`, and what each step knows.

A model family overrides the steps where it differs (see :func:`~hf_bigmodel.load_pretrained_dispatched`);
:class:`LoadContext` carries what the call knows so far from step to step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CheckpointMismatchError
from ..load.conversions import Conversion
from ..model.dtypes import resolve_dtype
from ..model.naming import parent
from ..model.tensors import model_tensors, put_tensor, set_tensor
from ..storage.checkpoint import Checkpoint, find_checkpoint
from .hub import DEFAULT_WEIGHT_NAMES, ModelFiles, resolve_model_files

__all__ = ["DtypeArg", "LoadContext", "PretrainedLoader"]

DtypeArg = str | torch.dtype | None



@dataclass
class LoadContext:
    """What one call knows so far; every :class:`PretrainedLoader` step receives it.

    Filled in order: the request (name, hub options), ``config_file``/``raw_config``, ``config``,
    ``model_class``, ``files``, ``dtype``, ``model``. ``cache`` is scratch space for a loader's own use.
    """

    name_or_path: str
    subfolder: str | None = None
    revision: str | None = None
    cache_dir: str | os.PathLike[str] | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    trust_remote_code: bool = False
    config_file: Path | None = None
    raw_config: dict[str, Any] = field(default_factory=dict)
    config: Any = None
    model_class: type[nn.Module] | None = None
    files: ModelFiles | None = None
    dtype: torch.dtype | None = None
    model: nn.Module | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    #: False for a pipeline stage: the shards an index names are fetched later, only the stage's own.
    fetch_shards: bool = True

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """The arguments :mod:`hf_bigmodel.hf.hub` functions take, as given to the call."""
        return {"subfolder": self.subfolder, "revision": self.revision, "cache_dir": self.cache_dir,
                "token": self.token, "local_files_only": self.local_files_only}



class PretrainedLoader:
    """The steps of :func:`load_pretrained_dispatched`; subclass and override what your model family needs.

    Defaults suit a plain PyTorch model: ``config.json`` read as a dict, weights named as in
    :data:`~hf_bigmodel.hf.hub.DEFAULT_WEIGHT_NAMES` (or ``weight_names``), keys used as they are, every
    ``_no_split_modules`` found on the modules honoured, missing weights set by ``reset_parameters()``.
    ``build_model`` must be overridden unless ``model_class=`` is passed (called as ``model_class(config)``).

    Order: :meth:`read_config`, :meth:`model_class`, :meth:`apply_kwargs`, :meth:`resolve_files`,
    :meth:`resolve_dtype`, :meth:`build_model` (inside ``init_empty_weights()``, torch's default dtype
    set to the load dtype), :meth:`after_build` (torch's default dtype restored),
    :meth:`no_split_modules`, :meth:`keep_in_fp32_modules`, :meth:`cast_dtype`, :meth:`rename_key` per
    checkpoint key (then :meth:`base_model_prefix` is added or stripped where that makes a key match),
    :meth:`conversions`, :meth:`init_missing`, planning and loading, :meth:`after_load`, dispatch.
    ``examples/custom_family.py`` is a complete family. In short::

        class MyLoader(PretrainedLoader):
            def build_model(self, ctx):
                return MyModel(**ctx.config)

            def rename_key(self, key, ctx):  # "layer_0.w" -> "blocks.0.linear.weight"
                layer, leaf = key.split(".")
                return f"blocks.{layer.removeprefix('layer_')}.linear." + {"w": "weight", "b": "bias"}[leaf]

        model = load_pretrained_dispatched("my-model/", loader=MyLoader)
    """

    #: The config file read (and downloaded) first.
    config_name: ClassVar[str] = "config.json"
    #: Weight files looked for, first present wins (``None``: :data:`~hf_bigmodel.hf.hub.DEFAULT_WEIGHT_NAMES`).
    weight_names: ClassVar[tuple[str, ...] | None] = None
    #: What ``torch_dtype=None`` means: ``None`` keeps the model's own dtype, ``"auto"`` the checkpoint's.
    default_dtype: ClassVar[str | None] = None

    @classmethod
    def can_load(cls, config: Mapping[str, Any]) -> bool:
        """Whether this loader handles a model whose ``config.json`` holds ``config`` (registry selection)."""
        return False

    # -- files and config --------------------------------------------------------------------------
    def read_config(self, ctx: LoadContext) -> Any:
        """The family's config object (default: the config file as a dict)."""
        return dict(ctx.raw_config)

    def model_class(
        self, ctx: LoadContext, requested: type[nn.Module] | str | None
    ) -> type[nn.Module] | None:
        """The class to build (``requested``: the call's ``model_class=``); ``None``: build_model decides."""
        if isinstance(requested, str):
            raise TypeError(f"{type(self).__name__} cannot find model_class={requested!r} by name; pass it.")
        return requested

    def apply_kwargs(self, ctx: LoadContext, kwargs: dict[str, Any]) -> None:
        """Pop the call's extra keyword arguments that override config entries; those left raise TypeError.

        Default: a key already in a dict config, or an attribute of a config object, is overridden.
        """
        for key in list(kwargs):
            if isinstance(ctx.config, dict):
                if key in ctx.config:
                    ctx.config[key] = kwargs.pop(key)
            elif hasattr(ctx.config, key) and not callable(getattr(ctx.config, key)):
                setattr(ctx.config, key, kwargs.pop(key))

    def resolve_files(self, ctx: LoadContext) -> ModelFiles:
        """Find (download) the config and weight files: :func:`~hf_bigmodel.hf.hub.resolve_model_files`."""
        return resolve_model_files(
            ctx.name_or_path, **ctx.hub_kwargs, weight_names=self.weight_names or DEFAULT_WEIGHT_NAMES,
            config_name=self.config_name, fetch_shards=ctx.fetch_shards,
        )

    def resolve_dtype(self, ctx: LoadContext, requested: DtypeArg) -> torch.dtype | None:
        """The dtype floating-point weights are loaded in (``None``: keep the model's own dtypes).

        ``"auto"`` reads ``dtype``/``torch_dtype`` from the config, else the first floating-point
        tensor of the checkpoint.
        """
        if requested is None:
            requested = self.default_dtype
        if requested is None:
            return None
        if isinstance(requested, str) and requested.strip().lower() == "auto":
            return self.checkpoint_dtype(ctx)
        return resolve_dtype(requested)

    def checkpoint_dtype(self, ctx: LoadContext) -> torch.dtype | None:
        """The checkpoint's dtype: the config's ``dtype``/``torch_dtype``, else the weights'."""
        for key in ("dtype", "torch_dtype"):
            value = ctx.raw_config.get(key)
            if isinstance(value, str) and value != "auto":
                return resolve_dtype(value)
        for info in self.checkpoint(ctx).scan().values():
            if info.dtype.is_floating_point:
                return info.dtype
        return None

    def checkpoint(self, ctx: LoadContext) -> Checkpoint:
        """The :class:`~hf_bigmodel.storage.checkpoint.Checkpoint` of ``ctx.files`` (opened once per call)."""
        if "checkpoint" not in ctx.cache:
            if ctx.files is None:
                raise RuntimeError("checkpoint() needs ctx.files; call it after resolve_files().")
            ctx.cache["checkpoint"] = find_checkpoint(ctx.files.checkpoint, require_shards=ctx.fetch_shards)
        return ctx.cache["checkpoint"]

    # -- the model ---------------------------------------------------------------------------------
    def build_model(self, ctx: LoadContext) -> nn.Module:
        """Build the model (inside ``init_empty_weights()``, torch's default dtype set to ``ctx.dtype``)."""
        if ctx.model_class is None:
            raise NotImplementedError(
                f"{type(self).__name__} does not know how to build the model: override build_model(), "
                "or pass model_class= (called as model_class(config))."
            )
        return ctx.model_class(ctx.config)

    def after_build(self, ctx: LoadContext) -> None:
        """Fix-ups of the empty model once built, with torch's default dtype restored (default: none)."""

    def no_split_modules(self, ctx: LoadContext) -> list[str]:
        """Classes the planner never splits across devices: every ``_no_split_modules`` found.

        A model that declares none keeps its repeated blocks whole instead: the classes of the modules in
        its ``nn.ModuleList``s (the layers). A block cut between devices can break its forward, and the
        planner could otherwise cut anywhere.
        """
        model = _model(ctx)
        found: dict[str, None] = {}
        for module in model.modules():
            for name in getattr(module, "_no_split_modules", None) or ():
                found[name] = None
        if not found:
            for module in model.modules():
                if isinstance(module, nn.ModuleList):
                    found.update(dict.fromkeys(type(block).__name__ for block in module))
        return list(found)

    def keep_in_fp32_modules(self, ctx: LoadContext) -> list[str]:
        """Module names (dotted components) whose float weights stay float32 whatever ``ctx.dtype``."""
        return []

    def base_model_prefix(self, ctx: LoadContext) -> str:
        """The attribute holding the base model (``"bert"``, ``"model"``), added or stripped to match keys."""
        return str(getattr(_model(ctx), "base_model_prefix", "") or "")

    def rename_key(self, key: str, ctx: LoadContext) -> str | None:
        """The model name for checkpoint ``key``; ``None`` drops it. Default: unchanged."""
        return key

    def target_name(self, key: str, ctx: LoadContext) -> str | None:
        """The model tensor checkpoint ``key`` ends up in (renamed or converted into), from its name alone.

        A pipeline stage picks the keys (and shards) it needs with it before any shard is read.
        Default: :meth:`rename_key`; loaders whose renames need the shards' contents override it.
        """
        return self.rename_key(key, ctx)

    def ignore_unexpected_key(self, key: str, ctx: LoadContext) -> bool:
        """True to drop, silently, a checkpoint key that matches nothing in the model."""
        return False

    def conversions(self, ctx: LoadContext) -> list[Conversion]:
        """Model tensors built from several checkpoint tensors, or computed from them (default: none).

        Their source keys bypass :meth:`rename_key`; see :mod:`hf_bigmodel.load.conversions`.
        """
        return []

    def init_missing(self, ctx: LoadContext, names: Sequence[str]) -> None:
        """Give a value to model tensors the checkpoint lacks (``names``), still on the meta device.

        Default: materialise them on CPU (:meth:`materialize`) and call ``reset_parameters()`` of
        their modules; a module without one makes the load fail listing the tensors.
        """
        modules = self.materialize(ctx, names)
        failed: list[str] = []
        with torch.no_grad():
            for module_name, module in modules.items():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                else:
                    failed.extend(n for n in names if parent(n) == module_name)
        if failed:
            raise CheckpointMismatchError(
                missing=failed, path=str(ctx.files.checkpoint) if ctx.files else None,
                hint="  Their modules have no reset_parameters() to initialise them: use a checkpoint that "
                     "holds them, or override PretrainedLoader.init_missing().",
            )

    def cast_dtype(self, ctx: LoadContext, keep_in_fp32: Sequence[str]) -> torch.dtype | None:
        """The dtype floating-point checkpoint tensors are loaded in; ``None``: each in its model tensor's dtype.

        Called once the model is built, before planning. Default (diffusers' rule):
        ``ctx.dtype``, with the tensors of ``keep_in_fp32`` modules in float32.
        """
        return ctx.dtype

    def materialize(self, ctx: LoadContext, names: Sequence[str]) -> dict[str, nn.Module]:
        """Put uninitialised CPU tensors in place of meta ones ``names`` (ties kept); return their modules."""
        return _swap(_model(ctx), names, lambda name, old: torch.empty_like(old, device="cpu"))

    def tensor_sizes(self, ctx: LoadContext) -> dict[str, int]:
        """Bytes of tensors whose loaded form is not their dtype times their shape (quantized weights), for
        the planner; default: none."""
        return {}

    def check_device_map(self, ctx: LoadContext, device_map: Mapping[str, Any]) -> None:
        """Refuse, before anything is read, a planned ``device_map`` the model cannot run under (default: none)."""

    def after_load(self, ctx: LoadContext) -> None:
        """Fix-ups once the weights are in (before dispatch): generation config, config dtype..."""

    def skip_keys(self, ctx: LoadContext) -> list[str] | None:
        """Forward inputs/outputs the hooks leave where they are (e.g. ``past_key_values``)."""
        keys = getattr(_model(ctx), "_skip_keys_device_placement", None)
        return sorted(keys) if keys else None



def _model(ctx: LoadContext) -> nn.Module:
    if ctx.model is None:
        raise RuntimeError("This step needs the built model (ctx.model); it runs after build_model().")
    return ctx.model


def _swap(model: nn.Module, names: Sequence[str],
          make: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, nn.Module]:
    """Put ``make(name, old)`` in place of tensors ``names`` (tied ones keep sharing); return their modules."""
    slots = model_tensors(model)
    made: dict[int, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    for name in names:
        slot, old = slots[name], slots[name].tensor
        new = made.get(id(old))
        if new is None:
            made[id(old)] = set_tensor(slot, make(name, old))
        else:
            put_tensor(slot, new)
        modules[parent(name)] = slot.module
    return modules
