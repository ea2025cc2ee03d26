"""Operating-system plumbing for the benchmark: page cache, memory cgroups, /proc readings.

Linux only. Nothing here imports torch, so the harness and the runners share it cheaply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import platform
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger("benchmarks.system")

_PAGE = os.sysconf("SC_PAGE_SIZE")


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Every regular file under ``paths`` (files are yielded as given, folders walked)."""
    for path in paths:
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file())


# ---------------------------------------------------------------- page cache


def evict_from_page_cache(paths: Iterable[Path]) -> int:
    """Drop the cached pages of every file under ``paths`` (no root needed); returns the bytes covered.

    Dirty pages cannot be dropped, so each file is flushed first.

    Example::

        evict_from_page_cache([Path("ckpt/")])
        assert resident_bytes([Path("ckpt/")])[0] < 1 << 20
    """
    total = 0
    for file in iter_files(paths):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def direct_read_bandwidth(paths: Iterable[Path], *, chunk: int = 64 << 20, repeat: int = 3) -> float | None:
    """Bytes per second of one reader streaming every file under ``paths`` with O_DIRECT, best of ``repeat``.

    What a forward that reads its disk-offloaded weights can get at best from this disk (a shared disk
    varies from pass to pass, hence the best); None where the filesystem refuses O_DIRECT.
    """
    files = list(iter_files(paths))
    passes = [_direct_read_pass(files, chunk) for _ in range(repeat)]
    return max((p for p in passes if p is not None), default=None)


def _direct_read_pass(files: list[Path], chunk: int) -> float | None:
    evict_from_page_cache(files)
    buffer = mmap.mmap(-1, chunk, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned, for O_DIRECT
    if hasattr(mmap, "MADV_HUGEPAGE"):  # as torch does for large tensors: O_DIRECT into 4 KiB pages is slower
        buffer.madvise(mmap.MADV_HUGEPAGE)
    total, started = 0, time.perf_counter()
    try:
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                return None
            try:
                offset = 0
                while n := os.preadv(fd, [buffer], offset):
                    total += n
                    offset += n
                    if n < chunk:
                        break
            except OSError:
                return None
            finally:
                os.close(fd)
    finally:
        buffer.close()
    elapsed = time.perf_counter() - started
    return total / elapsed if elapsed > 0 else None


def warm_page_cache(paths: Iterable[Path], *, chunk: int = 16 << 20) -> int:
    """Read every file under ``paths`` once so its pages are cached; returns the bytes read."""
    total = 0
    buffer = bytearray(chunk)
    for file in iter_files(paths):
        with open(file, "rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                total += n
    return total


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def resident_bytes(paths: Iterable[Path]) -> tuple[int, int]:
    """``(bytes in the page cache, total bytes)`` over the files under ``paths``, measured with mincore(2).

    Example::

        cached, total = resident_bytes([Path("ckpt/")])
        print(f"{cached / total:.0%} of the checkpoint is cached")
    """
    libc = _libc()
    cached = total = 0
    for file in iter_files(paths):
        size = file.stat().st_size
        total += size
        if size == 0:
            continue
        fd = os.open(file, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {file} failed")
            try:
                pages = (size + _PAGE - 1) // _PAGE
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore on {file} failed")
                cached += sum(b & 1 for b in bytes(vec)) * _PAGE
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return min(cached, total), total


def reset_folder(path: Path) -> None:
    """Empty ``path`` (created if missing): the offload folder before each run."""
    if path.exists():
        evict_from_page_cache([path])
        shutil.rmtree(path)
    path.mkdir(parents=True)


# ---------------------------------------------------------------- /proc


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` in bytes: ``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``..."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
    return fields


def proc_io() -> dict[str, int]:
    """``/proc/self/io``: ``read_bytes`` counts what this process (all its threads) fetched from storage.

    O_DIRECT reads and page faults of memory-mapped files alike, so every loader's disk traffic is measured
    the same way; pages already in the page cache are not counted.
    """
    with open("/proc/self/io") as handle:
        return {key: int(value) for key, _, value in (line.partition(":") for line in handle)}


def machine_description() -> dict[str, str]:
    """CPU model, cores, RAM and kernel: what the figures were measured on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = proc_meminfo().get("MemTotal", 0)
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem / 2**30:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def disk_description(path: Path) -> str:
    """The block device holding ``path``: name, driver, size and whether it spins (``vda, virtio_blk, 256 GiB``)."""
    try:
        block = _block_device(path)
        size = int((block / "size").read_text()) * 512
        driver = Path(os.path.realpath(block / "device" / "driver")).name if (block / "device").exists() else "?"
        rotational = (block / "queue" / "rotational").read_text().strip() == "1"
    except (OSError, ValueError):
        return "unknown disk"
    return f"{block.name}, {driver}, {size / 2**30:.0f} GiB, {'rotational' if rotational else 'non-rotational'} per the kernel"


def _block_device(path: Path) -> Path:
    """The sysfs folder of the whole block device holding ``path`` (a partition's parent)."""
    dev = os.stat(path).st_dev
    block = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    return block.parent if (block / "partition").exists() else block


def disk_busy_ms(path: Path) -> int | None:
    """Milliseconds the block device holding ``path`` has had a request in flight since boot (``io_ticks``
    of its ``stat``), or None where the kernel does not say. Its change over a span of time, against the
    span, is how busy the disk was: the part of a disk-bound run that the reads left the disk idle."""
    try:
        return int((_block_device(path) / "stat").read_text().split()[9])
    except (OSError, ValueError, IndexError):
        return None


def proc_meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    info: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts:
            info[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return info


# ---------------------------------------------------------------- memory cgroup (v1)


def _own_memory_cgroup() -> Path | None:
    """The cgroup-v1 memory folder this process belongs to, or None without one."""
    root = Path("/sys/fs/cgroup/memory")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = root / rel.lstrip("/")
            return folder if folder.is_dir() else None
    return None


class MemoryCgroup:
    """A child memory cgroup (v1) under this process's own, holding one benchmark runner.

    Nested under the harness's cgroup, so whatever limits the harness already has still apply.
    Use :meth:`create`; it returns ``None`` plus the reason when cgroups cannot be used here.

    Example::

        group, why = MemoryCgroup.create("hfbm_bench_1", limit=1_300_000_000)
        subprocess.run(cmd, preexec_fn=group.join)   # the child runs confined from its first byte
        print(group.peak_bytes(), group.oom_kills())
        group.remove()
    """

    def __init__(self, path: Path, limit: int | None) -> None:
        self.path = path
        self.limit = limit

    @classmethod
    def create(cls, name: str, *, limit: int | None) -> tuple[MemoryCgroup | None, str]:
        parent = _own_memory_cgroup()
        if parent is None:
            return None, "no cgroup-v1 memory controller at /sys/fs/cgroup/memory"
        path = parent / name
        try:
            if path.exists():
                path.rmdir()
            path.mkdir()
        except OSError as exc:
            return None, f"cannot create {path}: {exc.strerror} (run as root, or pass --no-cgroup)"
        group = cls(path, limit)
        try:
            if limit is not None:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                swap = path / "memory.memsw.limit_in_bytes"
                if swap.exists():  # no swapping out of the limit either
                    try:
                        swap.write_text(str(limit))
                    except OSError:
                        pass
        except OSError as exc:
            group.remove()
            return None, f"cannot set memory.limit_in_bytes in {path}: {exc.strerror}"
        return group, ""

    def join(self) -> None:
        """Move the calling process into the group (use as ``preexec_fn``: runs in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def peak_bytes(self) -> int:
        """Peak memory charged to the group: anonymous memory plus page cache the runner brought in."""
        return int(self._read("memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        """How many processes the OOM killer ended inside this group."""
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0  # kernels before 4.13 do not count kills; the runner's SIGKILL still tells

    def remove(self) -> None:
        """Delete the group (its remaining page-cache charges move to the parent)."""
        try:
            self.path.rmdir()
        except OSError as exc:
            logger.warning("could not remove cgroup %s: %s", self.path, exc.strerror)
