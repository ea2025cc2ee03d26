"""Greedy generation across pipeline stages for transformers causal language models.

``model.generate(...)`` of a model loaded with ``pipeline=True`` runs here, on every rank at once. The
batch is cut into micro-batches (``micro_batches=``, default: one per stage) that follow each other
through the stages, and each micro-batch goes on to its next token as soon as the last stage chose it,
so once the pipeline is full every stage is busy with a different micro-batch. Each stage keeps its own
KV cache per micro-batch, for its own blocks only. The last stage picks the tokens (greedy, as
``generate`` with ``do_sample=False``) and sends them to every rank; every rank returns the same
sequences, equal to what ``generate`` gives in one process.

The inputs of each forward are those transformers' ``generate`` would pass (the model's own
``prepare_inputs_for_generation``; attention mask and position ids grown as ``generate`` grows them).
Settings that change which token greedy decoding picks (repetition penalty, forced or suppressed
tokens, minimum lengths, beams, sampling...) are refused rather than ignored.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PipelineError
from ..parallel.channel import Incoming, Kind, MessageId
from ..parallel.pipeline import OP_GENERATE, Pipeline
from ..parallel.runtime import map_tensors

__all__ = ["attach_generation", "pipeline_generate"]

#: GenerationConfig fields whose other values change greedy tokens (or ask for outputs a pipeline lacks).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "do_sample": (False, None), "num_beams": (1, None), "num_beam_groups": (1, None),
    "num_return_sequences": (1, None), "repetition_penalty": (1.0, None), "encoder_repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None), "encoder_no_repeat_ngram_size": (0, None), "bad_words_ids": (None,),
    "min_length": (0, None), "min_new_tokens": (0, None), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "stop_strings": (None,), "constraints": (None,), "force_words_ids": (None,),
    "diversity_penalty": (0.0, None), "prompt_lookup_num_tokens": (None,), "max_time": (None,),
    "cache_implementation": (None,), "prefill_chunk_size": (None,), "output_scores": (False, None),
    "output_logits": (False, None), "return_dict_in_generate": (False, None), "output_attentions": (False, None),
    "output_hidden_states": (False, None), "penalty_alpha": (None,), "dola_layers": (None,), "use_cache": (True,),
    "token_healing": (False, None), "low_memory": (False, None), "assistant_early_exit": (None,),
}


def _refuse(message: str, pipeline: Pipeline) -> PipelineError:
    return PipelineError(message, rank=pipeline.stage)


def _generation_config(model: nn.Module, pipeline: Pipeline, given: Any, kwargs: dict[str, Any]) -> Any:
    """The model's generation config updated with ``kwargs``; settings a pipeline cannot honour raise."""
    hf_model: Any = model
    config = copy.deepcopy(given if given is not None else hf_model.generation_config)
    extra = config.update(**kwargs)
    if extra:
        raise TypeError(f"generate() of a pipelined model got unsupported argument(s) {sorted(extra)}: it takes "
                        "input_ids, attention_mask, max_new_tokens/max_length, eos/pad token ids, micro_batches.")
    changed = [f"{name}={getattr(config, name)!r}" for name, neutral in _NEUTRAL.items()
               if hasattr(config, name) and getattr(config, name) not in neutral]
    if changed:
        raise _refuse(
            f"Pipelined generate() decodes greedily and cannot apply {', '.join(changed)} (set in the call or in the "
            "model's generation_config): these change which token is chosen. Pass neutral values (e.g. "
            "do_sample=False, repetition_penalty=1.0), or generate on one process.", pipeline)
    return config


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


@dataclass
class _MicroBatch:
    """One slice of the batch going through the stages: its sequences, cache and pending tokens."""

    index: int
    ids: torch.Tensor  # [b, S + generated]
    mask: torch.Tensor  # [b, S + generated]
    positions: torch.Tensor  # [b, S + generated]
    cache: Any
    unfinished: torch.Tensor  # [b] long
    generated: int = 0
    done: bool = False
    incoming: Incoming | None = None
    chosen: torch.Tensor | None = None
    inputs: dict[str, Any] = field(default_factory=dict)


class _Generation:
    """The state of one ``generate`` call on this rank."""

    def __init__(self, model: nn.Module, pipeline: Pipeline, config: Any, max_new: int, eos: list[int],
                 pad: int | None) -> None:
        self.model, self.pipeline, self.config, self.max_new = model, pipeline, config, max_new
        self.hf_model: Any = model  # transformers' attributes, untyped here
        self.eos = torch.tensor(eos, dtype=torch.long)
        self.pad = pad
        self.op = pipeline.begin(OP_GENERATE)
        self.streamer: Any = None  # transformers' streamer protocol: put(prompt), put(tokens) per step, end()
        self.accepts_logits_to_keep = "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def new_cache(self) -> Any:
        """A cache holding this stage's blocks; entries of other stages' blocks alias one of this stage's."""
        from transformers import DynamicCache

        text_config = self.hf_model.config.get_text_config(decoder=True)
        cache = DynamicCache(config=text_config)
        layers = getattr(cache, "layers", None)
        blocks = self.pipeline.plan.blocks
        if not isinstance(layers, list) or len(layers) != len(blocks):
            raise _refuse(f"The KV cache of {type(self.model).__name__} does not have one layer per block of "
                          f"{self.pipeline.plan.spine!r}; pipelined generation cannot give each stage its own.",
                          self.pipeline)
        start, stop = self.pipeline.plan.block_range(self.pipeline.stage)
        for j in [*range(0, start), *range(stop, len(layers))]:
            same = [i for i in range(start, stop) if type(layers[i]) is type(layers[j])
                    and getattr(layers[i], "sliding_window", None) == getattr(layers[j], "sliding_window", None)]
            layers[j] = layers[same[0] if same else start]  # answers "how long is the cache" for masks
        return cache

    def start(self, index: int, ids: torch.Tensor, mask: torch.Tensor) -> _MicroBatch:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return _MicroBatch(index, ids, mask, positions, self.new_cache(),
                           torch.ones(ids.shape[0], dtype=torch.long))

    def forward(self, mb: _MicroBatch, step: int) -> None:
        """Run this stage's part of the forward of ``mb``; the last stage chooses and sends its tokens."""
        extra = {"logits_to_keep": 1} if self.accepts_logits_to_keep else {}
        inputs = self.hf_model.prepare_inputs_for_generation(
            mb.ids, next_sequence_length=None if step == 0 else 1, cache=mb.cache, attention_mask=mb.mask,
            position_ids=mb.positions, use_cache=True, is_first_iteration=step == 0, **extra)
        at = MessageId(self.op, step, mb.index)
        device = self.pipeline.device  # where this stage takes its inputs (its GPU, or the CPU)
        inputs = map_tensors(inputs, lambda t: t.to(device))
        out = self.pipeline.run(at, self.model, **inputs, return_dict=True)
        shape = (mb.ids.shape[0],)
        if self.pipeline.is_last:
            logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            chosen = torch.argmax(logits, dim=-1).cpu()
            if self.pad is not None:
                chosen = chosen * mb.unfinished + self.pad * (1 - mb.unfinished)
            mb.chosen = self.pipeline.share(chosen, kind=Kind.TOKENS, at=at, shape=shape, dtype=torch.long,
                                            what="sharing the chosen tokens")  # type: ignore[assignment]
        else:
            shared = self.pipeline.share(None, kind=Kind.TOKENS, at=at, shape=shape, dtype=torch.long,
                                         what=f"waiting for the tokens of micro-batch {mb.index}")
            mb.incoming = shared if isinstance(shared, Incoming) else None

    def advance(self, mb: _MicroBatch) -> None:
        """Append ``mb``'s tokens of the last forward; it is done when every sequence ended or is long enough."""
        tokens = mb.incoming.wait().cpu() if mb.incoming is not None else mb.chosen
        assert tokens is not None
        mb.incoming, mb.chosen = None, None
        mb.ids = torch.cat([mb.ids, tokens[:, None].to(mb.ids.device)], dim=-1)
        mb.mask = torch.cat([mb.mask, mb.mask.new_ones((mb.mask.shape[0], 1))], dim=-1)
        mb.positions = torch.cat([mb.positions, mb.positions[:, -1:] + 1], dim=-1)
        mb.generated += 1
        if self.streamer is not None:
            self.streamer.put(tokens)
        if len(self.eos):
            mb.unfinished = mb.unfinished & ~torch.isin(tokens, self.eos)
        mb.done = mb.generated >= self.max_new or int(mb.unfinished.max()) == 0


def _prompt(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    if len(args) > 1:
        raise TypeError("generate() of a pipelined model takes the input ids as its only positional argument.")
    ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise TypeError("generate() of a pipelined model needs input_ids, a [batch, length] tensor of token ids.")
    return ids, kwargs.pop("attention_mask", None)


def _attention_mask(ids: torch.Tensor, mask: Any, pad: int | None, eos: list[int]) -> torch.Tensor:
    """The given mask, else the one ``generate`` infers: padding where the pad token (not also EOS) appears."""
    if mask is not None:
        return torch.as_tensor(mask, dtype=torch.long).cpu()
    if pad is not None and pad not in eos and bool((ids == pad).any()):
        return ids.ne(pad).long()
    return torch.ones_like(ids, dtype=torch.long)


def pipeline_generate(model: nn.Module, pipeline: Pipeline, *args: Any, micro_batches: int | None = None,
                      **kwargs: Any) -> torch.Tensor:
    """Greedy ``generate`` across the stages (every rank calls it with the same inputs and gets the same output).

    ``streamer`` (one sequence): as in transformers, ``put`` the prompt then each token as it comes, ``end``.
    """
    with pipeline.guard("generating"):
        ids, given_mask = _prompt(model, args, kwargs)
        streamer = kwargs.pop("streamer", None)
        if streamer is not None and ids.shape[0] != 1:
            raise ValueError("A streamer takes one sequence; generate() got a batch of "
                             f"{ids.shape[0]} (transformers' streamers only support batch size 1 too).")
        config = _generation_config(model, pipeline, kwargs.pop("generation_config", None), kwargs)
        eos = _token_ids(config.eos_token_id)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        device = ids.device
        ids = ids.detach().cpu()
        mask = _attention_mask(ids, given_mask, pad, eos)
        max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - ids.shape[1]
        if max_new <= 0:
            return ids.to(device)
        gen = _Generation(model, pipeline, config, max_new, eos, pad)
        gen.streamer = streamer
        if streamer is not None:
            streamer.put(ids)
        count = max(1, min(micro_batches or pipeline.num_stages, ids.shape[0]))
        size = math.ceil(ids.shape[0] / count)
        mbs = [gen.start(i, ids[r: r + size], mask[r: r + size]) for i, r in enumerate(range(0, ids.shape[0], size))]
        with torch.inference_mode():
            for step in range(max_new):
                for mb in mbs:
                    if step > 0 and not mb.done:
                        gen.advance(mb)
                    if not mb.done:
                        gen.forward(mb, step)
                if all(mb.done for mb in mbs):
                    break
            for mb in mbs:
                if not mb.done:
                    gen.advance(mb)
        pipeline.channel.flush()
        if streamer is not None:
            streamer.end()
        return _assemble(mbs, pad).to(device)


def _assemble(mbs: list[_MicroBatch], pad: int | None) -> torch.Tensor:
    """The micro-batches' sequences stacked; those that stopped early padded as ``generate`` pads them."""
    width = max(mb.ids.shape[1] for mb in mbs)
    parts = []
    for mb in mbs:
        missing = width - mb.ids.shape[1]
        if missing:
            if pad is None:
                raise RuntimeError("sequences of different lengths without a pad token")  # unreachable: EOS implies pad
            mb.ids = torch.cat([mb.ids, mb.ids.new_full((mb.ids.shape[0], missing), pad)], dim=-1)
        parts.append(mb.ids)
    return torch.cat(parts, dim=0)


def attach_generation(model: nn.Module, pipeline: Pipeline) -> None:
    """Make ``model.generate`` the pipelined one, and ``model(...)`` refuse caches (each stage keeps its own)."""
    def generate(*args: Any, micro_batches: int | None = None, **kwargs: Any) -> torch.Tensor:
        return pipeline_generate(model, pipeline, *args, micro_batches=micro_batches, **kwargs)

    routed = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if pipeline.runtime.call is None:
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise _refuse("A pipelined model keeps one KV cache per stage; model(...) takes no cache. Use "
                              "model.generate(...) to generate.", pipeline)
            kwargs["use_cache"] = False
        return routed(*args, **kwargs)

    setattr(model, "generate", generate)  # noqa: B010 - an instance attribute, as hooks set forward
    model.forward = forward  # type: ignore[method-assign]
