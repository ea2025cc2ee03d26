"""A pretrained model built empty from its config alone, with the steps ``load_pretrained_dispatched`` runs.

Used by ``hf-bigmodel plan`` (which must not download weights) and by ``demo`` (to size the budget
before loading). The loader chosen, the dtype, the no-split classes and the float32-kept modules are
the ones a real load uses, so a plan made here is the plan the load makes.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelFileNotFoundError
from ..hf.hub import resolve_config
from ..hf.loader import LoadContext, PretrainedLoader
from ..model.dtypes import matches_module
from ..model.empty import init_empty_weights
from ..model.tensors import model_tensors

__all__ = ["EmptyModel", "Source", "build_empty_model", "prepare"]

logger = logging.getLogger(__name__)


@dataclass
class EmptyModel:
    """A model on the meta device and what planning it needs."""

    model: nn.Module
    loader: PretrainedLoader
    ctx: LoadContext
    dtype: torch.dtype | None
    no_split: list[str] = field(default_factory=list)
    special_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    #: True when the config names no dtype and no weights were read: float32 was assumed.
    dtype_assumed: bool = False
    #: Bytes of quantized weights (a pre-quantized checkpoint's, from its headers), for the planner.
    tensor_sizes: dict[str, int] = field(default_factory=dict)
    #: True when the checkpoint is quantized but its headers were not read: sizes are its dtype's (more).
    quantized_sizes_unknown: bool = False


def _is_local(name: str, subfolder: str | None) -> bool:
    folder = Path(name) / subfolder if subfolder else Path(name)
    return folder.is_dir()


def _config_names_dtype(raw: dict[str, object]) -> bool:
    return any(isinstance(raw.get(k), str) and raw.get(k) != "auto" for k in ("dtype", "torch_dtype"))


@dataclass(frozen=True)
class Source:
    """Where a model's files come from: the command's MODEL and its Hub options."""

    name_or_path: str
    revision: str | None = None
    subfolder: str | None = None
    token: str | None = None
    local_files_only: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Source:
        return cls(args.model, revision=args.revision, subfolder=args.subfolder or None, token=args.token,
                   local_files_only=args.local_files_only, trust_remote_code=args.trust_remote_code)

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """The matching keyword arguments of ``load_pretrained_dispatched``."""
        return {"revision": self.revision, "subfolder": self.subfolder, "token": self.token,
                "local_files_only": self.local_files_only, "trust_remote_code": self.trust_remote_code}


def prepare(
    source: Source,
    *,
    loader: PretrainedLoader | type[PretrainedLoader] | None = None,
) -> tuple[LoadContext, PretrainedLoader]:
    """The first steps of a load: fetch and read the config, pick the loader, resolve the model class.

    Cheap (one small download at most, nothing built), so commands can check a model before loading it.

    Example::

        ctx, loader = prepare(Source("path/to/tiny-llama"))
        ctx.model_class  # <class 'transformers...LlamaForCausalLM'>
    """
    from ..hf.pretrained import _read_json
    from ..hf.registry import select_loader

    ctx = LoadContext(source.name_or_path, **source.load_kwargs)
    ctx.config_file = resolve_config(source.name_or_path, **ctx.hub_kwargs)
    ctx.raw_config = _read_json(ctx.config_file)
    chosen = select_loader(loader, ctx.raw_config)
    logger.info("%s: config read, loader %s", source.name_or_path, type(chosen).__name__)
    ctx.config = chosen.read_config(ctx)
    ctx.model_class = chosen.model_class(ctx, None)
    chosen.apply_kwargs(ctx, {})
    return ctx, chosen


def build_empty_model(
    source: Source,
    *,
    dtype: torch.dtype | str | None = None,
    loader: PretrainedLoader | type[PretrainedLoader] | None = None,
) -> EmptyModel:
    """Fetch only the config of ``source`` and build its model on the meta device.

    ``dtype`` is ``--dtype`` (``None``: the family's default). When that default is the checkpoint's
    dtype and the config does not name one, a local model's weight headers are read, as
    ``from_pretrained`` would; without weights to read (a Hub repo, whose weights planning never
    downloads, or a folder holding only ``config.json``) float32 is assumed, as ``from_pretrained``
    does without a dtype, a warning says so and ``EmptyModel.dtype_assumed`` is set.

    Example::

        empty = build_empty_model(Source("path/to/tiny-llama"), dtype=torch.float16)
        empty.model.model.layers[0].mlp.up_proj.weight.device  # device(type='meta')
    """
    ctx, chosen = prepare(source, loader=loader)
    quantized = ctx.cache.get("quantizer") is not None  # its weights' bytes are in the headers, not the config
    needs_weights = quantized or (dtype in (None, "auto") and not _config_names_dtype(ctx.raw_config))
    if needs_weights and _is_local(source.name_or_path, source.subfolder):
        try:
            ctx.files = chosen.resolve_files(ctx)  # local: only headers are read, nothing is copied
        except ModelFileNotFoundError:
            logger.info("%s holds no weights: planning from the config alone", source.name_or_path)
    assumed = False
    try:
        ctx.dtype = chosen.resolve_dtype(ctx, dtype)
    except RuntimeError:  # the loader wants the checkpoint's dtype, which only weights could tell
        if ctx.files is not None:
            raise
        logger.warning(
            "The config of %s names no dtype and planning reads no weights: assuming float32, as from_pretrained "
            "does without one. Pass --dtype to plan for another.", source.name_or_path,
        )
        ctx.dtype, assumed = torch.float32, True
    from ..hf.pretrained import _default_dtype

    with init_empty_weights(), _default_dtype(ctx.dtype):
        ctx.model = chosen.build_model(ctx)
    keep = chosen.keep_in_fp32_modules(ctx) if ctx.dtype is not None else []
    special = {
        name: torch.float32 for name, slot in model_tensors(ctx.model).items()
        if keep and slot.tensor.is_floating_point() and matches_module(name, keep)
    }
    sizes: dict[str, int] = {}
    if quantized and ctx.files is not None:
        sizes = chosen.tensor_sizes(ctx)
    elif quantized:
        logger.warning(
            "%s is quantized and planning reads no weights: its quantized weights are counted at their dtype's "
            "size, more than they take. Plan a local copy for exact sizes.", source.name_or_path,
        )
    return EmptyModel(ctx.model, chosen, ctx, ctx.dtype, chosen.no_split_modules(ctx), special, assumed,
                      sizes, quantized and ctx.files is None)
