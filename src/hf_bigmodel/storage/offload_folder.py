"""The offload folder: offloaded weights as content-named safetensors files, and its manifest ``index.json``.

Weight files are named by what they hold: the identity of their source (a checkpoint shard's path,
size, mtime, inode and header digest, or a digest of the tensors' bytes) plus every name, dtype and
shape. A file of that name is only ever the same content, so several processes can fill one folder
at once and a later run re-uses a file after checking its header. Files are written to a private
name, flushed to the disk and only then published (:func:`~hf_bigmodel.storage.files.publish`): a
crash never leaves a file whose header promises data its blocks do not hold. What ``index.json``
records, and when it is trusted, is :mod:`.offload_index`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import Advice, CheckpointError, OffloadError, summarize
from ..model.sizes import format_size
from .files import publish
from .offload_index import INDEX_NAME, index_document, load_offload_index
from .safetensors_io import SafetensorsHeader, read_header
from .weights_map import BuiltDiskTensor, DiskRef, DiskTensor, flatten_subclass, subclass_builder

__all__ = ["INDEX_NAME", "OffloadFolder", "content_id", "load_offload_index"]

logger = logging.getLogger(__name__)


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


def content_id(tensors: Mapping[str, torch.Tensor]) -> str:
    """A digest of the tensors' names, dtypes, shapes and bytes: names the file that stores them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "content:" + digest.hexdigest()


def _distinct(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What to store (contiguous CPU tensors, one per set of names viewing the same bytes), and alias -> stored name.

    ``torch.save(model.state_dict())`` keeps tied weights as two names of one storage; safetensors refuses
    shared memory, so each is stored once. Distinct views of one storage get copies of their own.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name in sorted(tensors):
        t = tensors[name].detach()
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        shared = t.numel() > 0 and t.untyped_storage().data_ptr() in storages
        storages.add(t.untyped_storage().data_ptr())
        t = t.to("cpu")
        stored[name] = t.clone() if shared or not t.is_contiguous() else t
    return stored, aliases


def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"os error (\d+)", str(err))  # safetensors' serializer: "I/O error: ... (os error 28)"
    return int(found.group(1)) if found else None


class OffloadFolder:
    """A folder holding offloaded weights as safetensors files and an ``index.json`` manifest."""

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

    def _tmp(self, name: str) -> Path:
        return self.path / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"

    def content_path(self, source_id: str, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> Path:
        """The file :meth:`write` uses for tensors ``{name: (dtype, shape)}`` taken from ``source_id``."""
        digest = hashlib.sha256(source_id.encode())
        for name in sorted(specs):
            dtype, shape = specs[name]
            digest.update(f"|{name}:{_dtype_name(dtype)}:{tuple(shape)}".encode())
        return self.path / f"w-{digest.hexdigest()[:24]}.safetensors"

    def _free(self) -> int | None:
        try:
            return shutil.disk_usage(self.path).free
        except OSError:
            return None

    def check_space(self, nbytes: int) -> None:
        """Raise :class:`OffloadError` now if the folder's disk has less than ``nbytes`` free."""
        free = self._free()
        if free is not None and nbytes > free:
            raise OffloadError(
                f"offload_folder {str(self.path)!r} needs {format_size(nbytes)} for the offloaded weights but its "
                f"disk has {format_size(free)} free. Free {format_size(nbytes - free)} or pass an offload_folder "
                "on a larger disk.",
                path=str(self.path),
            )

    def write(self, tensors: Mapping[str, torch.Tensor], *, source_id: str | None = None) -> dict[str, DiskRef]:
        """Store ``tensors`` in one safetensors file and return where each one lies.

        The file is named by ``source_id`` (the identity of the checkpoint shard they came from) or, without
        one, by a digest of their bytes, so another run re-uses a valid existing file. Names that share
        their bytes (tied weights) are stored once and point at the same place.
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
        if not tensors:
            return {}
        stored, aliases = _distinct(tensors)
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in stored.items()}
        file = self.content_path(source_id if source_id is not None else content_id(stored), specs)
        header = self._reuse(file, specs) if file.is_file() else None
        if header is None:
            header = self._publish(file, stored, replace=file.exists())
        refs = {k: DiskTensor(header.entries[k], t.dtype) for k, t in stored.items()}
        refs.update({alias: refs[name] for alias, name in aliases.items()})
        return refs

    def _publish(self, file: Path, stored: dict[str, torch.Tensor], *, replace: bool) -> SafetensorsHeader:
        from safetensors.torch import save_file

        try:
            publish(file, lambda tmp: save_file(stored, str(tmp)), tmp=self._tmp(file.name), replace=replace)
        except FileExistsError:  # another process published it first: the same content, by its name
            header = self._reuse(file, {k: (t.dtype, tuple(t.shape)) for k, t in stored.items()})
            if header is None:
                return self._publish(file, stored, replace=True)
            return header
        except Exception as err:  # OSError, and safetensors' SafetensorError for the same failures
            if _errno_of(err) is None and not isinstance(err, OSError):
                raise
            raise self._write_error(err, file, stored) from None
        return read_header(file, content_named=True)

    def _write_error(self, err: BaseException, file: Path, tensors: Mapping[str, torch.Tensor]) -> OffloadError:
        needed = sum(t.numel() * t.element_size() for t in tensors.values())
        code = _errno_of(err)
        why = os.strerror(code) if code is not None else str(err)
        free = self._free()
        room = f" ({format_size(needed)} needed, {format_size(free)} free)" if free is not None else ""
        fix = "Free some space or pass another offload_folder."
        if code == 27:  # EFBIG: a file-size limit (ulimit -f) or the file system's largest file
            fix = ("Raise the file-size limit (ulimit -f) or pass an offload_folder on a file system that allows "
                   "larger files.")
        return OffloadError(
            f"Could not write {format_size(needed)} of offloaded weights ({summarize(sorted(tensors), 3)}) to "
            f"offload_folder {str(self.path)!r} (file {file.name}): {why}{room}. {fix}",
            path=str(self.path),
        )

    def _reuse(self, file: Path, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> SafetensorsHeader | None:
        try:
            header = read_header(file, content_named=True)
        except CheckpointError as err:
            logger.warning("Ignoring %s in the offload folder and writing it again: %s", file, err)
            return None
        for name, (dtype, shape) in specs.items():
            entry = header.entries.get(name)
            if entry is None or entry.shape != shape or entry.dtype != dtype:
                logger.warning("Offload file %s does not hold %r as expected; writing it again.", file, name)
                return None
        logger.debug("Re-using offloaded weights in %s", file)
        return header

    def _stored(self, path: str) -> str:
        file = Path(path)
        return file.name if file.parent.resolve() == self.path.resolve() else str(file.resolve())

    def write_index(self, weights: Mapping[str, DiskRef]) -> Path:
        """Record what the folder holds (durably, atomically), for ``dispatch_model(offload_dir=...)``.

        A fused tensor is recorded piece by piece (file, key, and the boxes each piece maps); a built one by
        its parts and what builds it, for the record only: how to build it lives with the loaded model, so
        :func:`load_offload_index` refuses it.
        """
        index = self.path / INDEX_NAME
        text = json.dumps(index_document(weights, self._stored), indent=1)
        try:
            publish(index, lambda tmp: tmp.write_text(text), tmp=self._tmp(INDEX_NAME))
        except OSError as err:
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
