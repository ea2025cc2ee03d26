"""Torch checkpoints (``.bin``/``.pt``/``.pth``): unpickled with ``weights_only=True``, checked like torch checks.

``torch.load(mmap=True)`` maps each storage at the offset of its zip record and trusts the record: a
compressed (deflated) record or one shorter than its storage is read as garbage, where a load without
the map decompresses, or refuses, it. So before mapping, the zip directory and the pickle's storage
list are compared without running the pickle (:func:`mappable`): every data record must be stored
uncompressed and hold exactly its storage's bytes. A record of the wrong size is refused; anything
the check cannot vouch for (compression, a storage type it does not know, an odd pickle) is loaded
without the map, where torch checks every record itself.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError, summarize
from ..model.sizes import format_size
from .safetensors_io import refetch_advice

__all__ = ["is_truncated_zip", "load_torch_file", "load_torch_shard", "mappable"]

#: Bytes per element of the storage classes torch.save names in its pickles.
_STORAGE_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QInt8Storage": 1, "QInt32Storage": 4,
    "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}
_MARK = object()


def is_truncated_zip(path: str) -> bool:
    """A zip-format torch file (torch >= 1.6) whose end record, written last, is missing."""
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    return is_zip and not zipfile.is_zipfile(path)


def _persistent_ids(data: bytes) -> list[object]:
    """The persistent ids of a pickle (torch's storage references), found without running it.

    A small stack machine over :mod:`pickletools` opcodes: values that reach a persistent id (strings,
    integers, globals, tuples, memo entries) are tracked, everything else is an opaque placeholder.
    Nothing is imported or called.
    """
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[object, object] = {}
    found: list[object] = []
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg))
        elif name == "GLOBAL":
            stack.append(("global", arg))
        elif name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
            stack.append(("global", f"{module} {qualname}"))
        elif name == "TUPLE":
            start = marks.pop()
            items = tuple(stack[start:])
            del stack[start:]
            stack.append(items)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[len(stack) - count:])
            del stack[len(stack) - count:]
            stack.append(items)
        elif name == "BINPERSID":
            found.append(stack.pop())
            stack.append(None)
        elif name == "PERSID":
            found.append(arg)
            stack.append(None)
        else:
            _generic(op, arg, stack, marks)
    return found


def _generic(op: pickletools.OpcodeInfo, arg: object, stack: list[object], marks: list[int]) -> None:
    """Apply an opcode's stack effect with placeholders (its argument, for one that pushes a literal)."""
    before = op.stack_before
    if pickletools.markobject in before:
        del stack[marks.pop():]
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    if below:
        del stack[len(stack) - below:]
    after = op.stack_after
    if not before and len(after) == 1 and arg is not None:
        stack.append(arg)
    else:
        stack.extend([None] * len(after))


def _storage_sizes(archive: zipfile.ZipFile, prefix: str) -> dict[str, int] | None:
    """Record key -> bytes its storage needs, from the pickle; None when some storage cannot be sized."""
    try:
        ids = _persistent_ids(archive.read(prefix + "data.pkl"))
    except Exception:  # noqa: BLE001  (an odd pickle: torch's own loader decides)
        return None
    sizes: dict[str, int] = {}
    for pid in ids:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            return None
        kind, key, numel = pid[1], pid[2], pid[4]
        name = kind[1].rpartition(" ")[2] if isinstance(kind, tuple) and len(kind) == 2 else None
        itemsize = _STORAGE_ITEMSIZE.get(name) if isinstance(name, str) else None
        if itemsize is None or not isinstance(key, str) or not isinstance(numel, int):
            return None
        sizes[key] = numel * itemsize
    return sizes


def mappable(path: str) -> bool:
    """Whether ``torch.load(path, mmap=True)`` reads what a load without the map would.

    False (load without the map) for a legacy (non-zip) file, a compressed record or a pickle the check
    cannot size; raises :class:`CorruptCheckpointError` for a record whose size is not its storage's.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return False
    with archive:
        infos = archive.infolist()
        pickles = [i.filename for i in infos if i.filename.endswith("data.pkl")]
        if len(pickles) != 1:
            return False
        prefix = pickles[0].removesuffix("data.pkl")
        records = {i.filename[len(prefix) + 5:]: i for i in infos if i.filename.startswith(prefix + "data/")}
        if any(i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size for i in records.values()):
            return False
        sizes = _storage_sizes(archive, prefix)
    if sizes is None:
        return False
    wrong = [f"{prefix}data/{key} holds {records[key].file_size} B, its storage needs {need} B"
             if key in records else f"{prefix}data/{key} is missing" for key, need in sizes.items()
             if key not in records or records[key].file_size != need]
    if wrong:
        raise CorruptCheckpointError(
            f"{path!r} is not a consistent torch checkpoint: {summarize(wrong, 3)}. Loading it would read other "
            f"tensors' bytes. {refetch_advice(path)}",
            path=path,
        )
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


def _unpickle(path: str) -> tuple[object, bool]:
    size = os.stat(path).st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path!r} is empty (0 bytes). {refetch_advice(path)}", path=path)
    if is_truncated_zip(path):
        raise CorruptCheckpointError(
            f"{path!r} is a truncated torch checkpoint: it holds {format_size(size)} but the zip directory "
            f"that ends every torch.save file is missing, so its end was cut off. {refetch_advice(path)}",
            path=path,
        )
    mapped = mappable(path)
    return torch.load(path, map_location="cpu", mmap=mapped, weights_only=True), mapped


def load_torch_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Unpickle a torch checkpoint with ``weights_only=True`` (never runs code), mmap'd when that is safe.

    A pickle that asks for anything but tensors and plain containers raises :class:`UnsafeCheckpointError`
    (nothing in it ran); an empty, truncated, inconsistent or undecodable file raises
    :class:`CorruptCheckpointError` naming it and saying how to get a good copy. Tensors of a mapped
    file are views of a private map: copy those you keep (:meth:`Checkpoint.iter_shard` does).

    Example::

        state = load_torch_file("ckpt/pytorch_model.bin")   # {"layer.weight": tensor(...), ...}
    """
    return load_torch_shard(path)[0]


def load_torch_shard(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """:func:`load_torch_file`, and whether its tensors are views of a memory map of the file."""
    path = str(path)
    try:
        state, mapped = _unpickle(path)
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
    return state, mapped
