"""Validated safetensors headers and direct reads of single tensors.

The header is checked against the file before anything trusts it: a truncated download or a corrupt
file is reported by name with what is wrong, instead of crashing deep inside a forward pass.
Tensors are read with ``pread`` straight into their final memory, with no mmap that would pin the
page cache to the process.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..model.sizes import format_size

__all__ = [
    "DTYPES",
    "SafetensorsHeader",
    "TensorEntry",
    "read_header",
    "read_tensor",
    "refetch_advice",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file: absolute byte range, dtype and shape."""

    path: str
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int


def refetch_advice(path: str | os.PathLike[str]) -> str:
    """What to do about a damaged weights file: re-download from the Hub cache, or fetch/save it again.

    >>> refetch_advice("/home/me/.cache/huggingface/hub/models--gpt2/snapshots/abc/model.safetensors")[:36]
    'It lives in the Hugging Face cache: '
    """
    text = str(path).replace("\\", "/")
    if "/blobs/" in text or "/snapshots/" in text:
        return ("It lives in the Hugging Face cache: download it again with force_download=True "
                "(or delete it from the cache and load again).")
    return "Download or save it again."


def _corrupt(path: str | Path, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{str(path)!r} is not a valid safetensors file: {why}. The file is truncated or corrupt. "
        + refetch_advice(path),
        path=str(path),
    )


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file (reads only the header bytes).

    Checks the header length, the JSON, every dtype and shape, and that every tensor's bytes lie
    inside the file, so later reads cannot fail half-way.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"it holds {file_size} bytes, less than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise _corrupt(
                    path, f"the header claims {format_size(header_len)} but the file holds {format_size(file_size)} "
                    f"({format_size(header_len + 8 - file_size)} missing)"
                )
            if header_len > _MAX_HEADER:
                raise _corrupt(path, f"the header claims {format_size(header_len)}, over the "
                                     f"{format_size(_MAX_HEADER)} any real checkpoint needs")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Checkpoint file {path!r} does not exist.", path=path) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, f"its __metadata__ is not a mapping of strings ({str(metadata)[:80]})")
    entries: dict[str, TensorEntry] = {}
    for key, info in header.items():
        try:
            dtype_name = info["dtype"]
            shape = tuple(_dim(d) for d in info["shape"])
            begin, end = (_dim(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"the entry for {key!r} is malformed ({str(info)[:80]})") from None
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if dtype is None:
            raise _corrupt(path, f"{key!r} has unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})")
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * dtype.itemsize
        if end < begin or end - begin != expected:
            raise _corrupt(
                path, f"{key!r} spans {end - begin} bytes but shape {list(shape)} of {dtype_name} needs {expected}"
            )
        entries[key] = TensorEntry(path, key, dtype, shape, data_start + begin, data_start + end)
    cut = sorted((e for e in entries.values() if e.end > file_size), key=lambda e: e.start)
    if cut:
        needed = max(e.end for e in cut)
        raise _corrupt(
            path,
            f"its header needs {needed} bytes but the file holds {file_size} bytes "
            f"({format_size(needed - file_size)} missing); {len(cut)} tensor(s) are cut short, first "
            f"{cut[0].key!r} (bytes {cut[0].start}-{cut[0].end})",
        )
    _check_layout(path, entries, data_start)
    return SafetensorsHeader(path, entries, dict(metadata), file_size)


def _dim(value: object) -> int:
    """A shape entry or offset: a non-negative JSON integer (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value


def _check_layout(path: str, entries: dict[str, TensorEntry], data_start: int) -> None:
    """Tensors must tile the data section from its first byte, without overlaps or gaps (as safetensors writes)."""
    cursor = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start != cursor:
            what = "overlaps the previous tensor" if entry.start < cursor else "leaves a gap before it"
            raise _corrupt(path, f"bad offsets: {entry.key!r} starts at data byte {entry.start - data_start}, "
                                 f"which {what} (expected {cursor - data_start})")
        cursor = entry.end


def read_tensor(entry: TensorEntry, *, fd: int | None = None) -> torch.Tensor:
    """Read one tensor into fresh CPU memory with ``pread``."""
    nbytes = entry.nbytes
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    handle = os.open(entry.path, os.O_RDONLY) if fd is None else fd
    try:
        view = memoryview(buffer.numpy()) if nbytes else memoryview(b"")  # type: ignore[arg-type]
        done = 0
        while done < nbytes:
            n = os.preadv(handle, [view[done:]], entry.start + done)
            if n <= 0:
                raise _corrupt(entry.path, f"reading {entry.key!r} stopped at byte {entry.start + done}")
            done += n
    finally:
        if fd is None:
            os.close(handle)
    return buffer.view(entry.dtype).reshape(entry.shape) if nbytes else torch.empty(entry.shape, dtype=entry.dtype)
