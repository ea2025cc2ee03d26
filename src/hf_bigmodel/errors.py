"""Every exception hf_bigmodel raises, in one place.

Each one also inherits the builtin exception that callers already catch (``ValueError``,
``FileNotFoundError``, ``OSError``...), and carries the offending object as attributes so programs
can react without parsing messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "BigModelError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DeviceMapError",
    "GatedModelError",
    "HubError",
    "InvalidIndexError",
    "InvalidMaxMemoryError",
    "ModelClassNotFoundError",
    "ModelFileNotFoundError",
    "ModelNotFoundError",
    "OfflineCacheMissError",
    "OffloadError",
    "RevisionNotFoundError",
    "UnsafeCheckpointError",
    "summarize",
]


def summarize(items: Iterable[Any], limit: int = 10) -> str:
    """``a, b, c (+N more)``: a list cut to ``limit`` entries for error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown


class BigModelError(Exception):
    """Base class of every error raised by hf_bigmodel."""


class InvalidMaxMemoryError(BigModelError, ValueError):
    """A ``max_memory`` entry is malformed, negative or names a device this machine lacks."""

    def __init__(self, message: str, *, key: Any = None, value: Any = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


class DeviceMapError(BigModelError, ValueError):
    """A device map names modules that do not exist, leaves weights unplaced or uses a bad device."""

    def __init__(self, message: str, *, modules: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.modules = list(modules)


class CheckpointError(BigModelError):
    """Base class of the problems found in a checkpoint."""

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path, or a shard named by its index, does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A weights file is truncated, has a malformed header or cannot be decoded."""


class InvalidIndexError(CheckpointError, ValueError):
    """A ``*.index.json`` is not JSON, lacks ``weight_map`` or points outside its folder."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A torch pickle asked to run code or build objects that plain tensors never need."""


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """Checkpoint keys do not match the model: missing, unexpected or mis-shaped tensors.

    The message reuses PyTorch's wording (``Missing key(s) in state_dict``) so it reads familiar.
    """

    def __init__(
        self,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
        path: Any = None,
        hint: str = "",
    ) -> None:
        self.missing_keys = list(missing)
        self.unexpected_keys = list(unexpected)
        self.mismatched_keys = list(mismatched)
        lines = [f"Error(s) in loading the checkpoint {str(path)!r} into the model:" if path else
                 "Error(s) in loading the checkpoint into the model:"]
        if self.missing_keys:
            lines.append(f"  Missing key(s) in state_dict ({len(self.missing_keys)}): {summarize(self.missing_keys)}.")
        if self.unexpected_keys:
            lines.append(
                f"  Unexpected key(s) in state_dict ({len(self.unexpected_keys)}): {summarize(self.unexpected_keys)}."
            )
        if self.mismatched_keys:
            shown = [f"{k}: checkpoint {list(c)} vs model {list(m)}" for k, c, m in self.mismatched_keys]
            lines.append(f"  Size mismatch ({len(shown)}): {summarize(shown)}.")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines), path=path)


class OffloadError(BigModelError, OSError):
    """The offload folder cannot be created, written or trusted."""

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:  # OSError would otherwise format errno/strerror
        return str(self.args[0]) if self.args else ""


class ModelClassNotFoundError(BigModelError, ValueError):
    """A config names a model class that no installed library provides."""


class HubError(BigModelError, OSError):
    r"""Base class of the problems met while finding a model's files (on the Hub or in a local folder).

    Like transformers' ``from_pretrained`` errors these are ``OSError``\s; each carries ``repo_id``
    (the name or path asked for), ``revision`` and ``filename`` (``None`` where not relevant).
    """

    def __init__(
        self,
        message: str,
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        filename: str | None = None,
    ) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision
        self.filename = filename

    def __str__(self) -> str:  # OSError would otherwise format errno/strerror/filename
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(HubError, FileNotFoundError):
    """The name is neither an existing local folder nor a repository the Hub knows (or lets you see)."""


class RevisionNotFoundError(HubError, FileNotFoundError):
    """The repository exists but the branch, tag or commit asked for does not."""


class ModelFileNotFoundError(HubError, FileNotFoundError):
    """A file the model needs (config, weights, index, a shard) is missing from the repo or folder."""


class GatedModelError(HubError, PermissionError):
    """The repo is gated: accept its terms on the Hub and authenticate (``token=`` or ``hf auth login``)."""


class OfflineCacheMissError(HubError, FileNotFoundError):
    """The Hub cannot or may not be reached (offline mode, ``local_files_only``) and the cache lacks a file.

    (Offline by choice, or because the network failed: the message says which.)
    """
