"""The host buffers a CPU run's prefetcher reads groups into, kept within the prefetch memory bound.

A :class:`BufferPool` hands out aligned, huge-page buffers (:func:`~hf_bigmodel.storage.direct_io.aligned_empty`)
and takes each back only when its job has ended and no tensor but the pool's own references its storage
(the hooks' views are gone): a buffer is never overwritten while anything can still read it. The
smallest free buffer that holds a group is reused, whatever group it was made for: reusing only buffers
of a group's own size made groups of two sizes (86 MiB layers, a 125 MiB output head) churn the pool,
two buffers made, faulted in and zeroed at every forward (~10 ms of the hooks' thread, and the zeroing in
the reads' path). A new buffer is sized for its group, and the pool holds at most ``bound`` bytes
(``largest group + window``): idle buffers are let go (back to the OS) before a new one would exceed it,
and when that is not enough a group read ahead waits (``acquire`` returns None) unless it is required
now. A buffer still referenced when let go is left to its holders (``abandoned``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..storage.direct_io import aligned_empty

if TYPE_CHECKING:
    from .prefetch_reader import Job

__all__ = ["Buffer", "BufferPool", "use_count"]


def use_count(tensor: torch.Tensor) -> int | None:
    """References to ``tensor``'s storage (None when this torch cannot tell: buffers are then never reused)."""
    try:
        return int(torch._C._storage_Use_Count(tensor.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


@dataclass(eq=False)
class Buffer:
    """A reusable aligned host buffer (CPU runs); ``baseline`` is its storage's use count when idle."""

    tensor: torch.Tensor
    baseline: int | None
    job: Job | None = None


class BufferPool:
    """Buffers for groups read into host memory, within ``bound`` bytes (module docstring).

    Example::

        pool = BufferPool(300 * 2**20)
        buffer = pool.acquire(86 * 2**20)      # then buffer.job = the job reading into it
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.buffers: list[Buffer] = []
        self.abandoned = 0

    @property
    def held_bytes(self) -> int:
        return sum(b.tensor.numel() for b in self.buffers)

    @staticmethod
    def free(buffer: Buffer) -> bool:
        """Whether ``buffer`` can be read into again: its job ended and was retired, and no view is left."""
        owner = buffer.job
        if owner is not None:
            if not (owner.retired and owner.done.is_set()):
                return False
            owner.values = None  # the reader may have finished after the job was retired
        return buffer.baseline is not None and use_count(buffer.tensor) == buffer.baseline

    def acquire(self, size: int, *, required: bool = True) -> Buffer | None:
        """A buffer of at least ``size`` bytes that nothing uses; None when none can be had within the bound
        and the group is not ``required`` now (a read ahead waits for a later turn)."""
        for buffer in sorted(self.buffers, key=lambda b: b.tensor.numel()):
            if buffer.tensor.numel() >= size and self.free(buffer):
                return buffer
        for buffer in self.buffers:  # cancelled reads still running: wait for them, their buffer may fit
            if buffer.job is not None and buffer.job.retired and not buffer.job.done.is_set():
                buffer.job.done.wait()
                if buffer.tensor.numel() >= size and self.free(buffer):
                    return buffer
        idle = sum(b.tensor.numel() for b in self.buffers if b.job is None or b.job.retired)
        if not required and self.held_bytes - idle + size > self.bound:
            return None  # even with every idle buffer let go it would not fit
        for buffer in list(self.buffers):
            if self.held_bytes + size <= self.bound:
                break
            if buffer.job is None or buffer.job.retired:
                self.buffers.remove(buffer)  # idle: freed; still referenced elsewhere: left to its holders
                if not self.free(buffer):
                    self.abandoned += 1
                buffer.job = None  # no job <-> buffer cycle keeps it alive until a garbage collection
        tensor = aligned_empty(size, huge=True)  # read into at every forward: 2 MiB pages (see there)
        buffer = Buffer(tensor, use_count(tensor))
        self.buffers.append(buffer)
        return buffer

    def clear(self) -> None:
        """Let every buffer go (their holders keep what they still reference)."""
        for buffer in self.buffers:
            buffer.job = None
        self.buffers.clear()
