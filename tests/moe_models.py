"""Tiny mixture-of-experts models, saved expert by expert as Hub checkpoints are (for conversion tests).

transformers 5 holds each layer's experts fused (``mlp.experts.gate_up_proj`` ``[experts, 2 * inter, hidden]``)
and ``save_pretrained`` reverses its conversion mapping, writing one tensor per expert and projection,
the layout of every MoE checkpoint on the Hub. :func:`save_moe` checks that it did.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

__all__ = ["MOE_FAMILIES", "SavedMoE", "save_moe"]

VOCAB = 128


def _configs() -> dict[str, Any]:
    import transformers as t

    small: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 3,
                             "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False}
    return {
        "mixtral": t.MixtralConfig(**small, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": t.Qwen2MoeConfig(**small, intermediate_size=40, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                                      decoder_sparse_step=1),
        "qwen3_moe": t.Qwen3MoeConfig(**small, head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                      num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1),
        "olmoe": t.OlmoeConfig(**{**small, "num_key_value_heads": 2}, intermediate_size=16, num_experts=4,
                               num_experts_per_tok=2),
        "deepseek_v3": t.DeepseekV3Config(**{**small, "num_key_value_heads": 2}, intermediate_size=48,
                                          moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=4,
                                          n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                          q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                          v_head_dim=8),
    }


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


class SavedMoE(NamedTuple):
    path: Path
    model: Any  # the in-memory model it was saved from (fused experts), eval mode


def save_moe(family: str, directory: str | Path, *, shard_size: str | None = "24KB", seed: int = 0,
             config: dict[str, Any] | None = None) -> SavedMoE:
    """Build ``family`` tiny with random weights, ``save_pretrained`` it (sharded: experts span shards)."""
    import transformers
    from safetensors import safe_open

    torch.manual_seed(seed)
    cfg = _configs()[family]
    for key, value in (config or {}).items():
        setattr(cfg, key, value)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # routers start near zero: spread them so top-k picks differ across tokens
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 1)
    path = Path(directory)
    model.save_pretrained(path, max_shard_size=shard_size or "50GB")
    keys: list[str] = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys += list(f.keys())
    fused = [k for k in keys if k.endswith(("gate_up_proj", "experts.down_proj"))]
    if fused or not any(_PER_EXPERT.search(k) for k in keys):
        raise AssertionError(f"save_pretrained wrote fused experts for {family}: {fused[:3]}")
    return SavedMoE(path, model)
