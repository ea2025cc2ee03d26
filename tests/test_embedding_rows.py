"""Embeddings read by row (hf_bigmodel.runtime.embedding_rows): only the rows of the batch's tokens come off disk.

Every output is compared exactly (``torch.equal``) with the undispatched model.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_model
from tiny_models import assert_same_outputs
from torch import nn

from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch, remove_hook_from_submodules
from hf_bigmodel.runtime.embedding_rows import EmbeddingRowsHook
from hf_bigmodel.runtime.hooks import AlignDevicesHook
from hf_bigmodel.storage import direct_io
from hf_bigmodel.storage.direct_io import DirectReader
from hf_bigmodel.storage.row_reads import read_rows, row_runs
from hf_bigmodel.storage.safetensors_io import read_header

VOCAB, DIM = 4096, 256  # 2 MiB in bf16: 512-byte rows


class EmbedHead(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # what a subclass does with the ids is unknown
        return super().forward(ids) * 2.0


def _saved(tmp_path, *, tie=False, embedding=None):
    torch.manual_seed(0)
    ref = EmbedHead(tie=tie).to(torch.bfloat16).eval()
    if embedding is not None:
        ref.emb = embedding.to(torch.bfloat16)
        if tie:
            ref.head.weight = ref.emb.weight
    path = tmp_path / "model.safetensors"
    save_model(ref, str(path))
    return path, ref


def _dispatched(path, *, tie=False, embedding_class=nn.Embedding, device_map=None):
    with init_empty_weights():
        model = EmbedHead(tie=tie)
        if embedding_class is not nn.Embedding:
            model.emb = embedding_class(VOCAB, DIM, padding_idx=0)
            if tie:
                model.head.weight = model.emb.weight
    return load_checkpoint_and_dispatch(model, path, device_map=device_map or {"emb": "disk", "head": "cpu"},
                                        dtype=torch.bfloat16)


@pytest.fixture()
def counted_reads(monkeypatch):
    """Bytes each read fetched, keyed by tensor key (a row run's key starts with its tensor's)."""
    reads: list[tuple[str, int]] = []
    original = DirectReader.start_read  # read_into goes through it too

    def counting(self, entry, buffer):
        reads.append((entry.key, direct_io.padded_span(entry)[1]))
        return original(self, entry, buffer)

    monkeypatch.setattr(DirectReader, "start_read", counting)
    return reads


def test_row_runs_and_read_rows_give_exactly_the_rows(tmp_path):
    path, ref = _saved(tmp_path)
    entry = read_header(str(path)).entries["emb.weight"]
    rows = [0, 1, 2, 17, 4094, 4095]
    assert row_runs(rows) == [(0, 3), (17, 18), (4094, 4096)]
    got = read_rows(entry, rows, DirectReader())
    assert torch.equal(got, ref.emb.weight.detach()[rows])
    assert read_rows(entry, [], DirectReader()).shape == (0, DIM)
    with pytest.raises(IndexError, match="emb.weight"):
        read_rows(entry, [4095, 4096], DirectReader())


def test_an_embedding_on_disk_reads_only_its_tokens_rows_and_gives_the_same_output(tmp_path, counted_reads):
    path, ref = _saved(tmp_path)
    model = _dispatched(path)
    hook = model.emb._hf_hook
    assert isinstance(hook, EmbeddingRowsHook)
    ids = torch.tensor([[5, 9, 9, 10, 4000], [0, 5, 11, 3, 3]])
    with torch.no_grad():
        out = model(ids)
        expected = ref(ids)
    assert torch.equal(out, expected)
    emb_bytes = sum(n for key, n in counted_reads if key.startswith("emb.weight"))
    assert 0 < emb_bytes <= 6 * 2 * 4096  # 6 runs (0, 3, 5, 9-11, 4000...), each at most two pages
    assert hook.rows_read == 7 and hook.whole_reads == 0
    assert model.emb.padding_idx == 0  # handed back after the forward
    assert model.emb.weight.device.type == "meta"  # released


def test_many_rows_are_read_as_the_whole_matrix(tmp_path, counted_reads):
    path, ref = _saved(tmp_path)
    model = _dispatched(path)
    ids = torch.arange(0, VOCAB, 7).reshape(1, -1)  # 586 runs: one sequential read is cheaper
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    assert model.emb._hf_hook.whole_reads == 1 and model.emb._hf_hook.rows_read == 0
    assert ("emb.weight", 2 * 2**20) in counted_reads or any(n >= 2 * 2**20 for _, n in counted_reads)


def test_ids_outside_the_vocabulary_fail_and_leave_the_model_working(tmp_path):
    path, ref = _saved(tmp_path)
    model = _dispatched(path)
    with torch.no_grad(), pytest.raises(IndexError, match="emb.weight"):
        model(torch.tensor([[1, VOCAB]]))
    assert model.emb.padding_idx == 0 and model.emb.weight.device.type == "meta"
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 2]])), ref(torch.tensor([[1, 2]])))


def test_with_gradients_on_the_embedding_reads_the_whole_matrix(tmp_path):
    path, ref = _saved(tmp_path)
    model = _dispatched(path)
    ids = torch.tensor([[3, 4]])
    assert torch.equal(model(ids).detach(), ref(ids).detach())
    assert model.emb._hf_hook.rows_read == 0


def test_a_subclass_overriding_forward_keeps_the_whole_matrix_hook(tmp_path):
    path, ref = _saved(tmp_path, embedding=ScaledEmbedding(VOCAB, DIM, padding_idx=0))
    model = _dispatched(path, embedding_class=ScaledEmbedding)
    hook = model.emb._hf_hook
    assert type(hook) is AlignDevicesHook
    ids = torch.tensor([[3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_a_tied_head_still_reads_the_whole_matrix(tmp_path, counted_reads, caplog):
    path, ref = _saved(tmp_path, tie=True)
    with caplog.at_level("INFO", logger="hf_bigmodel.runtime.dispatch"):
        model = _dispatched(path, tie=True, device_map={"emb": "disk", "head": "disk"})
    assert "head.weight, tied to it, still reads the whole matrix" in caplog.text
    assert isinstance(model.emb._hf_hook, EmbeddingRowsHook)
    ids = torch.tensor([[7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    whole = [n for key, n in counted_reads if key == "emb.weight"]
    rows = [n for key, n in counted_reads if key.startswith("emb.weight[")]
    assert rows and sum(rows) <= 2 * 4096  # the embedding: one run
    assert whole and whole[0] >= VOCAB * DIM * 2  # the head: the whole matrix


def test_removing_the_hooks_brings_the_whole_matrix_back(tmp_path):
    path, ref = _saved(tmp_path)
    model = _dispatched(path)
    remove_hook_from_submodules(model)
    assert torch.equal(model.emb.weight, ref.emb.weight)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[1, 2]])), ref(torch.tensor([[1, 2]])))


def test_llama_generation_with_the_embedding_on_disk_is_bit_identical(tmp_path):
    from tiny_models import SMALL_LLAMA_LAYERS
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=SMALL_LLAMA_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(config).eval()
    for param in ref.parameters():  # buffers (rotary inv_freq) stay float32, as loading leaves them
        param.data = param.data.to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="400KB")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    device_map = {"model.embed_tokens": "disk", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    model = load_checkpoint_and_dispatch(model, tmp_path, device_map=device_map, dtype=torch.bfloat16)
    assert isinstance(model.model.embed_tokens._hf_hook, EmbeddingRowsHook)
    ids = torch.randint(3, 8192, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_same_outputs(model, ref, ids, 5)
    assert model.model.embed_tokens._hf_hook.rows_read > 0
