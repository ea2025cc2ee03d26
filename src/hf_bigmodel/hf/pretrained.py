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

from ..errors import PipelineError, summarize
from ..model.dtypes import resolve_dtype
from ..model.empty import init_empty_weights
from ..plan.device_map import resolve_device_map
from ..runtime.prefetch_plan import prefetch_headroom
from .diffusers_pipeline import find_pipeline_index, load_pipeline
from .hub import resolve_config
from .loader import DtypeArg, LoadContext, PretrainedLoader
from .pipeline_load import load_pipelined
from .registry import select_loader
from .steps import LoadSteps

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
    pipeline: bool = False,
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

    A diffusers pipeline (a folder or repo with ``model_index.json``, no ``subfolder``) returns the
    ``DiffusionPipeline``: its model components (UNet, VAE, text encoders) planned together within one
    ``max_memory`` and loaded as above (``hf_device_map`` keys start with the component's name; offload
    files go to ``offload_folder/<component>``), the others (tokenizers, schedulers) loaded by diffusers,
    which reads or downloads only their files. Other keyword arguments then go to
    ``DiffusionPipeline.from_pretrained`` (``safety_checker=None``); a component passed there is not loaded.
    See :mod:`hf_bigmodel.hf.diffusers_pipeline`.

    Other keyword arguments override config entries, as in transformers (``output_hidden_states=True``,
    ``attn_implementation="eager"``); ``offload_buffers=True`` streams buffers of offloaded modules too.
    Any other keyword raises ``TypeError`` naming it.

    ``pipeline=True`` (in every process of a ``torchrun`` launch, one host or several) cuts the model into
    one stage per process: each process downloads and reads only its stage's shards, fits its stage in its
    own ``max_memory`` (offloading the rest), and ``model.generate(...)`` / ``model(...)``, called on every
    process, run across the stages and return the same result everywhere. Decoder-only models; greedy
    generation. See :mod:`hf_bigmodel.parallel`.

    Example::

        model = load_pretrained_dispatched("bigscience/T0pp", model_class=AutoModelForSeq2SeqLM,
                                           torch_dtype=torch.float16, max_memory={0: "10GiB", "cpu": "30GiB"})
        model.hf_device_map  # {"shared": 0, "encoder": 0, "decoder.block.0": "cpu", ..., "lm_head": "disk"}
    """
    requested_dtype = _merge_dtype(torch_dtype, kwargs.pop("dtype", None))
    offload_buffers = bool(kwargs.pop("offload_buffers", False))
    for name in _IGNORED_KWARGS:
        kwargs.pop(name, None)
    if pipeline and not (device_map == "auto" or device_map is None):
        raise PipelineError(
            f"With pipeline=True every process plans its own stage; device_map={device_map!r} cannot be honoured. "
            "Leave device_map='auto' and give each process its budget with max_memory.")
    ctx = LoadContext(
        os.fspath(pretrained_model_name_or_path), subfolder=subfolder or None, revision=revision,
        cache_dir=cache_dir, token=token, local_files_only=local_files_only,
        trust_remote_code=trust_remote_code, fetch_shards=not pipeline,
    )

    def prepared() -> LoadSteps:
        chosen = _prepare(ctx, loader, model_class, requested_dtype, kwargs)
        return _steps(chosen, ctx, no_split_module_classes)

    if subfolder is None and loader is None and model_class is None and not pipeline:
        hub = {k: v for k, v in ctx.hub_kwargs.items() if k != "subfolder"}
        index = find_pipeline_index(ctx.name_or_path, hub)
        if index is not None:  # a diffusers pipeline: every model component, planned together

            def component(name: str, cls: type[nn.Module]) -> LoadSteps:
                sub = LoadContext(ctx.name_or_path, subfolder=name, trust_remote_code=trust_remote_code, **hub)
                return _steps(_prepare(sub, None, cls, requested_dtype, {}), sub, no_split_module_classes)

            return load_pipeline(  # type: ignore[no-any-return]
                index, ctx.name_or_path, component, device_map=device_map, max_memory=max_memory,
                offload_folder=offload_folder, offload_buffers=offload_buffers, hub_kwargs=hub, kwargs=kwargs)
    if pipeline:  # the processes join first: a failure while preparing is then reported to all
        return load_pipelined(prepared, max_memory=max_memory, offload_folder=offload_folder,
                              offload_buffers=offload_buffers)
    return _load_in_process(prepared(), device_map=device_map, max_memory=max_memory,
                            offload_folder=offload_folder, offload_buffers=offload_buffers)


def _prepare(ctx: LoadContext, loader: PretrainedLoader | type[PretrainedLoader] | None,
             model_class: type[nn.Module] | str | None, requested_dtype: DtypeArg,
             kwargs: dict[str, Any]) -> PretrainedLoader:
    """Config, class, files and dtype into ``ctx``, then the empty model; returns the loader chosen."""
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
        ctx.model = chosen.build_model(ctx)
    chosen.after_build(ctx)
    return chosen


def _steps(chosen: PretrainedLoader, ctx: LoadContext, extra_no_split: Sequence[str] | None) -> LoadSteps:
    """The :class:`LoadSteps` of a built model: its no-split classes (plus ``extra_no_split``), fp32 modules."""
    no_split = list(dict.fromkeys([*chosen.no_split_modules(ctx), *(extra_no_split or [])]))
    keep = chosen.keep_in_fp32_modules(ctx) if ctx.dtype is not None else []
    return LoadSteps(chosen, ctx, no_split, keep)


def _load_in_process(steps: LoadSteps, *, device_map: Any, max_memory: Mapping[int | str, int | str] | None,
                     offload_folder: str | os.PathLike[str] | None, offload_buffers: bool) -> nn.Module:
    """The whole model in this process: plan the device map, load every shard, dispatch."""
    model, ctx = steps.model, steps.ctx
    checkpoint = steps.loader.checkpoint(ctx)
    steps.read_keys(checkpoint.keys())
    missing = steps.init_missing(steps.missing())
    plan = resolve_device_map(
        model, "cpu" if device_map is None else device_map, max_memory=max_memory,
        no_split_module_classes=steps.no_split, dtype=steps.cast, special_dtypes=steps.special,
        offload_buffers=offload_buffers, tensor_sizes=steps.loader.tensor_sizes(ctx),
        main_headroom=prefetch_headroom(offload_buffers=offload_buffers),
    )
    steps.load(checkpoint, plan, lambda key: steps.table.get(key, key), missing,
               offload_folder=offload_folder, offload_buffers=offload_buffers)
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
