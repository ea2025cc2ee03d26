"""How fast can a reader stream offloaded weights while the main thread runs Python? (a measurement)

A reader thread that calls ``os.preadv`` gives up the GIL for the system call but must take it back
afterwards; while the main thread runs Python, that can take up to ``sys.getswitchinterval()`` (5 ms)
per call, and the disk idles meanwhile. This script measures, on one file read with ``O_DIRECT`` in
decoder-layer-sized groups (86 MiB, as the benchmark checkpoint's layers), the throughput of each way
of reading, under these loads of the main thread:

- ``idle``: the main thread waits (the reader's best);
- ``python``: a pure-Python loop (the worst case: it never lets go of the GIL on its own);
- ``decode``: small torch ops with Python glue in between, as a decoder's forward at batch 1.
- ``gemv``: bf16 ``linear`` over 132 MiB of weights on every torch thread, as a decode step over weights
  kept in RAM (not a default: pass ``--loads idle,gemv``; it measures the cores' and memory's contention).

Ways of reading (``--strategies``):

- ``per_tensor``: one ``preadv`` per tensor of the group, views made on the reader thread (what the
  prefetcher did before);
- ``per_group``: one ``preadv`` per group (a layer's tensors are adjacent in a safetensors shard);
- ``pool4``, ``pool8``: the group cut into 8 MiB chunks read by 4 (8) threads (several reads in flight);
- ``aio``: the group's chunks submitted with glibc's ``lio_listio`` through ctypes (its own C threads,
  8 in flight); one foreign call per group, so the GIL is taken back once (what the prefetcher does,
  :mod:`hf_bigmodel.storage.aio`; ``per_group`` is what it did before);
- ``process``: a reader *process* (no torch, no GIL shared with the main one) reads the group into a
  shared-memory buffer and answers through a pipe.

Example::

    python benchmarks/reader_gil.py                         # ~1-2 min; prints a table, writes JSON
    python benchmarks/reader_gil.py --size 2GiB --repeat 5 --strategies per_group,process
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import system

from hf_bigmodel.model.sizes import format_size, parse_size

MIB = 2**20
#: One Llama decoder layer of the benchmark checkpoint (hidden 2048, intermediate 5632, 8 KV heads), in
#: the order safetensors stores it: norms, mlp.{down,gate,up}, norm, self_attn.{k,o,q,v}.
LAYER_TENSORS = [4096, 23068672, 23068672, 23068672, 4096, 2097152, 8388608, 8388608, 2097152]
GROUP = sum(LAYER_TENSORS)
ALIGN = 4096
SLOTS = 3  # buffers in rotation: the prefetch window of depth 2, plus the group in use
O_DIRECT = getattr(os, "O_DIRECT", 0)


def _group_spans(group_index: int) -> list[tuple[int, int]]:
    """(file offset, length) of each tensor of group ``group_index``, each padded to ALIGN."""
    spans, offset = [], group_index * _padded_group()
    for size in LAYER_TENSORS:
        length = -(-size // ALIGN) * ALIGN
        spans.append((offset, length))
        offset += length
    return spans


def _padded_group() -> int:
    return sum(-(-size // ALIGN) * ALIGN for size in LAYER_TENSORS)


def make_file(path: Path, size: int) -> None:
    if path.is_file() and path.stat().st_size == size:
        return
    chunk = os.urandom(16 * MIB)
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            n = min(len(chunk), size - written)
            handle.write(chunk[:n])
            written += n
        handle.flush()
        os.fsync(handle.fileno())


def anonymous_buffer(nbytes: int) -> mmap.mmap:
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


# ---------------------------------------------------------------- readers (each: read groups 0..n-1)


def read_per_tensor(fd: int, buffers: list[memoryview], groups: int) -> None:
    import torch

    for g in range(groups):
        view = buffers[g % SLOTS]
        tensor = torch.frombuffer(view, dtype=torch.uint8)
        at = 0
        for offset, length in _group_spans(g):
            os.preadv(fd, [view[at : at + length]], offset)
            tensor[at : at + length].view(torch.bfloat16)  # the view the reader thread used to make
            at += length


def read_per_group(fd: int, buffers: list[memoryview], groups: int) -> None:
    size = _padded_group()
    for g in range(groups):
        os.preadv(fd, [buffers[g % SLOTS][:size]], g * size)


def make_pool_reader(threads: int, chunk: int) -> Callable[[int, list[memoryview], int], None]:
    def read(fd: int, buffers: list[memoryview], groups: int) -> None:
        size = _padded_group()
        with ThreadPoolExecutor(threads) as pool:
            for g in range(groups):
                view = buffers[g % SLOTS]
                futures = [pool.submit(os.preadv, fd, [view[a : min(a + chunk, size)]], g * size + a)
                           for a in range(0, size, chunk)]
                for future in futures:
                    future.result()
    return read


def make_aio_reader(in_flight: int, chunk: int) -> Callable[[int, list[memoryview], int], None]:
    """The prefetcher's way (:func:`hf_bigmodel.storage.aio.read_spans`): one ``lio_listio`` per group."""
    from hf_bigmodel.storage import aio

    def read(fd: int, buffers: list[memoryview], groups: int) -> None:
        size = _padded_group()
        fds = [os.dup(fd) for _ in range(in_flight)]  # glibc serialises the requests of one descriptor
        try:
            for g in range(groups):
                address = ctypes.addressof(ctypes.c_char.from_buffer(buffers[g % SLOTS]))
                aio.read_spans(fds, address, [(a, g * size + a, min(chunk, size - a)) for a in range(0, size, chunk)])
        finally:
            for d in fds:
                os.close(d)
    return read


_CHILD = r"""
import os, sys, mmap
fd, memfd, size, slot, slots = (int(a) for a in sys.argv[1:6])
shared = mmap.mmap(memfd, slot * slots)
views = [memoryview(shared)[i * slot : i * slot + size] for i in range(slots)]
os.write(1, b"ready...")
while True:
    line = os.read(0, 8)
    if len(line) < 8:
        break
    g = int.from_bytes(line, "little")
    os.preadv(fd, [views[g % slots]], g * size)
    os.write(1, line)
"""


class ProcessReader:
    """A child Python process (no torch) reading groups into a shared-memory buffer it shares with us."""

    def __init__(self, path: Path) -> None:
        self.size = _padded_group()
        self.slot = -(-self.size // (2 * MIB)) * 2 * MIB
        self.memfd = os.memfd_create("hf_bigmodel-reader")
        os.ftruncate(self.memfd, self.slot * SLOTS)
        self.fd = os.open(path, os.O_RDONLY | O_DIRECT)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(self.fd), str(self.memfd), str(self.size), str(self.slot), str(SLOTS)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self.fd, self.memfd), bufsize=0,
        )
        self.shared = mmap.mmap(self.memfd, self.slot * SLOTS)
        self.wait()  # the child has started (not timed)

    def submit(self, g: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(g.to_bytes(8, "little"))

    def wait(self) -> int:
        assert self.proc.stdout is not None
        return int.from_bytes(self.proc.stdout.read(8), "little")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()
        self.shared.close()
        os.close(self.memfd)
        os.close(self.fd)


# ---------------------------------------------------------------- main-thread loads


def load_python(stop: Callable[[], bool]) -> int:
    spins = 0
    while not stop():
        total = 0
        for i in range(2000):  # ~0.1 ms of bytecode between checks
            total += i * i
        spins += 1
    return spins


def make_decode_load() -> Callable[[Callable[[], bool]], int]:
    import torch

    weights = [torch.randn(256, 256, dtype=torch.bfloat16) for _ in range(8)]
    x = torch.randn(1, 256, dtype=torch.bfloat16)

    def load(stop: Callable[[], bool]) -> int:
        spins = 0
        while not stop():
            h = x
            for w in weights:  # small kernels with Python glue between them, like a decode step
                h = torch.nn.functional.silu(h @ w) * 0.5 + h
            spins += 1
        return spins
    return load


def make_gemv_load() -> Callable[[Callable[[], bool]], int]:
    import torch

    weights = [torch.randn(5632, 2048, dtype=torch.bfloat16) for _ in range(6)]  # 132 MiB: not in any cache
    x = torch.randn(1, 1, 2048, dtype=torch.bfloat16)

    def load(stop: Callable[[], bool]) -> int:
        spins = 0
        while not stop():
            for w in weights:  # a decode step over weights in RAM: bf16 GEMV on every torch thread
                torch.nn.functional.linear(x, w)
            spins += 1
        return spins
    return load


def load_idle(stop: Callable[[], bool]) -> int:
    while not stop():
        time.sleep(0.001)
    return 0


# ---------------------------------------------------------------- one measurement


def measure(strategy: str, load: Callable[[Callable[[], bool]], int], path: Path, groups: int) -> float:
    """Bytes per second reading ``groups`` groups of ``path`` with ``strategy`` while ``load`` runs."""
    system.evict_from_page_cache([path])
    size = _padded_group() * groups
    if strategy == "process":
        reader = ProcessReader(path)
        try:
            started = time.perf_counter()
            pending = list(range(groups))
            for g in pending[:SLOTS]:
                reader.submit(g)
            state = {"done": 0, "next": SLOTS}
            answers = reader.proc.stdout
            assert answers is not None
            os.set_blocking(answers.fileno(), False)

            def stop() -> bool:  # the main thread collects answers between steps of its work
                try:
                    data = os.read(answers.fileno(), 8 * SLOTS)
                except BlockingIOError:
                    data = None
                if data == b"":
                    raise RuntimeError(f"the reader process died (exit code {reader.proc.wait()})")
                data = data or b""
                for _ in range(len(data) // 8):
                    state["done"] += 1
                    if state["next"] < groups:
                        reader.submit(state["next"])
                        state["next"] += 1
                return state["done"] >= groups

            load(stop)
            elapsed = time.perf_counter() - started
        finally:
            reader.close()
        return size / elapsed
    slot = -(-_padded_group() // (2 * MIB)) * 2 * MIB
    backing = anonymous_buffer(slot * SLOTS)
    buffers = [memoryview(backing)[i * slot : (i + 1) * slot] for i in range(SLOTS)]
    readers: dict[str, Callable[[int, list[memoryview], int], None]] = {
        "per_tensor": read_per_tensor, "per_group": read_per_group,
        "pool4": make_pool_reader(4, 8 * MIB), "pool8": make_pool_reader(8, 8 * MIB),
        "aio": make_aio_reader(8, 8 * MIB),
    }
    fd = os.open(path, os.O_RDONLY | O_DIRECT)
    try:
        thread = threading.Thread(target=readers[strategy], args=(fd, buffers, groups))
        started = time.perf_counter()
        thread.start()
        load(lambda: not thread.is_alive())
        thread.join()
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        for view in buffers:
            view.release()
        backing.close()
    return size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work")
    parser.add_argument("--size", default="1GiB", help="bytes read per measurement (whole groups)")
    parser.add_argument("--repeat", type=int, default=3, help="passes; the median is shown")
    parser.add_argument("--strategies", default="per_tensor,per_group,pool4,pool8,aio,process")
    parser.add_argument("--loads", default="idle,python,decode")
    args = parser.parse_args()
    import torch  # noqa: F401  (imported before any measurement: per_tensor and decode use it)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    groups = max(1, parse_size(args.size) // _padded_group())
    path = args.work_dir / "reader_probe.bin"
    make_file(path, groups * _padded_group())
    loads = {"idle": load_idle, "python": load_python, "decode": make_decode_load(), "gemv": make_gemv_load()}
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    chosen = [name.strip() for name in args.loads.split(",") if name.strip()]
    results: dict[str, dict[str, list[float]]] = {s: {name: [] for name in chosen} for s in strategies}
    load_avg = []
    for _ in range(args.repeat):  # interleaved, so the disk's drift hits every cell alike
        for strategy in strategies:
            for name in chosen:
                load_avg.append(os.getloadavg()[0])
                results[strategy][name].append(measure(strategy, loads[name], path, groups))
    machine = system.machine_description()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']}, Linux {machine['kernel']}; "
          f"{groups} groups of {format_size(_padded_group())} ({format_size(groups * _padded_group())}) per pass, "
          f"O_DIRECT, median of {args.repeat}; 1-min load average {min(load_avg):.1f}-{max(load_avg):.1f}")
    header = "| reader | " + " | ".join(f"{name} GB/s" for name in chosen) + " | " + " | ".join(
        f"{name} / idle" for name in chosen if name != "idle") + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    summary: dict[str, Any] = {}
    for strategy in strategies:
        med = {name: statistics.median(results[strategy][name]) for name in chosen}
        summary[strategy] = med
        cells = [f"{med[name] / 1e9:.2f}" for name in chosen]
        cells += [f"{med[name] / med['idle']:.2f}" for name in chosen if name != "idle" and "idle" in med]
        print(f"| {strategy} | " + " | ".join(cells) + " |")
    out = args.work_dir / "reader_gil.json"
    out.write_text(json.dumps({"machine": machine, "group_bytes": _padded_group(), "groups": groups,
                               "runs": results, "median": summary, "loadavg": load_avg}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
