"""The offload folder's manifest, ``index.json``: what the folder holds, and the checks before it is trusted.

Version 2 records, per tensor, its file, key, dtype and shape (a fused tensor: each piece's file, key and
boxes), and per file its size and header digest; a checkpoint shard read in place also its mtime, inode
and device. :func:`load_offload_index` serves weights from the folder only when every one of those still
holds; an index of an older version (which recorded none of it), or one whose files changed, is
refused with what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OffloadError, summarize
from ..model.dtypes import resolve_dtype
from .fused import DiskPiece, FusedDiskTensor
from .safetensors_io import SafetensorsHeader, TensorEntry, read_header
from .weights_map import BuiltDiskTensor, DiskRef, DiskTensor

__all__ = ["INDEX_NAME", "index_document", "load_offload_index"]

INDEX_NAME = "index.json"
_FORMAT = "hf_bigmodel-offload"
_VERSION = 2


def _dtype_name(ref: DiskRef) -> str:
    return str(ref.dtype).removeprefix("torch.")


def _file_record(entry: TensorEntry, *, in_place: bool) -> dict[str, Any]:
    """What identifies a file of the index: size and header digest; for a checkpoint read in place, its stat."""
    identity = entry.identity
    if identity is None:
        identity = read_header(entry.path, content_named=not in_place).identity
    record: dict[str, Any] = {"size": identity.size, "header_sha256": identity.header}
    if in_place:
        record.update(mtime_ns=identity.mtime_ns, inode=identity.inode, device=identity.device)
    return record


def index_document(weights: Mapping[str, DiskRef], stored_name: Callable[[str], str]) -> dict[str, Any]:
    """The manifest of ``weights``; ``stored_name(path)`` is how the index names a file (relative inside the
    folder, absolute for a checkpoint read in place)."""
    entries: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, Any]] = {}

    def record(entry: TensorEntry) -> str:
        stored = stored_name(entry.path)
        if stored not in files:
            files[stored] = _file_record(entry, in_place=os.path.isabs(stored))
        return stored

    for name, ref in sorted(weights.items()):
        if isinstance(ref, BuiltDiskTensor):  # recorded, but only the load that wrote it knows how to build it
            parts = {key: {"file": record(p.entry), "key": p.entry.key} for key, p in ref.parts}
            entries[name] = {"built": ref.kind, "parts": parts, "shape": list(ref.shape), "dtype": _dtype_name(ref)}
        elif isinstance(ref, FusedDiskTensor):
            pieces = [{"file": record(p.entry), "key": p.entry.key, "dst": p.dst, "src": p.src} for p in ref.pieces]
            entries[name] = {"pieces": pieces, "shape": list(ref.shape), "dtype": _dtype_name(ref)}
        else:
            entries[name] = {"file": record(ref.entry), "key": ref.entry.key, "dtype": _dtype_name(ref),
                             "shape": list(ref.entry.shape)}
    return {"format": _FORMAT, "version": _VERSION, "files": files, "weights": entries}


def _read_document(folder: Path, fix: str) -> dict[str, Any]:
    index = folder / INDEX_NAME
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise OffloadError(f"Offload folder {str(folder)!r} has no {INDEX_NAME}; nothing was offloaded there.",
                           path=str(index)) from None
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"not JSON: {str(err)[:160]}"
        raise OffloadError(f"Cannot read {str(index)!r} ({why}). {fix}", path=str(index)) from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("weights"), dict):
        raise OffloadError(f"{str(index)!r} is not an hf_bigmodel offload index. {fix}", path=str(index))
    if data.get("version") != _VERSION or not isinstance(data.get("files"), dict):
        raise OffloadError(
            f"{str(index)!r} was written by an older hf_bigmodel (index version {data.get('version')!r}): it does not "
            f"record which files it holds, so they cannot be checked. {fix}",
            path=str(index),
        )
    return data


class _Files:
    """The index's files, each read (header) and checked against its record once."""

    def __init__(self, folder: Path, records: dict[str, Any]) -> None:
        self.folder = folder
        self.records = records
        self.headers: dict[str, SafetensorsHeader] = {}

    def entry(self, info: Any) -> TensorEntry:
        stored = info["file"]
        file = Path(stored)
        if not file.is_absolute() and (".." in file.parts or "\\" in str(file)):
            raise ValueError(f"file {str(file)!r} lies outside the folder")
        path = file if file.is_absolute() else self.folder / file
        header = self.headers.get(str(path))
        if header is None:
            header = self.headers[str(path)] = read_header(path, content_named=not file.is_absolute())
            problem = _file_problem(self.records.get(stored), header)
            if problem is not None:
                raise ValueError(f"file {str(path)!r}: {problem}")
        return header.entries[str(info["key"])]


def _file_problem(record: object, header: SafetensorsHeader) -> str | None:
    """How a file differs from its record in the index (None: it is the file the index was written for)."""
    if not isinstance(record, dict):
        return "the index does not record it"
    identity = header.identity
    now = {"size": identity.size, "header_sha256": identity.header, "mtime_ns": identity.mtime_ns,
           "inode": identity.inode, "device": identity.device}
    changed = [key for key in record if key in now and record[key] != now[key]]
    if changed:
        return f"it changed since the folder was written ({', '.join(changed)} differ)"
    return None


def _box(value: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) and p[0] <= p[1]
        for p in value
    ):
        raise ValueError(f"not a box: {str(value)[:80]}")
    return tuple((int(a), int(b)) for a, b in value)


def _fused(info: Any, files: _Files) -> FusedDiskTensor:
    shape = tuple(_box([[0, d] for d in info["shape"]]))
    pieces = []
    for raw in info["pieces"]:
        entry = files.entry(raw)
        dst, src = _box(raw["dst"]), _box(raw["src"])
        if len(src) != len(entry.shape) or any(b > d for (_, b), d in zip(src, entry.shape)):
            raise ValueError(f"piece {entry.key!r}: box {list(src)} lies outside its shape {list(entry.shape)}")
        if len(dst) != len(shape) or any(b > d for (_, b), (_, d) in zip(dst, shape)):
            raise ValueError(f"piece {entry.key!r}: box {list(dst)} lies outside the fused shape")
        pieces.append(DiskPiece(entry, dst, src))
    if not pieces or len({p.entry.dtype for p in pieces}) != 1:
        raise ValueError("a fused tensor needs pieces of one dtype")
    return FusedDiskTensor(tuple(pieces), tuple(d for _, d in shape), resolve_dtype(str(info["dtype"])))


def _ref(info: Any, files: _Files) -> DiskRef:
    """One weight of the index, checked against its file(s) (raises what went wrong)."""
    if isinstance(info, dict) and "built" in info:
        raise ValueError(f"built from its parts by {info['built']} (quantized weights), which only the load that "
                         "wrote it can do; load the model with load_pretrained_dispatched again")
    if isinstance(info, dict) and "pieces" in info:
        return _fused(info, files)
    entry = files.entry(info)
    if list(entry.shape) != info["shape"]:
        raise ValueError(f"{info['file']!r} holds {info['key']!r} with shape {list(entry.shape)}, the index says "
                         f"{info['shape']}")
    return DiskTensor(entry, resolve_dtype(info["dtype"]))


def load_offload_index(
    folder: str | os.PathLike[str], *, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, DiskRef]:
    """Read an offload folder's ``index.json``, checking every file and header before trusting it.

    File names must lie in the folder (absolute paths name a safetensors checkpoint read in place); every
    file must be the one the index was written for (size and header digest; a checkpoint also its mtime and
    inode), hold every tensor with the recorded dtype and shape, and, with ``expected`` (``{name: shape}`` of
    the model), the shape the model has. Every problem is listed in one :class:`OffloadError` that says to
    rebuild the folder.

    Example::

        refs = load_offload_index("offload")          # {"layers.0.weight": DiskTensor(...), ...}
        weights = WeightsMap(disk=refs)
    """
    folder = Path(folder)
    fix = f"Delete {str(folder)!r} (or pass an empty offload folder) and load the checkpoint again."
    data = _read_document(folder, fix)
    files = _Files(folder, data["files"])
    result: dict[str, DiskRef] = {}
    problems: list[str] = []
    for name, info in data["weights"].items():
        try:
            ref = _ref(info, files)
        except (KeyError, TypeError, ValueError, OSError, CheckpointError) as err:
            problems.append(f"{name} ({type(err).__name__}: {str(err)[:160]})")
            continue
        shape = expected.get(name) if expected is not None else None
        if shape is not None and tuple(shape) != ref.shape:
            problems.append(f"{name} (stored with shape {list(ref.shape)}, the model has {list(shape)})")
        result[name] = ref
    if problems:
        raise OffloadError(f"Offload folder {str(folder)!r} is inconsistent: {summarize(problems, 5)}. {fix}",
                           path=str(folder))
    return result
