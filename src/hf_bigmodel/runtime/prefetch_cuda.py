"""The prefetcher's CUDA path: disk tensors streamed to the GPU through a few pinned staging chunks.

A CUDA job never holds a whole group in host memory: each disk tensor's bytes go disk -> one of
:data:`STAGING_COUNT` pinned chunks -> the GPU, copies on the reader's side stream, a chunk reused once
the copy out of it has finished (its event). RAM tensors of a group cross in one copy per span of the
pinned arena dispatch laid them out in (:mod:`.pinned`). An event recorded after the group's copies is
what the compute stream waits on (:meth:`~.prefetch.Prefetcher.take`), so nothing synchronises the host.
Written for speed and tested on CPU for its logic; not yet measured on a GPU.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from ..storage.direct_io import ALIGNMENT, DirectReader, aligned_empty
from ..storage.fused import FusedDiskTensor, box_shape, contiguous_span
from ..storage.safetensors_io import TensorEntry
from ..storage.weights_map import BuiltDiskTensor, DiskTensor
from .pinned import spans

if TYPE_CHECKING:
    from .prefetch_reader import Item, Job

__all__ = ["STAGING_CHUNK", "STAGING_COUNT", "Staging", "copy_from_ram", "fetch_to_device", "to_device", "typed_view"]

#: CUDA runs stage disk reads through this many pinned chunks of this size (64 MiB of pinned RAM).
STAGING_CHUNK = 16 * 2**20
STAGING_COUNT = 4


class Staging:
    """Pinned host chunks a CUDA reader cycles through: disk -> chunk -> GPU, never a whole group in RAM.

    A chunk is reused only once the copy out of it has finished (its event), which blocks the reader
    thread alone. ``count`` chunks let the disk run ``count`` chunks ahead of the PCIe copies.
    """

    def __init__(self, chunk: int = STAGING_CHUNK, count: int = STAGING_COUNT) -> None:
        self.chunk = chunk
        self.buffers = [_pinned(chunk) for _ in range(count)]
        self.events: list[Any] = [None] * count
        self.index = 0

    def acquire(self) -> torch.Tensor:
        event = self.events[self.index]
        if event is not None:
            event.synchronize()
        return self.buffers[self.index]

    def release(self, stream: Any) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self.events[self.index] = event
        self.index = (self.index + 1) % len(self.buffers)


def _pinned(nbytes: int) -> torch.Tensor:
    """Pinned and ALIGNMENT-aligned (a power-of-two size: torch's pinned allocator rounds sizes up to one)."""
    tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else aligned_empty(nbytes, pin=True)


def typed_view(raw: torch.Tensor, ref: DiskTensor) -> torch.Tensor:
    """``raw`` bytes (CPU or GPU) as ``ref``'s stored tensor: a view, or a copy where the offset is unaligned."""
    entry = ref.entry
    if raw.numel() == 0:
        return torch.empty(entry.shape, dtype=entry.dtype, device=raw.device)
    try:
        return raw.view(entry.dtype).view(entry.shape)
    except RuntimeError:  # byte offset not a multiple of the element size: copy to aligned memory
        return raw.clone().view(entry.dtype).view(entry.shape)


def _stream(entry: TensorEntry, reader: DirectReader, staging: Staging, out: torch.Tensor, stream: Any) -> None:
    """Stream ``entry``'s bytes into the GPU ``uint8`` tensor ``out`` chunk by chunk (on ``stream``, the current)."""
    first = entry.start - entry.start % ALIGNMENT
    low = entry.start
    while low < entry.end:  # each piece's aligned span lies within one chunk-sized window of the file
        high = min(entry.end, first + ((low - first) // staging.chunk + 1) * staging.chunk)
        piece = replace(entry, dtype=torch.uint8, shape=(high - low,), start=low, end=high)
        raw = reader.read_into(piece, staging.acquire())
        out[low - entry.start : high - entry.start].copy_(raw, non_blocking=True)
        staging.release(stream)
        low = high


def _fused_to_device(ref: FusedDiskTensor, reader: DirectReader, staging: Staging, device: torch.device,
                     stream: Any) -> torch.Tensor:
    """Assemble a fused tensor on ``device``: each piece streams into its box (through a GPU temporary
    when the box is strided, or when only part of the piece's tensor is wanted and that part is strided)."""
    dtype = ref.stored_dtype
    fused = torch.empty(ref.shape, dtype=dtype, device=device)
    flat = fused.view(-1).view(torch.uint8) if fused.numel() else fused
    for piece in ref.pieces:
        source = piece.source_range()
        span = contiguous_span(ref.shape, piece.dst)
        if source is not piece.entry and span is not None:  # bytes land where they belong
            start = span[0] * dtype.itemsize
            _stream(source, reader, staging, flat[start : start + source.nbytes], stream)
            continue
        tmp = torch.empty(source.nbytes, dtype=torch.uint8, device=device)
        _stream(source, reader, staging, tmp, stream)
        values = tmp.view(dtype)
        if source is piece.entry:
            values = values.view(piece.entry.shape)[tuple(slice(a, b) for a, b in piece.src)]
        fused[tuple(slice(a, b) for a, b in piece.dst)].copy_(values.reshape(box_shape(piece.dst)))
    return fused if ref.dtype == dtype else fused.to(ref.dtype)


def to_device(ref: DiskTensor | FusedDiskTensor, reader: DirectReader, staging: Staging, device: torch.device,
               stream: Any) -> torch.Tensor:
    """Stream one disk tensor to ``device`` chunk by chunk (on ``stream``, the current stream)."""
    if isinstance(ref, FusedDiskTensor):
        return _fused_to_device(ref, reader, staging, device, stream)
    entry = ref.entry
    out = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
    _stream(entry, reader, staging, out, stream)
    value = typed_view(out, ref)
    return value if ref.dtype == entry.dtype else value.to(ref.dtype)


def fetch_to_device(job: Job, reader: DirectReader, device: torch.device, stream: Any,
                     staging: Staging | None) -> list[torch.Tensor]:
    """A CUDA job: RAM tensors copied in arena spans, disk tensors streamed through ``staging``, on ``stream``."""
    assert staging is not None
    values: list[torch.Tensor] = []
    with torch.cuda.device(device), torch.cuda.stream(stream):
        placed = copy_from_ram(job.items, device)
        for index, item in enumerate(job.items):
            if index in placed:
                values.append(placed[index])
                continue
            assert item.ref is not None
            if isinstance(item.ref, BuiltDiskTensor):  # built from its parts, on the device already
                values.append(item.ref.build({inner: values[i] for inner, i in item.parts.items()}))
                continue
            job.path = item.ref.entry.path if isinstance(item.ref, DiskTensor) else ", ".join(item.ref.paths)
            values.append(to_device(item.ref, reader, staging, device, stream))
        job.event = torch.cuda.Event()
        job.event.record(stream)
    return values


def copy_from_ram(items: list[Item], device: torch.device) -> dict[int, torch.Tensor]:
    """The RAM items of a group on ``device``, by item index: one asynchronous copy per span of an arena.

    Dispatch lays a block's RAM tensors out in one pinned arena (:mod:`.pinned`), so a group's tensors
    usually cross in one copy, and come out as views of one device buffer; anything else is copied alone.
    """
    placed: dict[int, torch.Tensor] = {}
    memory = [(i, item.memory) for i, item in enumerate(items) if item.memory is not None]
    together = [(i, t) for i, t in memory if t.is_contiguous() and t.device.type == "cpu"]
    for i, tensor in memory:
        if not (tensor.is_contiguous() and tensor.device.type == "cpu"):
            placed[i] = tensor.to(device, non_blocking=True)
    for span in spans([t for _, t in together]):
        if len(span.members) == 1:
            i, tensor = together[span.members[0][0]]
            placed[i] = tensor.to(device, non_blocking=True)
            continue
        out = torch.empty(span.source.numel(), dtype=torch.uint8, device=device)
        out.copy_(span.source, non_blocking=True)
        for member, offset in span.members:
            i, tensor = together[member]
            placed[i] = out[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
    return placed
