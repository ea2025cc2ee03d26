"""How the prefetcher keeps reads going through a forward (hf_bigmodel.runtime.prefetch).

Reads start on the thread that submits a group, a pool buffer is reused by any group it holds, and a
group is let go as soon as its modules are done, its room going to reads ahead; a module that runs again
after that keeps its group to its turn. Outputs are always the undispatched model's, exactly.
"""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import save_small_bf16_llama, small_llama_config
from torch import nn

from hf_bigmodel import disk_offload, init_empty_weights, load_checkpoint_and_dispatch
from hf_bigmodel.runtime import prefetch_plan, prefetch_pool, prefetch_reader
from hf_bigmodel.runtime.prefetch import prefetcher_of


@pytest.fixture
def one_group_per_module(monkeypatch):
    monkeypatch.setattr(prefetch_plan, "GROUP_BYTES", 1)
    monkeypatch.setattr(prefetch_plan, "MERGE_BYTES", 0)


class Chain(nn.Module):
    """``count`` 8 x 8 linears in a row (one 4 KiB buffer each); block ``again`` runs twice in a row (as
    ALBERT's shared layer does)."""

    def __init__(self, count: int = 5, again: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(count))
        self.again = again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = torch.tanh(block(x))
            if i == self.again:
                x = torch.tanh(block(x))
        return x


def _chain(tmp_path, prefetch, **kwargs):
    torch.manual_seed(5)
    ref = Chain(**kwargs).eval()
    model = Chain(**kwargs).eval()
    model.load_state_dict(ref.state_dict())
    return ref, disk_offload(model, tmp_path / "offload", execution_device="cpu", prefetch=prefetch)


def test_reads_start_on_the_thread_that_submits_the_group(tmp_path, one_group_per_module, monkeypatch):
    started: list[str] = []
    real = prefetch_reader.start_fetch

    def spy(job, *args, **kwargs):
        started.append(threading.current_thread().name)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(prefetch_reader, "start_fetch", spy)
    ref, model = _chain(tmp_path, prefetch=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), ref(x))
    assert started and set(started) == {threading.current_thread().name}  # never the reader thread


def test_a_finished_group_is_let_go_and_its_room_read_ahead(tmp_path, one_group_per_module):
    ref, model = _chain(tmp_path, prefetch="8KiB")  # two 4 KiB groups ahead, and one more in use
    fetcher = prefetcher_of(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), ref(x))
            # The last block is done: none in use, its room holds a third group of the next forward.
            assert fetcher._current is None
            assert [job.group.index for job in fetcher._inflight] == [0, 1, 2]
    stats = fetcher.stats()
    assert stats["buffer_bytes"] <= stats["memory_bound"] and stats["misses"] == 0


def test_a_module_that_runs_again_keeps_its_group_to_its_turn(tmp_path, one_group_per_module):
    ref, model = _chain(tmp_path, prefetch=2, again=1)
    fetcher = prefetcher_of(model)
    x = torch.randn(3, 8)
    misses = []
    with torch.no_grad():
        for _ in range(6):
            assert torch.equal(model(x), ref(x))
            misses.append(fetcher.stats()["misses"])
    # Let go after its first run, the block's second run missed once; its group is then kept to its turn.
    assert misses[1] - misses[0] == 1 and misses[-1] == misses[1], misses
    assert fetcher._repeated == {1}


def test_no_buffer_is_made_once_groups_of_mixed_sizes_cycle(one_group_per_module, tmp_path, monkeypatch):
    """Reusing only buffers of a group's own size made buffers at every forward when sizes alternate."""
    from transformers import AutoModelForCausalLM

    saved = save_small_bf16_llama(tmp_path / "llama")
    made: list[int] = []
    real = prefetch_pool.aligned_empty
    monkeypatch.setattr(prefetch_pool, "aligned_empty", lambda n, **k: made.append(n) or real(n, **k))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    model = load_checkpoint_and_dispatch(model, saved.path, device_map={"": "disk"}, dtype=torch.bfloat16)
    fetcher = prefetcher_of(model)
    assert len({g.host_bytes for g in fetcher._groups}) > 2
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, saved.model(ids).logits)
        made.clear()
        for _ in range(3):
            assert torch.equal(model(ids).logits, saved.model(ids).logits)
    assert made == []
    stats = fetcher.stats()
    assert stats["buffer_bytes"] <= stats["memory_bound"]
