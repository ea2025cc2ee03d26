"""What loading a checkpoint will do, decided from its headers before any tensor data is read: a :class:`LoadPlan`.

The plan matches checkpoint keys to model tensors (through the caller's renaming, and the
:mod:`conversions <hf_bigmodel.load.conversions>` that build a model tensor from several keys), checks
every shape and dtype, and decides per tensor where it goes and in which dtype, and how: *read* into the
model, *referenced* in place (a byte range, or a fused set of byte ranges, of the checkpoint's own
safetensors files, for ``"disk"`` tensors), or *written* once into the offload folder (``"disk"``
tensors of other formats, or computed by a conversion). Tied names the checkpoint stores once take
their partner's value. Every problem is found here, and raised at once, before anything is read or
changed; :func:`~hf_bigmodel.load.loading.load_checkpoint` then applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointMismatchError, summarize
from ..model.dtypes import FLOAT8, target_dtype
from ..model.naming import lookup
from ..model.tensors import ModelTensor, tie_groups
from ..plan.devices import Device, normalize_device
from ..storage.checkpoint import TensorInfo
from ..storage.fused import FusedDiskTensor
from ..storage.weights_map import BuiltDiskTensor
from .conversions import Conversion, built_disk_ref, check_conversions, fused_disk_refs

__all__ = ["LoadPlan", "plan_load"]


@dataclass
class LoadPlan:
    """Which checkpoint tensor fills which model tensor, where, in which dtype, and how (module docstring)."""

    path: str
    #: Model name -> the checkpoint tensor that fills it (its key may differ: a renamed key).
    matches: dict[str, TensorInfo] = field(default_factory=dict)
    #: Model name -> the conversion that makes it from several checkpoint tensors.
    made: dict[str, Conversion] = field(default_factory=dict)
    #: A conversion's checkpoint key -> its file.
    source_files: dict[str, str] = field(default_factory=dict)
    #: Checkpoint keys the model does not have (ignored, unless ``strict``).
    unexpected: list[str] = field(default_factory=list)
    #: Model tensors the checkpoint lacks that keep their current value.
    missing: list[str] = field(default_factory=list)
    #: Every model tensor (tied aliases too) -> the device it is placed on.
    devices: dict[str, Device] = field(default_factory=dict)
    #: Matched or made name -> where it goes (a ``"disk"`` module's buffers stay in RAM unless ``offload_buffers``).
    dest: dict[str, Device] = field(default_factory=dict)
    #: Matched name, or target of a layout conversion -> the dtype it ends up in.
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    #: ``"disk"`` names recorded as byte ranges of the checkpoint's safetensors files: never read.
    referenced: list[str] = field(default_factory=list)
    #: ``"disk"`` targets of layout conversions recorded as fused byte ranges of the checkpoint: never read.
    fused: dict[str, FusedDiskTensor] = field(default_factory=dict)
    #: ``"disk"`` targets of ``on_read`` conversions, computed from their sources (read in place) when read.
    built: dict[str, BuiltDiskTensor] = field(default_factory=dict)
    #: ``"disk"`` names read (or computed) and written once into the offload folder: torch checkpoints,
    #: conversions that cannot be read in place.
    converted: list[str] = field(default_factory=list)
    #: Matched names read and put in the model.
    read: list[str] = field(default_factory=list)
    #: Tied name the checkpoint lacks -> the partner whose value it shares.
    ties: dict[str, str] = field(default_factory=dict)

    @property
    def by_file(self) -> dict[str, dict[str, str]]:
        """Checkpoint file -> {key: model name} of the tensors taken from it, in checkpoint order."""
        files: dict[str, dict[str, str]] = {}
        for name, info in self.matches.items():
            files.setdefault(info.file, {})[info.key] = name
        return files

    @property
    def offloads(self) -> bool:
        """Something goes to ``"disk"``: RAM is short, so shards are read around the page cache."""
        return any(device == "disk" for device in self.dest.values())

    def __str__(self) -> str:
        renamed = sum(1 for name, info in self.matches.items() if info.key != name)
        lines = [
            f"LoadPlan for {self.path}: {len(self.matches)} tensor(s) matched ({renamed} renamed), "
            f"{len(self.made)} made by conversions, {len(self.unexpected)} unexpected, {len(self.missing)} "
            f"missing (kept), {len(self.ties)} tied",
            f"  read {len(self.read)}, referenced in place {len(self.referenced) + len(self.fused) + len(self.built)}, "
            f"written to the offload folder {len(self.converted)}",
        ]
        per_device: dict[str, int] = {}
        for device in self.dest.values():
            per_device[repr(device)] = per_device.get(repr(device), 0) + 1
        lines += [f"  {device}: {count} tensor(s)" for device, count in per_device.items()]
        return "\n".join(lines)


def plan_load(
    slots: Mapping[str, ModelTensor],
    infos: Mapping[str, TensorInfo],
    *,
    path: str,
    device_map: Mapping[str, Device] | None = None,
    dtype: torch.dtype | None = None,
    keep_in_fp32_modules: Sequence[str] = (),
    offload_buffers: bool = False,
    strict: bool = False,
    key_mapping: Callable[[str], str | None] | None = None,
    conversions: Sequence[Conversion] = (),
) -> LoadPlan:
    """The plan for loading the checkpoint tensors ``infos`` (from its headers) into the model tensors ``slots``.

    ``device_map`` (normalised) places tensors; without one they stay where they are (meta ones on the
    CPU). ``dtype`` casts floating-point tensors (``keep_in_fp32_modules`` to float32); without one they
    take the model's dtypes. ``conversions`` make model tensors from several keys (which bypass
    ``key_mapping``). Raises :class:`CheckpointMismatchError` for every missing, mis-shaped, uncastable
    (and with ``strict`` unexpected) key at once, before anything is read.
    """
    plan = LoadPlan(path)
    converted = {key for conv in conversions for key in conv.sources}
    plan.made = {name: conv for conv in conversions for name in conv.targets}
    plan.source_files = {key: infos[key].file for key in converted if key in infos}
    for key, info in infos.items():
        if key in converted:
            continue
        name = key_mapping(key) if key_mapping is not None else key
        if name is None:
            continue
        if name in slots:
            plan.matches[name] = info
        else:
            plan.unexpected.append(key)
    groups = tie_groups(slots)
    _check(plan, slots, groups, strict, check_conversions(conversions, infos, _shapes(slots)))
    for name, slot in slots.items():
        plan.devices[name] = _device_of(name, device_map, slot)
    for name in [*plan.matches, *plan.made]:
        device = plan.devices[name]
        if device == "disk" and slots[name].is_buffer and not offload_buffers:
            device = "cpu"  # buffers of disk modules live in RAM and travel with their module
        plan.dest[name] = device
    for name, info in plan.matches.items():
        plan.dtypes[name] = _final_dtype(name, info.dtype, slots[name], dtype, keep_in_fp32_modules)
        if plan.dest[name] != "disk":
            plan.read.append(name)
        elif info.entry is not None:
            plan.referenced.append(name)
        else:
            plan.converted.append(name)
    _plan_conversions(plan, conversions, infos, slots, dtype, keep_in_fp32_modules)
    for group in groups:  # a checkpoint usually stores one name of a tied group
        source = next((n for n in group if n in plan.matches or n in plan.made), None)
        for name in group if source is not None else ():
            if name not in plan.matches and name not in plan.made:
                plan.ties[name] = source  # type: ignore[assignment]
    return plan


def _shapes(slots: Mapping[str, ModelTensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(slot.tensor.shape) for name, slot in slots.items()}


def _plan_conversions(
    plan: LoadPlan, conversions: Sequence[Conversion], infos: Mapping[str, TensorInfo],
    slots: Mapping[str, ModelTensor], cast: torch.dtype | None, keep: Sequence[str],
) -> None:
    """Dtypes of layout targets; those all planned on disk referenced in place where the checkpoint allows."""
    for conv in conversions:
        if not conv.is_layout:
            if all(plan.dest[t] == "disk" for t in conv.targets):
                ref = built_disk_ref(conv, infos, tuple(slots[conv.targets[0]].tensor.shape))
                plan.built.update({conv.targets[0]: ref} if ref is not None else {})
            continue
        first = {p.target: infos[p.key].dtype for p in reversed(conv.parts)}
        dtypes = {t: _final_dtype(t, first[t], slots[t], cast, keep) for t in conv.targets}
        plan.dtypes.update(dtypes)
        if all(plan.dest[t] == "disk" for t in conv.targets):
            plan.fused.update(fused_disk_refs(conv, infos, _shapes({t: slots[t] for t in conv.targets}), dtypes)
                              or {})
    plan.converted += [n for n in plan.made if plan.dest[n] == "disk" and n not in plan.fused and n not in plan.built]


def _check(
    plan: LoadPlan, slots: Mapping[str, ModelTensor], groups: list[list[str]], strict: bool,
    conversion_problems: list[str],
) -> None:
    """Every mismatch between checkpoint and model, raised at once; missing tensors that keep a value noted."""
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    uncastable: list[str] = []
    for name, info in plan.matches.items():
        current = slots[name].tensor
        if tuple(current.shape) != info.shape:
            mismatched.append((name, info.shape, tuple(current.shape)))
        elif not _castable(info.dtype, current.dtype):
            uncastable.append(f"{name}: checkpoint {info.dtype} cannot become model {current.dtype}")
    uncastable += conversion_problems
    partners = {n: g for g in groups for n in g}
    unloadable: list[str] = []
    for name, slot in slots.items():
        if not any(p in plan.matches or p in plan.made for p in partners.get(name, [name])):
            (unloadable if slot.tensor.device.type == "meta" else plan.missing).append(name)
    if mismatched or uncastable or unloadable or (strict and (plan.unexpected or plan.missing)):
        hint = ""
        if uncastable:
            hint += (f"  Tensors that cannot be loaded as they are ({len(uncastable)}): {summarize(uncastable)}. "
                     "Integer, bool and floating-point tensors only convert within their kind (fp8 ones not at "
                     "all: their values need their scales, which only the checkpoint's quantizer applies), and "
                     "converted tensors must fill the model's shapes; the checkpoint was saved from a different "
                     "model or is damaged: load the checkpoint made for this model.\n")
        if unloadable:
            hint += ("  The missing tensors have no value in the model (it was built empty); load a checkpoint "
                     "that holds them, or build the model normally so they keep their initial values.")
        raise CheckpointMismatchError(
            missing=unloadable + (plan.missing if strict else []),
            unexpected=plan.unexpected if strict else [],
            mismatched=mismatched,
            path=plan.path,
            hint=hint.rstrip("\n"),
        )


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


def _device_of(name: str, device_map: Mapping[str, Device] | None, slot: ModelTensor) -> Device:
    if device_map is None:
        current = slot.tensor.device
        return "cpu" if current.type == "meta" else normalize_device(current)
    return lookup(name, device_map)


def _final_dtype(
    name: str, ckpt_dtype: torch.dtype, slot: ModelTensor, cast: torch.dtype | None, keep: Sequence[str]
) -> torch.dtype:
    current = slot.tensor.dtype
    if cast is None or not current.is_floating_point or current in FLOAT8:
        return current
    return target_dtype(name, ckpt_dtype, cast, keep)
