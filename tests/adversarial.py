"""Helpers for the adversarial suites: isolated child processes, real tiny disks and read-only mounts.

``run_isolated`` runs a snippet in a fresh Python with an address-space cap and a timeout, so a crash
(SIGBUS, SIGSEGV), a runaway allocation or a hang fails the test instead of taking the test run down;
the snippet reports through ``report(value)`` (one JSON line). ``tiny_tmpfs`` and ``read_only_view``
stage full disks and read-only file systems for real (we are root on CI); where mounting is not
permitted the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
GiB = 2**30

_PRELUDE = """
import json as _json, sys as _sys
def report(value):
    print("REPORT " + _json.dumps(value), flush=True)
"""


def run_isolated(code: str, *, memory: int = 3 * GiB, timeout: float = 120, file_size: int | None = None,
                 cwd: Path | None = None) -> Any:
    """Run ``code`` in a child Python (``import torch`` costs ~0.7 GiB of address space) and return its report.

    A child killed by a signal, out of time, or exiting non-zero fails the test with its stderr.
    ``file_size`` caps the size of files it writes (RLIMIT_FSIZE: writes past it fail with EFBIG).
    """

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")]),
               HF_BIGMODEL_DISABLE_PROGRESS_BARS="1")
    try:
        proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=cwd, preexec_fn=limits, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish within {timeout} s (a hang)")
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        pytest.fail(f"the child was killed by {name}: a crash, not an error\n{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report from the child\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("REPORT "):])


def _mount(*args: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` (``"256k"``) mounted at ``path`` for the block: writes past it get ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only_view(source: Path, path: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``path``: every write there fails with EROFS, even for root."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(path))
    try:
        proc = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {proc.stderr.strip()[:200]}")
        yield path
    finally:
        _umount(path)
