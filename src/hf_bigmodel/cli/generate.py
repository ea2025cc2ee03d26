"""What ``hf-bigmodel run`` feeds ``generate`` and how the text comes back: prompts (plain, chat, batched),
sampling options, and a streamer that prints tokens as they come.

The text shown for a prompt is the same whether streamed or not: the decoded prompt-plus-continuation
minus the decoded prompt, as transformers' text-generation pipeline does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from .parser import UsageError

__all__ = ["Prompts", "Sampling", "TextStream", "completion", "count_new_tokens", "encode_prompts"]


@dataclass(frozen=True)
class Sampling:
    """``--do-sample``, ``--temperature``, ``--top-p``, ``--seed``: greedy unless ``do_sample``."""

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Sampling:
        return cls(args.do_sample, args.temperature, args.top_p, args.seed)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``generate``; sampling values left out fall back to the model's generation config."""
        if not self.do_sample:
            return {"do_sample": False, "num_beams": 1}
        chosen = {"temperature": self.temperature, "top_p": self.top_p}
        return {"do_sample": True, "num_beams": 1, **{k: v for k, v in chosen.items() if v is not None}}

    def seed_now(self) -> None:
        """Seed torch's generators (every device) so a sampled run can be repeated."""
        if self.seed is not None:
            torch.manual_seed(self.seed)


@dataclass
class Prompts:
    """The prompts as tokenized for one ``generate`` call, and what is shown before each continuation."""

    inputs: Any  # a BatchEncoding: input_ids [B, S] and attention_mask [B, S], left-padded for decoder-only
    shown: list[str] = field(default_factory=list)  # the prompt as typed (plain decoder-only), else ""


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, chat: bool, decoder_only: bool, name: str) -> Prompts:
    """Tokenize ``prompts`` as one batch: through the chat template with ``chat``; left-padded for a
    decoder-only model (generation continues each row from its last real token)."""
    texts = list(prompts)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(
                f"argument --chat: the tokenizer of {name!r} has no chat template. Leave out --chat to continue "
                "the prompt as plain text, or pass --tokenizer with a chat model's tokenizer."
            )
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
    if len(texts) > 1:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise UsageError(f"argument --prompt: the tokenizer of {name!r} has neither a pad nor an end-of-text "
                                 "token to pad a batch with; pass one prompt at a time.")
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left" if decoder_only else "right"
    # A chat template writes the special tokens itself.
    inputs = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, add_special_tokens=not chat)
    shown = list(prompts) if decoder_only and not chat else [""] * len(texts)
    return Prompts(inputs, shown)


def completion(tokenizer: Any, prefix: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after ``prefix`` (prompt or decoder start): decode(prefix + ids) minus decode(prefix)."""
    before = tokenizer.decode(list(prefix), skip_special_tokens=True)
    after = tokenizer.decode([*prefix, *ids], skip_special_tokens=True)
    return after[len(before):]


def count_new_tokens(rows: torch.Tensor, eos: int | Sequence[int] | None) -> int:
    """Tokens generated in ``rows`` (new tokens only, [B, T]): each row up to its end-of-text token included;
    what follows is padding of a row that finished first."""
    stops = set([eos] if isinstance(eos, int) else eos or [])
    total = 0
    for row in rows.tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        total += end
    return total


class TextStream:
    """A ``generate`` streamer printing one sequence's continuation as it comes (batch size 1).

    ``generate`` calls :meth:`put` with the prefix first (the prompt, or a seq2seq decoder's start
    token), then with each new token, and :meth:`end`. Text is written up to its last whitespace: what
    follows may still change as tokens arrive (a word continued, a space before punctuation removed by
    the tokenizer's clean-up), and an incomplete UTF-8 character is never written. At :meth:`end` the
    rest is written, so the whole equals :func:`completion` of all the tokens.
    """

    def __init__(self, tokenizer: Any, out: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.prefix: list[int] | None = None
        self.ids: list[int] = []
        self.written = ""
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        tokens = [int(t) for t in value.reshape(-1).tolist()]
        if self.prefix is None:
            self.prefix = tokens
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids += tokens
        text = completion(self.tokenizer, self.prefix, self.ids)
        cut = max(text.rfind(" "), text.rfind("\n"))
        stable = text[:cut] if cut > 0 else ""
        if stable.endswith("\ufffd") or not stable.startswith(self.written) or len(stable) <= len(self.written):
            return
        self._write(stable[len(self.written):])

    def end(self) -> None:
        text = completion(self.tokenizer, self.prefix or [], self.ids)
        if text.startswith(self.written):
            self._write(text[len(self.written):])
        else:  # the tokenizer rewrote text already shown: show the final text whole rather than a wrong one
            self._write(f"\n{text}")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.written += text
