"""Reading weights from disk fast, and without filling the page cache when memory is short.

A memory-limited process that streams gigabytes of offloaded weights through ordinary ``pread`` fills
the page cache with pages it will not read again before they are evicted; under a cgroup limit those
pages count against the process, which then thrashes or is killed. :class:`DirectReader` reads a
tensor's bytes with ``O_DIRECT`` (the device copies straight into our buffer): it reads the aligned
superset of the byte range into an aligned buffer and hands out a view of the exact range inside it.
Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems: ``EINVAL``) it falls back
to buffered reads followed by ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the consumed range.

``HF_BIGMODEL_DIRECT_IO=0`` turns ``O_DIRECT`` off (buffered reads, pages dropped after use).

:func:`read_shard` is the loader's way through a shard: O_DIRECT under a memory cap, else a private
memory map (zero-copy), or buffered reads in parallel chunks (much faster than one ``pread`` into
memory not yet faulted in).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import torch

from ..errors import CorruptCheckpointError
from .safetensors_io import TensorEntry

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = [
    "ALIGNMENT",
    "DirectReader",
    "aligned_empty",
    "direct_io_enabled",
    "drop_page_cache",
    "padded_span",
    "read_rows",
    "read_shard",
    "read_uncached",
    "row_runs",
]

logger = logging.getLogger(__name__)

#: Buffer address, file offset and length alignment for O_DIRECT (the page size covers every common device).
ALIGNMENT = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_FADVISE = hasattr(os, "posix_fadvise")


def _pread_exact(entry: TensorEntry, fd: int, view: memoryview, offset: int, *, need: int) -> None:
    """``pread`` until ``need`` bytes of ``view`` are filled from ``offset``; a short file names ``entry``."""
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CorruptCheckpointError(
                f"{entry.path!r} ended while reading {entry.key!r} (byte {offset + done} of "
                f"{entry.start}..{entry.end}); the file was truncated or replaced after it was opened. "
                "Download or write it again.",
                path=entry.path,
            )
        done += n


def direct_io_enabled() -> bool:
    """False when ``HF_BIGMODEL_DIRECT_IO`` is ``0``/``false``/``off``/``no``, or the OS has no O_DIRECT."""
    setting = os.environ.get("HF_BIGMODEL_DIRECT_IO", "").strip().lower()
    return bool(_O_DIRECT) and setting not in ("0", "false", "off", "no")


def aligned_empty(nbytes: int, *, alignment: int = ALIGNMENT, pin: bool = False) -> torch.Tensor:
    """A ``uint8`` CPU tensor of ``nbytes`` whose first byte sits at a multiple of ``alignment``.

    Example::

        buf = aligned_empty(1 << 20)
        assert buf.data_ptr() % 4096 == 0
    """
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift : shift + nbytes]


def padded_span(entry: TensorEntry, alignment: int = ALIGNMENT) -> tuple[int, int]:
    """``(first, length)``: the aligned file range covering ``entry``'s bytes (what an O_DIRECT read fetches).

    >>> padded_span(TensorEntry("f", "k", torch.uint8, (10,), 4100, 4110))
    (4096, 4096)
    """
    first = entry.start - entry.start % alignment
    last = -(-entry.end // alignment) * alignment
    return first, max(last - first, alignment if entry.end > entry.start else 0)


class DirectReader:
    """Reads tensors' bytes into caller-provided aligned buffers, bypassing (or dropping) the page cache.

    One file descriptor per file is kept open until :meth:`close`. Thread-safe.

    Example::

        reader = DirectReader()
        buf = aligned_empty(padded_span(entry)[1])
        data = reader.read_into(entry, buf)   # uint8 view of exactly entry.nbytes bytes
    """

    def __init__(self, *, direct: bool | None = None) -> None:
        self.direct = direct_io_enabled() if direct is None else direct
        self._fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()

    def _open(self, path: str) -> tuple[int, bool]:
        with self._lock:
            found = self._fds.get(path)
            if found is not None:
                return found
            fd, direct = -1, False
            if self.direct:
                try:
                    fd, direct = os.open(path, os.O_RDONLY | _O_DIRECT), True
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    logger.debug("%s does not support O_DIRECT; reading it buffered and dropping its pages", path)
            if fd < 0:
                fd = os.open(path, os.O_RDONLY)
            self._fds[path] = (fd, direct)
            return fd, direct

    def _buffered(self, path: str, fd: int) -> None:
        """``O_DIRECT`` was refused at read time: reopen ``path`` buffered for good."""
        with self._lock:
            os.close(fd)
            self._fds[path] = (os.open(path, os.O_RDONLY), False)

    def read_into(self, entry: TensorEntry, buffer: torch.Tensor) -> torch.Tensor:
        """Read ``entry``'s bytes into ``buffer`` (aligned ``uint8``, at least ``padded_span(entry)[1]`` long).

        Returns the ``uint8`` view of exactly ``entry.nbytes`` bytes inside ``buffer``; it starts
        ``entry.start % ALIGNMENT`` bytes in, whichever way the bytes were read.
        """
        first, length = padded_span(entry)
        if buffer.numel() < length or buffer.data_ptr() % ALIGNMENT:
            raise ValueError(f"buffer for {entry.key!r} must be {ALIGNMENT}-aligned and hold {length} bytes")
        skip = entry.start - first
        if entry.nbytes == 0:
            return buffer[skip:skip]
        fd, direct = self._open(entry.path)
        view = buffer.numpy().data
        if direct:
            try:
                self._pread(entry, fd, view[:length], first, need=entry.end - first)
                return buffer[skip : skip + entry.nbytes]
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                logger.debug("O_DIRECT read of %s refused (%s); falling back to buffered reads", entry.path, err)
                self._buffered(entry.path, fd)
                fd, _ = self._open(entry.path)
        self._pread(entry, fd, view[skip : skip + entry.nbytes], entry.start, need=entry.nbytes)
        if _FADVISE:
            os.posix_fadvise(fd, entry.start, entry.nbytes, os.POSIX_FADV_DONTNEED)
        return buffer[skip : skip + entry.nbytes]

    @staticmethod
    def _pread(entry: TensorEntry, fd: int, view: memoryview, offset: int, *, need: int) -> None:
        _pread_exact(entry, fd, view, offset, need=need)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn os down already
            self.close()


def row_runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """``rows`` (sorted, distinct) as half-open runs of consecutive indices.

    >>> row_runs([0, 1, 2, 7, 9, 10])
    [(0, 3), (7, 8), (9, 11)]
    """
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def read_rows(entry: TensorEntry, rows: Sequence[int], reader: DirectReader) -> torch.Tensor:
    """Rows ``rows`` (sorted, distinct indices along dim 0) of the tensor ``entry``, read from its file alone.

    Consecutive rows are read together, each run with one aligned read; nothing else of the tensor is
    read. Returns a fresh ``(len(rows), *entry.shape[1:])`` tensor of ``entry.dtype``.

    Example::

        reader = DirectReader()
        embeddings = read_rows(header.entries["model.embed_tokens.weight"], [1, 17, 4095], reader)
    """
    if not entry.shape:
        raise ValueError(f"{entry.key!r} is a scalar; it has no rows to read")
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
    out = torch.empty((len(rows), *entry.shape[1:]), dtype=entry.dtype)
    if not rows or row_bytes == 0:
        return out
    flat = out.view(-1).view(torch.uint8)
    runs = row_runs(rows)
    pieces = [replace(entry, key=f"{entry.key}[{a}:{b}]", shape=(b - a, *entry.shape[1:]),
                      start=entry.start + a * row_bytes, end=entry.start + b * row_bytes) for a, b in runs]
    if runs[0][0] < 0 or runs[-1][1] > entry.shape[0]:
        raise IndexError(f"rows {runs[0][0]}..{runs[-1][1] - 1} of {entry.key!r} asked; it has {entry.shape[0]}")
    buffer = aligned_empty(max(padded_span(p)[1] for p in pieces))
    at = 0
    for piece in pieces:
        raw = reader.read_into(piece, buffer)
        flat[at : at + piece.nbytes].copy_(raw)
        at += piece.nbytes
    return out


def drop_page_cache(path: str, start: int = 0, end: int | None = None) -> None:
    """Drop the page-cache pages of ``path``'s bytes ``start..end`` (the whole file by default).

    For buffered reads whose pages will not be read again soon (streaming a checkpoint under a memory
    cap). Clean pages only: nothing is lost. A no-op where ``posix_fadvise`` is missing.

    Example::

        tensor = read_tensor(entry)
        drop_page_cache(entry.path, entry.start, entry.end)
    """
    if not _FADVISE:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, 0 if end is None else max(end - start, 0), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- the loader's shard reads ----------------------------------------------------------------------------

#: Buffered reads into fresh memory go in chunks of this size on two threads: one large ``pread`` into
#: not-yet-faulted memory is several times slower than chunks read in parallel.
READ_CHUNK = 8 * 2**20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hf_bigmodel-read")
        return _pool


def _as_tensor(raw: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    try:
        return raw.view(entry.dtype).view(entry.shape)
    except RuntimeError:  # byte offset not a multiple of the element size
        return raw.clone().view(entry.dtype).view(entry.shape)


def read_uncached(entry: TensorEntry) -> torch.Tensor:
    """One tensor into fresh memory, around the page cache (O_DIRECT, else buffered and dropped).

    Example::

        tensor = read_uncached(read_header("model.safetensors").entries["lm_head.weight"])
    """
    reader = DirectReader()
    try:
        raw = reader.read_into(entry, aligned_empty(padded_span(entry)[1]))
    finally:
        reader.close()
    return _as_tensor(raw, entry)


def _read_chunked(entry: TensorEntry, fd: int) -> torch.Tensor:
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = buffer.numpy().data if entry.nbytes else memoryview(b"")
    spans = [(a, min(a + READ_CHUNK, entry.nbytes)) for a in range(0, entry.nbytes, READ_CHUNK)]
    if len(spans) <= 1:
        _pread_exact(entry, fd, view, entry.start, need=entry.nbytes)
    else:
        futures = [_readers().submit(_pread_exact, entry, fd, view[a:b], entry.start + a, need=b - a)
                   for a, b in spans]
        wait(futures)  # every chunk finished before the buffer is used or dropped
        for future in futures:
            future.result()
    return _as_tensor(buffer, entry)


def read_shard(checkpoint: Checkpoint, file: str, keys: set[str] | None = None, *,
               uncached: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` of one shard, as ``checkpoint.iter_shard`` gives them, but faster.

    Safetensors shards: without ``uncached``, tensors are views of a private memory map of the shard
    (zero-copy, like transformers; ``HF_BIGMODEL_MMAP=0`` reads them in parallel chunks instead); with
    ``uncached`` (a memory-capped load) they are read with O_DIRECT (or buffered with their pages
    dropped), so neither the page cache nor mapped pages grow. Torch shards: ``checkpoint.iter_shard``.

    Example::

        for key, tensor in read_shard(ckpt, ckpt.files[0], uncached=True):
            ...
    """
    if checkpoint.format != "safetensors":
        yield from checkpoint.iter_shard(file, keys)
        return
    entries = [i.entry for i in checkpoint.scan().values()
               if i.file == file and i.entry is not None and (keys is None or i.key in keys)]
    if uncached:
        reader = DirectReader()
        try:
            for entry in entries:
                raw = reader.read_into(entry, aligned_empty(padded_span(entry)[1]))
                yield entry.key, _as_tensor(raw, entry)
        finally:
            reader.close()
            drop_page_cache(file)  # what readahead around buffered fallback reads brought in
        return
    whole = _map(file) if entries and _mmap_enabled() else None
    if whole is not None:
        for entry in entries:
            yield entry.key, _as_tensor(whole[entry.start : entry.end], entry)
        return
    fd = os.open(file, os.O_RDONLY)
    try:
        for entry in entries:
            yield entry.key, _read_chunked(entry, fd)
    finally:
        os.close(fd)


def _map(file: str) -> torch.Tensor | None:
    """The whole file as a ``uint8`` tensor over a private (copy-on-write) memory map, or None if it cannot be.

    Zero-copy: pages come from the page cache when first touched; writes to the tensors stay private.
    """
    try:
        storage = torch.UntypedStorage.from_file(file, shared=False, nbytes=os.path.getsize(file))
    except (RuntimeError, OSError) as err:
        logger.debug("Cannot memory-map %s (%s); reading it instead", file, err)
        return None
    # from_file is typed on the storage base class; called on UntypedStorage it returns an UntypedStorage.
    return torch.empty(0, dtype=torch.uint8).set_(cast(torch.UntypedStorage, storage))


def _mmap_enabled() -> bool:
    return os.environ.get("HF_BIGMODEL_MMAP", "").strip().lower() not in ("0", "false", "off", "no")
