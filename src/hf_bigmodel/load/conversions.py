"""Checkpoint tensors that become model tensors only once converted: merged, split, or computed.

A model-family integration describes each conversion plainly (:class:`Conversion`): which checkpoint keys
it takes, which model tensors it makes, and how. Two kinds:

- a *layout*: every element of a model tensor is an element of one checkpoint tensor, placed by boxes
  (:class:`Part`). Stacking experts, concatenating ``gate`` and ``up``, chunking ``qkv``: a fused tensor is
  complete when its last part has arrived, it is built in place as shards stream (RAM holds the finished
  tensors and the shard being read), and on disk it is a :class:`~hf_bigmodel.storage.fused.FusedDiskTensor`
  over the checkpoint's own bytes: nothing is copied.
- a *computation* (``convert``): anything else (transposes, dequantization...). Its inputs are gathered
  until the last one arrives, then it runs once; results planned on disk go to the offload folder, unless
  it may run each time they are read (``on_read``: a dequantization), when they stay the checkpoint's own
  (quantized) bytes and are computed as their module runs (a
  :class:`~hf_bigmodel.storage.weights_map.BuiltDiskTensor`).

This module is pure bookkeeping; :mod:`hf_bigmodel.load.loading` reads the shards and places the tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import summarize
from ..storage.checkpoint import TensorInfo
from ..storage.fused import Box, DiskPiece, FusedDiskTensor, box_shape
from ..storage.weights_map import BuiltDiskTensor, DiskTensor

__all__ = ["Assembler", "Conversion", "Part", "built_disk_ref", "check_conversions", "fused_disk_refs"]


@dataclass(frozen=True)
class Part:
    """The elements ``src`` of checkpoint tensor ``key`` fill the box ``dst`` of model tensor ``target``."""

    key: str
    target: str
    dst: Box
    src: Box


@dataclass(frozen=True)
class Conversion:
    """Checkpoint keys ``sources`` become model tensors ``targets``: by ``parts`` (a layout) or by ``convert``.

    ``convert`` receives ``{key: tensor}`` for every source (each first cast to ``source_dtypes[key]`` when
    that is set) and returns ``{model name: tensor}``. ``shapes`` are the targets' shapes when known before
    anything is read (checked against the model). ``label`` names the conversion in errors and in the
    identity of what it writes to an offload folder. ``on_read``: ``convert`` is a pure function of its sources,
    cheap enough to run each time its (single) target is read, so a disk target keeps the checkpoint's bytes.
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    parts: tuple[Part, ...] = ()
    convert: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]] | None = None
    source_dtypes: Mapping[str, torch.dtype | None] = field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    label: str = ""
    on_read: bool = False

    @property
    def is_layout(self) -> bool:
        return self.convert is None


def _same_values(src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """Two boxes hold the same elements in order when they match once dimensions of size 1 are dropped."""
    return [d for d in src if d != 1] == [d for d in dst if d != 1]


def _within(box: Box, shape: Sequence[int]) -> bool:
    return len(box) == len(shape) and all(0 <= a <= b <= d for (a, b), d in zip(box, shape))


def check_conversions(
    conversions: Sequence[Conversion], infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    """Everything wrong with ``conversions`` against the checkpoint (``infos``) and the model (``shapes``).

    A layout's parts must lie inside their tensors and fill each target exactly once (counted in
    elements); a computation's known output shapes must be the model's.
    """
    problems: list[str] = []
    for conv in conversions:
        absent = [k for k in conv.sources if k not in infos]
        unknown = [t for t in conv.targets if t not in shapes]
        if absent or unknown:
            problems.append(f"{conv.label}: " + "; ".join(
                ([f"checkpoint lacks {summarize(absent, 3)}"] if absent else [])
                + ([f"model lacks {summarize(unknown, 3)}"] if unknown else [])))
            continue
        if not conv.is_layout:
            problems += [f"{t}: {conv.label} makes shape {list(s)}, the model has {list(shapes[t])}"
                         for t, s in conv.shapes.items() if t in shapes and tuple(s) != tuple(shapes[t])]
            continue
        filled = dict.fromkeys(conv.targets, 0)
        for part in conv.parts:
            source, target = infos[part.key].shape, shapes.get(part.target)
            if target is None or not _within(part.src, source) or not _within(part.dst, target) \
                    or not _same_values(box_shape(part.src), box_shape(part.dst)):
                problems.append(f"{part.target}: part {list(part.dst)} from {part.key} {list(part.src)} does not "
                                f"fit (checkpoint shape {list(source)}, model shape {list(target or ())})")
                continue
            filled[part.target] = filled.get(part.target, 0) + math.prod(box_shape(part.dst))
        problems += [f"{t}: {conv.label} fills {n} of its {math.prod(shapes[t])} elements from {len(conv.sources)} "
                     "checkpoint tensor(s)" for t, n in filled.items() if n != math.prod(shapes[t])]
    return problems


def fused_disk_refs(
    conv: Conversion, infos: Mapping[str, TensorInfo], shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, torch.dtype],
) -> dict[str, FusedDiskTensor] | None:
    """The targets of a layout as byte ranges of the checkpoint (no copy), or None when they cannot be.

    That needs safetensors sources (byte ranges) of one dtype per target. ``dtypes``: each target's dtype
    once read.
    """
    if not conv.is_layout:
        return None
    pieces: dict[str, list[DiskPiece]] = {t: [] for t in conv.targets}
    for part in conv.parts:
        entry = infos[part.key].entry
        if entry is None:
            return None
        pieces[part.target].append(DiskPiece(entry, part.dst, part.src))
    if any(len({p.entry.dtype for p in ps}) != 1 for ps in pieces.values()):
        return None
    return {t: FusedDiskTensor(tuple(ps), tuple(shapes[t]), dtypes[t]) for t, ps in pieces.items()}


def built_disk_ref(conv: Conversion, infos: Mapping[str, TensorInfo], shape: tuple[int, ...]
                   ) -> BuiltDiskTensor | None:
    """The target of an ``on_read`` computation as its sources read in place and converted when read, or None
    when it cannot be: sources not all in safetensors files, several targets, or a conversion that does not
    make the model's shape from meta tensors of its sources."""
    if not conv.on_read or conv.convert is None or len(conv.targets) != 1:
        return None
    if any(infos[key].entry is None for key in conv.sources):
        return None
    parts = tuple((key, DiskTensor(infos[key].entry, conv.source_dtypes.get(key) or infos[key].dtype))  # type: ignore[arg-type]
                  for key in conv.sources)
    build = functools.partial(_convert_one, conv.convert, conv.targets[0])
    ref = BuiltDiskTensor(parts, build, shape, torch.float32, conv.label)
    try:
        meta = ref.build_meta()
    except Exception:  # noqa: BLE001  (a conversion that cannot run on meta tensors: converted once instead)
        return None
    if tuple(meta.shape) != tuple(shape):
        return None
    return BuiltDiskTensor(parts, build, shape, meta.dtype, conv.label)


def _convert_one(convert: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]], target: str,
                 sources: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return convert(dict(sources))[target]


class Assembler:
    """Builds conversion targets from source tensors as they stream in; :meth:`feed` returns finished ones.

    ``allocate(name)`` gives the empty tensor a layout target is built in (its final device and dtype).
    A source is cast to its ``source_dtypes`` entry when it arrives; a computation's inputs are kept
    until the last one arrives.
    """

    def __init__(self, conversions: Iterable[Conversion], allocate: Callable[[str], torch.Tensor]) -> None:
        self._allocate = allocate
        self._by_key: dict[str, list[Conversion]] = {}
        self._waiting: dict[int, set[str]] = {}  # id(conversion) -> keys still to arrive
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._built: dict[str, torch.Tensor] = {}
        self._left: dict[str, int] = {}  # layout target -> parts still to arrive
        for conv in conversions:
            self._waiting[id(conv)] = set(conv.sources)
            for key in conv.sources:
                self._by_key.setdefault(key, []).append(conv)
            for part in conv.parts:
                self._left[part.target] = self._left.get(part.target, 0) + 1

    @property
    def keys(self) -> set[str]:
        return set(self._by_key)

    def conversions_of(self, key: str) -> list[Conversion]:
        """The conversions ``key`` is a source of."""
        return self._by_key.get(key, [])

    def pending(self) -> list[str]:
        """Targets not finished (their sources never arrived)."""
        return sorted({t for c in {id(c): c for cs in self._by_key.values() for c in cs}.values()
                       for t in c.targets if self._waiting[id(c)]})

    def feed(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        done: dict[str, torch.Tensor] = {}
        for conv in self._by_key.get(key, ()):
            waiting = self._waiting[id(conv)]
            if key not in waiting:
                continue
            waiting.discard(key)
            dtype = conv.source_dtypes.get(key)
            value = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
            if conv.is_layout:
                done.update(self._place(conv, key, value))
                continue
            inputs = self._inputs.setdefault(id(conv), {})
            inputs[key] = value
            if not waiting:
                assert conv.convert is not None
                done.update(conv.convert(self._inputs.pop(id(conv))))
        return done

    def _place(self, conv: Conversion, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        done: dict[str, torch.Tensor] = {}
        for part in conv.parts:
            if part.key != key:
                continue
            built = self._built.get(part.target)
            if built is None:
                built = self._built[part.target] = self._allocate(part.target)
            piece = value[tuple(slice(a, b) for a, b in part.src)]
            target = built[tuple(slice(a, b) for a, b in part.dst)]
            target.copy_(piece.reshape(target.shape))
            self._left[part.target] -= 1
            if self._left[part.target] == 0:
                done[part.target] = self._built.pop(part.target)
        return done
