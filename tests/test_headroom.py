"""Room for the prefetch buffers on a GPU (hf_bigmodel.plan.headroom): a strategy's plan fits max_memory with them.

Planning is pure, so GPUs this machine lacks are planned for (``check_devices=False``).
"""

from __future__ import annotations

import warnings

import pytest
import transformers

from hf_bigmodel import init_empty_weights
from hf_bigmodel.errors import BigModelWarning
from hf_bigmodel.model.sizes import compute_module_sizes
from hf_bigmodel.plan.device_map import resolve_device_map
from hf_bigmodel.runtime.prefetch_plan import plan_prefetch, prefetch_headroom


@pytest.fixture(scope="module")
def llama():
    """12 decoder layers of 64 MiB (float32): above the prefetcher's merge size, so each is a group of its own."""
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                      tie_word_embeddings=False)
    with init_empty_weights():
        return transformers.LlamaForCausalLM(config)


def peak_on(model, device_map, device, prefetch=None) -> int:
    """Weights placed on ``device`` plus what the prefetcher holds there (``hf-bigmodel plan``'s peak)."""
    sizes = compute_module_sizes(model)
    planned = plan_prefetch(model, device_map, sizes=sizes, prefetch=prefetch)
    held = planned.total if planned is not None and planned.device == device else 0
    return sum(sizes[k] for k, d in device_map.items() if d == device) + held


def plan(model, budgets, **kwargs):
    return resolve_device_map(model, "auto", max_memory=budgets, no_split_module_classes=model._no_split_modules,
                              check_devices=False, **kwargs)


@pytest.mark.parametrize("prefetch", [None, 1, "1MiB"])
def test_a_gpu_plan_keeps_room_for_the_prefetch_buffers(llama, prefetch):
    layer = compute_module_sizes(llama)["model.layers.0"]
    budgets = {0: 8 * layer, "cpu": 2 * layer}
    unfitted = plan(llama, budgets)
    assert peak_on(llama, unfitted, 0, prefetch) > budgets[0]  # the walk alone overflows the GPU once prefetching
    fitted = plan(llama, budgets, main_headroom=prefetch_headroom(prefetch))
    assert peak_on(llama, fitted, 0, prefetch) <= budgets[0]
    on_gpu = [k for k, d in fitted.items() if d == 0]
    assert on_gpu and len(on_gpu) < len([k for k, d in unfitted.items() if d == 0])  # the GPU still runs layers


def test_prefetching_off_keeps_the_accelerate_room_only(llama):
    layer = compute_module_sizes(llama)["model.layers.0"]
    budgets = {0: 8 * layer, "cpu": 2 * layer}
    assert plan(llama, budgets, main_headroom=prefetch_headroom(0)) == plan(llama, budgets)


def test_a_cpu_plan_is_unchanged_its_prefetch_buffers_come_beside_the_budget(llama):
    layer = compute_module_sizes(llama)["model.layers.0"]
    budgets = {"cpu": 4 * layer}
    assert plan(llama, budgets, main_headroom=prefetch_headroom()) == plan(llama, budgets)


def test_a_plan_that_cannot_fit_after_a_few_rounds_warns_with_what_to_do(llama):
    layer = compute_module_sizes(llama)["model.layers.0"]
    budgets = {0: 8 * layer, "cpu": 2 * layer}
    sizes = compute_module_sizes(llama)

    def always_a_byte_over(model, device_map, _sizes):  # whatever the plan, one byte too many
        return budgets[0] - sum(sizes[k] for k, d in device_map.items() if d == 0) + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan(llama, budgets, main_headroom=always_a_byte_over)
    messages = [str(w.message) for w in caught if issubclass(w.category, BigModelWarning)]
    assert len(messages) == 1 and "more on 0 than max_memory gives it" in messages[0]
    assert "prefetch=" in messages[0]
