"""``load_pretrained_dispatched``: a model folder or Hub repo id in, a loaded and dispatched model out.

The call is a pipeline of small steps, each a method of :class:`PretrainedLoader` that a model family
overrides where it differs: find the files, read the config, pick and build the (empty) model, name
the modules that must not be split or must stay in float32, rename checkpoint keys, initialise weights
the checkpoint lacks, and fix things up after loading. transformers and diffusers models use built-in
subclasses; other families pass ``loader=`` or register theirs (``hf_bigmodel.hf.registry``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointMismatchError, summarize
from ..load.loading import OFFLOAD_ATTR, load_checkpoint
from ..model.dtypes import matches_module, resolve_dtype
from ..model.empty import init_empty_weights
from ..model.naming import lookup
from ..model.sizes import find_tied_parameters
from ..model.tensors import model_tensors
from ..plan.device_map import resolve_device_map
from ..runtime.dispatch import _dispatch
from ..storage.checkpoint import TensorInfo
from .hub import resolve_config
from .loader import DtypeArg, LoadContext, PretrainedLoader, _model
from .registry import select_loader

__all__ = ["load_pretrained_dispatched"]

logger = logging.getLogger(__name__)

#: Keyword arguments of transformers' ``from_pretrained`` that are accepted and have no effect here.
_IGNORED_KWARGS = ("low_cpu_mem_usage", "offload_state_dict", "_fast_init")








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
    conversions = chosen.conversions(ctx)
    missing = _missing_names(model, table, {t for conv in conversions for t in conv.targets})
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

    plan = resolve_device_map(
        model, "cpu" if device_map is None else device_map, max_memory=max_memory,
        no_split_module_classes=no_split, dtype=ctx.dtype, special_dtypes=special, offload_buffers=offload_buffers,
    )
    report = load_checkpoint(
        model, checkpoint, device_map=plan, offload_folder=offload_folder, dtype=ctx.dtype,
        offload_buffers=offload_buffers, keep_in_fp32_modules=keep,
        key_mapping=lambda key: table.get(key, key), conversions=conversions,
    )
    if report.weights:
        setattr(model, OFFLOAD_ATTR, report.weights)
    chosen.after_load(ctx)
    # Newly initialised tensors planned on disk stay in RAM unless an offload folder can receive them.
    in_ram = {} if offload_folder is not None else {
        n: model_tensors(model)[n].tensor for n in missing if lookup(n, plan) == "disk"
    }

    _dispatch(model, plan, offload_dir=offload_folder, offload_buffers=offload_buffers,
              skip_keys=chosen.skip_keys(ctx), state_dict=in_ram or None)
    model.eval()
    return model




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


def _missing_names(model: nn.Module, table: Mapping[str, str | None], made: set[str]) -> list[str]:
    """Model tensors no checkpoint key fills (a tied tensor is filled by any name of its group)."""

    provided = {v for v in table.values() if v is not None} | made
    partners = {n: set(g) for g in find_tied_parameters(model) for n in g}
    return [
        name for name, slot in model_tensors(model).items()
        if slot.tensor.device.type == "meta" and name not in provided
        and not partners.get(name, set()) & provided
    ]
