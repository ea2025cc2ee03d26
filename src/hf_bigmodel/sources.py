"""Checkpoints on disk: find them, validate their index, and read them shard by shard.

A checkpoint is one ``.safetensors`` file, a sharded ``*.safetensors.index.json``, one torch file
(``.bin``/``.pt``/``.pth``, always unpickled with ``weights_only=True``), a sharded
``pytorch_model.bin.index.json``, or a folder holding any of these (safetensors preferred).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidIndexError,
    UnsafeCheckpointError,
    summarize,
)
from .safetensors_io import TensorEntry, read_header, read_tensor

__all__ = ["Checkpoint", "TensorInfo", "find_checkpoint", "read_index", "load_torch_file"]

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".bin", ".pt", ".pth", ".ckpt")
_INDEX_PREFERENCE = (
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
)
_SINGLE_PREFERENCE = ("model.safetensors", "diffusion_pytorch_model.safetensors")
_TORCH_INDEX_PREFERENCE = ("pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json")
_TORCH_SINGLE_PREFERENCE = ("pytorch_model.bin", "diffusion_pytorch_model.bin")


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
    _infos: dict[str, TensorInfo] | None = field(default=None, repr=False)
    _torch_cache: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def scan(self) -> dict[str, TensorInfo]:
        """Every tensor's key, shape, dtype and file, read from headers (safetensors) or an mmap'd load (torch)."""
        if self._infos is None:
            infos: dict[str, TensorInfo] = {}
            for file in self.files:
                if self.format == "safetensors":
                    for key, entry in read_header(file).entries.items():
                        infos[key] = TensorInfo(key, entry.shape, entry.dtype, file, entry)
                else:
                    for key, tensor in self._torch_shard(file).items():
                        infos[key] = TensorInfo(key, tuple(tensor.shape), tensor.dtype, file)
            self._infos = infos
        return self._infos

    def _torch_shard(self, file: str) -> dict[str, torch.Tensor]:
        shard = self._torch_cache.get(file)
        if shard is None:
            shard = load_torch_file(file)
            if _is_mmapped(shard):  # lazy: keeping it costs address space, not memory
                self._torch_cache[file] = shard
        return shard

    def iter_shard(self, file: str, keys: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` for the tensors of one shard (all, or only ``keys``), read one at a time."""
        if self.format == "safetensors":
            entries = [i.entry for i in self.scan().values() if i.file == file and i.entry is not None]
            fd = os.open(file, os.O_RDONLY)
            try:
                for entry in entries:
                    if keys is None or entry.key in keys:
                        yield entry.key, read_tensor(entry, fd=fd)
            finally:
                os.close(fd)
        else:
            shard = self._torch_cache.pop(file, None) or load_torch_file(file)
            for key, tensor in shard.items():
                if keys is None or key in keys:
                    yield key, tensor

    def release(self) -> None:
        """Drop cached torch shards (their mmaps)."""
        self._torch_cache.clear()


def _is_mmapped(state: dict[str, torch.Tensor]) -> bool:
    for tensor in state.values():
        storage = tensor.untyped_storage()
        return bool(getattr(storage, "filename", None))
    return True


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Unpickle a torch checkpoint with ``weights_only=True`` (never runs code), mmap'd when possible."""
    path = str(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refused to load {path!r}: it asks the unpickler for more than tensors ({str(err).splitlines()[0][:200]}). "
            "hf_bigmodel only loads torch files with weights_only=True, so no code inside it ran. "
            "If you trust the file, convert it to safetensors yourself.",
            path=path,
        ) from None
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Checkpoint file {path!r} does not exist.", path=path) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CorruptCheckpointError(
            f"{path!r} is not a readable torch checkpoint ({str(err).splitlines()[0][:200]}). "
            "It is truncated or corrupt; download or save it again.",
            path=path,
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CorruptCheckpointError(
            f"{path!r} does not hold a state dict (a mapping of names to tensors); got {type(state).__name__}.",
            path=path,
        )
    return state


def read_index(index_file: str | Path) -> list[str]:
    """Validate a ``*.index.json`` and return its shard paths in first-use order.

    Rejects non-JSON, a missing ``weight_map``, shard names that are absolute, contain ``..`` or do not
    end in a weights extension, and shards that do not exist, naming the index and every culprit.
    """
    index_file = Path(index_file)
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Index file {str(index_file)!r} does not exist.", path=str(index_file)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidIndexError(
            f"Index file {str(index_file)!r} is not valid JSON ({err}). Download or write it again.",
            path=str(index_file),
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidIndexError(
            f"Index file {str(index_file)!r} has no 'weight_map' object mapping tensor names to shard files.",
            path=str(index_file),
        )
    bad: list[str] = []
    shards: list[str] = []
    for key, shard in weight_map.items():
        if not isinstance(key, str) or not isinstance(shard, str):
            bad.append(f"{key!r} -> {shard!r} (not a string)")
            continue
        if shard not in shards:
            shards.append(shard)
    wanted_ext = SAFETENSORS_EXT if index_file.name.endswith(".safetensors.index.json") else None
    for shard in shards:
        parts = Path(shard).parts
        if os.path.isabs(shard) or shard.startswith(("/", "\\")) or ".." in parts or "\\" in shard:
            bad.append(f"{shard!r} (points outside the index's folder)")
        elif not shard.endswith(wanted_ext or SAFETENSORS_EXT + TORCH_EXT):
            bad.append(f"{shard!r} (not a {'/'.join(wanted_ext or SAFETENSORS_EXT + TORCH_EXT)} file)")
    if bad:
        raise InvalidIndexError(
            f"Index file {str(index_file)!r} names invalid shards: {summarize(bad)}. "
            "Shard names must be plain file names next to the index.",
            path=str(index_file),
        )
    folder = index_file.parent
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"Index file {str(index_file)!r} names shard(s) that are not in {str(folder)!r}: {summarize(missing)}. "
            "The download is incomplete; fetch the missing shards.",
            path=str(index_file),
        )
    return [str(folder / s) for s in shards]


def _format_of(files: list[str], where: str) -> str:
    kinds = {"safetensors" if f.endswith(SAFETENSORS_EXT) else "torch" for f in files}
    if len(kinds) != 1:
        raise InvalidIndexError(f"{where!r} mixes safetensors and torch shards; use one format.", path=where)
    return kinds.pop()


def find_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Resolve a file, an index or a folder into a :class:`Checkpoint` (nothing is read but the index)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"Checkpoint {str(p)!r} does not exist.", path=str(p))
    if p.is_file():
        name = p.name
        if name.endswith(".index.json"):
            files = read_index(p)
            return Checkpoint(str(p), _format_of(files, str(p)), files, index_file=str(p))
        if name.endswith(SAFETENSORS_EXT):
            return Checkpoint(str(p), "safetensors", [str(p)])
        if name.endswith(TORCH_EXT):
            return Checkpoint(str(p), "torch", [str(p)])
        raise CheckpointNotFoundError(
            f"{str(p)!r} is not a checkpoint: expected .safetensors, .bin/.pt/.pth, or a *.index.json.", path=str(p)
        )
    for names, kind in ((_INDEX_PREFERENCE, "index"), (_SINGLE_PREFERENCE, "file"),
                        (_TORCH_INDEX_PREFERENCE, "index"), (_TORCH_SINGLE_PREFERENCE, "file")):
        for name in names:
            if (p / name).is_file():
                return find_checkpoint(p / name)
    entries = sorted(os.listdir(p))
    for ext_group in ((".safetensors.index.json",), (".index.json",), SAFETENSORS_EXT, TORCH_EXT):
        found = [e for e in entries if e.endswith(ext_group) and (p / e).is_file()]
        if found and ext_group[0].endswith(".index.json"):
            if len(found) > 1:
                raise InvalidIndexError(
                    f"Folder {str(p)!r} holds several indexes ({summarize(found)}); pass the one to load.", path=str(p)
                )
            return find_checkpoint(p / found[0])
        if found:
            files = [str(p / e) for e in found]
            return Checkpoint(str(p), _format_of(files, str(p)), files)
    raise CheckpointNotFoundError(
        f"Folder {str(p)!r} holds no checkpoint: looked for *.safetensors, a *.index.json and .bin/.pt/.pth files"
        f"{' (it is empty)' if not entries else ' (found: ' + summarize(entries) + ')'}.",
        path=str(p),
    )
