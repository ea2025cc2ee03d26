"""Disk blocks spread among the RAM ones (hf_bigmodel.plan.spread).

A ``device_map`` strategy that keeps some repeated blocks in RAM and reads the others from disk
interleaves them, holding on each device exactly what the planner's walk put there; outputs stay the
undispatched model's.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import ResidualBlock as Block
from tiny_models import assert_same_outputs, small_llama_config
from torch import nn

from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.model.sizes import compute_module_sizes
from hf_bigmodel.plan.device_map import resolve_device_map
from hf_bigmodel.plan.planner import infer_auto_device_map
from hf_bigmodel.plan.spread import spread_offloaded, spread_positions

NO_SPLIT = ["ResidualBlock"]
BLOCK = 64 * 64 * 4


class Stack(nn.Module):
    """``count`` blocks, optionally a wider one among them and the last two tied."""

    def __init__(self, count: int = 10, *, wide_at: int | None = None, tie: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(96 if i == wide_at else 64) for i in range(count)])
        self.head = nn.Linear(64, 64, bias=False)
        if tie:
            self.blocks[-1].proj.weight = self.blocks[-2].proj.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if x.shape[-1] == block.proj.in_features else x
        return self.head(x)


def empty(**kwargs) -> Stack:
    with init_empty_weights():
        return Stack(**kwargs)


def per_device_bytes(model: nn.Module, device_map: dict) -> dict:
    sizes = compute_module_sizes(model)
    totals: dict = {}
    for name, device in device_map.items():
        totals[device] = totals.get(device, 0) + sizes[name]
    return totals


@pytest.mark.parametrize("among", range(1, 41))
def test_spread_positions_are_distinct_in_range_and_evenly_spaced(among):
    for count in range(among + 1):
        positions = spread_positions(count, among)
        assert positions == sorted(set(positions)) and len(positions) == count
        assert all(0 <= p < among for p in positions)
        if count:
            step = among / count
            gaps = [b - a for a, b in zip(positions, positions[1:])]
            assert all(int(step) <= gap <= int(step) + 1 for gap in gaps)  # as even as whole positions go
            assert positions[0] <= step / 2 and among - 1 - positions[-1] <= step / 2  # half a step at the ends


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
@pytest.mark.parametrize("in_ram", [1, 3, 7])
def test_strategies_spread_what_ram_keeps_and_keep_what_each_device_holds(strategy, in_ram):
    model = empty()
    budgets = {"cpu": BLOCK + in_ram * BLOCK + 100}  # a block's room (the offloaded layer) + in_ram blocks
    walk = infer_auto_device_map(model, budgets, no_split_module_classes=NO_SPLIT)
    device_map = resolve_device_map(model, strategy, max_memory=budgets, no_split_module_classes=NO_SPLIT)
    assert per_device_bytes(model, device_map) == per_device_bytes(model, walk)
    order = [device_map.get(f"blocks.{i}") for i in range(10)]
    assert order.count("cpu") == in_ram and order.count("disk") == 10 - in_ram
    fewer = "cpu" if 2 * in_ram <= 10 else "disk"
    assert [i for i, d in enumerate(order) if d == fewer] == spread_positions(order.count(fewer), 10)
    assert [walk.get(f"blocks.{i}") for i in range(in_ram)] == ["cpu"] * in_ram  # accelerate's walk: RAM first


def test_plans_without_both_ram_and_disk_are_left_alone():
    model = empty()
    assert resolve_device_map(model, "auto", max_memory={"cpu": 10**6}, no_split_module_classes=NO_SPLIT) == {"": "cpu"}
    on_gpu = {f"blocks.{i}": 0 if i < 4 else "disk" for i in range(10)} | {"head": "disk"}
    assert spread_offloaded(model, on_gpu, compute_module_sizes(model)) == on_gpu


def test_accelerator_blocks_stay_and_only_ram_and_disk_trade_places():
    model = empty()
    device_map = {f"blocks.{i}": 0 if i < 2 else "cpu" if i < 4 else "disk" for i in range(10)} | {"head": "disk"}
    spread = spread_offloaded(model, device_map, compute_module_sizes(model))
    assert [spread[f"blocks.{i}"] for i in range(10)] == [0, 0, "disk", "disk", "cpu", "disk", "disk", "disk",
                                                          "cpu", "disk"]
    assert spread["head"] == "disk"


def test_blocks_that_differ_or_share_a_tensor_are_not_interchangeable():
    model = empty(wide_at=0)  # blocks.0 is wider: it keeps its place, the nine others spread
    device_map = {f"blocks.{i}": "cpu" if i < 3 else "disk" for i in range(10)} | {"head": "disk"}
    spread = spread_offloaded(model, device_map, compute_module_sizes(model))
    assert spread["blocks.0"] == "cpu"
    assert [i for i in range(1, 10) if spread[f"blocks.{i}"] == "cpu"] == [1 + p for p in spread_positions(2, 9)]
    tied = empty(tie=True)
    assert spread_offloaded(tied, device_map, compute_module_sizes(tied)) == device_map


def test_a_transformers_llama_loads_spread_and_gives_the_reference_outputs(tmp_path):
    config = small_llama_config()
    config.num_hidden_layers = 8
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    ref.save_pretrained(tmp_path, max_shard_size="200KB")
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    sizes = compute_module_sizes(model)
    budgets = {"cpu": sizes["lm_head"] + sizes["model.embed_tokens"] + 3 * sizes["model.layers.0"] + 1000}
    model = load_checkpoint_and_dispatch(model, tmp_path, device_map="auto", max_memory=budgets,
                                         no_split_module_classes=model._no_split_modules)
    layers = [model.hf_device_map.get(f"model.layers.{i}") for i in range(8)]
    kept = layers.count("cpu")
    assert 0 < kept < 8 and layers[:kept] != ["cpu"] * kept  # some kept in RAM, not just the first ones
    ids = torch.randint(3, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    assert_same_outputs(model, ref, ids, 4)
