"""Embeddings on disk first (hf_bigmodel.plan.rows_on_disk) and the planner's pinned items.

A ``device_map`` strategy that spills to disk moves a plain, untied embedding there (it reads only its
batch's rows) when that keeps later layers off the disk; outputs stay exactly the undispatched model's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from tiny_models import ResidualBlock as Block
from tiny_models import assert_same_outputs, small_llama_config
from torch import nn

from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.errors import BigModelWarning, DeviceMapError
from hf_bigmodel.model.naming import lookup
from hf_bigmodel.model.sizes import compute_module_sizes
from hf_bigmodel.plan.device_map import resolve_device_map
from hf_bigmodel.plan.planner import infer_auto_device_map, plan_device_map
from hf_bigmodel.plan.rows_on_disk import _other_disk_bytes, row_embeddings
from hf_bigmodel.plan.spread import spread_offloaded
from hf_bigmodel.runtime.embedding_rows import EmbeddingRowsHook

NO_SPLIT = ["ResidualBlock"]


class LM(nn.Module):
    """emb (vocab 256 x 64: 64 KiB) -> 6 blocks (16 KiB each) -> head (64 KiB), the head untied unless ``tie``."""

    def __init__(self, *, tie: bool = False, embedding: type[nn.Embedding] = nn.Embedding, vocab: int = 256):
        super().__init__()
        self.emb = embedding(vocab, 64)
        self.blocks = nn.ModuleList([Block() for _ in range(6)])
        self.head = nn.Linear(64, vocab, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class DirectLM(LM):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # logits from the embedding's matrix, not calling it
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return x @ self.emb.weight.T


class Scaled(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


def empty_lm(cls: type[LM] = LM, **kwargs) -> LM:
    with init_empty_weights():
        return cls(**kwargs)


EMB, BLOCK, HEAD = 256 * 64 * 4, 64 * 64 * 4, 256 * 64 * 4
#: RAM for the embedding and 2 blocks once a 64 KiB layer's room is kept: the rest spills to disk.
SPILLING = {"cpu": HEAD + EMB + 2 * BLOCK + 100}


def spread(model: nn.Module, device_map: dict) -> dict:
    """``device_map`` as the strategies leave it after the walk: blocks read from disk spread among those in RAM."""
    return spread_offloaded(model, device_map, compute_module_sizes(model))


def disk_bytes(model: nn.Module, device_map: dict) -> int:
    sizes = compute_module_sizes(model)
    return sum(sizes[k] for k, d in device_map.items() if d == "disk")


# -- the planner's pinned items -------------------------------------------------------------------------


def test_a_pinned_item_is_placed_first_and_its_parents_split_around_it():
    model = empty_lm()
    plain = plan_device_map(model, SPILLING, no_split_module_classes=NO_SPLIT)
    assert lookup("emb.weight", plain) == "cpu"
    pinned = plan_device_map(model, SPILLING, no_split_module_classes=NO_SPLIT, pinned={"emb": "disk"})
    assert pinned == {"emb": "disk", "blocks": "cpu", "head": "disk"}  # all 6 blocks fit in the room freed
    assert [k for k, d in plain.items() if d == "cpu"] == ["emb", "blocks.0", "blocks.1"]


def test_a_pinned_item_counts_against_a_disk_budget():
    model = empty_lm()
    with pytest.raises(DeviceMapError, match="emb"):
        plan_device_map(model, {**SPILLING, "disk": EMB - 1}, no_split_module_classes=NO_SPLIT,
                        pinned={"emb": "disk"})


def test_pins_inside_a_no_split_block_or_of_unknown_items_are_refused():
    model = empty_lm()
    with pytest.raises(ValueError, match="blocks.0.*not split"):
        plan_device_map(model, SPILLING, no_split_module_classes=NO_SPLIT, pinned={"blocks.0.proj": "disk"})
    with pytest.raises(ValueError, match="nope"):
        plan_device_map(model, SPILLING, no_split_module_classes=NO_SPLIT, pinned={"nope": "disk"})


def test_a_pin_survives_fallback_allocation():
    model = empty_lm()
    budgets = {0: BLOCK + 10, "cpu": HEAD + 2 * BLOCK + 100}
    device_map = plan_device_map(model, budgets, no_split_module_classes=NO_SPLIT, pinned={"emb": "disk"},
                                 fallback_allocation=True)
    assert device_map["emb"] == "disk"


# -- the device_map strategies --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_strategies_move_a_row_read_embedding_to_disk_when_that_keeps_layers_off_it(strategy):
    model = empty_lm()
    accelerate_like = infer_auto_device_map(model, SPILLING, no_split_module_classes=NO_SPLIT)
    device_map = resolve_device_map(model, strategy, max_memory=SPILLING, no_split_module_classes=NO_SPLIT)
    assert device_map["emb"] == "disk" and lookup("emb.weight", accelerate_like) == "cpu"
    assert disk_bytes(model, device_map) - EMB < disk_bytes(model, accelerate_like)


@pytest.mark.parametrize("kwargs", [{"tie": True}, {"embedding": Scaled}, {"cls": DirectLM}],
                         ids=["tied-to-the-head", "subclass-forward", "read-by-another-forward"])
def test_embeddings_that_do_not_read_by_row_stay_where_the_walk_put_them(kwargs):
    model = empty_lm(**kwargs)
    assert row_embeddings(model) == []
    accelerate_like = infer_auto_device_map(model, SPILLING, no_split_module_classes=NO_SPLIT)
    assert resolve_device_map(model, "auto", max_memory=SPILLING, no_split_module_classes=NO_SPLIT) == spread(
        model, accelerate_like)


def test_nothing_moves_without_a_disk_spill_or_without_a_gain():
    model = empty_lm()
    assert resolve_device_map(model, "auto", max_memory={"cpu": 10**6}, no_split_module_classes=NO_SPLIT) == {"": "cpu"}
    small = empty_lm(vocab=32)  # an 8 KiB embedding: the room it frees holds no 16 KiB block
    budgets = {"cpu": BLOCK + 32 * 64 * 4 + 2 * BLOCK + 100}
    accelerate_like = infer_auto_device_map(small, budgets, no_split_module_classes=NO_SPLIT)
    assert "disk" in accelerate_like.values() and lookup("emb.weight", accelerate_like) == "cpu"
    assert resolve_device_map(small, "auto", max_memory=budgets, no_split_module_classes=NO_SPLIT) == spread(
        small, accelerate_like)


def test_an_entry_holding_the_embedding_on_disk_counts_without_it():
    """Once every other weight under a module went to disk with the embedding, the plan merges them into one
    entry (``{"body": "disk"}``): the comparison of disk bytes leaves the embedding inside it out."""
    sizes = {"": 300, "body": 200, "body.emb": 120, "body.blocks": 80, "head": 100}
    assert _other_disk_bytes({"body": "disk", "head": "cpu"}, sizes, {"body.emb": "disk"}) == 80
    assert _other_disk_bytes({"body.emb": "cpu", "body.blocks": "disk", "head": "disk"}, sizes, {}) == 180
    assert _other_disk_bytes({"": "disk"}, sizes, {"body.emb": "disk"}) == 180


def test_a_disk_budget_too_small_for_the_embedding_keeps_the_first_plan():
    model = empty_lm(vocab=200)  # a 50 KiB embedding: the room it frees holds 3 blocks, 2 KiB stay unused
    emb = 200 * 64 * 4
    budgets = {"cpu": emb + emb + 2 * BLOCK + 100, "disk": 4 * BLOCK + emb}  # exactly the first plan's disk part
    accelerate_like = infer_auto_device_map(model, budgets, no_split_module_classes=NO_SPLIT)
    assert disk_bytes(model, accelerate_like) == budgets["disk"]
    assert resolve_device_map(model, "auto", max_memory=budgets, no_split_module_classes=NO_SPLIT) == spread(
        model, accelerate_like)
    roomier = {**budgets, "disk": budgets["disk"] + 2 * 1024}
    assert resolve_device_map(model, "auto", max_memory=roomier, no_split_module_classes=NO_SPLIT)["emb"] == "disk"


def test_the_chosen_plans_warnings_are_given_once():
    model = empty_lm()
    budgets = {"cpu": HEAD - 1}  # even an empty CPU cannot hold the largest offloaded layer: a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_device_map(model, "auto", max_memory=budgets, no_split_module_classes=NO_SPLIT)
    assert len([w for w in caught if issubclass(w.category, BigModelWarning)]) == 1


def llama_config(**kwargs) -> transformers.LlamaConfig:
    """:func:`small_llama_config` with a 1024-token vocabulary: its embedding (256 KiB in float32) outweighs a
    decoder layer (145 KiB), as in real models."""
    config = small_llama_config()
    config.vocab_size = 1024
    for key, value in kwargs.items():
        setattr(config, key, value)
    return config


def llama_budget(model: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """RAM for the head's room, the embedding and two decoder layers: the rest spills to disk."""
    sizes = compute_module_sizes(model, dtype=dtype)
    return {"cpu": sizes["lm_head"] + sizes["model.embed_tokens"] + 2 * sizes["model.layers.0"] + 1000}


def test_a_transformers_llama_plan_moves_its_untied_embedding_and_not_a_tied_one():
    with init_empty_weights():
        untied = transformers.LlamaForCausalLM(llama_config())
    budgets = llama_budget(untied)
    no_split = untied._no_split_modules
    device_map = resolve_device_map(untied, "auto", max_memory=budgets, no_split_module_classes=no_split)
    before = infer_auto_device_map(untied, budgets, no_split_module_classes=no_split)
    assert device_map["model.embed_tokens"] == "disk" and lookup("model.embed_tokens.weight", before) == "cpu"
    layers_on_cpu = [k for k, d in device_map.items() if d == "cpu" and k.startswith("model.layers.")]
    assert len(layers_on_cpu) == 3  # one more decoder layer than the walk's two beside the embedding
    with init_empty_weights():
        tied = transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=True))
    tied.tie_weights()
    tied_map = resolve_device_map(tied, "auto", max_memory=budgets, no_split_module_classes=no_split)
    assert tied_map == spread(tied, infer_auto_device_map(tied, budgets, no_split_module_classes=no_split))


# -- end to end -------------------------------------------------------------------------------------------


def test_auto_dispatch_reads_the_embedding_by_row_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(llama_config()).eval()
    for param in ref.parameters():  # buffers (rotary inv_freq) stay float32, as loading leaves them
        param.data = param.data.to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(llama_config())
    model = load_checkpoint_and_dispatch(model, tmp_path, device_map="auto",
                                         max_memory=llama_budget(model, torch.bfloat16),
                                         no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16)
    assert model.hf_device_map["model.embed_tokens"] == "disk"
    hook = model.model.embed_tokens._hf_hook
    assert isinstance(hook, EmbeddingRowsHook)
    ids = torch.tensor([[1, 5, 9, 1000, 7, 7]])
    assert_same_outputs(model, ref, ids, 4)
    # The prompts' forwards read this small matrix whole (5 rows' pages are over an eighth of it); each of
    # generate's 3 decode forwards reads its one row.
    assert (hook.whole_reads, hook.rows_read) == (2, 3)
