"""How a failure reads on the command line: one line in the options' words, and its exit status.

Library errors carry their advice as :class:`~hf_bigmodel.errors.Advice` naming call arguments
(``offload_folder``); here each argument is spelled as the option that sets it (``--offload-folder DIR``),
and advice no option can follow is left out. The exit status says who has to act:

- 2: the command line must change (a bad option or value, a MODEL, revision or file that does not
  exist, a model that cannot do what the command needs, or advice naming an option);
- 1: the command was right but failed (network, corrupt files, memory, a bug);
- 130: interrupted.
"""

from __future__ import annotations

import argparse

from ..errors import (
    BigModelError,
    BigModelWarning,
    CheckpointNotFoundError,
    DeviceMapError,
    GatedModelError,
    InvalidMaxMemoryError,
    ModelClassNotFoundError,
    ModelFileNotFoundError,
    ModelNotFoundError,
    RevisionNotFoundError,
)
from .parser import EXIT_FAILURE, EXIT_USAGE, UsageError

__all__ = ["OPTIONS", "cli_spelling", "describe", "exit_status"]

#: Call argument -> the option that sets it and the placeholder shown for its value (``""``: a flag).
OPTIONS: dict[str, tuple[str, str]] = {
    "offload_folder": ("--offload-folder", "DIR"),
    "token": ("--token", "TOKEN"),
    "revision": ("--revision", "REV"),
    "subfolder": ("--subfolder", "DIR"),
    "local_files_only": ("--local-files-only", ""),
    "trust_remote_code": ("--trust-remote-code", ""),
    "max_memory": ("--max-memory", "DEVICE=SIZE"),
    "torch_dtype": ("--dtype", "DTYPE"),
    "dtype": ("--dtype", "DTYPE"),
    "no_split_module_classes": ("--no-split", "CLASS"),
}

#: Errors whose fix is always a different command line (another MODEL, revision, option value).
_USAGE = (UsageError, argparse.ArgumentError, InvalidMaxMemoryError, DeviceMapError, ModelNotFoundError,
          RevisionNotFoundError, ModelFileNotFoundError, CheckpointNotFoundError, ModelClassNotFoundError,
          GatedModelError)


def cli_spelling(argument: str, value: str) -> str | None:
    """The option for a call argument (``None``: the command line has none).

    A quoted example value is shown as typed on the command line, anything else as the placeholder; a
    flag's value is implied by the advice's wording ("load it once without {}").

    >>> cli_spelling("revision", "'main'"), cli_spelling("offload_folder", "...")
    ('--revision main', '--offload-folder DIR')
    >>> cli_spelling("local_files_only", "True"), cli_spelling("weight_names", "[...]")
    ('--local-files-only', None)
    """
    if argument not in OPTIONS:
        return None
    option, placeholder = OPTIONS[argument]
    if not placeholder:
        return option
    literal = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" and " " not in value
    return f"{option} {value[1:-1] if literal else placeholder}"


def describe(err: BaseException) -> str:
    """An exception (or warning) as one line: its message with the advice the command line can follow."""
    text = err.describe(cli_spelling) if isinstance(err, (BigModelError, BigModelWarning)) else str(err)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    return text or type(err).__name__


def exit_status(err: BaseException) -> int:
    """2 when the command line must change (see the module docstring), 1 for everything else."""
    if isinstance(err, _USAGE):
        return EXIT_USAGE
    if isinstance(err, BigModelError) and any(a.render(cli_spelling) for a in err.advice):
        return EXIT_USAGE
    return EXIT_FAILURE
