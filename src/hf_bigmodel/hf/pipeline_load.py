"""``load_pretrained_dispatched(..., pipeline=True)``: this process's stage of a model, and the pipeline.

Every process launched together (``torchrun``) builds the same empty model and agrees on the cut; each
then reads only the checkpoint keys of its own stage, from only the shards that hold them (downloading
just those shards from the Hub), loads them with the usual loader within its own budget (offloading
what does not fit) and dispatches them. ``model.generate`` and ``model(...)`` then run across the
stages, on every process at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from torch import nn

from ..errors import PipelineError
from ..load.conversions import Conversion
from ..parallel.launch import loading_stage, stage_checkpoint
from .hub import fetch_weight_files
from .pipeline_generate import attach_generation
from .steps import LoadSteps, key_table

__all__ = ["load_pipelined"]


def load_pipelined(prepare: Callable[[], LoadSteps], *, max_memory: Mapping[int | str, int | str] | None,
                   offload_folder: str | os.PathLike[str] | None, offload_buffers: bool) -> nn.Module:
    """Join the pipeline, ``prepare()`` the empty model, load this process's stage, start (see the module's doc)."""
    with loading_stage(max_memory) as load:
        steps = prepare()
        model, ctx, loader = steps.model, steps.ctx, steps.loader
        _check_supported(model)
        full = loader.checkpoint(ctx)  # the index only: no shard is opened yet
        # Quantized weights' bytes come from every shard's header: read where every shard is here (a local
        # checkpoint; a plain model reads none); a Hub checkpoint's shards are not all downloaded, and its
        # quantized weights are planned at their dtype's size, more than they take (never less).
        sizes = loader.tensor_sizes(ctx) if all(os.path.isfile(f) for f in full.files) else {}
        load.plan_stage(model, no_split_module_classes=steps.no_split, dtype=steps.cast, special_dtypes=steps.special,
                        offload_buffers=offload_buffers, tensor_sizes=sizes)
        names = key_table(loader, ctx, full.keys(), rename=lambda key: loader.target_name(key, ctx))
        checkpoint = stage_checkpoint(full, load.keys(full, base=lambda key: names.get(key, key)))
        assert ctx.files is not None
        fetch_weight_files(ctx.files, checkpoint.files, cache_dir=ctx.cache_dir, token=ctx.token,
                           local_files_only=ctx.local_files_only)
        ctx.cache["checkpoint"] = checkpoint
        steps.read_keys(checkpoint.keys())  # renames and conversions from this stage's shards only
        steps.conversions = _held_conversions(steps.conversions, load.held)
        missing = steps.init_missing([n for n in steps.missing() if n in load.held])
        table = load.keys(checkpoint, base=lambda key: steps.table.get(key, key))
        with load.detached():
            steps.load(checkpoint, load.device_map, table.get, missing, offload_folder=offload_folder,
                       offload_buffers=offload_buffers)
    pipeline = load.pipeline
    assert pipeline is not None
    model.eval()
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        attach_generation(model, pipeline)
    model.pipeline = pipeline  # type: ignore[assignment]
    return model


def _check_supported(model: nn.Module) -> None:
    """Refuse, before anything is read, models a pipeline cannot run."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise PipelineError(
            f"{type(model).__name__} is an encoder-decoder model: every block of its decoder needs the encoder's "
            "output, which a pipeline does not pass between stages. pipeline=True supports decoder-only models; "
            "load this one in one process (without pipeline=True).")
    if callable(getattr(model, "prepare_inputs_for_generation", None)):
        import transformers

        if int(transformers.__version__.split(".")[0]) < 5:
            raise PipelineError(
                f"pipeline=True needs transformers >= 5 (its caches and generation inputs); transformers "
                f"{transformers.__version__} is installed. Upgrade it, or load the model in one process.")


def _held_conversions(conversions: list[Conversion], held: set[str]) -> list[Conversion]:
    """The conversions building this stage's tensors (a shard may also hold another stage's sources)."""
    split = [c.label for c in conversions if set(c.targets) & held and not set(c.targets) <= held]
    if split:
        raise PipelineError(f"Weight conversion(s) {', '.join(split)} build tensors of two pipeline stages; "
                            "this checkpoint cannot be split into stages. Load it in one process.")
    return [c for c in conversions if set(c.targets) <= held]
