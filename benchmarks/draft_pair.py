"""A target checkpoint and a small draft model that agrees with it, for the assisted-generation benchmark.

Random weights make useless drafts: a small random model predicts nothing a random 1B model says. So
the pair is built to agree the way a trained pair does, most of the time but not always:

- the target has the benchmark checkpoint's shape (942.7M parameters, bf16), with its embedding and
  output head of rank ``RANK``: ``E = E' A`` and ``W = W' A``, where ``A`` (``RANK x hidden``) has
  orthogonal rows of equal norm; its decoder layers are random but their output projections
  (``o_proj``, ``down_proj``) are scaled by ``LAYER_SCALE``, so the context moves the prediction a little;
- the draft is a 1-layer Llama of width ``RANK`` (~34 MB in bf16, kept in RAM) with embedding ``E'``,
  head ``W'`` and a layer whose output projections are zero: its next token is ``argmax W' E'[x]``,
  which is the target's too whenever the layers' contribution does not change the winner.

With ``LAYER_SCALE = 0.002`` the draft's next token is the target's for 76% of positions (24 random
prompts of 16 tokens; 0.001: 85%, 0.003: 65%, 0.005: 49%, 0.04: 0%), about what a trained pair of a
small and a large model of one family reaches. The acceptance this gives is measured by the benchmark
(tokens per forward of the big model) and printed with the figures: speed-ups are only as good as it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger("benchmarks.draft_pair")

RANK = 256
LAYER_SCALE = 0.002
SEED = 7


def pair_dirs(work_dir: Path) -> tuple[Path, Path]:
    return work_dir / "drafted-target", work_dir / "draft"


def build_pair(work_dir: Path, source: Path) -> tuple[Path, Path]:
    """The (target, draft) folders under ``work_dir``, built once from the benchmark checkpoint ``source``."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    target, draft = pair_dirs(work_dir)
    marker = {"rank": RANK, "layer_scale": LAYER_SCALE, "seed": SEED, "source": source.name}
    done = target / "PAIR.json"
    if done.is_file() and json.loads(done.read_text()) == marker and (draft / "config.json").is_file():
        return target, draft
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(draft, ignore_errors=True)
    target.mkdir(parents=True)
    config = json.loads((source / "config.json").read_text())
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    generator = torch.Generator().manual_seed(SEED)
    basis, _ = torch.linalg.qr(torch.randn(hidden, RANK, generator=generator))  # orthonormal columns
    lift = basis.T.contiguous()  # A: RANK x hidden, A A^T = I
    small_embed = torch.randn(vocab, RANK, generator=generator) * 0.02 * (hidden / RANK) ** 0.5
    small_head = torch.randn(vocab, RANK, generator=generator) * 0.02 * (hidden / RANK) ** 0.5
    for item in ["config.json", "model.safetensors.index.json", "generation_config.json"]:
        if (source / item).is_file():
            shutil.copy(source / item, target / item)
    for shard in sorted(source.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for key, tensor in tensors.items():
            if key == "model.embed_tokens.weight":
                tensors[key] = (small_embed @ lift).to(tensor.dtype)
            elif key == "lm_head.weight":
                tensors[key] = (small_head @ lift).to(tensor.dtype)
            elif key.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[key] = (tensor.float() * LAYER_SCALE).to(tensor.dtype)
        save_file(tensors, str(target / shard.name), metadata={"format": "pt"})
        del tensors
    small = LlamaConfig(vocab_size=vocab, hidden_size=RANK, intermediate_size=2 * RANK, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                        tie_word_embeddings=False, bos_token_id=config.get("bos_token_id", 1),
                        eos_token_id=config.get("eos_token_id", 2))
    model = LlamaForCausalLM(small)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(small_embed)
        model.lm_head.weight.copy_(small_head)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    model.to(torch.bfloat16).save_pretrained(draft)
    done.write_text(json.dumps(marker))
    logger.info("built the drafted target %s and its %d-wide draft %s", target, RANK, draft)
    return target, draft
