"""Cutting models into pipeline stages: pure planning on meta models (no processes, no weights)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_bigmodel import init_empty_weights
from hf_bigmodel.errors import PipelineError
from hf_bigmodel.parallel.stages import _cut, fast_capacity, plan_stages, stage_device_map
from hf_bigmodel.parallel.view import stage_only
from hf_bigmodel.plan.planner import plan_device_map

transformers = pytest.importorskip("transformers")


def _meta_llama(layers: int = 4, hidden: int = 64, vocab: int = 1000):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    with init_empty_weights():
        return transformers.LlamaForCausalLM(config)


def _meta_gpt2(layers: int = 4):
    config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=layers, n_head=4, n_positions=64)
    with init_empty_weights():
        return transformers.GPT2LMHeadModel(config)


def test_llama_is_cut_between_decoder_layers_with_embeddings_first_and_head_last():
    plan = plan_stages(_meta_llama(4), 2, no_split_module_classes=["LlamaDecoderLayer"])
    assert plan.spine == "model.layers"
    assert plan.starts == (0, 2)
    assert plan.held_by(0) == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.rotary_emb"]
    assert plan.held_by(1) == ["model.layers.2", "model.layers.3", "model.norm", "model.rotary_emb", "lm_head"]
    assert plan.stage_of("model.rotary_emb") is None  # no parameters: every stage computes it
    assert (plan.entry(0), plan.exit(0), plan.entry(1), plan.exit(1)) == (None, "model.layers.2", "model.layers.2",
                                                                          None)
    assert plan.describe().splitlines()[0].startswith("stage 0: model.embed_tokens, model.layers.0-1  ")


def test_stage_bytes_add_up_and_a_tied_head_counts_on_both_stages():
    model = _meta_gpt2(4)
    plan = plan_stages(model, 2, no_split_module_classes=["GPT2Block"])
    wte = 1000 * 64 * 4
    blocks = [sum(p.numel() * 4 for p in model.transformer.h[i].parameters()) for i in range(4)]
    first = wte + 64 * 64 * 4 + sum(blocks[:2])  # wte + wpe + two blocks
    assert plan.bytes_of(0) == first
    assert plan.bytes_of(1) == sum(blocks[2:]) + 2 * 64 * 4 + wte  # ln_f + lm_head (the tied wte, again)
    assert plan.stage_of("transformer.drop") is None


def test_budgets_steer_the_cut_towards_the_bigger_process():
    model = _meta_llama(8, vocab=16)  # embeddings and head tiny: the layers decide
    even = plan_stages(model, budgets=[{"cpu": 10**9}, {"cpu": 10**9}], no_split_module_classes=["LlamaDecoderLayer"])
    skewed = plan_stages(model, budgets=[{"cpu": 10**9}, {"cpu": 3 * 10**9}],
                         no_split_module_classes=["LlamaDecoderLayer"])
    assert even.starts == (0, 4)
    assert skewed.starts == (0, 2)
    gpu_rank = plan_stages(model, budgets=[{0: 10**9, "cpu": 10**12}, {"cpu": 3 * 10**9}],
                           no_split_module_classes=["LlamaDecoderLayer"])
    assert gpu_rank.capacities == (10**9, 3 * 10**9)  # a GPU process runs from its GPU, not its RAM


def test_fast_capacity_is_the_accelerators_else_the_ram():
    assert fast_capacity({0: 5, 1: 7, "cpu": 100, "disk": 10**9}) == 12
    assert fast_capacity({"cpu": 100, "disk": 10**9}) == 100
    assert fast_capacity({0: 0, "cpu": 100}) == 100


def _brute_force(weights, first, last, caps):
    n, count = len(caps), len(weights)
    best = None
    for cuts in itertools.combinations(range(1, count), n - 1):
        bounds = (0, *cuts, count)
        worst = max((sum(weights[bounds[s]:bounds[s + 1]]) + (first if s == 0 else 0)
                     + (last if s == n - 1 else 0)) / caps[s] for s in range(n))
        best = worst if best is None else min(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(0, 50), min_size=1, max_size=8), first=st.integers(0, 80),
       last=st.integers(0, 80), caps=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_the_cut_minimises_the_largest_bytes_to_capacity_ratio(weights, first, last, caps):
    if len(caps) > len(weights):
        return
    starts = _cut(weights, first, last, caps)
    assert starts[0] == 0 and list(starts) == sorted(set(starts))  # every stage gets at least one block
    bounds = (*starts, len(weights))
    worst = max((sum(weights[bounds[s]:bounds[s + 1]]) + (first if s == 0 else 0) + (last if s == len(caps) - 1
                 else 0)) / caps[s] for s in range(len(caps)))
    assert worst == pytest.approx(_brute_force(weights, first, last, caps))


def test_more_stages_than_blocks_is_refused_naming_the_counts():
    with pytest.raises(PipelineError, match=r"has 2 block\(s\) in 'model.layers', too few for 3"):
        plan_stages(_meta_llama(2), 3, no_split_module_classes=["LlamaDecoderLayer"])


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(PipelineError, match="no run of repeated blocks"):
        plan_stages(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)), 2)


def test_each_process_plans_its_own_stage_within_its_own_budget():
    model = _meta_llama(4)
    plan = plan_stages(model, 2, no_split_module_classes=["LlamaDecoderLayer"])
    budget = {"cpu": plan.bytes_of(1) - 1000}  # just short of the stage: some of it must go to disk
    small = stage_device_map(model, plan, 1, budget, no_split_module_classes=["LlamaDecoderLayer"])
    assert sorted([small["model.layers.2"], small["model.layers.3"]]) == ["cpu", "disk"] and small["lm_head"] == "disk"
    assert not any(k.startswith(("model.embed_tokens", "model.layers.0", "model.layers.1")) for k in small)
    roomy = {"cpu": plan.bytes_of(1) + 1000}
    assert stage_device_map(model, plan, 1, roomy, no_split_module_classes=["LlamaDecoderLayer"]) == {"": "cpu"}
    assert sum(1 for _ in model.parameters()) == sum(1 for _ in _meta_llama(4).parameters())  # nothing lost


def test_a_stage_plans_as_one_process_would_its_embedding_on_disk_first():
    """The first stage, short of room, puts its input embedding on disk (it reads only its batch's rows there)
    so one more decoder layer stays in RAM than the planner's walk alone would keep."""
    model = _meta_llama(6)
    plan = plan_stages(model, 2, no_split_module_classes=["LlamaDecoderLayer"])
    budget = {"cpu": plan.bytes_of(0) - 1000}
    device_map = stage_device_map(model, plan, 0, budget, no_split_module_classes=["LlamaDecoderLayer"])
    assert device_map["model.embed_tokens"] == "disk"
    assert [k for k, d in device_map.items() if d == "cpu"] == ["model.layers.0", "model.layers.2"]  # spread
    with stage_only(model, plan.not_held_by(0)) as view:
        walk = plan_device_map(view, budget, no_split_module_classes=["LlamaDecoderLayer"])
    assert [k for k, d in walk.items() if d == "cpu"] == ["model.embed_tokens", "model.layers.0"]


class _Scaled(nn.Module):
    """Blocks plus a tensor held directly by the module around them (read by forward, not by a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x * self.scale


def test_tensors_held_around_the_spine_are_shared_and_never_streamed():
    with init_empty_weights():
        model = _Scaled()
    plan = plan_stages(model, 2)
    assert plan.stage_of("scale") is None
    with pytest.warns(UserWarning, match="budget is only 0 B"):
        device_map = stage_device_map(model, plan, 0, {"cpu": 0})
    assert device_map == {"": "disk", "scale": "cpu"}  # the stage's blocks streamed, the shared scale resident


def test_stage_only_shows_one_stage_and_puts_everything_back_even_on_error():
    model = _meta_llama(2)
    before = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="boom"):
        with stage_only(model, ["model.layers.1", "lm_head"]) as stage:
            names = {n for n, _ in stage.named_parameters()}
            assert not any(n.startswith(("model.layers.1.", "lm_head.")) for n in names)
            assert "model.layers.0.mlp.up_proj.weight" in names
            raise RuntimeError("boom")
    assert dict(model.named_modules()) == before
