"""Checkpoints on disk: find them, scan what they hold, and read them shard by shard.

A checkpoint is one ``.safetensors`` file, a sharded ``*.safetensors.index.json``, one torch file
(``.bin``/``.pt``/``.pth``, always unpickled with ``weights_only=True``), a sharded
``pytorch_model.bin.index.json``, or a folder holding any of these (the one preference order of
:data:`~hf_bigmodel.storage.index.DEFAULT_WEIGHT_NAMES`).

Scanning records every file's identity; reading a shard checks it again, so a file changed between
planning and loading is an error, never other weights. A tensor name held by two shards is an error
naming both (an index decides which shard holds each name; a folder without one cannot say).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidIndexError, summarize
from .files import FileIdentity
from .index import (
    DEFAULT_WEIGHT_NAMES,
    INDEX_SUFFIX,
    SAFETENSORS_EXT,
    TORCH_EXT,
    CheckpointIndex,
    parse_index,
    read_index,
    read_weight_map,
)
from .safetensors_io import TensorEntry, read_header, read_tensor
from .torch_io import load_torch_file, load_torch_shard

__all__ = ["Checkpoint", "TensorInfo", "find_checkpoint", "load_torch_file", "read_index", "read_weight_map"]


@dataclass(frozen=True)
class TensorInfo:
    """What the checkpoint says about one tensor, known before its data is read."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    entry: TensorEntry | None = None  # byte range, for safetensors files


@dataclass
class Checkpoint:
    """A resolved checkpoint: its files in load order and, once scanned, every tensor's metadata."""

    path: str
    format: str  # "safetensors" | "torch"
    files: list[str]
    index_file: str | None = None
    index: CheckpointIndex | None = field(default=None, repr=False)
    _infos: dict[str, TensorInfo] | None = field(default=None, repr=False)
    _identities: dict[str, FileIdentity] = field(default_factory=dict, repr=False)
    _torch_cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def scan(self) -> dict[str, TensorInfo]:
        """Every tensor's key, shape, dtype and file, read from headers (safetensors) or an mmap'd load (torch).

        Records each file's identity. A name in two files, or in another shard than the index says,
        raises :class:`~hf_bigmodel.errors.CorruptCheckpointError` naming both files.
        """
        if self._infos is None:
            infos: dict[str, TensorInfo] = {}
            duplicates: list[str] = []
            for file in self.files:
                for info in self._scan_file(file):
                    seen = infos.get(info.key)
                    if seen is not None:
                        duplicates.append(f"{info.key!r} in {seen.file!r} and {file!r}")
                    infos[info.key] = info
            if duplicates:
                raise CorruptCheckpointError(
                    f"Checkpoint {self.path!r} holds tensor(s) in more than one file: {summarize(duplicates, 3)}. "
                    "Which copy is meant cannot be told; remove the stale shard or re-download the checkpoint.",
                    path=self.path,
                )
            self._check_index(infos)
            self._infos = infos
        return self._infos

    def _scan_file(self, file: str) -> list[TensorInfo]:
        if self.format == "safetensors":
            header = read_header(file)
            self._identities[file] = header.identity
            return [TensorInfo(key, e.shape, e.dtype, file, e) for key, e in header.entries.items()]
        self._identities[file] = FileIdentity.of(file, os.stat(file))
        return [TensorInfo(key, tuple(t.shape), t.dtype, file) for key, t in self._torch_shard(file).items()]

    def _check_index(self, infos: dict[str, TensorInfo]) -> None:
        """Every name the index assigns to a shard must be in that shard (missing everywhere: the loader's call)."""
        if self.index is None:
            return
        wrong = []
        for key, shard in self.index.weight_map.items():
            info = infos.get(key)
            expected = self.index.shard_path(shard)
            if info is not None and info.file != expected:
                wrong.append(f"{key!r} (index: {expected!r}; found in {info.file!r})")
        if wrong:
            raise CorruptCheckpointError(
                f"Index file {self.index.path!r} disagrees with its shards: {summarize(wrong, 3)}. The index or a "
                "shard is stale; re-download the checkpoint.",
                path=self.index.path,
            )

    def identity(self, file: str) -> FileIdentity:
        """The identity ``file`` had when it was scanned."""
        self.scan()
        return self._identities[file]

    def _torch_shard(self, file: str) -> dict[str, torch.Tensor]:
        shard = self._torch_cache.get(file)
        if shard is None:
            shard, mapped = load_torch_shard(file)
            if mapped:  # lazy: keeping it costs address space, not memory
                self._torch_cache[file] = shard
        return shard

    def iter_shard(self, file: str, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for the tensors of one shard (all, or only ``keys``), read one at a time.

        Every tensor owns its memory (mapped torch tensors are copied), and the file is checked against its
        scanned identity before the first read and after the last, so what was read is what was planned.
        """
        identity = self.identity(file)
        if self.format == "safetensors":
            entries = [i.entry for i in self.scan().values() if i.file == file and i.entry is not None]
            fd = identity.open()
            try:
                for entry in entries:
                    if keys is None or entry.key in keys:
                        yield entry.key, read_tensor(entry, fd=fd)
                identity.check_fd(fd)
            finally:
                os.close(fd)
            return
        identity.check()
        cached = self._torch_cache.pop(file, None)
        shard, mapped = (cached, True) if cached is not None else load_torch_shard(file)
        for key, tensor in shard.items():
            if keys is None or key in keys:
                yield key, tensor.clone() if mapped else tensor
        identity.check()

    def keys(self) -> list[str]:
        """Every tensor key of :attr:`files`: from the index when sharded (no shard is opened), else the file's."""
        if self.index_file is not None:
            files = set(self.files)
            return [key for key, file in read_weight_map(self.index_file).items() if file in files]
        return list(self.scan())

    def release(self) -> None:
        """Drop cached torch shards (their mmaps)."""
        self._torch_cache.clear()


def _format_of(files: list[str], where: str) -> str:
    kinds = {"safetensors" if f.endswith(SAFETENSORS_EXT) else "torch" for f in files}
    if len(kinds) != 1:
        raise InvalidIndexError(f"{where!r} mixes safetensors and torch shards; use one format.", path=where)
    return kinds.pop()


def find_checkpoint(path: str | os.PathLike[str], *, require_shards: bool = True) -> Checkpoint:
    """Resolve a file, an index or a folder into a :class:`Checkpoint` (nothing is read but the index).

    ``require_shards=False`` accepts an index whose shards are not all present yet (a pipeline stage
    fetches only its own; reading an absent shard then fails naming it).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"Checkpoint {str(p)!r} does not exist.", path=str(p))
    if p.is_file():
        name = p.name
        if name.endswith(INDEX_SUFFIX):
            index = parse_index(p)
            files = read_index(p) if require_shards else [index.shard_path(s) for s in index.shards]
            return Checkpoint(str(p), _format_of(files, str(p)), files, index_file=str(p), index=index)
        if name.endswith(SAFETENSORS_EXT):
            return Checkpoint(str(p), "safetensors", [str(p)])
        if name.endswith(TORCH_EXT):
            return Checkpoint(str(p), "torch", [str(p)])
        raise CheckpointNotFoundError(
            f"{str(p)!r} is not a checkpoint: expected .safetensors, .bin/.pt/.pth, or a *.index.json.", path=str(p)
        )
    for name in DEFAULT_WEIGHT_NAMES:
        if (p / name).is_file():
            return find_checkpoint(p / name, require_shards=require_shards)
    entries = sorted(os.listdir(p))
    for ext_group in ((".safetensors.index.json",), (".index.json",), SAFETENSORS_EXT, TORCH_EXT):
        found = [e for e in entries if e.endswith(ext_group) and (p / e).is_file()]
        if found and ext_group[0].endswith(".index.json"):
            if len(found) > 1:
                raise InvalidIndexError(
                    f"Folder {str(p)!r} holds several indexes ({summarize(found)}); pass the one to load.", path=str(p)
                )
            return find_checkpoint(p / found[0], require_shards=require_shards)
        if found:
            files = [str(p / e) for e in found]
            return Checkpoint(str(p), _format_of(files, str(p)), files)
    raise CheckpointNotFoundError(
        f"Folder {str(p)!r} holds no checkpoint: looked for *.safetensors, a *.index.json and .bin/.pt/.pth files"
        f"{' (it is empty)' if not entries else ' (found: ' + summarize(entries) + ')'}.",
        path=str(p),
    )
