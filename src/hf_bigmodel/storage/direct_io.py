"""Reading weights from disk fast, and without filling the page cache when memory is short.

A memory-limited process that streams gigabytes of offloaded weights through ordinary ``pread`` fills
the page cache with pages it will not read again before they are evicted; under a cgroup limit those
pages count against the process, which then thrashes or is killed. :class:`DirectReader` reads a
tensor's bytes with ``O_DIRECT`` (the device copies straight into our buffer): it reads the aligned
superset of the byte range into an aligned buffer and hands out a view of the exact range inside it.
Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems: ``EINVAL``) it falls back
to buffered reads followed by ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the consumed range.

``HF_BIGMODEL_DIRECT_IO=0`` turns ``O_DIRECT`` off (buffered reads, pages dropped after use). A reader
made with ``keep_cache=True`` reads through the page cache and keeps the pages, for the prefetcher when
memory is plentiful (:func:`hf_bigmodel.runtime.prefetch.keeps_page_cache`).

A reader made with ``in_flight=N`` cuts each ``O_DIRECT`` read longer than one :data:`CHUNK` into
chunks and submits them together with ``lio_listio`` (:mod:`.aio`), ``N`` at a time at the device: the
reading thread releases the GIL once per run of tensors instead of once per read, and a device that
serves several requests at once (NVMe, virtio) is kept busy. Where that is not available reads go one
at a time. ``HF_BIGMODEL_READS_IN_FLIGHT`` sets what the prefetcher uses (:func:`reads_in_flight`).

:func:`read_shard` is the loader's way through a shard: O_DIRECT under a memory cap, else buffered
reads in parallel chunks (much faster than one ``pread`` into memory not yet faulted in). Never a
memory map: a loaded tensor must own its bytes (see :func:`read_shard`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import torch

from ..env import flag, whole_number
from . import aio
from .files import FileIdentity, pread_exact
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
    "read_shard",
    "read_uncached",
    "reads_in_flight",
]

logger = logging.getLogger(__name__)

#: Buffer address, file offset and length alignment for O_DIRECT (the page size covers every common device).
ALIGNMENT = 4096
#: ``aligned_empty(huge=True)`` buffers this large or larger are placed on, and advised as, transparent huge pages.
HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
#: A reader with several reads in flight cuts reads into chunks of this size (a multiple of ALIGNMENT).
CHUNK = 8 * 2**20
#: Reads the prefetcher keeps in flight unless ``HF_BIGMODEL_READS_IN_FLIGHT`` says otherwise.
DEFAULT_IN_FLIGHT = 8
READS_ENV = "HF_BIGMODEL_READS_IN_FLIGHT"
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_FADVISE = hasattr(os, "posix_fadvise")


def direct_io_enabled() -> bool:
    """False when ``HF_BIGMODEL_DIRECT_IO`` is ``0``/``false``/``off``/``no``, or the OS has no O_DIRECT."""
    return bool(_O_DIRECT) and flag("HF_BIGMODEL_DIRECT_IO", default=True)


def aligned_empty(nbytes: int, *, alignment: int = ALIGNMENT, pin: bool = False, huge: bool = False) -> torch.Tensor:
    """A ``uint8`` CPU tensor of ``nbytes`` whose first byte sits at a multiple of ``alignment``.

    ``huge``: for a buffer that is read into again and again (the prefetcher's). One of
    :data:`HUGE_PAGE` or more starts on a huge-page boundary and is advised to the kernel as huge pages
    before anything touches it (:func:`_huge_empty`): an ``O_DIRECT`` read into 4 KiB pages is
    cut into as many requests as the device's segment limit demands (254 pages, 1 MiB, on a virtio
    disk), one into 2 MiB pages into far fewer; ``benchmarks/sustained_read.py`` measured 0.72 against
    1.6 GB/s on the development machine's disk. Not for memory allocated once per read or per tensor:
    the first touch of a huge page may wait for the kernel to compact memory (~1 s per 440 MiB measured
    there, after a page cache eviction), which a reused buffer pays once and a loaded model every time.

    Example::

        buf = aligned_empty(1 << 20)
        assert buf.data_ptr() % 4096 == 0
    """
    if huge and not pin and nbytes >= HUGE_PAGE and _MADV_HUGEPAGE is not None:
        return _huge_empty(nbytes)
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8, pin_memory=pin)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift : shift + nbytes]


def _huge_empty(nbytes: int) -> torch.Tensor:
    """``nbytes`` of fresh anonymous memory from a mapping of its own, starting on a huge-page boundary,
    its whole huge pages advised as such before anything touches them.

    Not ``torch.empty``: below glibc's mmap threshold (up to 32 MiB once large blocks were freed) that
    reuses heap memory already faulted in as 4 KiB pages, which advice cannot change. The mapping is
    unmapped when the last tensor viewing it goes.
    """
    assert _MADV_HUGEPAGE is not None
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds a reference to the mapping
    shift = (-raw.data_ptr()) % HUGE_PAGE
    whole = nbytes - nbytes % HUGE_PAGE
    with contextlib.suppress(OSError):  # refused (transparent huge pages off): 4 KiB pages, still correct
        region.madvise(_MADV_HUGEPAGE, shift, whole)
    return raw[shift : shift + nbytes]


def padded_span(entry: TensorEntry, alignment: int = ALIGNMENT) -> tuple[int, int]:
    """``(first, length)``: the aligned file range covering ``entry``'s bytes (what an O_DIRECT read fetches).

    >>> padded_span(TensorEntry("f", "k", torch.uint8, (10,), 4100, 4110))
    (4096, 4096)
    """
    first = entry.start - entry.start % alignment
    last = -(-entry.end // alignment) * alignment
    return first, max(last - first, alignment if entry.end > entry.start else 0)


def reads_in_flight() -> int:
    """``$HF_BIGMODEL_READS_IN_FLIGHT`` (a whole number >= 1), else :data:`DEFAULT_IN_FLIGHT`.

    >>> reads_in_flight() >= 1
    True
    """
    value = whole_number(READS_ENV, minimum=1)
    return DEFAULT_IN_FLIGHT if value is None else value


class DirectReader:
    """Reads tensors' bytes into caller-provided aligned buffers, bypassing (or dropping) the page cache.

    One file descriptor per file is kept open until :meth:`close`. Thread-safe. ``in_flight`` > 1:
    ``O_DIRECT`` reads longer than :data:`CHUNK` go in chunks, that many at a time (module docstring),
    through as many duplicate descriptors of the file. ``keep_cache=True`` reads through the page cache
    and keeps the pages (no ``O_DIRECT``, nothing dropped), in the same aligned chunks: for bytes read
    again and again while memory is plentiful, the next reads come from RAM.

    Example::

        reader = DirectReader()
        buf = aligned_empty(padded_span(entry)[1])
        data = reader.read_into(entry, buf)   # uint8 view of exactly entry.nbytes bytes
    """

    def __init__(self, *, direct: bool | None = None, in_flight: int = 1, keep_cache: bool = False) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1 (reads at a time), got {in_flight}")
        self.keep_cache = keep_cache
        self.direct = False if keep_cache else direct_io_enabled() if direct is None else direct
        self.in_flight = in_flight
        # One descriptor per file as planned (its identity; its path when none was recorded).
        self._fds: dict[FileIdentity | str, tuple[int, bool]] = {}
        self._dups: dict[FileIdentity | str, list[int]] = {}  # more of them, for reads in flight
        self._retired: list[int] = []  # descriptors replaced by buffered ones (_buffered), closed at close()
        self._lock = threading.Lock()

    def _open(self, entry: TensorEntry) -> tuple[int, bool]:
        """The descriptor for ``entry``'s file: opened and checked (stat and header) once; every read from it
        is then checked with an ``fstat`` (:func:`~hf_bigmodel.storage.files.pread_exact`)."""
        path = entry.path
        key = entry.identity or path
        with self._lock:
            found = self._fds.get(key)
            if found is not None:
                return found
            fd, direct = -1, False
            if self.direct:
                try:
                    fd, direct = _open_checked(entry, os.O_RDONLY | _O_DIRECT), True
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    logger.debug("%s does not support O_DIRECT; reading it buffered and dropping its pages", path)
            if fd < 0:
                fd = _open_checked(entry, os.O_RDONLY)
            self._fds[key] = (fd, direct)
            return fd, direct

    def _buffered(self, entry: TensorEntry, fd: int) -> None:
        """``O_DIRECT`` was refused at read time: reopen the file buffered for good (checked again)."""
        key = entry.identity or entry.path
        with self._lock:
            if self._fds.get(key, (fd,))[0] != fd:
                return  # reopened already, after another read of the file was refused
            # Closed with the others at close(): a read started by start_read may still be using them.
            self._retired += self._dups.pop(key, [fd])[1:] + [fd]
            self._fds[key] = (_open_checked(entry, os.O_RDONLY), False)

    def read_into(self, entry: TensorEntry, buffer: torch.Tensor) -> torch.Tensor:
        """Read ``entry``'s bytes into ``buffer`` (aligned ``uint8``, at least ``padded_span(entry)[1]`` long).

        Returns the ``uint8`` view of exactly ``entry.nbytes`` bytes inside ``buffer``; it starts
        ``entry.start % ALIGNMENT`` bytes in, whichever way the bytes were read.
        """
        return self.start_read(entry, buffer)()

    def start_read(self, entry: TensorEntry, buffer: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start :meth:`read_into` and return the function that finishes it (and returns its view).

        A read that goes in flight (:mod:`.aio`; ``O_DIRECT`` or kept pages, longer than one :data:`CHUNK`)
        is at the device when this returns, so a reader can queue its next run before it finishes this one;
        any other read happens when the function is called. Call the function exactly once, before
        ``buffer`` is reused or freed, also when the bytes are no longer wanted: until then the device
        may still be writing into it.
        """
        first, length = padded_span(entry)
        if buffer.numel() < length or buffer.data_ptr() % ALIGNMENT:
            raise ValueError(f"buffer for {entry.key!r} must be {ALIGNMENT}-aligned and hold {length} bytes")
        skip = entry.start - first
        if entry.nbytes == 0:
            return lambda: buffer[skip:skip]
        fd, direct = self._open(entry)
        batch: aio.Batch | None = None
        if (direct or self.keep_cache) and self.in_flight > 1 and length > CHUNK and aio.available():
            need = entry.end - first
            spans = [(a, first + a, -(-min(CHUNK, need - a) // ALIGNMENT) * ALIGNMENT) for a in range(0, need, CHUNK)]
            try:
                batch = aio.submit(self._duplicates(entry, fd), buffer.data_ptr(), spans)
            except OSError as err:
                logger.debug("lio_listio read of %s not started (%s); reading it with pread", entry.path, err)

        def finish() -> torch.Tensor:
            self._finish(entry, buffer, fd, direct, batch)
            return buffer[skip : skip + entry.nbytes]

        return finish

    def _finish(self, entry: TensorEntry, buffer: torch.Tensor, fd: int, direct: bool, batch: aio.Batch | None) -> None:
        first, length = padded_span(entry)
        view = buffer.numpy().data
        if direct or self.keep_cache:
            try:
                if batch is not None:
                    self._complete(entry, fd, view, first, batch, need=entry.end - first)
                else:
                    self._pread(entry, fd, view[:length], first, need=entry.end - first)
                return
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                logger.debug("O_DIRECT read of %s refused (%s); falling back to buffered reads", entry.path, err)
                self._buffered(entry, fd)
                fd, _ = self._open(entry)
        self._pread(entry, fd, view[entry.start - first : entry.end - first], entry.start, need=entry.nbytes)
        if _FADVISE and not self.keep_cache:
            os.posix_fadvise(fd, entry.start, entry.nbytes, os.POSIX_FADV_DONTNEED)

    @staticmethod
    def _pread(entry: TensorEntry, fd: int, view: memoryview, offset: int, *, need: int) -> None:
        pread_exact(fd, view, offset, path=entry.path, what=repr(entry.key), need=need, identity=entry.identity)

    def _complete(self, entry: TensorEntry, fd: int, view: memoryview, offset: int, batch: aio.Batch, *,
                  need: int) -> None:
        """Wait for ``batch`` (``need`` bytes from ``offset`` in :data:`CHUNK` pieces) and make it whole.

        A piece that came back short is completed with ``pread`` (which names ``entry`` if the file
        ended); if the batch failed (out of resources, say), the whole range is read again with ``pread``.
        """
        try:
            counts = batch.wait()
        except OSError as err:
            logger.debug("lio_listio read of %s failed (%s); reading it with pread", entry.path, err)
            at, _, length = batch.spans[-1]
            self._pread(entry, fd, view[: at + length], offset, need=need)
            return
        for (at, _, length), got in zip(batch.spans, counts):
            wanted = min(length, need - at)
            if got < wanted:  # only when the file ended early: pread says so, naming the entry
                done = got - got % ALIGNMENT
                self._pread(entry, fd, view[at + done : at + length], offset + at + done, need=wanted - done)
        if entry.identity is not None:  # as after every pread: the file must still be the one planned
            entry.identity.check_fd(fd)

    def _duplicates(self, entry: TensorEntry, fd: int) -> list[int]:
        key = entry.identity or entry.path
        with self._lock:
            dups = self._dups.get(key)
            if dups is None:
                dups = self._dups[key] = [fd] + [os.dup(fd) for _ in range(self.in_flight - 1)]
            return dups

    def bypass_cache(self) -> None:
        """Stop keeping pages: later reads bypass the page cache (``O_DIRECT`` where allowed, as a reader made
        without ``keep_cache``), and the pages of the files read so far are dropped. Call between reads (the
        reading thread does): descriptors are reopened."""
        with self._lock:
            files = [key.path if isinstance(key, FileIdentity) else key for key in self._fds]
            self._close_all()
            self.keep_cache = False
            self.direct = direct_io_enabled()
        for path in files:
            with contextlib.suppress(OSError):  # a file gone meanwhile has no pages to drop
                drop_page_cache(path)

    def close(self) -> None:
        with self._lock:
            self._close_all()

    def _close_all(self) -> None:
        """Close every descriptor (the caller holds the lock)."""
        for dups in self._dups.values():
            for dup in dups[1:]:
                os.close(dup)
        self._dups.clear()
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn os down already
            self.close()


def _open_checked(entry: TensorEntry, flags: int) -> int:
    """Open ``entry``'s file, checked against the identity recorded when it was planned (when there is one)."""
    return entry.identity.open(flags) if entry.identity is not None else os.open(entry.path, flags)


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

_MATMUL_ALIGN = 64
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
    # The tensor starts at the same address modulo 64 as its bytes in the file (as a memory map would place
    # it): CPU matmul kernels take paths by alignment, and loading must give from_pretrained's exact outputs.
    room = torch.empty(entry.nbytes + _MATMUL_ALIGN, dtype=torch.uint8)
    skip = (entry.start - room.data_ptr()) % _MATMUL_ALIGN
    buffer = room[skip : skip + entry.nbytes]
    view = buffer.numpy().data if entry.nbytes else memoryview(b"")
    spans = [(a, min(a + READ_CHUNK, entry.nbytes)) for a in range(0, entry.nbytes, READ_CHUNK)]
    what = repr(entry.key)
    if len(spans) <= 1:
        pread_exact(fd, view, entry.start, path=entry.path, what=what, identity=entry.identity)
    else:
        futures = [_readers().submit(pread_exact, fd, view[a:b], entry.start + a, path=entry.path, what=what,
                                     identity=entry.identity)
                   for a, b in spans]
        wait(futures)  # every chunk finished before the buffer is used or dropped
        for future in futures:
            future.result()
    return _as_tensor(buffer, entry)


def read_shard(checkpoint: Checkpoint, file: str, keys: set[str] | None = None, *,
               uncached: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` for ``keys`` of one shard, as ``checkpoint.iter_shard`` gives them, but faster.

    Every tensor is read into memory of its own, so a loaded model never changes, nor crashes, when its
    checkpoint is rewritten or truncated later (a private memory map would: pages not yet touched
    still come from the file). The file is checked against the identity recorded when it was planned
    before the first byte is read. Safetensors shards: buffered reads in parallel chunks (the page
    cache serves a warm file at memory speed); with ``uncached`` (a memory-capped load) O_DIRECT (or
    buffered with the pages dropped), so the page cache does not grow. Torch shards: ``checkpoint.iter_shard``.

    Example::

        for key, tensor in read_shard(ckpt, ckpt.files[0], uncached=True):
            ...
    """
    if checkpoint.format != "safetensors":
        yield from checkpoint.iter_shard(file, keys)
        return
    entries = [i.entry for i in checkpoint.scan().values()
               if i.file == file and i.entry is not None and (keys is None or i.key in keys)]
    if not entries:
        return
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
    fd = _open_checked(entries[0], os.O_RDONLY)
    try:
        for entry in entries:
            yield entry.key, _read_chunked(entry, fd)
    finally:
        os.close(fd)
