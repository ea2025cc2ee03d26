"""Offloaded weights: the lazy name -> tensor map hooks read from, and the offload folder.

A :class:`WeightsMap` holds, per tensor name, either a tensor in RAM or a :class:`DiskTensor`: a byte range
in a safetensors file, read (and cast) only when a module needs it. For a safetensors checkpoint that
file is the checkpoint's own shard, so nothing is copied. Other sources are written once into the
offload folder as safetensors files plus an ``index.json``.

Offload-folder files are named by their content's identity (source file, size, mtime, keys, dtypes),
written to a private temporary name and renamed into place, so several processes can fill the same
folder at once, and a later run re-uses a file only after checking its header.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import Advice, CheckpointError, OffloadError, summarize
from ..model.dtypes import resolve_dtype
from ..model.sizes import format_size
from .fused import DiskPiece, FusedDiskTensor
from .safetensors_io import TensorEntry, read_header
from .weights_map import BuiltDiskTensor, DiskRef, DiskTensor, flatten_subclass, subclass_builder

__all__ = ["INDEX_NAME", "OffloadFolder", "load_offload_index"]

logger = logging.getLogger(__name__)
INDEX_NAME = "index.json"
_FORMAT = "hf_bigmodel-offload"







def _discard(path: Path) -> None:
    """Remove a temporary file we created, whatever state the disk is in."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class OffloadFolder:
    """A folder holding offloaded weights as safetensors files and an ``index.json``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def prepare(self) -> None:
        """Create the folder and prove it is writable, or raise :class:`OffloadError` saying why."""
        if self.path.exists() and not self.path.is_dir():
            raise OffloadError(f"The offload folder {str(self.path)!r} is a file, not a folder.", path=str(self.path),
                               advice=[Advice("Pass a folder path as {}.", "offload_folder", "...")])
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
            why = f"{str(blocker)!r} is a file, not a folder" if blocker is not None else err.strerror or str(err)
            raise OffloadError(f"Cannot write to the offload folder {str(self.path)!r}: {why}.", path=str(self.path),
                               advice=[Advice("Pass {} on a writable disk.", "offload_folder", "...")]) from None
        self._sweep_orphans()

    def _sweep_orphans(self) -> None:
        """Delete temporary files whose writer died before renaming them (killed outright, say).

        Their names carry the writer's pid (``.<name>.<pid>.<id>.tmp``): a file is removed only when that
        process no longer exists and the file has not changed for a minute, so writers still at work,
        here or in another process, are never disturbed.
        """
        now = time.time()
        for tmp in self.path.glob(".*.tmp"):
            parts = tmp.name.rsplit(".", 3)
            if len(parts) != 4 or not parts[1].isdigit():
                continue
            try:
                if now - tmp.stat().st_mtime < 60 or _process_alive(int(parts[1])):
                    continue
                tmp.unlink()
                logger.info("Removed %s, left by a writer that died before finishing it.", tmp)
            except OSError:
                continue

    def content_path(self, source_id: str, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> Path:
        """The file :meth:`write` uses for tensors ``{name: (dtype, shape)}`` taken from ``source_id``."""
        digest = hashlib.sha256(source_id.encode())
        for name in sorted(specs):
            dtype, shape = specs[name]
            digest.update(f"|{name}:{_dtype_name(dtype)}:{tuple(shape)}".encode())
        return self.path / f"w-{digest.hexdigest()[:24]}.safetensors"

    def check_space(self, nbytes: int) -> None:
        """Raise :class:`OffloadError` now if the folder's disk has less than ``nbytes`` free."""
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            return  # cannot tell; the writes themselves will report a full disk
        if nbytes > free:
            raise OffloadError(
                f"offload_folder {str(self.path)!r} needs {format_size(nbytes)} for the offloaded weights but its "
                f"disk has {format_size(free)} free. Free {format_size(nbytes - free)} or pass an offload_folder "
                "on a larger disk.",
                path=str(self.path),
            )

    def write(self, tensors: Mapping[str, torch.Tensor], *, source_id: str | None = None) -> dict[str, DiskRef]:
        """Store ``tensors`` in one safetensors file and return where each one lies.

        With a ``source_id`` (the identity of the checkpoint shard they came from) the file name is
        derived from it, so another run re-uses a valid existing file; without one, the name is unique.
        A tensor subclass (quantized weights) is stored as its inner tensors, named ``name:inner``: its
        quantized bytes stay quantized on disk, and it is rebuilt when read (:class:`BuiltDiskTensor`).
        """
        flat, split = _flatten(tensors, self.path)
        written: dict[str, DiskRef] = dict(self._write_plain(flat, source_id))
        for name, (keys, context) in split.items():
            tensor = tensors[name]
            parts = tuple((key, written.pop(f"{name}:{key}")) for key in keys)
            kind = f"{type(tensor).__module__}.{type(tensor).__qualname__}"
            written[name] = BuiltDiskTensor(parts, subclass_builder(tensor, context),  # type: ignore[arg-type]
                                            tuple(tensor.shape), tensor.dtype, kind)
        return written

    def _write_plain(self, tensors: Mapping[str, torch.Tensor], source_id: str | None) -> dict[str, DiskTensor]:
        from safetensors.torch import save_file

        if not tensors:
            return {}
        if source_id is not None:
            file = self.content_path(source_id, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
            reused = self._reuse(file, tensors)
            if reused is not None:
                return reused
        else:
            file = self.path / f"w-{uuid.uuid4().hex}.safetensors"
        tmp = self.path / f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, file)
        except OSError as err:
            _discard(tmp)
            size = format_size(sum(t.numel() * t.element_size() for t in tensors.values()))
            raise OffloadError(
                f"Could not write {size} of offloaded weights ({summarize(sorted(tensors), 3)}) to offload_folder "
                f"{str(self.path)!r} (file {file.name}): {err.strerror or err}. Free some space or pass another "
                "offload_folder.",
                path=str(self.path),
            ) from None
        except BaseException:
            _discard(tmp)
            raise
        header = read_header(file)
        return {k: DiskTensor(header.entries[k], tensors[k].dtype) for k in tensors}

    def _reuse(self, file: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, DiskTensor] | None:
        if not file.is_file():
            return None
        try:
            header = read_header(file)
        except CheckpointError as err:
            logger.warning("Ignoring %s in the offload folder and writing it again: %s", file, err)
            return None
        for name, t in tensors.items():
            entry = header.entries.get(name)
            if entry is None or entry.shape != tuple(t.shape) or entry.dtype != t.dtype:
                logger.warning("Offload file %s does not hold %r as expected; writing it again.", file, name)
                return None
        logger.debug("Re-using offloaded weights in %s", file)
        return {k: DiskTensor(header.entries[k], tensors[k].dtype) for k in tensors}

    def _stored(self, path: str) -> str:
        file = Path(path)
        return file.name if file.parent.resolve() == self.path.resolve() else str(file.resolve())

    def write_index(self, weights: Mapping[str, DiskRef]) -> Path:
        """Record where every offloaded tensor lies (atomically), for ``dispatch_model(offload_dir=...)``.

        A fused tensor is recorded piece by piece (file, key, and the boxes each piece maps); a built one by
        its parts and what builds it, for the record only: how to build it lives with the loaded model, so
        :func:`load_offload_index` refuses it.
        """
        entries: dict[str, dict[str, object]] = {}
        for name, ref in sorted(weights.items()):
            if isinstance(ref, BuiltDiskTensor):
                parts = {key: {"file": self._stored(p.entry.path), "key": p.entry.key} for key, p in ref.parts}
                entries[name] = {"built": ref.kind, "parts": parts, "shape": list(ref.shape),
                                 "dtype": _dtype_name(ref.dtype)}
                continue
            if isinstance(ref, FusedDiskTensor):
                pieces = [{"file": self._stored(p.entry.path), "key": p.entry.key, "dst": p.dst, "src": p.src}
                          for p in ref.pieces]
                entries[name] = {"pieces": pieces, "shape": list(ref.shape), "dtype": _dtype_name(ref.dtype)}
                continue
            entries[name] = {"file": self._stored(ref.entry.path), "key": ref.entry.key,
                             "dtype": _dtype_name(ref.dtype)}
        index = self.path / INDEX_NAME
        tmp = self.path / f".{INDEX_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            tmp.write_text(json.dumps({"format": _FORMAT, "version": 1, "weights": entries}, indent=1))
            os.replace(tmp, index)
        except BaseException as err:
            _discard(tmp)
            if not isinstance(err, OSError):
                raise
            raise OffloadError(
                f"Could not write {str(index)!r}: {err.strerror or err}. "
                "Free some space or pass another offload_folder.",
                path=str(index),
            ) from None
        return index


def _flatten(tensors: Mapping[str, torch.Tensor], folder: Path
             ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[list[str], Any]]]:
    """Plain tensors to write (a subclass's inner tensors as ``name:inner``), and each subclass's inner names
    and context."""
    flat: dict[str, torch.Tensor] = {}
    split: dict[str, tuple[list[str], Any]] = {}
    for name, tensor in tensors.items():
        if type(tensor) in (torch.Tensor, torch.nn.Parameter):
            flat[name] = tensor
            continue
        parts = flatten_subclass(tensor)
        if parts is None or not all(t.is_contiguous() for t in parts[0].values()):
            raise OffloadError(
                f"{name} is a {type(tensor).__name__}, which cannot be written to offload_folder {str(folder)!r}: "
                "it does not flatten into contiguous plain tensors (torch's __tensor_flatten__).",
                path=str(folder), advice=[Advice("Keep it in RAM or on an accelerator: give it room with {}.",
                                                 "max_memory", "{'cpu': '...'}")])
        split[name] = (list(parts[0]), parts[1])
        flat.update({f"{name}:{key}": value for key, value in parts[0].items()})
    return flat, split


def _box(value: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v >= 0 for v in p) and p[0] <= p[1]
        for p in value
    ):
        raise ValueError(f"not a box: {str(value)[:80]}")
    return tuple((int(a), int(b)) for a, b in value)


def _index_entry(
    folder: Path, info: dict[str, object], headers: dict[str, dict[str, TensorEntry]]
) -> tuple[TensorEntry, Path]:
    file = Path(str(info["file"]))
    if not file.is_absolute() and (".." in file.parts or "\\" in str(file)):
        raise ValueError(f"file {str(file)!r} lies outside the folder")
    path = file if file.is_absolute() else folder / file
    if str(path) not in headers:
        headers[str(path)] = read_header(path).entries
    return headers[str(path)][str(info["key"])], path


def _fused_from_index(folder: Path, info: dict[str, object], headers: dict[str, dict[str, TensorEntry]]
                      ) -> FusedDiskTensor:
    shape = tuple(_box([[0, d] for d in info["shape"]]))  # type: ignore[attr-defined]
    pieces = []
    for raw in info["pieces"]:  # type: ignore[attr-defined]
        entry, _ = _index_entry(folder, raw, headers)
        dst, src = _box(raw["dst"]), _box(raw["src"])
        if len(src) != len(entry.shape) or any(b > d for (_, b), d in zip(src, entry.shape)):
            raise ValueError(f"piece {entry.key!r}: box {list(src)} lies outside its shape {list(entry.shape)}")
        if len(dst) != len(shape) or any(b > d for (_, b), (_, d) in zip(dst, shape)):
            raise ValueError(f"piece {entry.key!r}: box {list(dst)} lies outside the fused shape")
        pieces.append(DiskPiece(entry, dst, src))
    if not pieces or len({p.entry.dtype for p in pieces}) != 1:
        raise ValueError("a fused tensor needs pieces of one dtype")
    return FusedDiskTensor(tuple(pieces), tuple(d for _, d in shape), resolve_dtype(str(info["dtype"])))


def load_offload_index(
    folder: str | os.PathLike[str], *, expected: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, DiskRef]:
    """Read an offload folder's ``index.json``, checking every file and header before trusting it.

    File names must lie in the folder (absolute paths name a safetensors checkpoint read in place);
    every file's header is validated against its size; with ``expected`` (``{name: shape}`` of the
    model), every entry the model has must have that shape. Every problem is listed in one
    :class:`OffloadError` that says to rebuild the folder.

    Example::

        refs = load_offload_index("offload")          # {"layers.0.weight": DiskTensor(...), ...}
        weights = WeightsMap(disk=refs)
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    fix = f"Delete {str(folder)!r} (or pass an empty offload folder) and load the checkpoint again."
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise OffloadError(f"Offload folder {str(folder)!r} has no {INDEX_NAME}; nothing was offloaded there.",
                           path=str(index)) from None
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = err.strerror if isinstance(err, OSError) and err.strerror else f"not JSON: {str(err)[:160]}"
        raise OffloadError(f"Cannot read {str(index)!r} ({why}). {fix}", path=str(index)) from None
    weights = data.get("weights") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    if not isinstance(weights, dict):
        raise OffloadError(f"{str(index)!r} is not an hf_bigmodel offload index. {fix}", path=str(index))
    headers: dict[str, dict[str, TensorEntry]] = {}
    result: dict[str, DiskRef] = {}
    problems: list[str] = []
    for name, info in weights.items():
        try:
            ref: DiskRef
            if isinstance(info, dict) and "built" in info:
                raise ValueError(f"built from its parts by {info['built']} (quantized weights), which only the "
                                 "load that wrote it can do; load the model with load_pretrained_dispatched again")
            if isinstance(info, dict) and "pieces" in info:
                ref = _fused_from_index(folder, info, headers)
            else:
                entry, _ = _index_entry(folder, info, headers)
                ref = DiskTensor(entry, resolve_dtype(info["dtype"]))
            result[name] = ref
        except (KeyError, TypeError, ValueError, OSError, CheckpointError) as err:
            problems.append(f"{name} ({type(err).__name__}: {str(err)[:120]})")
            continue
        shape = expected.get(name) if expected is not None else None
        if shape is not None and tuple(shape) != ref.shape:
            problems.append(f"{name} (stored with shape {list(ref.shape)}, the model has {list(shape)})")
    if problems:
        raise OffloadError(f"Offload folder {str(folder)!r} is inconsistent: {summarize(problems, 5)}. {fix}",
                           path=str(folder))
    return result
