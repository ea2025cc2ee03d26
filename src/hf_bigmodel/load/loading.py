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

from ..errors import Advice, CheckpointMismatchError, DeviceMapError, OffloadError, summarize
from ..model.dtypes import FLOAT8, resolve_dtype, target_dtype
from ..model.naming import lookup
from ..model.sizes import find_tied_parameters
from ..model.tensors import ModelTensor, model_tensors, put_tensor, set_tensor
from ..plan.device_map import check_device_map
from ..plan.devices import Device, is_present, normalize_device, torch_device
from ..progress import progress
from ..storage.checkpoint import Checkpoint, TensorInfo, find_checkpoint
from ..storage.direct_io import read_shard
from ..storage.fused import FusedDiskTensor
from ..storage.offload_folder import OffloadFolder
from ..storage.weights_map import DiskTensor, WeightsMap
from .conversions import Assembler, Conversion, check_conversions, fused_disk_refs

__all__ = ["OFFLOAD_ATTR", "LoadReport", "load_checkpoint", "load_checkpoint_in_model"]

logger = logging.getLogger(__name__)
OFFLOAD_ATTR = "_hf_bigmodel_weights"








def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    if src == dst:
        return True
    if src in FLOAT8 or dst in FLOAT8:  # fp8 values need their scales: only a quantizer's conversion may cast
        return False
    if src.is_complex or dst.is_complex:
        return src.is_complex and dst.is_complex
    if src.is_floating_point or dst.is_floating_point:
        return src.is_floating_point and dst.is_floating_point
    return src != torch.bool and dst != torch.bool  # int <-> int


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


def _device_of(name: str, device_map: Mapping[str, Device] | None, slot: ModelTensor) -> Device:
    if device_map is None:
        current = slot.tensor.device
        return "cpu" if current.type == "meta" else normalize_device(current)
    return lookup(name, device_map)


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
    keys bypass ``key_mapping``.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else find_checkpoint(checkpoint)
    cast = resolve_dtype(dtype) if dtype is not None else None
    keep = list(keep_in_fp32_modules or [])
    dm: dict[str, Device] | None = None
    if device_map is not None:
        dm = check_device_map(model, device_map)
    slots = model_tensors(model)
    infos = ckpt.scan()

    # 1. Match checkpoint keys to model tensors, and check everything before touching the model.
    by_model_name: dict[str, TensorInfo] = {}
    unexpected: list[str] = []
    converted = {key for conv in conversions for key in conv.sources}
    made = {name: conv for conv in conversions for name in conv.targets}
    for key, info in infos.items():
        if key in converted:
            continue
        name = key_mapping(key) if key_mapping is not None else key
        if name is None:
            continue
        if name in slots:
            by_model_name[name] = info
        else:
            unexpected.append(key)
    groups = _tie_groups(model)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    uncastable: list[str] = []
    for name, info in by_model_name.items():
        current = slots[name].tensor
        if tuple(current.shape) != info.shape:
            mismatched.append((name, info.shape, tuple(current.shape)))
        elif not _castable(info.dtype, current.dtype):
            uncastable.append(f"{name}: checkpoint {info.dtype} cannot become model {current.dtype}")
    uncastable += check_conversions(conversions, infos, {n: tuple(s.tensor.shape) for n, s in slots.items()})
    missing_unloadable: list[str] = []
    missing_kept: list[str] = []
    for name, slot in slots.items():
        if name in by_model_name or name in made or any(p in by_model_name or p in made for p in groups.get(name, ())):
            continue
        (missing_unloadable if slot.tensor.device.type == "meta" else missing_kept).append(name)
    if mismatched or uncastable or missing_unloadable or (strict and (unexpected or missing_kept)):
        hint = ""
        if uncastable:
            hint += (f"  Tensors that cannot be loaded as they are ({len(uncastable)}): {summarize(uncastable)}. "
                     "Integer, bool and floating-point tensors only convert within their kind (fp8 ones not at "
                     "all: their values need their scales, which only the checkpoint's quantizer applies), and "
                     "converted "
                     "tensors must fill the model's shapes; the checkpoint was saved from a different model or "
                     "is damaged: load the checkpoint made for this model.\n")
        if missing_unloadable:
            hint += ("  The missing tensors have no value in the model (it was built empty); load a checkpoint "
                     "that holds them, or build the model normally so they keep their initial values.")
        raise CheckpointMismatchError(
            missing=missing_unloadable + (missing_kept if strict else []),
            unexpected=unexpected if strict else [],
            mismatched=mismatched,
            path=ckpt.path,
            hint=hint.rstrip("\n"),
        )
    if unexpected:
        logger.warning("Ignored %d checkpoint key(s) the model does not have: %s",
                       len(unexpected), summarize(unexpected))
    if missing_kept:
        logger.warning("%d model tensor(s) are not in the checkpoint and keep their current values: %s",
                       len(missing_kept), summarize(missing_kept))

    # 2. Decide every tensor's destination; prepare the offload folder if it must receive copies.
    dest: dict[str, Device] = {}
    for name in by_model_name:
        device = _device_of(name, dm, slots[name])
        if device == "disk" and slots[name].is_buffer and not offload_buffers:
            device = "cpu"  # buffers of disk modules live in RAM and travel with their module
        dest[name] = device
    for name in made:
        device = _device_of(name, dm, slots[name])
        dest[name] = "cpu" if device == "disk" and slots[name].is_buffer and not offload_buffers else device
    _check_devices_present({name: _device_of(name, dm, slot) for name, slot in slots.items()})  # tied aliases too
    to_disk = [n for n, d in dest.items() if d == "disk"]
    unwritable = [t for conv in conversions if not conv.disk for t in conv.targets if dest.get(t) == "disk"]
    if unwritable:
        raise OffloadError(
            f"The device map puts {len(unwritable)} quantized tensor(s) on 'disk' ({summarize(unwritable, 3)}); "
            f"their kind ({made[unwritable[0]].label}) cannot be written to an offload folder yet. Nothing was "
            "loaded.",
            advice=[Advice("Give them room in RAM or on an accelerator with {}.", "max_memory",
                           "{'cpu': '...'}")],
        )
    folder: OffloadFolder | None = None
    in_place = _fused_on_disk(conversions, dest, infos, slots, cast, keep)
    copies = [n for n in to_disk if (n in made and n not in in_place) or (n in by_model_name and
                                                                        by_model_name[n].entry is None)]
    if copies and offload_folder is None:
        raise OffloadError(
            f"The device map puts {len(copies)} tensor(s) on 'disk' ({summarize(copies, 3)}) that cannot be read "
            f"in place from {ckpt.path!r}: a torch checkpoint, or tensors a conversion computes.", path=ckpt.path,
            advice=[Advice("Pass {} so they can be written there once, as safetensors.", "offload_folder",
                           "'path/to/folder'")],
        )
    if offload_folder is not None and (to_disk or ckpt.format != "safetensors"):
        folder = OffloadFolder(offload_folder)
        folder.prepare()
        plain = [n for n in copies if n in by_model_name]
        if plain:
            folder.check_space(_bytes_to_convert(folder, ckpt, plain, by_model_name, slots, cast, keep))

    # 3. Stream the shards.
    weights = WeightsMap(disk=in_place)
    loaded: dict[str, torch.Tensor] = {}
    before = {name: slot.tensor for name, slot in slots.items()}

    def allocate(name: str) -> torch.Tensor:  # a layout target, built where it goes (disk: in RAM, then written)
        part = next(p for p in made[name].parts if p.target == name)
        dtype = _final_dtype(name, infos[part.key].dtype, slots[name], cast, keep)
        device = "cpu" if dest[name] == "disk" else torch_device(dest[name])
        return torch.empty(slots[name].tensor.shape, dtype=dtype, device=device)

    assembler = Assembler([c for c in conversions if not set(c.targets) <= set(in_place)], allocate)
    try:
        names_by_file: dict[str, dict[str, str]] = {}
        for name, info in by_model_name.items():
            names_by_file.setdefault(info.file, {})[info.key] = name
        for file in progress(ckpt.files, desc="Loading checkpoint shards", unit="shard"):
            wanted = names_by_file.get(file, {})
            pending_disk: dict[str, torch.Tensor] = {}
            to_read = {key for key in assembler.keys if infos[key].file == file}
            for key, name in wanted.items():
                info = infos[key]
                final_dtype = _final_dtype(name, info.dtype, slots[name], cast, keep)
                if dest[name] == "disk" and info.entry is not None:
                    weights.disk[name] = DiskTensor(info.entry, final_dtype)
                else:
                    to_read.add(key)
            # An offloading plan means RAM is short: read around the page cache (diskio.read_shard).
            for key, value in read_shard(ckpt, file, to_read, uncached=bool(to_disk)):
                if key not in wanted:
                    for name, made_value in assembler.feed(key, value).items():
                        if dest.get(name) == "disk":
                            pending_disk[name] = made_value
                        else:
                            loaded[name] = set_tensor(slots[name], made_value.to(torch_device(dest[name])))
                    continue
                name = wanted[key]
                final_dtype = _final_dtype(name, value.dtype, slots[name], cast, keep)
                if dest[name] == "disk":
                    pending_disk[name] = value.to(final_dtype)
                    continue
                value = value.to(device=torch_device(dest[name]), dtype=final_dtype)
                loaded[name] = set_tensor(slots[name], value)
            if pending_disk:
                weights.disk.update(_write(folder, pending_disk, file, made, infos))
                del pending_disk
        if assembler.pending():
            raise RuntimeError(f"Conversions never finished (a source never arrived): {summarize(assembler.pending())}")

        # 4. Tied tensors share one storage again (a checkpoint usually stores only one name of a group).
        for name, partners in groups.items():
            if name in loaded or name in weights.disk:
                continue
            source = next((p for p in partners if p in loaded or p in weights.disk), None)
            if source is None:
                continue
            if source in weights.disk:
                weights.disk[name] = weights.disk[source]
            else:
                # Share the very Parameter, wherever the map puts the alias: dispatch_model sees the tie and
                # either keeps one copy (same execution device) or streams a copy to the other device.
                put_tensor(slots[name], loaded[source])
                loaded[name] = loaded[source]
        _retype_placeholders(slots, weights)
        if folder is not None and weights.disk:
            folder.write_index(weights.disk)
    except BaseException:
        _restore(slots, before)  # a failed load leaves the model as it found it
        raise
    finally:
        ckpt.release()
    return LoadReport(weights, missing_kept, unexpected)


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
    """Give the meta placeholders of disk tensors the dtype they will be read in.

    Forward code inspects them before the hooks bring the weights (T5 casts its activations to
    ``wo.weight.dtype``, which is float32 when ``wo`` is kept in fp32). Tied placeholders stay shared.
    """
    made: dict[int, torch.Tensor] = {}
    for name, ref in weights.disk.items():
        slot = slots.get(name)
        if slot is None:
            continue
        old = slot.tensor
        if old.device.type != "meta" or old.dtype == ref.dtype:
            continue
        new = made.get(id(old))
        if new is None:
            new = made[id(old)] = set_tensor(slot, torch.empty(old.shape, dtype=ref.dtype, device="meta"))
        else:
            put_tensor(slot, new)


def _fused_on_disk(
    conversions: Sequence[Conversion], dest: Mapping[str, Device], infos: Mapping[str, TensorInfo],
    slots: Mapping[str, ModelTensor], cast: torch.dtype | None, keep: list[str],
) -> dict[str, DiskTensor | FusedDiskTensor]:
    """Layout targets all planned on disk, as byte ranges of the checkpoint's own files (nothing copied)."""
    refs: dict[str, DiskTensor | FusedDiskTensor] = {}
    for conv in conversions:
        if not conv.is_layout or any(dest[t] != "disk" for t in conv.targets):
            continue
        first = {p.target: infos[p.key].dtype for p in reversed(conv.parts)}
        dtypes = {t: _final_dtype(t, first[t], slots[t], cast, keep) for t in conv.targets}
        shapes = {t: tuple(slots[t].tensor.shape) for t in conv.targets}
        refs.update(fused_disk_refs(conv, infos, shapes, dtypes) or {})
    return refs


def _write(folder: OffloadFolder | None, tensors: dict[str, torch.Tensor], file: str,
           made: Mapping[str, Conversion], infos: Mapping[str, TensorInfo]) -> dict[str, DiskTensor]:
    """Write one shard's disk tensors. A conversion's results are named by the identity of every shard its
    sources come from and by what it does, so a later run re-uses them only when all of those are unchanged."""
    assert folder is not None  # checked before loading: tensors that need a copy need a folder
    plain = {n: t for n, t in tensors.items() if n not in made}
    written = folder.write(plain, source_id=_source_id(file)) if plain else {}
    by_conv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name in made:
            by_conv.setdefault(id(made[name]), {})[name] = tensor
    for group in by_conv.values():
        conv = made[next(iter(group))]
        shards = sorted({infos[key].file for key in conv.sources})
        identity = "|".join([conv.label, *conv.sources, *map(_source_id, shards)])
        written.update(folder.write(group, source_id=identity))
    return written


def _source_id(file: str) -> str:
    """Identity of a checkpoint shard (path, size, mtime): names its converted copy in the offload folder."""
    st = os.stat(file)
    return f"{os.path.abspath(file)}:{st.st_size}:{st.st_mtime_ns}"


def _bytes_to_convert(
    folder: OffloadFolder, ckpt: Checkpoint, names: Sequence[str], infos: Mapping[str, TensorInfo],
    slots: Mapping[str, ModelTensor], cast: torch.dtype | None, keep: list[str],
) -> int:
    """Bytes the offload folder must receive for ``names``, leaving out shards whose copy is already there."""
    by_file: dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]] = {}
    for name in names:
        info = infos[name]
        by_file.setdefault(info.file, {})[name] = (_final_dtype(name, info.dtype, slots[name], cast, keep), info.shape)
    total = 0
    for file, specs in by_file.items():
        if folder.content_path(_source_id(file), specs).is_file():
            continue  # re-used after its header is checked; rewritten (rarely) if damaged
        total += sum(dtype.itemsize * math.prod(shape) for dtype, shape in specs.values())
    return total


def _restore(slots: Mapping[str, ModelTensor], before: Mapping[str, torch.Tensor]) -> None:
    for name, slot in slots.items():
        put_tensor(slot, before[name])


def _final_dtype(
    name: str, ckpt_dtype: torch.dtype, slot: ModelTensor, cast: torch.dtype | None, keep: list[str]
) -> torch.dtype:
    current = slot.tensor.dtype
    if cast is None:
        return current
    if not current.is_floating_point or current in FLOAT8:
        return current
    return target_dtype(name, ckpt_dtype, cast, keep)


def _tie_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    groups: dict[str, tuple[str, ...]] = {}
    for group in find_tied_parameters(model):
        for name in group:
            groups[name] = tuple(n for n in group if n != name)
    return groups

