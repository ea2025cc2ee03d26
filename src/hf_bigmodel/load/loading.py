"""Streaming a checkpoint into a (possibly empty) model, shard by shard.

Every key, shape and dtype is checked against the model from the checkpoint's headers before any
tensor data is read, so a bad checkpoint fails at once with every problem listed, and the model is
left untouched. Tensors are then read one at a time, cast, and assigned in place of the meta
placeholders (no throw-away copy); disk-mapped tensors of safetensors checkpoints are only recorded
as byte ranges of the checkpoint's own files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import Advice, DeviceMapError, OffloadError, summarize
from ..model.dtypes import check_cast, resolve_dtype
from ..model.tensors import ModelTensor, model_tensors, put_tensor, set_tensor
from ..plan.device_map import check_device_map
from ..plan.devices import Device, is_present, torch_device
from ..progress import ByteProgress
from ..storage.checkpoint import Checkpoint, TensorInfo, find_checkpoint
from ..storage.direct_io import read_shard
from ..storage.offload_folder import OffloadFolder
from ..storage.weights_map import BuiltDiskTensor, DiskRef, DiskTensor, WeightsMap
from .conversions import Assembler, Conversion
from .load_plan import LoadPlan, plan_load

__all__ = ["OFFLOAD_ATTR", "LoadReport", "load_checkpoint", "load_checkpoint_in_model"]

logger = logging.getLogger(__name__)
OFFLOAD_ATTR = "_hf_bigmodel_weights"


@dataclass
class LoadReport:
    """What a load did: tensors found missing (kept their value) or unexpected (ignored), and the weights map."""

    weights: WeightsMap
    missing_keys: list[str]
    unexpected_keys: list[str]


def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike[str],
    device_map: Mapping[str, int | str | torch.device] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: Sequence[str] | None = None,
    offload_8bit: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
) -> None:
    """Load ``checkpoint`` (file, ``*.index.json`` or folder) into ``model``, placing tensors per ``device_map``.

    Floating-point tensors are cast to ``dtype`` (modules in ``keep_in_fp32_modules`` to float32); with no
    ``dtype`` they take the model's own dtype, as ``load_state_dict`` would. Tensors mapped to ``"disk"``
    stay in the checkpoint's safetensors files (other formats are written once into ``offload_folder``).
    Missing and mis-shaped keys raise :class:`CheckpointMismatchError` before anything is loaded;
    unexpected keys too with ``strict=True`` (else they are logged and ignored).

    ``offload_state_dict`` is accepted for accelerate compatibility: loading is always streamed one tensor
    at a time, so RAM never holds a second copy of the weights. ``full_state_dict`` concerns FSDP and is
    ignored.

    Example::

        with init_empty_weights():
            model = MyModel()
        load_checkpoint_in_model(model, "ckpt/model.safetensors.index.json", device_map={"": "cpu"})
    """
    if offload_8bit or broadcast_from_rank0:
        raise ValueError(
            "offload_8bit and broadcast_from_rank0 are not supported by hf_bigmodel; leave them False."
        )
    report = load_checkpoint(
        model, checkpoint, device_map=device_map, offload_folder=offload_folder, dtype=dtype,
        offload_buffers=offload_buffers, keep_in_fp32_modules=keep_in_fp32_modules, strict=strict,
    )
    if report.weights:
        setattr(model, OFFLOAD_ATTR, report.weights)  # picked up by dispatch_model


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    *,
    device_map: Mapping[str, int | str | torch.device] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    offload_buffers: bool = False,
    keep_in_fp32_modules: Sequence[str] | None = None,
    strict: bool = False,
    key_mapping: Callable[[str], str | None] | None = None,
    conversions: Sequence[Conversion] = (),
) -> LoadReport:
    """The engine behind :func:`load_checkpoint_in_model`, returning a :class:`LoadReport`.

    ``key_mapping`` renames checkpoint keys to model names (``None`` drops a key); model-family loaders use
    it for prefixes and renamed layers. ``conversions`` build model tensors from several checkpoint keys
    (merged experts, split projections, dequantized weights: :mod:`hf_bigmodel.load.conversions`); their
    keys bypass ``key_mapping``. Plans first (:func:`~.load_plan.plan_load`: every check before any read),
    then streams the shards.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else find_checkpoint(checkpoint)
    cast = resolve_dtype(dtype) if dtype is not None else None
    dm = check_device_map(model, device_map) if device_map is not None else None
    slots = model_tensors(model)
    infos = ckpt.scan()
    if cast is not None:
        check_cast(cast, {key: info.dtype for key, info in infos.items()}, source=repr(ckpt.path))
    plan = plan_load(
        slots, infos, path=ckpt.path, device_map=dm, dtype=cast,
        keep_in_fp32_modules=list(keep_in_fp32_modules or []), offload_buffers=offload_buffers, strict=strict,
        key_mapping=key_mapping, conversions=conversions,
    )
    if plan.unexpected:
        logger.warning("Ignored %d checkpoint key(s) the model does not have: %s",
                       len(plan.unexpected), summarize(plan.unexpected))
    if plan.missing:
        logger.warning("%d model tensor(s) are not in the checkpoint and keep their current values: %s",
                       len(plan.missing), summarize(plan.missing))
    _check_devices_present(plan.devices)  # tied aliases too
    folder = _offload_folder(plan, ckpt, offload_folder)
    weights = WeightsMap(disk={**plan.fused, **plan.built})
    before = {name: slot.tensor for name, slot in slots.items()}
    try:
        loaded = _stream(plan, ckpt, slots, weights, folder)
        for name, source in plan.ties.items():  # tied tensors share one storage again
            if source in weights.disk:
                weights.disk[name] = weights.disk[source]
            else:
                # Share the very Parameter, wherever the map puts the alias: dispatch_model sees the tie and
                # either keeps one copy (same execution device) or streams a copy to the other device.
                put_tensor(slots[name], loaded[source])
        _retype_placeholders(slots, weights)
        if folder is not None and weights.disk:
            folder.write_index(weights.disk)
    except BaseException:
        _restore(slots, before)  # a failed load leaves the model as it found it
        raise
    finally:
        ckpt.release()
    return LoadReport(weights, plan.missing, plan.unexpected)


def _offload_folder(
    plan: LoadPlan, ckpt: Checkpoint, offload_folder: str | os.PathLike[str] | None
) -> OffloadFolder | None:
    """The offload folder, prepared (with room checked) when tensors go to disk or the format needs it."""
    if plan.converted and offload_folder is None:
        raise OffloadError(
            f"The device map puts {len(plan.converted)} tensor(s) on 'disk' ({summarize(plan.converted, 3)}) that "
            f"cannot be read in place from {ckpt.path!r}: a torch checkpoint, or tensors a conversion computes.",
            path=ckpt.path, advice=[Advice("Pass {} so they can be written there once, as safetensors.",
                                           "offload_folder", "'path/to/folder'")],
        )
    if offload_folder is None or not (plan.offloads or ckpt.format != "safetensors"):
        return None
    folder = OffloadFolder(offload_folder)
    folder.prepare()
    if any(name in plan.matches for name in plan.converted):
        folder.check_space(_bytes_to_convert(folder, plan))
    return folder


def _stream(
    plan: LoadPlan, ckpt: Checkpoint, slots: Mapping[str, ModelTensor], weights: WeightsMap,
    folder: OffloadFolder | None,
) -> dict[str, torch.Tensor]:
    """Read the shards one tensor at a time: into the model, or into the offload folder; returns what was put
    in the model. Referenced tensors are only recorded in ``weights``; conversions are fed as keys arrive."""
    loaded: dict[str, torch.Tensor] = {}
    by_file = plan.by_file
    referenced = set(plan.referenced)

    def allocate(name: str) -> torch.Tensor:  # a layout target, built where it goes (disk: in RAM, then written)
        device = "cpu" if plan.dest[name] == "disk" else torch_device(plan.dest[name])
        return torch.empty(slots[name].tensor.shape, dtype=plan.dtypes[name], device=device)

    in_place = set(plan.fused) | set(plan.built)  # read (or computed) only when a module runs
    assembler = Assembler({id(c): c for c in plan.made.values() if not set(c.targets) <= in_place}.values(), allocate)
    reads: dict[str, set[str]] = {file: set() for file in ckpt.files}  # file -> keys to read from it
    for key in assembler.keys:
        reads[plan.source_files[key]].add(key)
    for file, wanted in by_file.items():
        reads[file] |= {key for key, name in wanted.items() if name not in referenced}
    infos = ckpt.scan()
    bar = ByteProgress(sum(_info_bytes(infos[key]) for keys in reads.values() for key in keys), desc="Loading weights")
    try:
        for file in ckpt.files:
            wanted = by_file.get(file, {})
            for name in wanted.values():
                if name in referenced:
                    weights.disk[name] = DiskTensor(plan.matches[name].entry, plan.dtypes[name])  # type: ignore[arg-type]
            pending_disk: dict[str, torch.Tensor] = {}
            # An offloading plan means RAM is short: read around the page cache (direct_io.read_shard).
            for key, value in bar.count(read_shard(ckpt, file, reads[file], uncached=plan.offloads)):
                target = wanted.get(key)
                if target is None:  # a conversion's source: its targets, once complete
                    for made, tensor in assembler.feed(key, value).items():
                        if plan.dest[made] == "disk":
                            pending_disk[made] = tensor
                        else:
                            loaded[made] = set_tensor(slots[made], tensor.to(torch_device(plan.dest[made])))
                    pending_disk.update(_taken_from_model(assembler.conversions_of(key), slots, plan))
                elif plan.dest[target] == "disk":
                    pending_disk[target] = value.to(plan.dtypes[target])
                else:
                    value = value.to(device=torch_device(plan.dest[target]), dtype=plan.dtypes[target])
                    loaded[target] = set_tensor(slots[target], value)
            if pending_disk:
                weights.disk.update(_write(folder, pending_disk, file, plan))
                del pending_disk
    finally:
        bar.close()
    if assembler.pending():
        raise RuntimeError(f"Conversions never finished (a source never arrived): {summarize(assembler.pending())}")
    return loaded


def _info_bytes(info: TensorInfo) -> int:
    return math.prod(info.shape) * info.dtype.itemsize


def _taken_from_model(conversions: Sequence[Conversion], slots: Mapping[str, ModelTensor], plan: LoadPlan
                      ) -> dict[str, torch.Tensor]:
    """Disk targets a conversion put straight into the model (transformers' torchao quantization does), taken
    out again so they are written with the shard, as other disk tensors are, and RAM never holds them all."""
    taken: dict[str, torch.Tensor] = {}
    for conv in conversions:
        for name in conv.targets:
            tensor = slots[name].tensor
            if plan.dest.get(name) == "disk" and tensor.device.type != "meta":
                taken[name] = tensor
                set_tensor(slots[name], torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))
    return taken


def _write(folder: OffloadFolder | None, tensors: dict[str, torch.Tensor], file: str, plan: LoadPlan
           ) -> dict[str, DiskRef]:
    """Write one shard's disk tensors. A conversion's results are named by the identity of every shard its
    sources come from and by what it does, so a later run re-uses them only when all of those are unchanged."""
    assert folder is not None  # checked before loading: tensors that need a copy need a folder
    made = plan.made
    plain = {n: t for n, t in tensors.items() if n not in made}
    written = folder.write(plain, source_id=_source_id(file)) if plain else {}
    by_conv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in made:
            by_conv.setdefault(id(made[name]), {})[name] = tensor
    for group in by_conv.values():
        conv = made[next(iter(group))]
        shards = sorted({plan.source_files[key] for key in conv.sources})
        identity = "|".join([conv.label, *conv.sources, *map(_source_id, shards)])
        written.update(folder.write(group, source_id=identity))
    return written


def _check_devices_present(dest: Mapping[str, Device]) -> None:
    """Every device tensors go to must exist here; raises before anything is read."""

    absent: dict[Device, list[str]] = {}
    for name, device in dest.items():
        if not is_present(device):
            absent.setdefault(device, []).append(name)
    if absent:
        where = "; ".join(f"{d!r} for {summarize(names, 3)}" for d, names in absent.items())
        raise DeviceMapError(
            f"The device map uses device(s) this machine does not have: {where} (CUDA available: "
            f"{torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}). Map those modules to devices "
            "that exist, or plan with device_map='auto'.",
            modules=[n for names in absent.values() for n in names],
        )


def _retype_placeholders(slots: Mapping[str, ModelTensor], weights: WeightsMap) -> None:
    """Give the meta placeholders of disk tensors the dtype (and tensor class) they will be read as.

    Forward code inspects them before the hooks bring the weights (T5 casts its activations to
    ``wo.weight.dtype``, which is float32 when ``wo`` is kept in fp32); a quantized weight's placeholder is
    its tensor subclass on meta, as from_pretrained's model holds it. Tied placeholders stay shared.
    """
    made: dict[int, torch.Tensor] = {}
    for name, ref in weights.disk.items():
        slot = slots.get(name)
        if slot is None:
            continue
        old = slot.tensor
        built = ref.build_meta() if isinstance(ref, BuiltDiskTensor) else None
        if old.device.type != "meta" or (old.dtype == ref.dtype and (built is None or type(built) is type(old))):
            continue
        new = made.get(id(old))
        if new is None:
            value = built if built is not None else torch.empty(old.shape, dtype=ref.dtype, device="meta")
            new = made[id(old)] = set_tensor(slot, value)
        else:
            put_tensor(slot, new)


def _source_id(file: str) -> str:
    """Identity of a checkpoint shard (path, size, mtime, inode): names its converted copy in the offload folder."""
    st = os.stat(file)
    return f"{os.path.abspath(file)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}"


def _bytes_to_convert(folder: OffloadFolder, plan: LoadPlan) -> int:
    """Bytes the offload folder must receive for the converted tensors, leaving out shards already copied."""
    by_file: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    for name in plan.converted:
        info = plan.matches[name]
        by_file.setdefault(info.file, {})[name] = (plan.dtypes[name], info.shape)
    total = 0
    for file, specs in by_file.items():
        if folder.content_path(_source_id(file), specs).is_file():
            continue  # re-used after its header is checked; rewritten (rarely) if damaged
        total += sum(dtype.itemsize * math.prod(shape) for dtype, shape in specs.values())
    return total


def _restore(slots: Mapping[str, ModelTensor], before: Mapping[str, torch.Tensor]) -> None:
    for name, slot in slots.items():
        put_tensor(slot, before[name])
