"""The prefetch window in bytes (hf_bigmodel.runtime.prefetch_window): what is read ahead fits it, buffers are
sized per group, and outputs stay bit-identical whatever the window."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_same_outputs, save_small_bf16_llama, small_llama_config

from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.runtime import prefetch as prefetch_module
from hf_bigmodel.runtime.prefetch import prefetcher_of
from hf_bigmodel.runtime.prefetch_window import ENV_VAR, Window, prefetch_memory, prefetch_window


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    saved = save_small_bf16_llama(tmp_path_factory.mktemp("llama"))
    return saved.path, saved.model


def _load(path, prefetch):
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk",
                  "model.layers": "disk"}
    return load_checkpoint_and_dispatch(model, path, device_map=device_map, dtype=torch.bfloat16, prefetch=prefetch)


def test_the_window_is_a_size_a_number_of_groups_or_off(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert prefetch_window(None) == Window()
    assert prefetch_window("1GB") == Window(nbytes=10**9) and prefetch_window("0").off
    assert prefetch_window(2) == Window(groups=2)
    monkeypatch.setenv(ENV_VAR, "64MiB")
    assert prefetch_window(None) == Window(nbytes=64 * 2**20)
    assert prefetch_window(1) == Window(groups=1)  # an explicit argument wins
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=ENV_VAR):
        prefetch_window(None)
    for bad in (-1, True, 1.5, "-3MiB"):
        with pytest.raises(ValueError, match="prefetch"):
            prefetch_window(bad)


def test_the_memory_bound_is_the_largest_group_plus_the_window():
    mib = 2**20
    layers = [86 * mib] * 18 + [125 * mib]
    assert Window().bytes_for(layers) == 172 * mib
    assert prefetch_memory(layers, Window()) == (125 + 172) * mib
    assert prefetch_memory(layers, Window(nbytes=64 * mib)) == 2 * 125 * mib  # one group ahead, even a large one
    assert prefetch_memory(layers, Window(groups=2)) == 3 * 125 * mib  # the depth of before
    assert prefetch_memory(layers, Window(groups=0)) == 0


@pytest.mark.parametrize("prefetch", [None, "1KiB", "100KiB", "10MiB", 1, 3])
def test_generation_is_bit_identical_and_buffers_stay_within_the_bound(llama, prefetch, monkeypatch):
    path, ref = llama
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = _load(path, prefetch)
    fetcher = prefetcher_of(model)
    held: list[int] = []
    ahead: list[int] = []
    fill = fetcher._fill

    def watched(start):
        fill(start)
        held.append(fetcher._pool.held_bytes)
        ahead.append(sum(prefetch_module._rounded(j.group.fetch_bytes) for j in fetcher._inflight))

    monkeypatch.setattr(fetcher, "_fill", watched)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    assert_same_outputs(model, ref, ids, 5)
    stats = fetcher.stats()
    assert held and max(held) <= stats["memory_bound"]
    if stats["window_bytes"] is not None:  # more than one group ahead only when they fit the window
        largest = max(prefetch_module._rounded(g.fetch_bytes) for g in fetcher._groups)
        assert max(ahead) <= max(stats["window_bytes"], largest)
    assert stats["misses"] == 0
