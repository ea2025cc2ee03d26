"""How fast O_DIRECT reads stream a checkpoint, by buffer page size and by way of reading.

Each pass evicts the checkpoint from the page cache, then reads all of its safetensors files with
``O_DIRECT`` into one reused buffer, in one of four ways, interleaved over ``--passes`` rounds:

- ``4k/seq``: one 64 MiB ``pread`` at a time into 4 KiB pages (an ordinary ``torch.empty`` buffer);
- ``4k/aio``: 8 MiB chunks, 8 in flight with ``lio_listio`` (what the prefetcher does), 4 KiB pages;
- ``huge/seq`` and ``huge/aio``: the same into a buffer advised as transparent huge pages
  (what :func:`hf_bigmodel.storage.direct_io.aligned_empty` gives buffers of 2 MiB and more).

The device splits a request at its segment limit (``/sys/block/<dev>/queue/max_segments`` pages),
so 4 KiB pages cut an 8 MiB read into 1 MiB requests where 2 MiB pages do not. Prints GB/s per way
(median and best) and the device's limits::

    python benchmarks/sustained_read.py [--checkpoint DIR] [--passes 3]

~30 s for the 1.9 GB benchmark checkpoint (``run.py`` builds it in ``benchmarks/_work/``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from system import disk_description, evict_from_page_cache, iter_files  # noqa: E402

from hf_bigmodel.storage import aio  # noqa: E402
from hf_bigmodel.storage.direct_io import HUGE_PAGE, aligned_empty  # noqa: E402

SEQ_CHUNK = 64 << 20
AIO_CHUNK = 8 << 20
IN_FLIGHT = 8
WAYS = ("4k/seq", "4k/aio", "huge/seq", "huge/aio")


def small_pages(nbytes: int) -> torch.Tensor:
    """A 4 KiB-aligned buffer the kernel backs with 4 KiB pages (advised so, whatever the THP setting)."""
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8)
    out = raw[(-raw.data_ptr()) % 4096 :][:nbytes]
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is not None:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(out.data_ptr()), ctypes.c_size_t(nbytes), advice)
    return out


def read_pass(files: list[Path], buffer: torch.Tensor, way: str) -> float:
    """Bytes per second of one cold pass over ``files`` into ``buffer``."""
    evict_from_page_cache(files)
    view = buffer.numpy().data
    total = 0
    started = time.perf_counter()
    for file in files:
        size = os.path.getsize(file) // 4096 * 4096
        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
        fds = [fd] + [os.dup(fd) for _ in range(IN_FLIGHT - 1)]
        try:
            offset = 0
            while offset < size:
                if way.endswith("seq"):
                    got = os.preadv(fd, [view[: min(SEQ_CHUNK, size - offset)]], offset)
                else:
                    spans = [(i * AIO_CHUNK, offset + i * AIO_CHUNK, min(AIO_CHUNK, size - offset - i * AIO_CHUNK))
                             for i in range(IN_FLIGHT) if offset + i * AIO_CHUNK < size]
                    got = sum(aio.read_spans(fds, buffer.data_ptr(), spans))
                if got <= 0:
                    raise OSError(f"read of {file} at {offset} returned {got}")
                offset += got
                total += got
        finally:
            for d in fds:
                os.close(d)
    return total / (time.perf_counter() - started)


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=here / "_work" / "llama-18L-2048h-seed20240601")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    files = [f for f in iter_files([args.checkpoint]) if f.suffix == ".safetensors"]
    if not files:
        raise SystemExit(f"no .safetensors files under {args.checkpoint}: run benchmarks/run.py once to build them")
    if not aio.available():
        raise SystemExit("lio_listio is not available here (Linux with glibc, 64-bit)")
    size = max(SEQ_CHUNK, AIO_CHUNK * IN_FLIGHT)
    buffers = {"4k": small_pages(size), "huge": aligned_empty(size)}
    for buffer in buffers.values():
        buffer.fill_(0)  # fault every page in before timing
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.passes):
        for way in WAYS:
            rates[way].append(read_pass(files, buffers[way.split("/")[0]], way))
    device = disk_description(args.checkpoint)
    print(f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB in {len(files)} files on {device}; "
          f"huge pages {HUGE_PAGE >> 20} MiB")
    for way in WAYS:
        print(f"  {way:9s} median {statistics.median(rates[way]) / 1e9:.2f} GB/s, best {max(rates[way]) / 1e9:.2f} GB/s")
    out = here / "_work" / "sustained_read.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": device, "gb_per_s": {w: [r / 1e9 for r in v] for w, v in rates.items()}}, indent=1))


if __name__ == "__main__":
    main()
