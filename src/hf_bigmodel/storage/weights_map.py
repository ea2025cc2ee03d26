"""Offloaded weights as a lazy name -> tensor map: tensors in RAM, or byte ranges of safetensors files.

A :class:`WeightsMap` holds, per tensor name, either a tensor in RAM or a :data:`DiskRef`: a
:class:`DiskTensor` (a byte range in a safetensors file), a :class:`~hf_bigmodel.storage.fused.FusedDiskTensor`
(a tensor assembled from pieces of several), or a :class:`BuiltDiskTensor` (built from stored tensors when
read: a quantized tensor subclass from its inner tensors, fp8 weights dequantized from the checkpoint's
fp8 bytes and scales), read and cast only when a module needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .direct_io import DirectReader, aligned_empty, padded_span, read_uncached
from .fused import FusedDiskTensor, read_fused_into, scratch_bytes
from .safetensors_io import TensorEntry

__all__ = ["BuiltDiskTensor", "DiskRef", "DiskTensor", "WeightsMap", "flatten_subclass", "read_disk_ref",
           "subclass_builder"]


@dataclass(frozen=True)
class DiskTensor:
    """A tensor stored in a safetensors file, and the dtype it is cast to when read."""

    entry: TensorEntry
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def nbytes(self) -> int:
        """Bytes once read and cast."""
        n = 1
        for d in self.entry.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class BuiltDiskTensor:
    """A tensor built, each time it is read, from tensors stored in safetensors files (its ``parts``).

    Two uses: a tensor subclass (torchao's quantized weights) stored as its inner tensors, the quantized
    bytes as they are, and rebuilt by torch's ``__tensor_unflatten__`` (:func:`subclass_builder`); and a
    value computed from checkpoint tensors read in place (fp8 weights dequantized with their scales), so
    what is stored and read stays quantized. ``build`` takes ``{part name: tensor}``; ``shape`` and
    ``dtype`` are the built tensor's, ``nbytes`` what is read; ``kind`` names what is built.
    """

    parts: tuple[tuple[str, DiskTensor], ...]
    build: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str

    @property
    def nbytes(self) -> int:
        """Bytes read: the parts'."""
        return sum(part.nbytes for _, part in self.parts)

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(part.entry.path for _, part in self.parts))

    def build_meta(self) -> torch.Tensor:
        """The built tensor on the meta device (its class, shape and dtype), nothing read."""
        return self.build({name: torch.empty(part.shape, dtype=part.dtype, device="meta") for name, part in self.parts})


def subclass_builder(tensor: torch.Tensor, context: Any) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """What rebuilds ``tensor`` (a tensor subclass) from its inner tensors (views of them: no copy)."""
    unflatten = type(tensor).__tensor_unflatten__  # type: ignore[attr-defined]
    return functools.partial(_unflatten, unflatten, context, tuple(tensor.shape), tuple(tensor.stride()))


def _unflatten(unflatten: Callable[..., torch.Tensor], context: Any, shape: tuple[int, ...],
               stride: tuple[int, ...], inner: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return unflatten(dict(inner), context, torch.Size(shape), stride)


def flatten_subclass(tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any] | None:
    """``({inner name: plain tensor}, context)`` of a tensor subclass that flattens, else None (plain tensors).

    Only one level: a subclass whose inner tensors are themselves subclasses is not flattened (None).
    """
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or flatten is None:
        return None
    names, context = flatten(tensor)
    inner = {name: getattr(tensor, name) for name in names}
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in inner.values()):
        return None
    return inner, context


#: Where an offloaded tensor lies on disk: one byte range, pieces assembled on read, or parts built on read.
DiskRef = DiskTensor | FusedDiskTensor | BuiltDiskTensor


def read_disk_ref(ref: DiskRef) -> torch.Tensor:
    """Read ``ref`` into fresh memory around the page cache and cast it to ``ref.dtype``."""
    if isinstance(ref, BuiltDiskTensor):
        return ref.build({name: read_disk_ref(part) for name, part in ref.parts})
    if isinstance(ref, DiskTensor):
        tensor = read_uncached(ref.entry)
    else:
        reader = DirectReader()
        try:
            out = aligned_empty(ref.stored_nbytes)
            scratch = aligned_empty(scratch_bytes(ref, lambda e: padded_span(e)[1]))
            tensor = read_fused_into(ref, reader.read_into, out, scratch)
        finally:
            reader.close()
    return tensor if tensor.dtype == ref.dtype else tensor.to(ref.dtype)


class WeightsMap(Mapping[str, torch.Tensor]):
    """Full tensor name -> tensor, reading disk tensors on access.

    Example::

        weights = WeightsMap(memory={"lm_head.weight": w}, disk={"layers.0.weight": ref})
        weights["layers.0.weight"]   # read from its file now, cast to ref.dtype
    """

    def __init__(
        self,
        memory: Mapping[str, torch.Tensor] | None = None,
        disk: Mapping[str, DiskRef] | None = None,
    ) -> None:
        self.memory: dict[str, torch.Tensor] = dict(memory or {})
        self.disk: dict[str, DiskRef] = dict(disk or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.memory.get(name)
        if tensor is not None:
            return tensor
        ref = self.disk.get(name)
        if ref is None:
            raise KeyError(name)
        return self.read(ref)

    def __iter__(self) -> Iterator[str]:
        yield from self.memory
        yield from (k for k in self.disk if k not in self.memory)

    def __len__(self) -> int:
        return len(self.memory) + sum(1 for k in self.disk if k not in self.memory)

    def __contains__(self, name: object) -> bool:
        return name in self.memory or name in self.disk

    def is_on_disk(self, name: str) -> bool:
        return name not in self.memory and name in self.disk

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and (cast) dtype of ``name`` without reading it."""
        tensor = self.memory.get(name)
        if tensor is not None:
            return tuple(tensor.shape), tensor.dtype
        ref = self.disk[name]
        return ref.shape, ref.dtype

    def read(self, ref: DiskRef) -> torch.Tensor:
        """Read one disk tensor into fresh memory and cast it to its target dtype.

        The read goes around the page cache (:func:`~hf_bigmodel.storage.direct_io.read_uncached`), so streaming
        offloaded weights never fills the memory of a process that offloads because RAM is short.
        """
        return read_disk_ref(ref)

    def update(self, other: WeightsMap) -> None:
        self.memory.update(other.memory)
        self.disk.update(other.disk)

