"""The steps of a pretrained load once the empty model is built, shared by a whole-model load and a stage's.

:class:`LoadSteps` holds what the first steps decided (the loader, the context, the checkpoint key
table, the no-split classes and fp32-kept modules) and does the rest: give missing weights a value,
load the checkpoint within a device map, let the loader fix things up, and dispatch. A pipeline stage
runs the same steps on the model seen as that stage alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import CheckpointMismatchError, summarize
from ..load.conversions import Conversion
from ..load.loading import OFFLOAD_ATTR, load_checkpoint
from ..model.dtypes import check_cast, matches_module
from ..model.naming import lookup
from ..model.sizes import find_tied_parameters
from ..model.tensors import model_tensors
from ..plan.devices import Device
from ..runtime.dispatch import _dispatch
from ..storage.checkpoint import Checkpoint
from .loader import LoadContext, PretrainedLoader, _model

__all__ = ["LoadSteps", "key_table", "missing_names"]

logger = logging.getLogger(__name__)


def missing_names(model: nn.Module, table: Mapping[str, str | None], made: Iterable[str] = ()) -> list[str]:
    """Model tensors no checkpoint key fills (``made``: built by conversions; a tied tensor is filled by any
    name of its group)."""
    provided = {v for v in table.values() if v is not None} | set(made)
    partners = {n: set(g) for g in find_tied_parameters(model) for n in g}
    return [
        name for name, slot in model_tensors(model).items()
        if slot.tensor.device.type == "meta" and name not in provided
        and not partners.get(name, set()) & provided
    ]


class LoadSteps:
    """What the first steps decided, and the steps that load and dispatch the empty model."""

    def __init__(self, loader: PretrainedLoader, ctx: LoadContext, no_split: list[str], keep: list[str]) -> None:
        self.loader, self.ctx, self.no_split, self.keep = loader, ctx, no_split, keep
        self.model = _model(ctx)
        self.table: dict[str, str | None] = {}
        self.conversions: list[Conversion] = []
        #: The dtype floating-point checkpoint tensors are loaded in (None: each in its model tensor's dtype).
        self.cast = loader.cast_dtype(ctx, keep)
        self.special: dict[str, str | torch.dtype] = {
            name: torch.float32 for name, slot in model_tensors(self.model).items()
            if self.cast is not None and keep and slot.tensor.is_floating_point() and matches_module(name, keep)}

    def read_keys(self, keys: Iterable[str]) -> None:
        """The key table and the conversions for the checkpoint ``keys`` (the loader's renames, then prefixes)."""
        self.table = key_table(self.loader, self.ctx, keys)
        self.conversions = self.loader.conversions(self.ctx)

    def missing(self) -> list[str]:
        """Model tensors neither a checkpoint key nor a conversion fills."""
        return missing_names(self.model, self.table, (t for conv in self.conversions for t in conv.targets))

    def init_missing(self, missing: Sequence[str]) -> list[str]:
        """Give ``missing`` tensors a value (the loader's ``init_missing``); every one must get one."""
        if not missing:
            return []
        self.loader.init_missing(self.ctx, missing)
        still = [n for n in missing if model_tensors(self.model)[n].tensor.device.type == "meta"]
        if still:
            raise CheckpointMismatchError(
                missing=still, path=self.loader.checkpoint(self.ctx).path,
                hint=f"  {type(self.loader).__name__}.init_missing() left them on the meta device (no value).",
            )
        logger.warning("%d weight(s) of %s are not in the checkpoint and were newly initialised: %s. Train "
                       "the model before relying on them.", len(missing), type(self.model).__name__,
                       summarize(missing))
        return list(missing)

    def load(self, checkpoint: Checkpoint, device_map: Mapping[str, Device],
             key_mapping: Callable[[str], str | None], missing: Sequence[str], *,
             offload_folder: str | os.PathLike[str] | None, offload_buffers: bool) -> None:
        """Load ``checkpoint`` within ``device_map``, run the loader's ``after_load``, dispatch."""
        model, ctx = self.model, self.ctx
        self.loader.check_device_map(ctx, device_map)
        if ctx.dtype is not None:  # transformers 5 casts nothing itself (cast None): an integer dtype is refused here
            check_cast(ctx.dtype, {k: i.dtype for k, i in checkpoint.scan().items()}, source=repr(checkpoint.path))
        report = load_checkpoint(
            model, checkpoint, device_map=device_map, offload_folder=offload_folder, dtype=self.cast,
            offload_buffers=offload_buffers, keep_in_fp32_modules=self.keep, key_mapping=key_mapping,
            conversions=self.conversions,
        )
        if report.weights:
            setattr(model, OFFLOAD_ATTR, report.weights)
        self.loader.after_load(ctx)
        # Newly initialised tensors planned on disk stay in RAM unless an offload folder can receive them.
        in_ram = {} if offload_folder is not None else {
            n: model_tensors(model)[n].tensor for n in missing if lookup(n, device_map) == "disk"
        }
        _dispatch(model, device_map, offload_dir=offload_folder, offload_buffers=offload_buffers,
                  skip_keys=self.loader.skip_keys(ctx), state_dict=in_ram or None)


def key_table(loader: PretrainedLoader, ctx: LoadContext, keys: Iterable[str],
              rename: Callable[[str], str | None] | None = None) -> dict[str, str | None]:
    """Checkpoint key -> model name (``None``: dropped); keys left unchanged are unexpected ones.

    ``rename`` (default: the loader's ``rename_key``) is applied first, then the base-model prefix is added
    or stripped where that makes the name match.
    """
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
    for key in keys:
        renamed = rename(key) if rename is not None else loader.rename_key(key, ctx)
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
