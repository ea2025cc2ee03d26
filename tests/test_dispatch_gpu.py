"""Dispatch on CUDA: GPU-resident, CPU-offloaded and disk-offloaded modules, and model parallelism.

Marked ``gpu``: skipped on machines without CUDA (conftest.py).
"""

import pytest
import torch
from core_models import dispatched_tiny_lm, reference_tiny_lm, saved_tiny_lm

from hf_bigmodel import (
    cpu_offload,
    disk_offload,
    remove_hook_from_submodules,
)

pytestmark = pytest.mark.gpu
IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])


dispatched = dispatched_tiny_lm


@pytest.fixture()
def ckpt(tmp_path):
    return saved_tiny_lm(tmp_path / "ckpt")


def test_gpu_cpu_disk_map_runs_on_the_gpu(ckpt):
    ref, path = ckpt
    device_map = {"embed": 0, "blocks.0": 0, "blocks.1": "cpu", "blocks.2": "disk", "blocks.3": "cpu",
                  "norm": 0, "head": 0}
    model = dispatched(path, device_map)
    assert model.device == torch.device("cuda", 0)
    out = model(IDS)  # CPU input: moved in, output moved back next to it
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref(IDS), rtol=1e-4, atol=1e-5)
    assert model.blocks[1].fc1.weight.device.type == "meta"
    assert model._hf_bigmodel_weights.memory["blocks.1.fc1.weight"].is_pinned()
    out_gpu = model(IDS.cuda())
    assert out_gpu.device.type == "cuda"


def test_everything_on_one_gpu_has_no_hooks(ckpt):
    ref, path = ckpt
    model = dispatched(path, "auto")
    assert model.hf_device_map == {"": 0}
    assert not any("_hf_hook" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(IDS.cuda()).cpu(), ref(IDS), rtol=1e-4, atol=1e-5)


def test_budget_offloads_to_cpu_first(ckpt):
    ref, path = ckpt
    model = dispatched(path, "auto", max_memory={0: 9000, "cpu": "1GiB"}, no_split_module_classes=["Block"])
    assert set(model.hf_device_map.values()) == {0, "cpu"}
    torch.testing.assert_close(model(IDS), ref(IDS), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_model_parallel_across_two_gpus(ckpt):
    ref, path = ckpt
    device_map = {"embed": 0, "blocks.0": 0, "blocks.1": 0, "blocks.2": 1, "blocks.3": 1, "norm": 1, "head": 0}
    model = dispatched(path, device_map)
    assert model.blocks[3].fc1.weight.device == torch.device("cuda", 1)
    torch.testing.assert_close(model(IDS), ref(IDS), rtol=1e-4, atol=1e-5)


def test_cpu_offload_and_disk_offload_to_cuda(tmp_path):
    ref = reference_tiny_lm()
    model = cpu_offload(reference_tiny_lm(), execution_device=0)
    torch.testing.assert_close(model(IDS).cpu(), ref(IDS), rtol=1e-4, atol=1e-5)
    model = disk_offload(reference_tiny_lm(), tmp_path / "off", execution_device=0)
    torch.testing.assert_close(model(IDS).cpu(), ref(IDS), rtol=1e-4, atol=1e-5)
    assert torch.cuda.memory_allocated() < 10 * 2**20


def test_remove_hooks_brings_weights_back_to_ram(ckpt):
    ref, path = ckpt
    model = dispatched(path, {"embed": 0, "blocks": "disk", "norm": 0, "head": 0})
    remove_hook_from_submodules(model)
    assert all(p.device.type != "meta" for p in model.parameters())


def test_tied_weights_streamed_from_ram_share_one_pinned_copy(ckpt):
    ref, path = ckpt  # TinyLM ties head.weight to embed.weight
    model = dispatched(path, {"embed": "cpu", "blocks": 0, "norm": 0, "head": "cpu"})
    memory = model._hf_bigmodel_weights.memory
    assert memory["embed.weight"].is_pinned()
    assert memory["head.weight"] is memory["embed.weight"]  # one page-locked copy, not one per name
    torch.testing.assert_close(model(IDS), ref(IDS), rtol=1e-4, atol=1e-5)
