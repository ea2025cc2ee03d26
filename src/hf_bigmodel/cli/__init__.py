"""``hf-bigmodel``: plan, run and demo big-model inference from the shell (also ``python -m hf_bigmodel``).

Commands::

    hf-bigmodel plan MODEL [--max-memory cpu=2GiB --max-memory 0=10GiB] [--dtype float16] [--json]
    hf-bigmodel run MODEL --prompt "Hello" [--prompt ...] [--chat] [--do-sample --temperature T --top-p P --seed N]
                    [--assistant DRAFT] [--max-new-tokens 20] [--max-memory ...] [--offload-folder DIR]
    hf-bigmodel demo

Every failure is one line, ``hf-bigmodel: error: ...``, naming the option to use
(:mod:`.failures`); the exit status is 2 when the command line must change (a bad ``--max-memory``,
an unknown model, a missing file), 1 when the command was right but failed, 130 when interrupted.
``--debug`` shows the traceback, ``-v`` logs hf_bigmodel's decisions (planning, loading) on stderr.
``--help`` imports neither torch nor transformers (:mod:`.parser`); each command imports what it needs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from .parser import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, PROG, build_parser, check_args

__all__ = ["build_parser", "main"]

logger = logging.getLogger("hf_bigmodel.cli")


class _Formatter(logging.Formatter):
    """``hf-bigmodel: warning: ...`` for problems; ``hf-bigmodel: [planning] ...`` for progress and decisions."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return f"{PROG}: [{record.name.removeprefix('hf_bigmodel.')}] {message}"


#: Loggers whose warnings while a library is imported say nothing about this command: torchao's list of its
#: optional kernels it could not load, torch's deprecation notes about how torchao registers its types.
_IMPORT_CHATTER = ("torchao", "torch.utils._pytree")


@contextmanager
def _logging_to_stderr(verbosity: int) -> Iterator[None]:
    """0: warnings only; 1 (``-v``): progress and the planner's placement decisions; 2 (``-vv``): everything.

    Below ``-vv``, what libraries log while they are imported is left out (:data:`_IMPORT_CHATTER`: torchao
    names each optional CUDA kernel a CPU build lacks), so a failure stays one line. The loggers are
    restored afterwards, so calling :func:`main` in a program or a notebook leaves its logging as it was.
    """
    package = logging.getLogger("hf_bigmodel")
    planning = logging.getLogger("hf_bigmodel.plan.planner")
    saved = (package.level, package.propagate, planning.level)
    chatter = [logging.getLogger(name) for name in _IMPORT_CHATTER]
    chatter_levels = [log.level for log in chatter]
    for log in chatter if verbosity < 2 else ():
        log.setLevel(logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    package.addHandler(handler)
    package.propagate = False
    package.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)
    # The planner logs each placement at DEBUG unless asked for verbose planning; -v asks for it.
    planning.setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.level, package.propagate, planning.level = saved
        for log, level in zip(chatter, chatter_levels):
            log.setLevel(level)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Warnings as ``hf-bigmodel: warning: ...`` one-liners in the options' words, not Python's source dump."""
    from .failures import describe

    text = describe(message) if isinstance(message, Warning) else " ".join(str(message).split())
    print(f"{PROG}: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-bigmodel`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    >>> main(["plan", "path/to/tiny-llama", "--max-memory", "cpu=20KB", "--json"])  # doctest: +SKIP
    0
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    try:
        parser = build_parser()
        args = parser.parse_args(args_list)
        debug = args.debug
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        check_args(args)
        with _logging_to_stderr(args.verbose), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return _dispatch(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_FAILURE)
    except Exception as err:
        if debug:
            raise
        from .failures import describe, exit_status

        print(f"{PROG}: error: {describe(err)}", file=sys.stderr)
        return exit_status(err)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plan":
        from .plan import plan_command

        return plan_command(args)
    if args.command == "run":
        from .run import run_command

        return run_command(args)
    from .demo import demo_command

    return demo_command(args)
