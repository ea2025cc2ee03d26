"""Every exception hf_bigmodel raises, in one place.

Each one also inherits the builtin exception that callers already catch (``ValueError``,
``FileNotFoundError``, ``OSError``...), and carries the offending object as attributes so programs
can react without parsing messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Advice",
    "BigModelError",
    "BigModelWarning",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DeviceMapError",
    "DtypeError",
    "FileChangedError",
    "GatedModelError",
    "HubError",
    "InvalidIndexError",
    "InvalidMaxMemoryError",
    "ModelClassNotFoundError",
    "ModelFileNotFoundError",
    "ModelNotFoundError",
    "OfflineCacheMissError",
    "OffloadError",
    "OffloadedWeightUseError",
    "PipelineError",
    "RankFailedError",
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


#: How an interface names an argument: ``(argument, value) -> text``, or ``None`` when it has no such option.
Spelling = Callable[[str, str], "str | None"]


def python_spelling(argument: str, value: str) -> str:
    """``offload_folder='path'``: how a Python caller passes an argument."""
    return f"{argument}={value}"


@dataclass(frozen=True)
class Advice:
    """One thing to do about an error that takes an argument of the call, in the words of the caller's interface.

    ``text`` is a sentence with ``{}`` where the argument goes. Python callers read ``argument=value``;
    the command line reads its option (``hf_bigmodel.cli`` spells them) and leaves out advice it has no
    option for, so the message itself must say what failed and why without it.

    >>> advice = Advice("Pass {} so they can be written there.", "offload_folder", "'offload'")
    >>> advice.render()
    "Pass offload_folder='offload' so they can be written there."
    >>> advice.render(lambda argument, value: "--offload-folder DIR")
    'Pass --offload-folder DIR so they can be written there.'
    """

    text: str
    argument: str
    value: str = "..."

    def render(self, spelling: Spelling = python_spelling) -> str | None:
        spelled = spelling(self.argument, self.value)
        return None if spelled is None else self.text.format(spelled)


class _Advised(Exception):
    """A message and :class:`Advice`; ``str()`` spells the advice for Python, :meth:`describe` for another interface."""

    advice: tuple[Advice, ...] = ()

    def __init__(self, *args: Any, advice: Sequence[Advice] = ()) -> None:
        super().__init__(*args)
        self.advice = tuple(advice)

    @property
    def message(self) -> str:
        """What happened and why, without the advice."""
        return str(self.args[0]) if self.args else ""

    def describe(self, spelling: Spelling = python_spelling) -> str:
        """The message, then each piece of advice ``spelling`` can express."""
        rendered = (a.render(spelling) for a in self.advice)
        return " ".join([self.message, *(text for text in rendered if text)]).strip()

    def __str__(self) -> str:
        return self.describe()


class BigModelError(_Advised):
    """Base class of every error raised by hf_bigmodel.

    ``advice`` (:class:`Advice`) says what to do in terms of the call's arguments; ``str(err)`` is the
    message followed by the advice as Python spells it, :meth:`describe` renders it for another interface.
    """


class BigModelWarning(_Advised, UserWarning):
    """A warning hf_bigmodel gives with advice naming arguments, rendered like :class:`BigModelError`'s."""


class InvalidMaxMemoryError(BigModelError, ValueError):
    """A ``max_memory`` entry is malformed, negative or names a device this machine lacks."""

    def __init__(self, message: str, *, key: Any = None, value: Any = None, advice: Sequence[Advice] = ()) -> None:
        super().__init__(message, advice=advice)
        self.key = key
        self.value = value


class DeviceMapError(BigModelError, ValueError):
    """A device map names modules that do not exist, leaves weights unplaced or uses a bad device."""

    def __init__(self, message: str, *, modules: Sequence[str] = (), advice: Sequence[Advice] = ()) -> None:
        super().__init__(message, advice=advice)
        self.modules = list(modules)


class DtypeError(BigModelError, ValueError):
    """A dtype asked for cannot hold the weights' values (``torch.int8`` for a floating-point checkpoint)."""

    def __init__(self, message: str, *, dtype: Any = None, names: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.dtype = dtype
        self.names = list(names)


class CheckpointError(BigModelError):
    """Base class of the problems found in a checkpoint."""

    def __init__(self, message: str, *, path: Any = None, advice: Sequence[Advice] = ()) -> None:
        super().__init__(message, advice=advice)
        self.path = path


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path, or a shard named by its index, does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A weights file is truncated, has a malformed header or cannot be decoded."""


class InvalidIndexError(CheckpointError, ValueError):
    """A ``*.index.json`` is not JSON, lacks ``weight_map`` or points outside its folder."""


class UnsafeCheckpointError(CheckpointError, ValueError):
    """A torch pickle asked to run code or build objects that plain tensors never need."""


class FileChangedError(CheckpointError, OSError):
    """A weights file changed (size, modification time, inode or header) after it was planned.

    Raised before anything is read from it: offsets taken from the old file would read wrong weights.
    """

    def __str__(self) -> str:  # OSError would otherwise format errno/strerror
        return str(self.args[0]) if self.args else ""


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

    def __init__(self, message: str, *, path: Any = None, advice: Sequence[Advice] = ()) -> None:
        super().__init__(message, advice=advice)
        self.path = path


class OffloadedWeightUseError(BigModelError, RuntimeError):
    """An offloaded weight's idle placeholder took part in a computation (it was never brought in)."""

    def __init__(self, message: str, *, names: Sequence[str] = (), advice: Sequence[Advice] = ()) -> None:
        super().__init__(message, advice=advice)
        self.names = list(names)


class UnsupportedQuantizationError(BigModelError, ValueError):
    """A model is quantized with a method hf_bigmodel does not load (refused before anything is read)."""

    def __init__(self, message: str, *, method: str | None = None, advice: Sequence[Advice] = ()) -> None:
        super().__init__(message, advice=advice)
        self.method = method


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
        advice: Sequence[Advice] = (),
    ) -> None:
        super().__init__(message, advice=advice)
        self.repo_id = repo_id
        self.revision = revision
        self.filename = filename


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


class PipelineError(BigModelError, RuntimeError):
    """A pipeline across processes cannot run: a model or an argument it does not support, or a broken protocol.

    ``rank`` is the process that raised it (``None`` before the processes know their ranks).
    """

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


class RankFailedError(PipelineError):
    """Another process of the pipeline failed or vanished, so this one stops too.

    ``failed_rank`` names it, ``reason`` says why (its own error, or how it was lost), ``host`` where it ran.
    """

    def __init__(self, message: str, *, rank: int | None = None, failed_rank: int, reason: str,
                 host: str | None = None) -> None:
        super().__init__(message, rank=rank)
        self.failed_rank = failed_rank
        self.reason = reason
        self.host = host
