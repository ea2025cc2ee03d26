"""Weight file names, and the one validator of sharded checkpoints' ``*.index.json``.

An index comes from the Hub or a downloaded folder and is untrusted: before any shard is opened, its
JSON, its ``weight_map`` and every shard name are checked (a plain weights file inside the index's
folder: no absolute path, drive, ``..`` or backslash, the index's own extension). Both the Hub
resolver (before downloading shards) and the checkpoint reader (before reading them) use it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import CheckpointNotFoundError, InvalidIndexError, summarize
from .safetensors_io import refetch_advice

__all__ = [
    "DEFAULT_WEIGHT_NAMES",
    "DIFFUSERS_WEIGHT_NAMES",
    "INDEX_SUFFIX",
    "SAFETENSORS_EXT",
    "TORCH_EXT",
    "TRANSFORMERS_WEIGHT_NAMES",
    "CheckpointIndex",
    "parse_index",
    "read_index",
    "read_weight_map",
]

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".bin", ".pt", ".pth", ".ckpt")
INDEX_SUFFIX = ".index.json"
TRANSFORMERS_WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin",
)
#: The one preference order, for the Hub and for folders: safetensors (either library's names) before
#: torch pickles; within a library, an index before a single file.
DEFAULT_WEIGHT_NAMES = (*TRANSFORMERS_WEIGHT_NAMES[:2], *DIFFUSERS_WEIGHT_NAMES[:2],
                        *TRANSFORMERS_WEIGHT_NAMES[2:], *DIFFUSERS_WEIGHT_NAMES[2:])


@dataclass(frozen=True)
class CheckpointIndex:
    """A validated index: its shards (names relative to its folder, in first-use order) and weight map."""

    path: str
    shards: list[str]
    weight_map: dict[str, str]  # tensor name -> shard name

    @property
    def folder(self) -> Path:
        return Path(self.path).parent

    def shard_path(self, shard: str) -> str:
        return os.path.join(os.path.dirname(self.path), shard)


def _allowed_extensions(index_name: str) -> tuple[str, ...]:
    """``model.safetensors.index.json`` -> ``(".safetensors",)``; an index named otherwise: any weights file."""
    ext = PurePosixPath(index_name.removesuffix(INDEX_SUFFIX)).suffix
    return (ext,) if ext in SAFETENSORS_EXT + TORCH_EXT else SAFETENSORS_EXT + TORCH_EXT


_CONTROL = re.compile(r"[\x00-\x1f]")


def _shard_problem(shard: str, allowed: tuple[str, ...]) -> str | None:
    """Why ``shard`` (a name from an index) is not a plain weights file inside the index's folder, or None.

    String operations only (no ``Path`` per name): an index may name 100,000 shards.
    """
    if not shard:
        return "an empty name"
    if _CONTROL.search(shard):
        return "a name with control characters"
    try:
        encoded = os.fsencode(shard)
    except UnicodeError:
        return "a name the file system cannot encode"
    if shard.startswith(("/", "\\")) or "\\" in shard or ":" in shard or os.path.isabs(shard):
        return "points outside the index's folder"
    parts = shard.split("/")
    if ".." in parts:
        return "points outside the index's folder"
    if not shard.endswith(allowed):
        return f"not a {'/'.join(allowed)} file"
    if len(encoded) > 255 and any(len(os.fsencode(part)) > 255 for part in parts):
        return "a name longer than file systems allow"
    return None


def _load_json(index_file: Path) -> object:
    where = str(index_file)
    try:
        return json.loads(index_file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"Index file {where!r} does not exist.", path=where) from None
    except IsADirectoryError:
        raise CheckpointNotFoundError(
            f"Index file {where!r} is a folder; pass the *.index.json file or the folder holding it.", path=where
        ) from None
    except OSError as err:
        raise InvalidIndexError(f"Index file {where!r} cannot be read ({err.strerror or err}).", path=where) from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, huge integers
        why = "it nests too deep" if isinstance(err, RecursionError) else str(err)[:200]
        raise InvalidIndexError(
            f"Index file {where!r} is not valid JSON ({why}). {refetch_advice(where)}", path=where
        ) from None


def parse_index(index_file: str | os.PathLike[str]) -> CheckpointIndex:
    """Validate an index's JSON, ``weight_map`` and shard names (not whether the shards exist yet).

    Linear in the size of the index. Every bad entry is listed in one :class:`InvalidIndexError` that
    names the index.
    """
    index_file = Path(index_file)
    where = str(index_file)
    data = _load_json(index_file)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidIndexError(
            f"Index file {where!r} has no 'weight_map' object mapping tensor names to shard files. "
            + refetch_advice(where),
            path=where,
        )
    bad: list[str] = []
    shards: dict[str, None] = {}  # ordered set: first-use order, linear time
    for key, shard in weight_map.items():
        if isinstance(shard, str):
            shards.setdefault(shard)
        else:
            bad.append(f"{key!r} -> {str(shard)[:60]!r} (not a string)")
    allowed = _allowed_extensions(index_file.name)
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
    return CheckpointIndex(where, list(shards), dict(weight_map))


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):  # a path too long for the OS counts as absent
        return False


def read_weight_map(index_file: str | os.PathLike[str]) -> dict[str, str]:
    """Validate a ``*.index.json`` and return its ``weight_map`` (tensor key -> shard path), shards unchecked.

    The shards need not exist (a pipeline stage fetches only its own); see :func:`parse_index`.

    Example::

        read_weight_map("ckpt/model.safetensors.index.json")
        # {"embed.weight": "ckpt/model-00001-of-00002.safetensors", ...}
    """
    index = parse_index(index_file)
    paths = {shard: index.shard_path(shard) for shard in index.shards}
    return {key: paths[shard] for key, shard in index.weight_map.items()}


def read_index(index_file: str | os.PathLike[str]) -> list[str]:
    """Validate a ``*.index.json`` and return its shard paths in first-use order.

    Rejects non-JSON, a missing ``weight_map``, shard names that are not strings, are absolute, contain
    ``..``, backslashes or drive letters, or do not end in the index's weights extension
    (:class:`InvalidIndexError`), and shards that do not exist (:class:`CheckpointNotFoundError`), naming
    the index and every culprit.

    Example::

        read_index("ckpt/model.safetensors.index.json")
        # ["ckpt/model-00001-of-00002.safetensors", "ckpt/model-00002-of-00002.safetensors"]
    """
    index = parse_index(index_file)
    missing = [s for s in index.shards if not _is_file(index.shard_path(s))]
    if missing:
        raise CheckpointNotFoundError(
            f"Index file {index.path!r} names shard(s) that are not in {str(index.folder)!r}: {summarize(missing)}. "
            "The download is incomplete; fetch the missing shards.",
            path=index.path,
        )
    return [index.shard_path(s) for s in index.shards]
