"""Whole diffusers pipelines: a folder or repo with ``model_index.json`` loaded as one planned set of models.

``model_index.json`` names the pipeline class and each component's library and class. The components
that are models with weights (diffusers ``ModelMixin``, transformers ``PreTrainedModel``: the UNet, the
VAE, the text encoders) are each built empty by their own loader, then planned *together*, as one model
whose children are the components, across the devices of one ``max_memory`` (diffusers'
``device_map="balanced"`` for pipelines places whole components; this plans their blocks, so a component
bigger than a device is split or offloaded). Each is then loaded and dispatched within its share of the
plan. The other components (tokenizers, schedulers, feature extractors) are loaded by diffusers'
``DiffusionPipeline.from_pretrained``, handed the loaded models, so it reads or downloads only the files
of those other components.

diffusers is imported only when a pipeline is loaded.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelClassNotFoundError, ModelFileNotFoundError
from ..model.dtypes import matches_module
from ..model.tensors import model_tensors
from ..plan.device_map import resolve_device_map
from ..plan.devices import Device
from ..runtime.prefetch_plan import prefetch_headroom
from .hub import resolve_config
from .steps import LoadSteps

__all__ = ["component_map", "find_pipeline_index", "load_pipeline", "model_components"]

INDEX_NAME = "model_index.json"


def find_pipeline_index(name_or_path: str, hub_kwargs: Mapping[str, Any]) -> Path | None:
    """The ``model_index.json`` of a pipeline folder or repo; ``None`` for a model (it has a ``config.json``)."""
    try:
        resolve_config(name_or_path, **hub_kwargs)
        return None
    except ModelFileNotFoundError as missing:
        try:
            return resolve_config(name_or_path, **hub_kwargs, config_name=INDEX_NAME)
        except ModelFileNotFoundError:
            raise missing from None


def model_components(index: Mapping[str, Any]) -> dict[str, type[nn.Module]]:
    """Component -> class, for the components of ``model_index.json`` that are models with weights.

    Raises :class:`ModelClassNotFoundError` for a component that is an ``nn.Module`` of another kind (it
    could not be planned): pass it built, as diffusers takes it (``load_pretrained_dispatched(path,
    name=module)``).
    """
    import diffusers
    from transformers import PreTrainedModel

    found: dict[str, type[nn.Module]] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)) or len(entry) != 2 or None in entry:
            continue
        cls = _component_class(*entry)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue  # a tokenizer, a scheduler, a feature extractor
        if not issubclass(cls, diffusers.ModelMixin) and not issubclass(cls, PreTrainedModel):
            raise ModelClassNotFoundError(
                f"Pipeline component {name!r} is a {cls.__name__} ({entry[0]}), a torch module that is neither a "
                f"diffusers ModelMixin nor a transformers PreTrainedModel, so it cannot be planned. Build it "
                f"yourself and pass it as {name}=... .")
        found[name] = cls
    return found


def _component_class(library: str, class_name: str) -> Any:
    """The class diffusers would load a component with (a library, or a module of ``diffusers.pipelines``)."""
    for module_name in (library, f"diffusers.pipelines.{library}"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, class_name):
            return getattr(module, class_name)
    return None


def component_map(device_map: Mapping[str, Device], component: str) -> dict[str, Device]:
    """The entries of a pipeline's device map for ``component``, relative to it."""
    found: dict[str, Device] = {}
    for key, device in device_map.items():
        if key in ("", component):
            found[""] = device
        elif key.startswith(component + "."):
            found[key[len(component) + 1:]] = device
    return found


def plan_components(
    steps: Mapping[str, LoadSteps], device_map: Any, *, max_memory: Mapping[int | str, int | str] | None,
    offload_buffers: bool,
) -> dict[str, Device]:
    """One device map over every model component (keys prefixed with the component's name)."""
    together = nn.ModuleDict({name: s.model for name, s in steps.items()})
    no_split = list(dict.fromkeys(cls for s in steps.values() for cls in s.no_split))
    special: dict[str, str | torch.dtype] = {}
    for name, s in steps.items():  # each component's own load dtype, its fp32-kept modules in float32
        for tensor, slot in model_tensors(s.model).items():
            if s.cast is not None and slot.tensor.is_floating_point():
                special[f"{name}.{tensor}"] = torch.float32 if s.keep and matches_module(tensor, s.keep) else s.cast
    return resolve_device_map(
        together, "cpu" if device_map is None else device_map, max_memory=max_memory,
        no_split_module_classes=no_split, special_dtypes=special, offload_buffers=offload_buffers,
        main_headroom=prefetch_headroom(offload_buffers=offload_buffers),
    )


def _renamer(table: Mapping[str, str | None]) -> Callable[[str], str | None]:
    return lambda key: table.get(key, key)


def load_pipeline(
    index_file: Path, name_or_path: str, prepare: Callable[[str, type[nn.Module]], LoadSteps], *,
    device_map: Any, max_memory: Mapping[int | str, int | str] | None,
    offload_folder: str | os.PathLike[str] | None, offload_buffers: bool, hub_kwargs: Mapping[str, Any],
    kwargs: dict[str, Any],
) -> Any:
    """The diffusers pipeline of ``name_or_path``, its model components planned together and dispatched.

    ``prepare(component, cls)``: the component's :class:`LoadSteps` (built empty, from its subfolder).
    ``kwargs`` go to ``DiffusionPipeline.from_pretrained``; a component passed there is not loaded here.
    """
    import diffusers

    if kwargs.get("variant") is not None:
        raise TypeError(
            f"load_pretrained_dispatched() does not take variant={kwargs['variant']!r}: the model components of "
            f"{name_or_path!r} would be read from their main weight files, not the variant's. Leave variant= out "
            "(torch_dtype= loads the main weights in a dtype).")
    index = json.loads(Path(index_file).read_text(encoding="utf-8"))
    steps = {name: prepare(name, cls) for name, cls in model_components(index).items() if name not in kwargs}
    missing = {}
    checkpoints = {}
    for name, s in steps.items():
        checkpoints[name] = s.loader.checkpoint(s.ctx)
        s.read_keys(checkpoints[name].keys())
        missing[name] = s.init_missing(s.missing())
    plan = plan_components(steps, device_map, max_memory=max_memory, offload_buffers=offload_buffers)
    for name, s in steps.items():
        folder = None if offload_folder is None else Path(offload_folder) / name
        s.load(checkpoints[name], component_map(plan, name), _renamer(s.table), missing[name],
               offload_folder=folder, offload_buffers=offload_buffers)
        s.model.eval()
    pipeline = diffusers.DiffusionPipeline.from_pretrained(
        name_or_path, **hub_kwargs, **{name: s.model for name, s in steps.items()}, **kwargs)
    pipeline.hf_device_map = plan
    return pipeline
