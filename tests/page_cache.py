"""What of a file is in the page cache (mincore(2) over a read-only mapping), for tests of reads that avoid it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path


def resident_pages(file: Path) -> list[bool]:
    """Per page of ``file``, whether it is in the page cache."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = file.stat().st_size
    if size == 0:
        return []
    fd = os.open(file, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {file} failed")
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        try:
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {file} failed")
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
        return [bool(b & 1) for b in bytes(vec)]
    finally:
        os.close(fd)


def cached_bytes(files: list[Path]) -> int:
    """Bytes of ``files`` in the page cache."""
    return sum(sum(resident_pages(file)) * mmap.PAGESIZE for file in files)


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (``"ext4"``, ``"tmpfs"``...), from /proc/self/mounts."""
    best, kind = "", ""
    target = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def spy_reads(monkeypatch) -> list:
    """Every ``TensorEntry`` a ``DirectReader`` reads from now on (its key, bytes, file), in order."""
    from hf_bigmodel.storage.direct_io import DirectReader

    entries: list = []
    original = DirectReader.start_read  # read_into goes through it too

    def recording(self, entry, buffer):
        entries.append(entry)
        return original(self, entry, buffer)

    monkeypatch.setattr(DirectReader, "start_read", recording)
    return entries
