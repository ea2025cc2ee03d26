"""Validated safetensors headers and direct reads of single tensors.

The header is checked against the file before anything trusts it: a truncated download or a corrupt
file is reported by name with what is wrong, instead of crashing deep inside a forward pass.
Tensors are read with ``pread`` straight into their final memory, with no mmap that would pin the
page cache to the process. Each entry carries the :class:`~hf_bigmodel.storage.files.FileIdentity` of
its file as the header was read, and reads check it first.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ..model.sizes import format_size
from .files import FileIdentity, pread_exact

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
    identity: FileIdentity | None = field(default=None, compare=False, repr=False)  # of ``path`` when planned

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int
    identity: FileIdentity


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


def read_header(path: str | Path, *, content_named: bool = False) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file (reads only the header bytes).

    Checks the header length, the JSON, every dtype and shape, and that every tensor's bytes lie
    inside the file, so later reads cannot fail half-way. Records the file's identity (stat and header
    digest) in every entry, for the checks before later reads (``content_named``: see
    :class:`~hf_bigmodel.storage.files.FileIdentity`).
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            file_size = st.st_size
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
    if len(raw) != header_len:
        raise _corrupt(path, f"it ended {header_len - len(raw)} bytes into its header (it changed while read)")
    identity = FileIdentity.of(path, st, header=prefix + raw, content_named=content_named)
    try:
        header = json.loads(raw)
    except RecursionError:
        raise _corrupt(path, "its header nests JSON deeper than any tensor description does") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise _corrupt(path, f"its header is not JSON ({str(err)[:160]})") from None
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
        if expected > 2**63:
            raise _corrupt(path, f"{key!r} has shape {str(list(shape))[:80]}, larger than any file can hold")
        if end < begin or end - begin != expected:
            raise _corrupt(
                path, f"{key!r} spans {end - begin} bytes but shape {list(shape)} of {dtype_name} needs {expected}"
            )
        entries[key] = TensorEntry(path, key, dtype, shape, data_start + begin, data_start + end, identity)
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
    return SafetensorsHeader(path, entries, dict(metadata), file_size, identity)


def _dim(value: object) -> int:
    """A shape entry or offset: a JSON integer in 0..2**63 (not a bool, float or string)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**63:
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
    """Read one tensor into fresh CPU memory with ``pread`` (from ``fd`` when given, else the file, checked first).

    An ``fd`` is the caller's, already checked against ``entry.identity``; without one the file is
    opened and checked here.
    """
    handle = fd if fd is not None else (entry.identity.open() if entry.identity else os.open(entry.path, os.O_RDONLY))
    try:
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        if entry.nbytes:
            pread_exact(handle, buffer.numpy().data, entry.start, path=entry.path, what=repr(entry.key),
                        identity=entry.identity)
    finally:
        if fd is None:
            os.close(handle)
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return buffer.view(entry.dtype).reshape(entry.shape)
