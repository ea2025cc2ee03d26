"""``hf-bigmodel run``: load a model dispatched, continue one prompt or a batch of them, report the speed.

With ``--assistant`` a small draft model, loaded whole in RAM, proposes tokens that the model checks
several at a time (transformers' assisted generation): offloaded weights are read once per check.

The generated text is the only thing on stdout (one prompt: streamed as it comes; several: one block
each); huggingface_hub's download bars, hf_bigmodel's loading bar and the closing timing line go to
stderr, so ``hf-bigmodel run ... > out.txt`` keeps just the text.

Under a launcher that starts several processes (``torchrun --nproc-per-node N -m hf_bigmodel run ...``,
or ``torchrun ... --no-python hf-bigmodel run ...``: ``WORLD_SIZE`` > 1) the model is loaded with
``pipeline=True``: each process holds one stage within its own ``--max-memory``, all of them generate
together (greedily), and rank 0 alone prints the text. Every process prints its own timing line (its stage).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelClassNotFoundError, ModelFileNotFoundError
from ..model.sizes import format_size
from ..plan.devices import Device
from ..plan.placement import Placement
from .failures import describe, exit_status
from .generate import Prompts, Sampling, TextStream, completion, count_new_tokens, encode_prompts
from .model import Source, prepare
from .options import parse_dtype, parse_max_memory
from .parser import EXIT_USAGE, UsageError

__all__ = ["execution_device", "run_command"]

logger = logging.getLogger(__name__)


def execution_device(device_map: Mapping[str, Device]) -> torch.device:
    """Where inputs go for a dispatched model: its first accelerator, else the CPU.

    >>> execution_device({"embed": 0, "layers": "cpu", "head": "disk"})
    device(type='cuda', index=0)
    """
    return Placement.of(device_map).main_torch_device


def _placement_summary(device_map: Mapping[str, Device]) -> str:
    counts: dict[str, int] = {}
    for device in device_map.values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return ", ".join(f"{n} on {d}" for d, n in counts.items())


def _load_tokenizer(name: str, source: Source, *, own: bool) -> Any:
    """The tokenizer of ``name``: the model's own (``own``: at its revision) or ``--tokenizer``'s."""
    from transformers import AutoTokenizer

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise ModelFileNotFoundError(f"No tokenizer could be loaded from {name!r}: there is no such folder. Pass "
                                     "--tokenizer with a folder or repo id that has one.", repo_id=name)
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=source.revision if own else None, token=source.token,
            local_files_only=source.local_files_only, trust_remote_code=source.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileNotFoundError(
            f"No tokenizer could be loaded from {name!r} ({first}). Pass --tokenizer with a folder or repo id "
            "that has one (tokenizer.json, or the files of a slow tokenizer).",
            repo_id=name, revision=source.revision if own else None,
        ) from err


def _check_can_generate(model_class: type[nn.Module] | None, name: str) -> None:
    """Fail before loading anything when the config's model class has no ``generate``."""
    can = getattr(model_class, "can_generate", None)
    if model_class is None or not callable(getattr(model_class, "generate", None)) or (callable(can) and not can()):
        class_name = getattr(model_class, "__name__", "a model without a class")
        raise ModelClassNotFoundError(
            f"{name!r} loads as {class_name}, which cannot generate text. 'run' needs a causal or seq2seq "
            "language model (its config's architectures, e.g. LlamaForCausalLM or T5ForConditionalGeneration)."
        )


def run_command(args: argparse.Namespace) -> int:
    """``hf-bigmodel run``: print each prompt's continuation (streamed for one prompt), then load time and speed."""
    from ..hf.pretrained import load_pretrained_dispatched
    from ..parallel.world import launched_world_size

    sampling = Sampling.from_args(args)
    budgets = parse_max_memory(args.max_memory)
    dtype = parse_dtype(args.dtype)
    source = Source.from_args(args)
    ctx, _ = prepare(source)
    _check_can_generate(ctx.model_class, args.model)
    draft = Source(args.assistant, token=source.token, local_files_only=source.local_files_only,
                   trust_remote_code=source.trust_remote_code) if args.assistant else None
    if draft is not None:
        _check_assistant(draft)  # before the long load
    tokenizer = _load_tokenizer(args.tokenizer or args.model, source, own=args.tokenizer is None)
    decoder_only = not getattr(ctx.config, "is_encoder_decoder", False)
    prompts = encode_prompts(tokenizer, args.prompt, chat=args.chat, decoder_only=decoder_only,
                             name=args.tokenizer or args.model)

    pipelined = launched_world_size() > 1
    if pipelined:
        _check_pipeline_options(args)
    start = time.perf_counter()
    model = load_pretrained_dispatched(
        args.model, device_map="auto", torch_dtype=dtype, max_memory=budgets, offload_folder=args.offload_folder,
        no_split_module_classes=args.no_split or None, pipeline=pipelined, **source.load_kwargs,
    )
    load_seconds = time.perf_counter() - start
    device_map: dict[str, Device] = dict(getattr(model, "hf_device_map", {"": "cpu"}))
    logger.info("Placement: %s", device_map)
    assisted = _load_assistant(draft, model, tokenizer, dtype) if draft is not None else {}
    forwards = _CallCounter(model)
    pipeline = getattr(model, "pipeline", None) if pipelined else None
    prints = pipeline is None or pipeline.stage == 0  # every rank of a pipeline holds the same tokens: one prints

    # A pipeline takes its inputs on the CPU (each stage moves them to its own device).
    inputs = prompts.inputs.to("cpu" if pipeline is not None else execution_device(device_map))
    stream = TextStream(tokenizer) if len(args.prompt) == 1 and prints else None
    if stream is not None:
        sys.stdout.write(prompts.shown[0])
        sys.stdout.flush()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling.seed_now()
    start = time.perf_counter()
    with torch.inference_mode(), _quiet_assistant_calls():
        output = model.generate(  # type: ignore[operator]
            **inputs, max_new_tokens=args.max_new_tokens, pad_token_id=pad, streamer=stream,
            **sampling.generate_kwargs(), **assisted,
        )
    seconds = time.perf_counter() - start
    forwards.remove()
    if pipeline is not None:
        pipeline.close()  # on every rank: its last sends flushed, so no rank exits while another still waits
    new = output[:, inputs["input_ids"].shape[1]:] if decoder_only else output[:, 1:]  # seq2seq: start token
    if prints and stream is None:
        _print_completions(tokenizer, prompts, inputs["input_ids"] if decoder_only else output[:, :1], new)
    elif stream is not None:
        print()
    count = count_new_tokens(new, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    first = f"; first after {stream.first_token_at - start:.2f} s" if stream and stream.first_token_at else ""
    if assisted:
        first += f"; {forwards.calls} forward passes of the model, checking the assistant's drafts"
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    stage = "" if pipeline is None else f"stage {pipeline.stage} of {pipeline.num_stages}: "
    print(
        f"{stage}Loaded {type(model).__name__} in {load_seconds:.2f} s ({_placement_summary(device_map)}; "
        f"{format_size(weights)} resident); generated {count} tokens in {seconds:.2f} s "
        f"({count / seconds if seconds > 0 else float('inf'):.1f} tokens/s{first}).",
        file=sys.stderr,
    )
    return 0


def _check_pipeline_options(args: argparse.Namespace) -> None:
    """Options a pipeline (several processes under torchrun) cannot honour, refused before loading."""
    for given, option in ((args.assistant, "--assistant"), (args.do_sample, "--do-sample")):
        if given:
            raise UsageError(f"argument {option}: under torchrun (WORLD_SIZE > 1) run loads a pipeline, which "
                             f"generates greedily without an assistant; leave out {option}, or run in one process.")


def _check_assistant(draft: Source) -> None:
    """The draft model exists and can generate; a mistake names --assistant."""
    try:
        _check_can_generate(prepare(draft)[0].model_class, draft.name_or_path)
    except Exception as err:
        if exit_status(err) != EXIT_USAGE:
            raise
        raise UsageError(f"argument --assistant: {describe(err)}") from err


def _load_assistant(draft: Source, model: nn.Module, tokenizer: Any, dtype: torch.dtype | str | None
                    ) -> dict[str, Any]:
    """``generate``'s arguments for assisted generation: the draft model loaded whole in RAM and, when its
    vocabulary differs from the model's, both tokenizers (transformers then translates between them)."""
    from ..hf.pretrained import load_pretrained_dispatched

    start = time.perf_counter()
    assistant = load_pretrained_dispatched(draft.name_or_path, device_map={"": "cpu"}, torch_dtype=dtype,
                                           **draft.load_kwargs)
    logger.info("Assistant %s loaded in RAM in %.2f s", type(assistant).__name__, time.perf_counter() - start)
    kwargs: dict[str, Any] = {"assistant_model": assistant}
    if _vocab_size(assistant) != _vocab_size(model):
        kwargs["tokenizer"] = tokenizer
        try:
            kwargs["assistant_tokenizer"] = _load_tokenizer(draft.name_or_path, draft, own=True)
        except ModelFileNotFoundError as err:
            raise UsageError(
                f"argument --assistant: {draft.name_or_path!r} has a vocabulary of {_vocab_size(assistant)} tokens "
                f"and the model {_vocab_size(model)}, so its own tokenizer is needed to translate, and none could "
                "be loaded from it; pass a draft folder or repo id with its tokenizer files."
            ) from err
    return kwargs


def _vocab_size(model: nn.Module) -> int | None:
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


class _InternalCallFilter(logging.Filter):
    """Drops transformers' deprecation notice about its own assistant call (``generate`` given both a
    generation config and arguments): nothing the user typed causes it, nothing they can do about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing `generation_config` together with generation-related")


@contextmanager
def _quiet_assistant_calls() -> Iterator[None]:
    log = logging.getLogger("transformers.generation.utils")
    quiet = _InternalCallFilter()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


class _CallCounter:
    """Counts a module's forward calls (a forward hook) until :meth:`remove`."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def _print_completions(tokenizer: Any, prompts: Prompts, prefixes: torch.Tensor, new: torch.Tensor) -> None:
    """Each prompt's text, as ``head`` separates files: ``==> prompt 1/3 <==`` above each, a blank line between."""
    total = len(prompts.shown)
    for i, shown in enumerate(prompts.shown):
        if i:
            print()
        print(f"==> prompt {i + 1}/{total} <==")
        print(shown + completion(tokenizer, prefixes[i].tolist(), new[i].tolist()))
    sys.stdout.flush()
