"""Files as the loader trusts them: who they are, reading them exactly, and publishing them durably.

A weights file is read at byte offsets taken when it was planned. Re-saving it (a header a few bytes
longer), truncating or replacing it would make those offsets read garbage, so every planned file
carries a :class:`FileIdentity` (size, modification time, inode and a digest of its header) and every
read checks it: when the file is opened (its stat and header) and after each read (an ``fstat`` of the
open descriptor, about a microsecond, so bytes of a file written meanwhile are never used). A changed
file raises
:class:`~hf_bigmodel.errors.FileChangedError` naming it; it is never read.

What a later run trusts (offload files, their index) is written to a private name, flushed to the
disk (``fsync``) and only then renamed into place (:func:`publish`), so a crash or power loss leaves
either the old file, or the whole new one, never a header over zeroed blocks.

Residual risk, said plainly: a file rewritten in place with the same size within one tick of the file
system's clock (and the same header) keeps its identity; nothing short of hashing every byte on
every read would see it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptCheckpointError, FileChangedError, summarize
from ..model.sizes import format_size

__all__ = ["FileIdentity", "discard", "header_digest", "pread_exact", "publish"]


def header_digest(data: bytes) -> str:
    """The digest recorded for a file's header bytes (sha256, hex)."""
    return hashlib.sha256(data).hexdigest()


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + f".{ns % 10**9:09d}"


@dataclass(frozen=True)
class FileIdentity:
    """What a file was when it was planned: size, mtime, inode/device and its header's digest.

    ``header_end`` bytes from the start are the header (``0``: none recorded, the stat alone is compared).
    A ``content_named`` file (an offload-folder file, named by what it holds and never rewritten with
    other bytes) may be re-published by another process under a new inode: only its size and header count.
    """

    path: str
    size: int
    mtime_ns: int
    inode: int
    device: int
    header_end: int = 0
    header: str = ""
    content_named: bool = False

    @classmethod
    def of(cls, path: str, st: os.stat_result, *, header: bytes = b"", content_named: bool = False) -> FileIdentity:
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, len(header),
                   header_digest(header) if header else "", content_named)

    def changes(self, st: os.stat_result) -> list[str]:
        """How ``st`` differs from this identity (empty: same file, unchanged as far as a stat can tell)."""
        found = []
        if (st.st_ino, st.st_dev) != (self.inode, self.device) and not self.content_named:
            found.append("it was replaced by another file (new inode)")
        if st.st_size != self.size:
            found.append(f"its size went from {format_size(self.size)} ({self.size} B) to "
                         f"{format_size(st.st_size)} ({st.st_size} B)")
        if st.st_mtime_ns != self.mtime_ns and not self.content_named:
            found.append(f"it was modified at {_when(st.st_mtime_ns)} (planned: {_when(self.mtime_ns)})")
        return found

    def error(self, changes: list[str]) -> FileChangedError:
        return FileChangedError(
            f"{self.path!r} changed after it was planned for this model: {summarize(changes)}. Its tensors lie at "
            "byte offsets read before the change, so reading it now would give wrong weights; nothing was read. "
            "Keep weight files unchanged while a model uses them (save new weights to another folder), then "
            "load the model again.",
            path=self.path,
        )

    def check_stat(self, st: os.stat_result) -> None:
        changes = self.changes(st)
        if changes:
            raise self.error(changes)

    def check_fd(self, fd: int) -> None:
        """The cheap check before a group of reads: one ``fstat`` of the open descriptor."""
        self.check_stat(os.fstat(fd))

    def check_header(self, fd: int) -> None:
        """Compare the header bytes with the digest recorded at planning time (once per open)."""
        if not self.header_end:
            return
        with open(fd, "rb", closefd=False) as f:  # read as read_header reads it (a header, not tensor data)
            f.seek(0)
            data = f.read(self.header_end)
        if header_digest(data) != self.header:
            raise self.error(["its header (the tensors' names, dtypes, shapes and offsets) is different"])

    def open(self, flags: int = os.O_RDONLY) -> int:
        """Open the file and check it is still the one planned (stat and header); returns the descriptor.

        The header is read through a buffered descriptor (an ``O_DIRECT`` one cannot read into any buffer);
        with other ``flags`` the returned descriptor is checked to be the same file.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise self.error(["it no longer exists"]) from None
        try:
            self.check_fd(fd)
            self.check_header(fd)
            if flags == os.O_RDONLY:
                return fd
            other = os.open(self.path, flags)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        try:
            self.check_fd(other)
        except BaseException:
            os.close(other)
            raise
        return other

    def check(self) -> None:
        """Open-and-check without keeping the descriptor (before handing the path to another reader)."""
        os.close(self.open())


def pread_exact(fd: int, view: memoryview, offset: int, *, path: str, what: str, need: int | None = None,
                identity: FileIdentity | None = None) -> int:
    """Read from ``offset`` of ``fd`` into ``view`` until ``need`` bytes (default: all of it) are in (the one
    ``pread`` loop); returns the bytes read, which may exceed ``need`` (an ``O_DIRECT`` read of a padded span).

    With ``identity`` (the file as planned) the descriptor is checked after the read (one ``fstat``): a
    write, truncation or re-save that happened before or during the read changes its size or mtime, so
    bytes read from a changed file raise :class:`~hf_bigmodel.errors.FileChangedError` instead of being
    used. Raises :class:`~hf_bigmodel.errors.CorruptCheckpointError` naming ``path`` and ``what`` when the
    file ends first (and the stat shows no change).
    """
    need = len(view) if need is None else need
    done = 0
    while done < need:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            if identity is not None:
                identity.check_fd(fd)
            raise CorruptCheckpointError(
                f"{path!r} ended while reading {what} (byte {offset + done}, {need - done} B short); the file "
                "was truncated or replaced after it was opened. Download or write it again.",
                path=path,
            )
        done += n
    if identity is not None:
        identity.check_fd(fd)
    return done


def discard(path: Path) -> None:
    """Remove a temporary file we created, whatever state the disk is in."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def _fsync_path(path: Path, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_replace(tmp: Path, final: Path) -> None:
    try:
        os.link(tmp, final)  # atomic, and fails rather than replace
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: the last writer wins (same content, by its name)
        os.replace(tmp, final)
    else:
        discard(tmp)


def publish(final: Path, write: Callable[[Path], object], *, tmp: Path, replace: bool = True) -> None:
    """Write ``final`` durably: ``write(tmp)``, ``fsync`` it, rename it to ``final``, ``fsync`` the folder.

    Readers see either no file or the whole file, even after a crash or a power loss. ``tmp`` (a
    private name in the same folder) is removed on any failure; errors propagate. Without ``replace``
    an existing ``final`` is kept (``FileExistsError``): a file another process published first, still
    open in its readers, keeps its inode.
    """
    try:
        write(tmp)
        _fsync_path(tmp)
        if replace:
            os.replace(tmp, final)
        else:
            _link_or_replace(tmp, final)
    except BaseException:
        discard(tmp)
        raise
    with contextlib.suppress(OSError):  # some file systems refuse fsync on folders; the rename is done
        _fsync_path(final.parent, folder=True)
