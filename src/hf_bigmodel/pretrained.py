"""``load_pretrained_dispatched``: a model folder or Hub repo id in, a loaded and dispatched model out.

The call is a pipeline of small steps, each a method of :class:`PretrainedLoader` that a model family
overrides where it differs: find the files, read the config, pick and build the (empty) model, name
the modules that must not be split or must stay in float32, rename checkpoint keys, initialise weights
the checkpoint lacks, and fix things up after loading. transformers and diffusers models use built-in
subclasses; other families pass ``loader=`` or register theirs (``hf_bigmodel.integrations``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .dtypes import matches_module, resolve_dtype
from .empty import init_empty_weights
from .errors import CheckpointMismatchError, summarize
from .hub import DEFAULT_WEIGHT_NAMES, ModelFiles, resolve_config, resolve_model_files
from .loading import OFFLOAD_ATTR, load_checkpoint, model_tensors
from .naming import lookup, parent
from .sources import Checkpoint, TensorInfo, find_checkpoint

__all__ = ["LoadContext", "PretrainedLoader", "load_pretrained_dispatched"]

logger = logging.getLogger(__name__)

DtypeArg = str | torch.dtype | None
#: Keyword arguments of transformers' ``from_pretrained`` that are accepted and have no effect here.
_IGNORED_KWARGS = ("low_cpu_mem_usage", "offload_state_dict", "_fast_init")


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

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """The arguments :mod:`hf_bigmodel.hub` functions take, as given to the call."""
        return {"subfolder": self.subfolder, "revision": self.revision, "cache_dir": self.cache_dir,
                "token": self.token, "local_files_only": self.local_files_only}


class PretrainedLoader:
    """The steps of :func:`load_pretrained_dispatched`; subclass and override what your model family needs.

    Defaults suit a plain PyTorch model: ``config.json`` read as a dict, weights named as in
    :data:`~hf_bigmodel.hub.DEFAULT_WEIGHT_NAMES` (or ``weight_names``), keys used as they are, every
    ``_no_split_modules`` found on the modules honoured, missing weights set by ``reset_parameters()``.
    ``build_model`` must be overridden unless ``model_class=`` is passed (called as ``model_class(config)``).

    Order: :meth:`read_config`, :meth:`model_class`, :meth:`apply_kwargs`, :meth:`resolve_files`,
    :meth:`resolve_dtype`, :meth:`build_model` (inside ``init_empty_weights()``, torch's default dtype
    set to the load dtype), :meth:`no_split_modules`, :meth:`keep_in_fp32_modules`, :meth:`rename_key`
    per checkpoint key (then :meth:`base_model_prefix` is added or stripped where that makes a key
    match), :meth:`init_missing`, planning and loading, :meth:`after_load`, dispatch.
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
    #: Weight files looked for, first present wins (``None``: :data:`~hf_bigmodel.hub.DEFAULT_WEIGHT_NAMES`).
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
        """Find (download) the config and weight files: :func:`~hf_bigmodel.hub.resolve_model_files`."""
        return resolve_model_files(
            ctx.name_or_path, **ctx.hub_kwargs, weight_names=self.weight_names or DEFAULT_WEIGHT_NAMES,
            config_name=self.config_name,
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
        """The :class:`~hf_bigmodel.sources.Checkpoint` of ``ctx.files`` (opened once per call)."""
        if "checkpoint" not in ctx.cache:
            if ctx.files is None:
                raise RuntimeError("checkpoint() needs ctx.files; call it after resolve_files().")
            ctx.cache["checkpoint"] = find_checkpoint(ctx.files.checkpoint)
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

    def no_split_modules(self, ctx: LoadContext) -> list[str]:
        """Classes the planner never splits across devices: every ``_no_split_modules`` found."""
        found: dict[str, None] = {}
        for module in _model(ctx).modules():
            for name in getattr(module, "_no_split_modules", None) or ():
                found[name] = None
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

    def ignore_unexpected_key(self, key: str, ctx: LoadContext) -> bool:
        """True to drop, silently, a checkpoint key that matches nothing in the model."""
        return False

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

    def materialize(self, ctx: LoadContext, names: Sequence[str]) -> dict[str, nn.Module]:
        """Put uninitialised CPU tensors in place of meta ones ``names`` (ties kept); return their modules."""
        return _swap(_model(ctx), names, lambda name, old: torch.empty_like(old, device="cpu"))

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


# -- the call --------------------------------------------------------------------------------------
def load_pretrained_dispatched(
    pretrained_model_name_or_path: str | os.PathLike[str],
    *,
    device_map: str | int | torch.device | Mapping[str, int | str | torch.device] | None = "auto",
    torch_dtype: DtypeArg = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    model_class: type[nn.Module] | str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    loader: PretrainedLoader | type[PretrainedLoader] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a pretrained model (local folder or Hub repo id) straight into a device map.

    The model is built empty (meta), planned with ``device_map`` (``"auto"``, ``"balanced"``,
    ``"balanced_low_0"``, ``"sequential"``, one device, a dict; ``None``: CPU) within ``max_memory``,
    then loaded shard by shard: modules planned on ``"disk"`` read their weights in place from
    safetensors checkpoints (torch checkpoints need ``offload_folder``). The result is in eval mode
    with ``hf_device_map`` set. Only the config, index and needed shards are downloaded.

    ``torch_dtype`` (or its transformers 5 spelling ``dtype=``): a dtype, ``"auto"`` (the checkpoint's:
    config ``dtype``/``torch_dtype``, else the weights'), or ``None`` for the family's own default
    (transformers 5: the checkpoint's dtype; diffusers and custom loaders: the model's, float32).
    ``model_class``: a class, a transformers Auto class (``AutoModelForSeq2SeqLM``) or a class name;
    default: the config's ``architectures[0]`` (transformers) or ``_class_name`` (diffusers, with
    ``subfolder="unet"`` for a pipeline component). ``loader``: a :class:`PretrainedLoader` subclass
    or instance; default: the latest registered loader whose ``can_load`` accepts the config, then
    diffusers (config has ``_class_name``), then transformers.

    Other keyword arguments override config entries, as in transformers (``output_hidden_states=True``,
    ``attn_implementation="eager"``); ``offload_buffers=True`` streams buffers of offloaded modules too.
    Any other keyword raises ``TypeError`` naming it.

    Example::

        model = load_pretrained_dispatched("bigscience/T0pp", model_class=AutoModelForSeq2SeqLM,
                                           torch_dtype=torch.float16, max_memory={0: "10GiB", "cpu": "30GiB"})
        model.hf_device_map  # {"shared": 0, "encoder": 0, "decoder.block.0": "cpu", ..., "lm_head": "disk"}
    """
    requested_dtype = _merge_dtype(torch_dtype, kwargs.pop("dtype", None))
    offload_buffers = bool(kwargs.pop("offload_buffers", False))
    for name in _IGNORED_KWARGS:
        kwargs.pop(name, None)
    ctx = LoadContext(
        os.fspath(pretrained_model_name_or_path), subfolder=subfolder or None, revision=revision,
        cache_dir=cache_dir, token=token, local_files_only=local_files_only,
        trust_remote_code=trust_remote_code,
    )
    config_name = getattr(loader, "config_name", None) or "config.json"
    ctx.config_file = resolve_config(ctx.name_or_path, **ctx.hub_kwargs, config_name=config_name)
    ctx.raw_config = _read_json(ctx.config_file)
    from .integrations import select_loader

    chosen = select_loader(loader, ctx.raw_config)
    logger.info("Loading %s with %s", ctx.name_or_path, type(chosen).__name__)

    ctx.config = chosen.read_config(ctx)
    ctx.model_class = chosen.model_class(ctx, model_class)
    chosen.apply_kwargs(ctx, kwargs)
    if kwargs:
        raise TypeError(
            f"load_pretrained_dispatched() got unexpected keyword argument(s) {summarize(sorted(kwargs))}: "
            f"they are neither options of the call nor entries of the {type(ctx.config).__name__} config of "
            f"{ctx.name_or_path!r}. Check their spelling."
        )
    ctx.files = chosen.resolve_files(ctx)
    ctx.dtype = chosen.resolve_dtype(ctx, requested_dtype)
    with init_empty_weights(), _default_dtype(ctx.dtype):
        ctx.model = model = chosen.build_model(ctx)

    no_split = list(dict.fromkeys([*chosen.no_split_modules(ctx), *(no_split_module_classes or [])]))
    keep = chosen.keep_in_fp32_modules(ctx) if ctx.dtype is not None else []
    checkpoint = chosen.checkpoint(ctx)
    table = _key_table(chosen, ctx, checkpoint.scan())
    missing = _missing_names(model, table)
    if missing:
        chosen.init_missing(ctx, missing)
        still = [n for n in missing if model_tensors(model)[n].tensor.device.type == "meta"]
        if still:
            raise CheckpointMismatchError(
                missing=still, path=checkpoint.path,
                hint=f"  {type(chosen).__name__}.init_missing() left them on the meta device (no value).",
            )
        logger.warning("%d weight(s) of %s are not in the checkpoint and were newly initialised: %s. Train "
                       "the model before relying on them.", len(missing), type(model).__name__,
                       summarize(missing))

    special = {name: torch.float32 for name, slot in model_tensors(model).items()
               if keep and slot.tensor.is_floating_point() and matches_module(name, keep)}
    from .device_maps import resolve_device_map

    plan = resolve_device_map(
        model, "cpu" if device_map is None else device_map, max_memory=max_memory,
        no_split_module_classes=no_split, dtype=ctx.dtype, special_dtypes=special, offload_buffers=offload_buffers,
    )
    report = load_checkpoint(
        model, checkpoint, device_map=plan, offload_folder=offload_folder, dtype=ctx.dtype,
        offload_buffers=offload_buffers, keep_in_fp32_modules=keep,
        key_mapping=lambda key: table.get(key, key),
    )
    if report.weights:
        setattr(model, OFFLOAD_ATTR, report.weights)
    chosen.after_load(ctx)
    # Newly initialised tensors planned on disk stay in RAM unless an offload folder can receive them.
    in_ram = {} if offload_folder is not None else {
        n: model_tensors(model)[n].tensor for n in missing if lookup(n, plan) == "disk"
    }
    from .dispatch import _dispatch

    _dispatch(model, plan, offload_dir=offload_folder, offload_buffers=offload_buffers,
              skip_keys=chosen.skip_keys(ctx), state_dict=in_ram or None)
    model.eval()
    return model


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
            data = make(name, old)
            new = made[id(old)] = data if slot.is_buffer else nn.Parameter(
                data, requires_grad=old.requires_grad and data.is_floating_point())
        store = slot.module._buffers if slot.is_buffer else slot.module._parameters
        store[slot.leaf] = new  # type: ignore[assignment]
        modules[parent(name)] = slot.module
    return modules


def _merge_dtype(torch_dtype: DtypeArg, dtype: DtypeArg) -> DtypeArg:
    if torch_dtype is None or dtype is None:
        return dtype if torch_dtype is None else torch_dtype

    def norm(value: str | torch.dtype) -> str | torch.dtype:
        return "auto" if isinstance(value, str) and value.strip().lower() == "auto" else resolve_dtype(value)

    if norm(torch_dtype) != norm(dtype):
        raise ValueError(
            f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree; they are two spellings of one option "
            "(dtype= is transformers 5's). Pass only one."
        )
    return dtype


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Build with ``dtype`` as torch's default (as transformers and diffusers do) where torch allows it."""
    if dtype is None or dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Config {str(path)!r} is not valid JSON ({err}); fix or re-download it.") from None
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
            f"Config {str(path)!r} holds a {type(data).__name__}, not a JSON object.")
    return data


def _key_table(
    loader: PretrainedLoader, ctx: LoadContext, infos: Mapping[str, TensorInfo]
) -> dict[str, str | None]:
    """Checkpoint key -> model name (``None``: dropped); keys left unchanged are unexpected ones."""
    model = _model(ctx)
    names = set(model_tensors(model))
    transient = set(model_tensors(model, persistent_only=False)) - names  # non-persistent buffers
    prefix = loader.base_model_prefix(ctx)

    def matched(name: str, pool: set[str]) -> str | None:
        if name in pool:
            return name
        if prefix:
            if name.startswith(prefix + ".") and name[len(prefix) + 1:] in pool:
                return name[len(prefix) + 1:]  # checkpoint of a model with a head, loaded into the base model
            if f"{prefix}.{name}" in pool:
                return f"{prefix}.{name}"  # checkpoint of the base model, loaded into a model with a head
        return None

    table: dict[str, str | None] = {}
    for key in infos:
        renamed = loader.rename_key(key, ctx)
        if renamed is None:
            table[key] = None
            continue
        found = matched(renamed, names) or (matched(key, names) if renamed != key else None)
        if found is not None:
            table[key] = found
        elif matched(renamed, transient) is not None or loader.ignore_unexpected_key(renamed, ctx):
            table[key] = None  # e.g. position_ids saved by older versions: recomputed, not loaded
        else:
            table[key] = renamed  # unexpected: reported by the loader, then ignored
    return table


def _missing_names(model: nn.Module, table: Mapping[str, str | None]) -> list[str]:
    """Model tensors no checkpoint key fills (a tied tensor is filled by any name of its group)."""
    from .sizes import find_tied_parameters

    provided = {v for v in table.values() if v is not None}
    partners = {n: set(g) for g in find_tied_parameters(model) for n in g}
    return [
        name for name, slot in model_tensors(model).items()
        if slot.tensor.device.type == "meta" and name not in provided
        and not partners.get(name, set()) & provided
    ]
