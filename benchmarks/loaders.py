"""The loaders under comparison, each a function ``(checkpoint, *, max_memory, offload_folder) -> model``.

Imports happen inside each function, so a loader whose library is missing or broken fails on its own
(the runner reports it as FAILED) without touching the others.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

LoaderFn = Callable[..., Any]

#: Modules that never split across devices: one Llama decoder layer is the offload unit.
NO_SPLIT = ["LlamaDecoderLayer"]


def load_transformers(checkpoint: Path, *, max_memory: dict[Any, str] | None, offload_folder: Path | None) -> Any:
    """transformers ``from_pretrained(device_map="auto")`` (it dispatches with accelerate underneath)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"device_map": "auto", "dtype": torch.bfloat16}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
        kwargs["offload_folder"] = str(offload_folder)
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), **kwargs)


def _empty_model(checkpoint: Path, init_empty_weights: Callable[[], Any]) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(checkpoint))
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def load_accelerate(checkpoint: Path, *, max_memory: dict[Any, str] | None, offload_folder: Path | None) -> Any:
    """accelerate ``init_empty_weights`` + ``load_checkpoint_and_dispatch``."""
    import accelerate
    import torch

    model = _empty_model(checkpoint, accelerate.init_empty_weights)
    return accelerate.load_checkpoint_and_dispatch(
        model,
        str(checkpoint),
        device_map="auto",
        max_memory=max_memory,
        no_split_module_classes=NO_SPLIT,
        dtype=torch.bfloat16,
        offload_folder=str(offload_folder) if offload_folder else None,
    )


def load_hf_bigmodel(checkpoint: Path, *, max_memory: dict[Any, str] | None, offload_folder: Path | None) -> Any:
    """hf_bigmodel's drop-in replacement: same two calls, same arguments as accelerate."""
    import torch

    from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    model = _empty_model(checkpoint, init_empty_weights)
    return load_checkpoint_and_dispatch(
        model,
        str(checkpoint),
        device_map="auto",
        max_memory=max_memory,
        no_split_module_classes=NO_SPLIT,
        dtype=torch.bfloat16,
        offload_folder=str(offload_folder) if offload_folder else None,
    )


def load_hf_bigmodel_pretrained(
    checkpoint: Path, *, max_memory: dict[Any, str] | None, offload_folder: Path | None
) -> Any:
    """hf_bigmodel's one-call loader ``load_pretrained_dispatched`` (config, class, weights, dispatch)."""
    import torch

    from hf_bigmodel import load_pretrained_dispatched

    kwargs: dict[str, Any] = {"device_map": "auto", "torch_dtype": torch.bfloat16}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
        # A safetensors checkpoint needs no offload folder; hand one over only if the API takes it.
        if offload_folder is not None and "offload_folder" in inspect.signature(load_pretrained_dispatched).parameters:
            kwargs["offload_folder"] = str(offload_folder)
    return load_pretrained_dispatched(str(checkpoint), **kwargs)


LOADERS: dict[str, LoaderFn] = {
    "transformers": load_transformers,
    "accelerate": load_accelerate,
    "hf_bigmodel": load_hf_bigmodel,
    "hf_bigmodel_pretrained": load_hf_bigmodel_pretrained,
}

#: Libraries each loader uses, imported before its load is timed (transformers dispatches with accelerate).
LIBRARIES: dict[str, tuple[str, ...]] = {
    "transformers": ("accelerate",),
    "accelerate": ("accelerate",),
    "hf_bigmodel": ("hf_bigmodel",),
    "hf_bigmodel_pretrained": ("hf_bigmodel",),
}

#: The loaders hf_bigmodel is measured against (ratios are taken to the best of these).
ANCHORS = ("transformers", "accelerate")
