"""Pinned arenas for RAM-streamed weights (hf_bigmodel.runtime.pinned) and the one-copy-per-span transfer.

The CUDA calls (cudaHostRegister, the copies to a GPU) run in tests/test_gpu.py on a GPU; here the layout
and the spans are checked on the CPU, where a copy to ``cpu`` stands for the one to the GPU.
"""

from __future__ import annotations

import gc

import torch

from hf_bigmodel.runtime.pinned import ARENA_ALIGNMENT, arena_layout, pin_blocks, spans
from hf_bigmodel.runtime.prefetch_cuda import copy_from_ram
from hf_bigmodel.runtime.prefetch_reader import Item
from hf_bigmodel.storage.weights_map import WeightsMap


def _weights():
    torch.manual_seed(0)
    q, k = torch.randn(64, 32, dtype=torch.bfloat16), torch.randn(16, 32, dtype=torch.bfloat16)
    norm, head = torch.randn(33), torch.randn(100, 32, dtype=torch.bfloat16)
    memory = {"layers.0.q.weight": q, "layers.0.k.weight": k, "layers.0.norm.weight": norm,
              "head.weight": head, "embed.weight": head}  # embed tied to head
    return WeightsMap(memory=dict(memory)), memory


def test_each_block_gets_one_exactly_sized_arena_and_ties_share_their_place():
    weights, before = _weights()
    registered, unregistered = [], []
    arenas = pin_blocks(weights, {"layers.0": ["layers.0.q.weight", "layers.0.k.weight", "layers.0.norm.weight"],
                                  "head": ["head.weight", "embed.weight"]},
                        register=registered.append, unregister=unregistered.extend)
    assert len(arenas) == 2 and registered == arenas
    sizes = [64 * 32 * 2, 16 * 32 * 2, 33 * 4]
    assert arenas[0].numel() == arena_layout(sizes)[1] == 4096 + 1024 + 512  # no power-of-two rounding
    for name, tensor in before.items():
        assert torch.equal(weights.memory[name], tensor)
    q, k = weights.memory["layers.0.q.weight"], weights.memory["layers.0.k.weight"]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == arenas[0].untyped_storage().data_ptr()
    assert weights.memory["head.weight"] is weights.memory["embed.weight"]  # one copy of tied weights
    del weights
    gc.collect()
    assert len(unregistered) == 2  # unpinned with the weights map


def test_a_groups_tensors_of_one_arena_cross_in_one_copy():
    weights, before = _weights()
    pin_blocks(weights, {"layers.0": ["layers.0.q.weight", "layers.0.k.weight", "layers.0.norm.weight"]},
               register=lambda arena: None, unregister=lambda arenas: None)
    loose = torch.randn(8, 8)[:, :4]  # not contiguous: copied alone
    items = [Item(memory=weights.memory["layers.0.k.weight"]), Item(memory=loose),
             Item(memory=weights.memory["layers.0.q.weight"]), Item(memory=weights.memory["layers.0.norm.weight"])]
    assert [len(s.members) for s in spans([items[0].memory, items[2].memory, items[3].memory])] == [3]
    placed = copy_from_ram(items, torch.device("cpu"))
    assert torch.equal(placed[0], before["layers.0.k.weight"]) and torch.equal(placed[1], loose)
    assert torch.equal(placed[2], before["layers.0.q.weight"]) and torch.equal(placed[3], before["layers.0.norm.weight"])
    copies = {placed[i].untyped_storage().data_ptr() for i in (0, 2, 3)}
    assert len(copies) == 1  # one buffer: one copy
    assert copies != {weights.memory["layers.0.q.weight"].untyped_storage().data_ptr()}
    assert all(placed[i].data_ptr() % ARENA_ALIGNMENT == placed[0].data_ptr() % ARENA_ALIGNMENT for i in (2, 3))


def test_tensors_of_different_storages_are_copied_alone():
    a, b = torch.randn(10), torch.randn(10)
    assert [len(s.members) for s in spans([a, b])] == [1, 1]
    placed = copy_from_ram([Item(memory=a), Item(memory=b)], torch.device("cpu"))
    assert torch.equal(placed[0], a) and torch.equal(placed[1], b)
