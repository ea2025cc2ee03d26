"""Offloaded weights as a lazy name -> tensor map: tensors in RAM, or byte ranges of safetensors files.

A :class:`WeightsMap` holds, per tensor name, either a tensor in RAM or a :class:`DiskTensor` (a byte range
in a safetensors file, read and cast only when a module needs it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .direct_io import read_uncached
from .safetensors_io import TensorEntry

__all__ = ["DiskTensor", "WeightsMap"]


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



class WeightsMap(Mapping[str, torch.Tensor]):
    """Full tensor name -> tensor, reading disk tensors on access.

    Example::

        weights = WeightsMap(memory={"lm_head.weight": w}, disk={"layers.0.weight": ref})
        weights["layers.0.weight"]   # read from its file now, cast to ref.dtype
    """

    def __init__(
        self,
        memory: Mapping[str, torch.Tensor] | None = None,
        disk: Mapping[str, DiskTensor] | None = None,
    ) -> None:
        self.memory: dict[str, torch.Tensor] = dict(memory or {})
        self.disk: dict[str, DiskTensor] = dict(disk or {})

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

    def read(self, ref: DiskTensor) -> torch.Tensor:
        """Read one disk tensor into fresh memory and cast it to its target dtype.

        The read goes around the page cache (:func:`~hf_bigmodel.storage.direct_io.read_uncached`), so streaming
        offloaded weights never fills the memory of a process that offloads because RAM is short.
        """
        tensor = read_uncached(ref.entry)
        return tensor if tensor.dtype == ref.dtype else tensor.to(ref.dtype)

    def update(self, other: WeightsMap) -> None:
        self.memory.update(other.memory)
        self.disk.update(other.disk)

