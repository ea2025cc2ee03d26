"""Integrity of downloaded weight files: a cheap check for every load, and a full hash check.

In the Hugging Face cache a blob's file name is its ETag (sha256 for LFS files), so a cached file can
be verified without asking the Hub.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import CorruptCheckpointError, summarize
from ..model.sizes import format_size
from .safetensors_io import read_header
from .torch_io import is_truncated_zip

__all__ = ["verify_cached_file", "check_weight_file_sizes"]

_HASH_RE = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")


def verify_cached_file(path: str | os.PathLike[str]) -> bool:
    """Hash a file of the Hub cache and compare it with its blob's name, which is its ETag (sha256
    for LFS files, the git blob sha1 otherwise). ``False`` when ``path`` is no cache blob.

    Raises :class:`~hf_bigmodel.errors.CorruptCheckpointError` naming the file and the fix.

    >>> verify_cached_file(files.weight_files[0])  # doctest: +SKIP
    True
    """
    link = Path(path)
    blob = link.resolve()
    if not _HASH_RE.match(blob.name):
        return False
    size = blob.stat().st_size
    digest = hashlib.sha256() if len(blob.name) == 64 else hashlib.sha1(b"blob %d\0" % size)
    with open(blob, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        raise CorruptCheckpointError(
            f"Cached file {str(link)!r} is corrupt: its content ({format_size(size)}) hashes to "
            f"{digest.hexdigest()[:16]}… but the cache stored it as {blob.name[:16]}… (blob {str(blob)!r}). "
            "Download it again with force_download=True, or delete the blob and load again.",
            path=str(link),
        )
    return True


def check_weight_file_sizes(
    files: Iterable[str | os.PathLike[str]], *, expected_sizes: Mapping[str, int] | None = None
) -> None:
    """A check cheap enough for every load: each size matches what the Hub listed (``expected_sizes``,
    e.g. ``ModelFiles.expected_sizes``), each safetensors file holds every byte its header names and
    each torch zip keeps its end record. All problems are raised at once (``CorruptCheckpointError``).

    >>> check_weight_file_sizes(files.weight_files, expected_sizes=files.expected_sizes)  # doctest: +SKIP
    """
    expected_sizes = expected_sizes or {}
    problems: dict[str, str] = {}
    for file in [os.fspath(f) for f in files]:
        try:
            size = os.path.getsize(file)
        except OSError:
            problems[file] = f"{file!r} does not exist"
            continue
        want = expected_sizes.get(file)
        if want is not None and want != size:
            problems[file] = f"{file!r} holds {format_size(size)} ({size} B), the Hub lists {want} B"
        elif file.endswith(".safetensors"):
            try:
                read_header(file)
            except CorruptCheckpointError as err:
                problems[file] = str(err).split(". The file")[0]
        elif is_truncated_zip(file):
            problems[file] = f"{file!r} is a torch zip archive without its end record (truncated)"
    if problems:
        raise CorruptCheckpointError(
            f"{len(problems)} weight file(s) are incomplete or corrupt: {summarize(problems.values())}. "
            "Download them again with force_download=True, or delete them and load again.",
            path=next(iter(problems)),
        )
