"""How the prefetcher reads (CPU runs): one read per run of tensors adjacent in a file, not one per tensor."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_small_bf16_llama, small_llama_config

from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.runtime.prefetch import prefetcher_of
from hf_bigmodel.storage.direct_io import DirectReader


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    saved = save_small_bf16_llama(tmp_path_factory.mktemp("llama"))
    return saved.path, saved.model


def test_a_layers_adjacent_tensors_come_in_one_read_and_give_the_same_outputs(llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    path, ref = llama
    reads: list[str] = []
    original = DirectReader.read_into

    def counting(self, entry, buffer):
        reads.append(entry.key)
        return original(self, entry, buffer)

    monkeypatch.setattr(DirectReader, "read_into", counting)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers": "disk"}
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map, dtype=torch.bfloat16, prefetch=1)
    fetcher = prefetcher_of(model)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    reads.clear()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    groups = [g for g in fetcher._groups if g.reads]
    assert groups and all(len(g.reads) < len(g.items) for g in groups)  # 9 tensors of a layer, fewer reads
    tensors = sum(len(g.items) for g in groups)
    assert len(reads) < tensors  # the forward read runs, not tensors
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "max_new_tokens": 4, "min_new_tokens": 4,
              "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), ref.generate(ids, **kwargs))
