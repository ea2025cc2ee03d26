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

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidIndexError,
    UnsafeCheckpointError,
    summarize,
)
from ..model.sizes import format_size
from .safetensors_io import TensorEntry, read_header, read_tensor, refetch_advice

__all__ = ["Checkpoint", "TensorInfo", "find_checkpoint", "load_torch_file", "read_index", "read_weight_map"]

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

    def keys(self) -> list[str]:
        """Every tensor key of :attr:`files`: from the index when sharded (no shard is opened), else the file's."""
        if self.index_file is not None:
            files = set(self.files)
            return [key for key, file in read_weight_map(self.index_file).items() if file in files]
        return list(self.scan())

    def release(self) -> None:
        """Drop cached torch shards (their mmaps)."""
        self._torch_cache.clear()


def _is_mmapped(state: dict[str, torch.Tensor]) -> bool:
    for tensor in state.values():
        storage = tensor.untyped_storage()
        return bool(getattr(storage, "filename", None))
    return True


def _first_line(err: BaseException) -> str:
    """The telling line of an exception message (torch prefixes its own boilerplate), cut to 200 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "nsupported" in line:
            return line[:200]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line for line in lines if not line.startswith(boilerplate)] or lines
    return lines[0][:200] if lines else type(err).__name__


def _is_truncated_zip(path: str) -> bool:
    """A zip-format torch file (torch >= 1.6) whose end record, written last, is missing."""
    import zipfile

    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return is_zip and not zipfile.is_zipfile(path)


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Unpickle a torch checkpoint with ``weights_only=True`` (never runs code), mmap'd when possible.

    A pickle that asks for anything but tensors and plain containers raises :class:`UnsafeCheckpointError`
    (nothing in it ran); an empty, truncated or undecodable file raises :class:`CorruptCheckpointError`
    naming it and saying how to get a good copy.

    Example::

        state = load_torch_file("ckpt/pytorch_model.bin")   # {"layer.weight": tensor(...), ...}
    """
    path = str(path)
    try:
        size = os.stat(path).st_size
        if size == 0:
            raise CorruptCheckpointError(f"{path!r} is empty (0 bytes). {refetch_advice(path)}", path=path)
        if _is_truncated_zip(path):
            raise CorruptCheckpointError(
                f"{path!r} is a truncated torch checkpoint: it holds {format_size(size)} but the zip directory "
                f"that ends every torch.save file is missing, so its end was cut off. {refetch_advice(path)}",
                path=path,
            )
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err) and "zip" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"Refused to load {path!r}: the weights-only unpickler rejected it ({_first_line(err)}). It asks for "
            "more than tensors (code or arbitrary objects), or it is corrupt. hf_bigmodel only loads torch files "
            "with weights_only=True, so nothing inside it ran. If you trust the file, convert it to safetensors "
            "yourself; otherwise get the weights from a trusted source.",
            path=path,
        ) from None
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Checkpoint file {path!r} does not exist.", path=path) from None
    except (CorruptCheckpointError, MemoryError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001  (untrusted bytes fail inside torch/zip/pickle in many ways)
        detail = type(err).__name__ + (f": {_first_line(err)}" if str(err).strip() else "")
        raise CorruptCheckpointError(
            f"{path!r} is not a readable torch checkpoint ({detail}). It is truncated or corrupt. "
            f"{refetch_advice(path)}",
            path=path,
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CorruptCheckpointError(
            f"{path!r} does not hold a state dict (a mapping of names to tensors); got {type(state).__name__}.",
            path=path,
        )
    odd = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not isinstance(k, str) or
           not isinstance(v, torch.Tensor)]
    if odd:
        raise CorruptCheckpointError(
            f"{path!r} is not a plain state dict: entries {summarize(odd)} are not name -> tensor pairs. "
            "Save model.state_dict() (names to tensors only), or pass a checkpoint that holds just the weights.",
            path=path,
        )
    return state


def _shard_problem(shard: str, allowed: tuple[str, ...]) -> str | None:
    """Why ``shard`` (a name from an index) is not a plain weights file inside the index's folder, or None."""
    if not shard:
        return "an empty name"
    if any(ord(c) < 32 for c in shard):
        return "a name with control characters"
    try:
        os.fsencode(shard)
    except UnicodeError:
        return "a name the file system cannot encode"
    if os.path.isabs(shard) or shard.startswith(("/", "\\")) or "\\" in shard or ":" in shard:
        return "points outside the index's folder"
    if ".." in Path(shard).parts:
        return "points outside the index's folder"
    if not shard.endswith(allowed):
        return f"not a {'/'.join(allowed)} file"
    if any(len(os.fsencode(part)) > 255 for part in Path(shard).parts):
        return "a name longer than file systems allow"
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a path too long for the OS counts as absent
        return False


def read_weight_map(index_file: str | Path) -> dict[str, str]:
    """Validate a ``*.index.json`` and return its ``weight_map`` (tensor key -> shard path), shards unchecked.

    Rejects non-JSON, a missing ``weight_map``, shard names that are not strings, are absolute, contain
    ``..``, backslashes or drive letters, or do not end in a weights extension (:class:`InvalidIndexError`),
    naming the index and every culprit. The shards need not exist: a pipeline stage fetches only its own.

    Example::

        read_weight_map("ckpt/model.safetensors.index.json")
        # {"embed.weight": "ckpt/model-00001-of-00002.safetensors", ...}
    """
    index_file = Path(index_file)
    where = str(index_file)
    try:
        data = json.loads(index_file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Index file {where!r} does not exist.", path=where) from None
    except IsADirectoryError:
        raise CheckpointNotFoundError(
            f"Index file {where!r} is a folder; pass the *.index.json file or the folder holding it.", path=where
        ) from None
    except OSError as err:
        raise InvalidIndexError(f"Index file {where!r} cannot be read ({err.strerror or err}).", path=where) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise InvalidIndexError(
            f"Index file {where!r} is not valid JSON ({str(err)[:200]}). {refetch_advice(where)}", path=where
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidIndexError(
            f"Index file {where!r} has no 'weight_map' object mapping tensor names to shard files. "
            + refetch_advice(where),
            path=where,
        )
    bad: list[str] = []
    shards: list[str] = []
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            bad.append(f"{key!r} -> {str(shard)[:60]!r} (not a string)")
        elif shard not in shards:
            shards.append(shard)
    allowed = SAFETENSORS_EXT if index_file.name.endswith(".safetensors.index.json") else SAFETENSORS_EXT + TORCH_EXT
    for shard in shards:
        problem = _shard_problem(shard, allowed)
        if problem is not None:
            bad.append(f"{shard[:120]!r} ({problem})")
    if bad:
        raise InvalidIndexError(
            f"Index file {where!r} names invalid shards: {summarize(bad)}. "
            "Shard names must be plain weights file names next to the index; the index is damaged or "
            "was not made for this folder.",
            path=where,
        )
    folder = index_file.parent
    return {key: str(folder / shard) for key, shard in weight_map.items()}


def read_index(index_file: str | Path) -> list[str]:
    """Validate a ``*.index.json`` (see :func:`read_weight_map`) and return its shard paths in first-use order.

    Shards that do not exist raise :class:`CheckpointNotFoundError` naming the index and every missing one.

    Example::

        read_index("ckpt/model.safetensors.index.json")
        # ["ckpt/model-00001-of-00002.safetensors", "ckpt/model-00002-of-00002.safetensors"]
    """
    shards = list(dict.fromkeys(read_weight_map(index_file).values()))
    missing = [os.path.relpath(s, Path(index_file).parent) for s in shards if not _is_file(Path(s))]
    if missing:
        raise CheckpointNotFoundError(
            f"Index file {str(index_file)!r} names shard(s) that are not in {str(Path(index_file).parent)!r}: "
            f"{summarize(missing)}. The download is incomplete; fetch the missing shards.",
            path=str(index_file),
        )
    return shards


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
        if name.endswith(".index.json"):
            files = read_index(p) if require_shards else list(dict.fromkeys(read_weight_map(p).values()))
            return Checkpoint(str(p), _format_of(files, str(p)), files, index_file=str(p))
        if name.endswith(SAFETENSORS_EXT):
            return Checkpoint(str(p), "safetensors", [str(p)])
        if name.endswith(TORCH_EXT):
            return Checkpoint(str(p), "torch", [str(p)])
        raise CheckpointNotFoundError(
            f"{str(p)!r} is not a checkpoint: expected .safetensors, .bin/.pt/.pth, or a *.index.json.", path=str(p)
        )
    for names in (_INDEX_PREFERENCE, _SINGLE_PREFERENCE, _TORCH_INDEX_PREFERENCE, _TORCH_SINGLE_PREFERENCE):
        for name in names:
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
