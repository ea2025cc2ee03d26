"""Whole-model offload: keep a model's weights in RAM or on disk and stream them to where it runs.

``cpu_offload`` and ``disk_offload`` stream every module's weights just before it runs (with
prefetching); ``cpu_offload_with_hook`` moves a whole model to the execution device when it runs and
back on request, for pipelines whose models run one after another.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..load.loading import OFFLOAD_ATTR
from ..model.naming import parent
from ..model.tensors import ModelTensor, model_tensors, set_tensor
from ..storage.offload_folder import OffloadFolder, content_id, load_offload_index
from ..storage.weights_map import DiskRef, WeightsMap
from .dispatch import _dispatch
from .hooks import CpuOffload, UserCpuOffloadHook, add_hook_to_module
from .rollback import ModelState

__all__ = ["cpu_offload", "cpu_offload_with_hook", "disk_offload"]


def cpu_offload(
    model: nn.Module,
    execution_device: int | str | torch.device | None = None,
    offload_buffers: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int | str | None = None,
) -> nn.Module:
    """Keep every weight in RAM and bring each module's weights to ``execution_device`` only while it runs.

    Example::

        model = cpu_offload(model, execution_device=0)   # GPU memory: one layer at a time
    """
    if execution_device is None:
        execution_device = 0 if torch.cuda.is_available() else "cpu"
    return _dispatch(
        model, {"": "cpu"}, main_device=execution_device, state_dict=state_dict, offload_buffers=offload_buffers,
        preload_module_classes=preload_module_classes, force_hooks=True, offload_cpu=True, prefetch=prefetch,
    )


def cpu_offload_with_hook(
    model: nn.Module,
    execution_device: int | str | torch.device | None = None,
    prev_module_hook: UserCpuOffloadHook | None = None,
) -> tuple[nn.Module, UserCpuOffloadHook]:
    """Move the whole model to ``execution_device`` when it runs, and back to CPU when told to.

    Chain models run one after the other (a pipeline's text encoder, then UNet, then VAE)::

        enc, h1 = cpu_offload_with_hook(enc, 0)
        unet, h2 = cpu_offload_with_hook(unet, 0, prev_module_hook=h1)  # running unet offloads enc
        ...; h2.offload()
    """
    hook = CpuOffload(execution_device=execution_device, prev_module_hook=prev_module_hook)
    add_hook_to_module(model, hook, append=True)
    return model, UserCpuOffloadHook(model, hook)


def disk_offload(
    model: nn.Module,
    offload_dir: str | os.PathLike[str],
    execution_device: int | str | torch.device | None = None,
    offload_buffers: bool = False,
    preload_module_classes: Sequence[str] | None = None,
    *,
    prefetch: int | str | None = None,
) -> nn.Module:
    """Store every weight in ``offload_dir`` and read each module's weights only while it runs.

    Weights are written module by module; files are named by their content, so offloading the same
    weights again writes nothing, and other weights never take the place of old ones. Only once every
    file and the folder's index are written does the model give up its tensors (for meta placeholders):
    a write that fails (a full disk, a file-size limit) leaves the model as it was. An empty model (built
    with ``init_empty_weights``) is instead served from the folder's index, after its files are checked.

    Example::

        model = disk_offload(model, "offload", execution_device="cpu")
    """
    if execution_device is None:
        execution_device = 0 if torch.cuda.is_available() else "cpu"
    slots = model_tensors(model)
    recorded: WeightsMap | None = getattr(model, OFFLOAD_ATTR, None)
    to_store = [n for n, s in slots.items() if s.tensor.device.type != "meta" and n not in (recorded or {})]
    index: dict[str, DiskRef] | None = None
    state = ModelState.capture(model)
    try:
        if not any(not slots[n].is_buffer for n in to_store):
            # An empty model: the folder is where its weights are (a previous disk_offload wrote them).
            shapes = {n: tuple(s.tensor.shape) for n, s in slots.items()}
            index = load_offload_index(offload_dir, expected=shapes)
        else:
            weights = WeightsMap(recorded.memory if recorded else None, recorded.disk if recorded else None)
            folder = OffloadFolder(offload_dir)
            weights.disk.update(_write_all(slots, to_store, folder))
            folder.write_index(weights.disk)
            for n in to_store:  # all written: the hooks only need meta placeholders
                slot = slots[n]
                if slot.is_buffer and not offload_buffers:
                    continue  # stored for a later run, but kept here: it travels with its module
                set_tensor(slot, slot.tensor.detach().to("meta"))
            setattr(model, OFFLOAD_ATTR, weights)
        return _dispatch(
            model, {"": "disk"}, main_device=execution_device, offload_buffers=offload_buffers, offload_index=index,
            preload_module_classes=preload_module_classes, force_hooks=True, prefetch=prefetch,
        )
    except BaseException:
        state.restore()
        raise


def _write_all(slots: Mapping[str, ModelTensor], names: Sequence[str], folder: OffloadFolder) -> dict[str, DiskRef]:
    """Write ``names`` into ``folder`` one module at a time (tied names once); where each went."""
    folder.prepare()
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(parent(name), []).append(name)
    refs: dict[str, DiskRef] = {}
    written: dict[int, DiskRef] = {}
    for group in by_module.values():
        fresh = {n: slots[n].tensor.detach().to("cpu") for n in group if id(slots[n].tensor) not in written}
        # Named by content: the same weights are written once, other weights never collide.
        stored = folder.write(fresh, source_id=content_id(fresh)) if fresh else {}
        for n in group:
            key = id(slots[n].tensor)
            ref = stored.get(n) or written[key]
            written.setdefault(key, ref)
            refs[n] = ref
    return refs
