"""The CUDA path of prefetching: pinned buffers, a side stream, events; skipped without a CUDA device.

Outputs must be bit-identical to the synchronous path, no host-wide synchronisation may happen per
forward, and GPU memory stays bounded by the resident weights plus ``depth + 1`` groups.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import SMALL_LLAMA_LAYERS, save_small_bf16_llama, small_llama_config

from hf_bigmodel import cpu_offload, init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.runtime.prefetch import prefetcher_of

pytestmark = pytest.mark.gpu

LAYERS = SMALL_LLAMA_LAYERS


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    saved = save_small_bf16_llama(tmp_path_factory.mktemp("llama_gpu"))
    return saved.path, saved.model.to("cuda:0")


def _device_map():
    dm = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": "disk"}
    dm.update({f"model.layers.{i}": 0 if i == 0 else ("cpu" if i % 2 else "disk") for i in range(LAYERS)})
    return dm


def _load(path, prefetch):
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    return load_checkpoint_and_dispatch(model, path, device_map=_device_map(), dtype=torch.bfloat16,
                                        prefetch=prefetch)


def _run(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5,
                                min_new_tokens=5, pad_token_id=0)
    return logits, tokens


def test_gpu_prefetch_from_cpu_and_disk_is_bit_identical(llama):
    path, ref = llama
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1)).to("cuda:0")
    expected = _run(ref, ids)
    sync = _run(_load(path, 0), ids)
    model = _load(path, 2)
    fetched = _run(model, ids)
    for got in (sync, fetched):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    fetcher = prefetcher_of(model)
    assert fetcher is not None and fetcher.device.type == "cuda"
    stats = fetcher.stats()
    assert stats["hits"] > 0 and stats["misses"] == 0, stats
    assert stats["buffers"] == 0  # CUDA groups stream through the reader's pinned staging chunks, no host buffers
    memory = model._hf_bigmodel_weights.memory  # the layers mapped to "cpu": page-locked, copied asynchronously
    assert memory and all(t.is_pinned() for t in memory.values())


def test_no_host_wide_synchronisation_per_forward(llama, monkeypatch):
    path, _ = llama
    model = _load(path, 2)
    ids = torch.randint(3, 256, (1, 9)).to("cuda:0")
    with torch.no_grad():
        model(ids)  # warm-up: allocations, order learning
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("device"))
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", lambda self: calls.append("stream"))
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    assert calls == []


def test_a_user_stream_waits_for_the_side_stream(llama):
    path, ref = llama
    model = _load(path, 1)
    ids = torch.randint(3, 256, (2, 7)).to("cuda:0")
    with torch.no_grad():
        expected = ref(ids).logits
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            got = [model(ids).logits for _ in range(3)]
        stream.synchronize()
    for logits in got:
        assert torch.equal(logits, expected)


def test_cpu_offload_prefetches_from_pinned_ram_with_bounded_gpu_memory():
    torch.manual_seed(2)
    width, layers = 1024, 8
    ref = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).eval()
    model.load_state_dict(ref.state_dict())
    model = cpu_offload(model, execution_device=0, prefetch=2)
    fetcher = prefetcher_of(model)
    assert fetcher is not None
    x = torch.randn(4, width, device="cuda:0")
    ref = ref.to("cuda:0")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), ref(x))
    torch.cuda.synchronize()
    layer_bytes = (width * width + width) * 4
    # Resident: nothing but activations; in flight: at most depth + 1 layers, plus the one being released.
    assert torch.cuda.max_memory_allocated() - base <= (2 + 2) * layer_bytes + 4 * 2**20
    assert fetcher.stats()["hits"] >= 2 * layers
