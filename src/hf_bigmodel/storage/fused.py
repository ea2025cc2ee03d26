"""Tensors assembled from pieces of other tensors, read straight from the checkpoint's files.

transformers 5 keeps mixture-of-experts weights fused (one ``[experts, out, in]`` tensor per layer) while
checkpoints store them expert by expert. When fusing is a pure concatenation or stack, the fused tensor
needs no copy on disk: a :class:`FusedDiskTensor` lists, per piece, a tensor of a safetensors file (or
a box of it) and the box of the fused tensor it fills. Reading one allocates the fused tensor and reads
each piece into its place (:func:`read_fused_into`).

A *box* is one ``(start, stop)`` per dimension. A piece's source box and destination box hold the same
elements in the same order; they differ only by dimensions of size 1 (a stacked expert is
``[1, out, in]`` in the fused tensor and ``[out, in]`` in the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .safetensors_io import TensorEntry

__all__ = ["Box", "DiskPiece", "FusedDiskTensor", "box_shape", "contiguous_span", "full_box", "read_fused_into",
           "scratch_bytes"]

Box = tuple[tuple[int, int], ...]


def full_box(shape: Sequence[int]) -> Box:
    """The box covering a whole tensor of ``shape``.

    >>> full_box((2, 3))
    ((0, 2), (0, 3))
    """
    return tuple((0, int(d)) for d in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    """The shape of the elements a box holds.

    >>> box_shape(((1, 2), (0, 4)))
    (1, 4)
    """
    return tuple(stop - start for start, stop in box)


def contiguous_span(shape: Sequence[int], box: Box) -> tuple[int, int] | None:
    """``(first element, count)`` when ``box`` is one contiguous run of a row-major tensor of ``shape``, else None.

    >>> contiguous_span((4, 3), ((1, 3), (0, 3)))   # rows 1-2: elements 3..8
    (3, 6)
    >>> contiguous_span((4, 3), ((0, 4), (0, 2))) is None   # the first two columns: strided
    True
    """
    sizes = box_shape(box)
    count = math.prod(sizes)
    if count == 0:
        return 0, 0
    lead = next((i for i, n in enumerate(sizes) if n > 1), len(sizes) - 1)
    if any(box[i] != (0, shape[i]) for i in range(lead + 1, len(shape))):
        return None
    first, stride = 0, 1
    for dim in reversed(range(len(shape))):
        first += box[dim][0] * stride
        stride *= shape[dim]
    return first, count


@dataclass(frozen=True)
class DiskPiece:
    """One piece of a fused tensor: the elements ``src`` of checkpoint tensor ``entry`` fill the box ``dst``."""

    entry: TensorEntry
    dst: Box
    src: Box

    def source_range(self) -> TensorEntry:
        """The bytes to read for this piece: the box itself when contiguous in the file, else the whole tensor."""
        span = contiguous_span(self.entry.shape, self.src)
        if span is None:
            return self.entry
        first, count = span
        size = self.entry.dtype.itemsize
        start = self.entry.start + first * size
        return replace(self.entry, shape=(count,), start=start, end=start + count * size)


@dataclass(frozen=True)
class FusedDiskTensor:
    """A tensor of ``shape`` assembled from ``pieces`` (all of one dtype), cast to ``dtype`` when read.

    The pieces tile the tensor exactly (checked by whoever builds it: ``hf_bigmodel.load.conversions``).
    """

    pieces: tuple[DiskPiece, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.pieces[0].entry.dtype

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the assembled tensor before any cast."""
        return math.prod(self.shape) * self.stored_dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes once read and cast."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def paths(self) -> list[str]:
        return list(dict.fromkeys(p.entry.path for p in self.pieces))


def scratch_bytes(ref: FusedDiskTensor, padded: Callable[[TensorEntry], int]) -> int:
    """The scratch a read of ``ref`` bounces its pieces through (``padded``: bytes one read of an entry needs)."""
    return max((padded(p.source_range()) for p in ref.pieces), default=0)


def read_fused_into(
    ref: FusedDiskTensor,
    read: Callable[[TensorEntry, torch.Tensor], torch.Tensor],
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Assemble ``ref`` in ``out`` (``uint8``, ``ref.stored_nbytes`` long) and return it typed and shaped.

    ``read(entry, scratch)`` reads one byte range into ``scratch`` and returns the ``uint8`` view of its
    bytes (a :class:`~hf_bigmodel.storage.direct_io.DirectReader`'s ``read_into``). Each piece goes from
    there into its box of ``out``: one ``memcpy`` for a contiguous box, a strided copy otherwise.
    """
    dtype = ref.stored_dtype
    fused = out[: ref.stored_nbytes].view(dtype).view(ref.shape) if ref.stored_nbytes else \
        torch.empty(ref.shape, dtype=dtype)
    for piece in ref.pieces:
        source = piece.source_range()
        raw = read(source, scratch)
        values = _as_dtype(raw, dtype)
        if source is piece.entry:  # the whole tensor was read: cut the box out of it
            values = values.view(piece.entry.shape)[tuple(slice(a, b) for a, b in piece.src)]
        target = fused[tuple(slice(a, b) for a, b in piece.dst)]
        target.copy_(values.reshape(target.shape))
    return fused


def _as_dtype(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if raw.numel() == 0:
        return torch.empty(0, dtype=dtype)
    try:
        return raw.view(dtype)
    except RuntimeError:  # byte offset not a multiple of the element size
        return raw.clone().view(dtype)
