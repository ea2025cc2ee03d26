"""The CUDA path of prefetching: pinned buffers, a side stream, events; skipped without a CUDA device.

Outputs must be bit-identical to the synchronous path, no host-wide synchronisation may happen per
forward, and GPU memory stays bounded by the resident weights plus ``depth + 1`` groups.

Copies of a tiny model finish long before the compute stream reads them, so a missing ``wait_event``
would go unnoticed; the ordering tests hold the side stream with ``torch.cuda._sleep`` before each
group's copies (``slow_side_stream``): compute that does not wait reads memory not yet written.
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


#: GPU cycles the side stream sleeps before each group's copies and before each disk tensor's (about 10 ms):
#: far longer than it takes the compute stream to reach the tensors, so reading before they land gives
#: wrong values.
SLEEP_CYCLES = 20_000_000


@pytest.fixture
def slow_side_stream(monkeypatch):
    """Hold the prefetcher's side stream with a long kernel before every copy it makes.

    RAM tensors are copied right after the group's sleep; disk tensors go through the reader's staging
    chunks, and the reader waits for a chunk's copy before reusing it, so each gets a sleep of its own.
    """
    from hf_bigmodel.runtime import prefetch_reader

    real_fetch, real_to_device = prefetch_reader.fetch, prefetch_reader._to_device

    def slow_fetch(job, reader, device, stream, staging=None):
        if device.type == "cuda":
            with torch.cuda.device(device), torch.cuda.stream(stream):
                torch.cuda._sleep(SLEEP_CYCLES)
        return real_fetch(job, reader, device, stream, staging)

    def slow_to_device(ref, reader, staging, device, stream):
        torch.cuda._sleep(SLEEP_CYCLES)  # on ``stream``: fetch runs this inside torch.cuda.stream(stream)
        return real_to_device(ref, reader, staging, device, stream)

    monkeypatch.setattr(prefetch_reader, "fetch", slow_fetch)
    monkeypatch.setattr(prefetch_reader, "_to_device", slow_to_device)


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


def test_gpu_prefetch_from_cpu_and_disk_is_bit_identical(llama, slow_side_stream):
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


def test_no_host_wide_synchronisation_per_forward(llama):
    """Decoding with the cache, every step on the GPU: CUDA's sync debug mode raises on any synchronising call."""
    path, ref = llama
    model = _load(path, 2)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(2)).to("cuda:0")
    with torch.no_grad():
        out = model(ids, use_cache=True)  # prefill; warm-up: allocations, order learning
        expected = ref(ids, use_cache=True)
        steps, expected_steps = [], []
        cache, ref_cache = out.past_key_values, expected.past_key_values
        token, ref_token = out.logits[:, -1:].argmax(-1), expected.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError):  # the mode is on: a synchronisation would fail the test
                torch.cuda.current_stream().synchronize()
            for _ in range(4):  # decode: nothing leaves the GPU, nothing waits for it
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                steps.append(token)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for _ in range(4):
            expected = ref(ref_token, past_key_values=ref_cache, use_cache=True)
            ref_cache, ref_token = expected.past_key_values, expected.logits[:, -1:].argmax(-1)
            expected_steps.append(ref_token)
    assert torch.equal(torch.cat(steps, 1), torch.cat(expected_steps, 1))
    assert prefetcher_of(model).stats()["misses"] == 0


def test_a_user_stream_waits_for_the_side_stream(llama, slow_side_stream):
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


def test_compute_that_does_not_wait_reads_unwritten_memory(llama, slow_side_stream, monkeypatch):
    """The check above can fail: without wait_event, the held side stream's copies land too late."""
    path, ref = llama
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3)).to("cuda:0")
    with torch.no_grad():
        expected = ref(ids).logits
        model = _load(path, 1)
        monkeypatch.setattr(torch.cuda.Stream, "wait_event", lambda self, event: None)
        got = model(ids).logits
        torch.cuda.synchronize()
    assert not torch.equal(got, expected)
