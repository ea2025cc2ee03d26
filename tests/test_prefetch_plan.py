"""``plan_prefetch``: the prefetch memory planned from a device map bounds what a dispatched model's
prefetcher holds, with the prefetcher's own groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tiny_models import SMALL_LLAMA_LAYERS, save_small_bf16_llama, small_llama_config

from hf_bigmodel import compute_module_sizes, init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.runtime.prefetch import plan_prefetch, prefetcher_of
from hf_bigmodel.runtime.prefetch_window import ENV_VAR, Window, prefetch_memory


def _empty_llama() -> nn.Module:
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(small_llama_config())


def _device_map(disk: set[str]) -> dict[str, str]:
    entries = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(SMALL_LLAMA_LAYERS)), "model.norm",
               "model.rotary_emb", "lm_head"]
    return {name: "disk" if name in disk else "cpu" for name in entries}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_small_bf16_llama(tmp_path_factory.mktemp("llama")).path


@pytest.mark.parametrize(("prefetch", "embedding"), [(None, "cpu"), (1, "cpu"), ("100KiB", "cpu"), (None, "disk")])
def test_planned_memory_bounds_the_prefetcher_of_a_dispatched_model(llama, prefetch, embedding, monkeypatch) -> None:
    """An embedding on disk reads its rows itself, in no group: the plan leaves it out as the prefetcher does."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    disk = {"model.layers.1", "model.layers.2", "model.layers.3", "model.norm", "lm_head"}
    device_map = _device_map(disk | ({"model.embed_tokens"} if embedding == "disk" else set()))
    empty = _empty_llama()
    planned = plan_prefetch(empty, device_map, sizes=compute_module_sizes(empty, torch.bfloat16), prefetch=prefetch)
    model = load_checkpoint_and_dispatch(_empty_llama(), llama, device_map=device_map, dtype=torch.bfloat16,
                                         prefetch=prefetch)
    fetcher = prefetcher_of(model)
    assert fetcher is not None and planned is not None
    groups = fetcher._groups
    assert planned.device == "cpu" and planned.groups == len(groups)
    largest = max(groups, key=lambda g: g.host_bytes)
    assert list(planned.largest) == largest.prefixes  # the prefetcher's own groups
    bound = fetcher.stats()["memory_bound"]
    # Disk tensors are read at aligned offsets and buffers rounded: the plan bounds the real figure from
    # above, by at most two pages per tensor of a group, for each group it counts.
    slack = 2 * 4096 * max(len(g.items) for g in groups) * 3
    assert bound <= planned.total <= bound + slack, (bound, planned.total)


def test_off_or_nothing_streamed_means_nothing_planned() -> None:
    empty = _empty_llama()
    sizes = compute_module_sizes(empty, torch.float32)
    assert plan_prefetch(empty, _device_map(set()), sizes=sizes) is None  # a CPU run with nothing on disk
    assert plan_prefetch(empty, _device_map({"lm_head"}), sizes=sizes, prefetch=0) is None
    assert plan_prefetch(empty, _device_map({"lm_head"}), sizes=sizes, prefetch=2) is not None


def test_a_gpu_run_streams_ram_and_disk_weights_to_the_gpu() -> None:
    """Planned for a GPU this machine may lack: "cpu" entries are streamed too, in their own bytes, to GPU 0."""
    empty = _empty_llama()
    sizes = compute_module_sizes(empty, torch.float32)
    device_map = {**_device_map({"lm_head"}), "model.embed_tokens": 0}
    planned = plan_prefetch(empty, device_map, sizes=sizes, prefetch=2)
    assert planned is not None and planned.device == 0
    layer = sizes["model.layers.0"]  # a decoder layer holds no buffer of its own here
    assert planned.largest_bytes == max(sizes["lm_head"], layer)  # whole entries, no read alignment
    streamed = [layer] * SMALL_LLAMA_LAYERS + [sizes["model.norm"], sizes["lm_head"]]
    assert planned.total == prefetch_memory(streamed, Window(groups=2))
