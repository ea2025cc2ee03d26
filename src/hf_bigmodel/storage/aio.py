"""Several reads in flight, submitted in one call: glibc's ``lio_listio``.

A Python thread that reads with ``pread`` gives the GIL up for the system call and must take it back
before it can issue the next one; while the main thread runs Python, that can take a switch interval
(5 ms) per read, and the disk idles meanwhile. Several threads reading chunks keep the disk busy but
take the GIL back once per chunk, which the main thread's Python pays for. ``lio_listio`` submits
every chunk at once, and glibc's own threads (one per file descriptor, hence a duplicate descriptor
per read in flight) keep that many requests at the device while the caller waits in one place.
:func:`submit` returns at once (``LIO_NOWAIT``), so a reader can queue its next run of reads before it
waits for this one (:meth:`Batch.wait`); :func:`read_spans` does both. ``benchmarks/reader_gil.py``
measures it against one ``pread`` per run and against a pool of threads.

Only on Linux with glibc on a 64-bit machine (the ``struct aiocb`` layout below); elsewhere
:func:`available` is False and readers fall back to one ``pread`` per run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import sys
from collections.abc import Sequence
from functools import cache

__all__ = ["Batch", "available", "read_spans", "submit"]

_LIO_READ = 0
_LIO_NOWAIT = 1


class _Aiocb(ctypes.Structure):
    """glibc's ``struct aiocb`` on 64-bit Linux (168 bytes; ``aio_offset`` is 64-bit there)."""

    _fields_ = [
        ("aio_fildes", ctypes.c_int), ("aio_lio_opcode", ctypes.c_int), ("aio_reqprio", ctypes.c_int),
        ("aio_buf", ctypes.c_void_p), ("aio_nbytes", ctypes.c_size_t), ("aio_sigevent", ctypes.c_byte * 64),
        ("next_prio", ctypes.c_void_p), ("abs_prio", ctypes.c_int), ("policy", ctypes.c_int),
        ("error_code", ctypes.c_int), ("return_value", ctypes.c_ssize_t), ("aio_offset", ctypes.c_int64),
        ("reserved", ctypes.c_byte * 32),
    ]


@cache
def _library() -> ctypes.CDLL | None:
    """The C library that has ``lio_listio`` (libc since glibc 2.34, librt before), or None."""
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8 or ctypes.sizeof(_Aiocb) != 168:
        return None
    for name in ("c", "rt"):
        path = ctypes.util.find_library(name)
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError:
            continue
        needed = ("lio_listio", "aio_error", "aio_return", "aio_suspend", "gnu_get_libc_version")  # glibc's
        if all(hasattr(lib, f) for f in needed):
            lib.aio_return.restype = ctypes.c_ssize_t
            return lib
    return None


def available() -> bool:
    """True where :func:`read_spans` works (Linux, glibc, 64-bit)."""
    return _library() is not None


def read_spans(fds: Sequence[int], address: int, spans: Sequence[tuple[int, int, int]]) -> list[int]:
    """Read every ``(buffer offset, file offset, length)`` span into memory at ``address``, all in flight.

    Span ``i`` is read through ``fds[i % len(fds)]`` (descriptors of one file: glibc runs one request
    per descriptor at a time). Returns the bytes each span got (fewer than asked only at the end of the
    file). Returns only once no request is running, whatever happened; raises ``OSError`` with the first
    failed request's error (or :func:`available`'s absence as ``ENOSYS``).
    """
    return submit(fds, address, spans).wait()


class Batch:
    """Reads submitted together by :func:`submit`, running in glibc's threads until :meth:`wait`.

    The memory they fill and the descriptors they read through must stay valid until :meth:`wait` has
    returned (or raised): call it exactly once, also when the bytes are no longer wanted.
    """

    def __init__(self, lib: ctypes.CDLL, fds: Sequence[int], address: int,
                 spans: Sequence[tuple[int, int, int]]) -> None:
        self.spans = list(spans)
        self._lib = lib
        self._blocks = (_Aiocb * len(spans))()  # zeroed: a request glibc could not queue reads as 0 bytes
        for block, (at, offset, length), index in zip(self._blocks, spans, range(len(spans))):
            block.aio_fildes = fds[index % len(fds)]
            block.aio_lio_opcode = _LIO_READ
            block.aio_buf = address + at
            block.aio_nbytes = length
            block.aio_offset = offset
        self._pointers = (ctypes.POINTER(_Aiocb) * len(spans))(*[ctypes.pointer(b) for b in self._blocks])
        # A request that could not be queued (out of resources) keeps its zeroed result or gets its error:
        # wait() sees either, so the return value is not needed.
        lib.lio_listio(_LIO_NOWAIT, self._pointers, len(spans), None)

    def wait(self) -> list[int]:
        """Wait for every request; the bytes each got. Raises ``OSError`` (the first failure's error) only
        once none is running."""
        lib = self._lib
        counts: list[int] = []
        failure = 0
        for index, block in enumerate(self._blocks):
            status = lib.aio_error(ctypes.byref(block))
            while status == errno.EINPROGRESS:
                lib.aio_suspend(ctypes.byref(self._pointers, index * ctypes.sizeof(ctypes.c_void_p)), 1, None)
                status = lib.aio_error(ctypes.byref(block))
            got = lib.aio_return(ctypes.byref(block))  # also frees glibc's record of the request
            if status != 0 or got < 0:
                failure = failure or status or errno.EIO
            counts.append(max(int(got), 0))
        if failure:
            raise OSError(failure, f"lio_listio read failed: {errno.errorcode.get(failure, failure)}")
        return counts


def submit(fds: Sequence[int], address: int, spans: Sequence[tuple[int, int, int]]) -> Batch:
    """Start reading the ``(buffer offset, file offset, length)`` spans into memory at ``address`` and
    return at once: :meth:`Batch.wait` gives what :func:`read_spans` returns. Lets a reader queue its next
    run of reads at the device before it finishes the current one (the disk never idles in between).
    Raises ``OSError`` (``ENOSYS``) where :func:`available` is False."""
    lib = _library()
    if lib is None:
        raise OSError(errno.ENOSYS, "lio_listio is not available on this platform")
    return Batch(lib, fds, address, spans)
