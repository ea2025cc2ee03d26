"""One stage's forward, its checks, the message headers and the failure records: in one process.

The stage runtime talks to a stand-in channel here (what it would send, what it would receive), so each
stage's share of a forward is checked against the whole model's, exactly; models that pass more than the
hidden states between blocks are refused. The monitor runs on an in-process store.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from core_models import TinyLM, reference_tiny_lm
from torch import nn

from hf_bigmodel.errors import PipelineError, RankFailedError
from hf_bigmodel.parallel.channel import Incoming, Kind, MessageId, _header
from hf_bigmodel.parallel.faults import Monitor
from hf_bigmodel.parallel.runtime import Placeholder, StageRuntime
from hf_bigmodel.parallel.stages import plan_stages
from hf_bigmodel.parallel.world import World

AT = MessageId(op=5, step=0, micro_batch=0)


@dataclass
class _Ready:
    value: torch.Tensor

    def wait(self) -> torch.Tensor:
        return self.value


@dataclass
class FakeChannel:
    """Records sends; answers receives with ``incoming`` (checking the expected shape, as the header would)."""

    incoming: torch.Tensor | None = None
    sent: list[tuple[torch.Tensor, int, Kind, MessageId]] = field(default_factory=list)

    def send(self, tensor, dst, *, kind, at, what):
        self.sent.append((tensor.clone(), dst, kind, at))

    def post(self, src, *, kind, at, shape, dtype, what):
        assert self.incoming is not None and tuple(self.incoming.shape) == tuple(shape) and self.incoming.dtype == dtype
        return _Ready(self.incoming)


def _stage(model: nn.Module, plan, stage: int, channel: FakeChannel) -> StageRuntime:
    return StageRuntime(model, plan, stage, channel, torch.device("cpu"))  # type: ignore[arg-type]


def _hidden_before(model: TinyLM, ids: torch.Tensor, block: int) -> torch.Tensor:
    x = model.embed(ids)
    for b in model.blocks[:block]:
        x = b(x)
    return x


def test_each_stage_computes_its_share_of_the_forward_exactly():
    ref = reference_tiny_lm()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    plan = plan_stages(ref, 2)
    expected = ref(ids)
    with torch.no_grad():
        first = FakeChannel()
        runtime = _stage(ref, plan, 0, first)
        with runtime.calling(AT):
            out0 = ref(ids)
        runtime.close()
        assert isinstance(out0, Placeholder) and out0.shape == expected.shape  # made-up: the last stage's
        (sent, dst, kind, at), = first.sent
        assert (dst, kind, at) == (1, Kind.ACTIVATION, AT)
        assert torch.equal(sent, _hidden_before(ref, ids, 2))

        second = FakeChannel(incoming=sent)
        runtime = _stage(ref, plan, 1, second)
        with runtime.calling(AT):
            out1 = ref(ids)
        runtime.close()
    assert not isinstance(out1, Placeholder) and torch.equal(out1, expected)
    assert torch.equal(ref(ids), expected)  # closed: the model runs whole again


class _Leaky(nn.Module):
    """Blocks that also take a value computed by a module before them (not the hidden states)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.side = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(_TwoInputs() for _ in range(2))

    def forward(self, ids):
        x = self.embed(ids)
        extra = self.side(x)
        for block in self.blocks:
            x = block(x, extra)
        return x


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, extra):
        return self.linear(x) + extra


def test_a_block_fed_by_another_stages_module_is_refused_not_computed():
    model = _Leaky()
    plan = plan_stages(model, 2)
    runtime = _stage(model, plan, 1, FakeChannel(incoming=torch.zeros(1, 3, 4)))
    with pytest.raises(PipelineError, match=r"blocks.1 \(stage 1\) would get args\[1\] computed from modules of"):
        with runtime.calling(AT):
            model(torch.tensor([[1, 2, 3]]))
    runtime.close()


def test_another_stages_module_called_outside_a_pipelined_forward_says_what_to_call():
    model = reference_tiny_lm()
    runtime = _stage(model, plan_stages(model, 2), 0, FakeChannel())
    with pytest.raises(PipelineError, match=r"holds only stage 0 of 2 .*call model.generate\(...\) or model"):
        model(torch.tensor([[1, 2]]))
    runtime.close()


class _Shortcut(TinyLM):
    """A forward that stops after the first block for one-token inputs."""

    def forward(self, ids):
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            if ids.shape[1] == 1 and i == 1:
                return x
            x = block(x)
        return self.head(self.norm(x))


def test_a_forward_that_never_reaches_the_stage_cut_is_an_error():
    model = _Shortcut().eval()
    runtime = _stage(model, plan_stages(model, 2), 0, FakeChannel())
    with pytest.raises(PipelineError, match="never reached blocks.2, where it sends the hidden states"):
        with runtime.calling(AT):
            model(torch.tensor([[1]]))
    runtime.close()


def test_a_header_of_another_message_is_an_error_naming_both():
    expected = _header(Kind.ACTIVATION, AT, torch.empty(2, 3))
    other = _header(Kind.ACTIVATION, MessageId(5, 1, 0), torch.empty(2, 3))

    class Done:
        def wait(self):
            return None

    world = World(rank=1, size=2, local_rank=1, local_size=2, host="h", device=torch.device("cpu"), backend="gloo",
                  store=dist.HashStore(), timeout=10.0)
    channel = type("C", (), {"world": world, "monitor": None})()
    incoming = Incoming(channel, 0, expected.tolist(), other, torch.empty(2, 3), [Done(), Done()], "testing")
    with pytest.raises(PipelineError, match=r"expected activation of operation 5, step 0.*got activation of "
                                            r"operation 5, step 1"):
        incoming.wait()


@pytest.fixture
def monitor(monkeypatch):
    monkeypatch.setenv("HF_BIGMODEL_PIPELINE_HEARTBEAT", "0.02")
    world = World(rank=0, size=3, local_rank=0, local_size=3, host="hostA", device=torch.device("cpu"),
                  backend="gloo", store=dist.HashStore(), timeout=30.0)
    watch = Monitor(world)
    yield watch
    watch.close()


def _as_rank(monitor: Monitor, rank: int, **entry) -> None:
    record = {"rank": rank, "host": f"host{rank}", "pid": 100 + rank, "phase": "loading", "error": "X: y",
              "lost": None, "time": time.time(), **entry}
    monitor.world.store.set(f"failed/{rank}", json.dumps(record))
    monitor.world.store.add("failures", 1)


def test_the_first_real_error_is_reported_not_the_losses_it_caused(monitor):
    monitor.world.store.set("info/2", json.dumps({"host": "hostC", "pid": 7}))
    _as_rank(monitor, 1, lost=2, error="RankFailedError: lost rank 2", time=1.0)
    _as_rank(monitor, 2, error="CorruptCheckpointError: shard cut short", time=2.0)
    err = monitor.failure(1, "generating", RuntimeError("Connection closed by peer"))
    assert isinstance(err, RankFailedError) and err.failed_rank == 2 and err.host == "host2"
    assert "rank 2 (host hostC, pid 7) failed while loading: CorruptCheckpointError: shard cut short" in str(err)


def test_a_rank_lost_without_a_word_is_named_as_killed_or_crashed(monitor):
    _as_rank(monitor, 2, lost=1, error="RankFailedError: lost rank 1", phase="generating")
    err = monitor.failure(2, "generating", RuntimeError("Connection closed by peer [1.2.3.4]:5"))
    assert err.failed_rank == 1
    assert "lost rank 1 while generating" in str(err) and "killed (by a signal or the OOM killer)" in str(err)
    timeout = monitor.failure(1, "generating", RuntimeError("Timed out waiting 30000ms for recv"))
    assert "did not answer within" in str(timeout)


def test_a_silent_peer_is_lost_after_ten_heartbeats_while_waiting(monitor):
    store = monitor.world.store
    store.add("alive/1", 1)
    store.add("alive/2", 1)
    keep_beating = threading.Event()

    def beat():
        while not keep_beating.wait(0.01):
            store.add("alive/2", 1)  # rank 2 lives; rank 1 never beats again

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(RankFailedError, match="lost rank 1 while waiting: it did not answer") as info:
            monitor.exchange("loaded", "", "waiting")
    finally:
        keep_beating.set()
    assert info.value.failed_rank == 1 and time.monotonic() - started < 5


def test_another_ranks_failure_interrupts_a_long_load(monitor):
    threading.Timer(0.2, lambda: _as_rank(monitor, 2, error="OSError: disk full")).start()
    started = time.monotonic()
    with pytest.raises(RankFailedError, match="Stopping rank 0: rank 2 failed while loading: OSError: disk full"):
        with monitor.interruptible("loading"):
            while time.monotonic() - started < 10:
                sum(range(1000))  # a load that would go on for 10 s
    assert time.monotonic() - started < 5


def _world(device: str = "cpu", local_size: int = 2) -> World:
    return World(rank=1, size=2, local_rank=1, local_size=local_size, host="h", device=torch.device(device),
                 backend="gloo", store=dist.HashStore(), timeout=10.0)


def test_a_gpu_budget_is_each_process_own_gpu():
    from hf_bigmodel.parallel.launch import own_budgets

    gpu1 = _world("cuda:1")
    assert own_budgets({0: "10GB", "cpu": "5GB"}, gpu1) == {1: 10**10, "cpu": 5 * 10**9}
    assert own_budgets({0: "10GB", 1: "20GB", "disk": "1TB"}, gpu1) == {1: 2 * 10**10, "disk": 10**12}
    with pytest.raises(PipelineError, match=r"names GPUs \[0, 2\] but rank 1 computes on GPU 1"):
        own_budgets({0: "10GB", 2: "5GB"}, gpu1)
    with pytest.raises(PipelineError, match="has no GPU"):
        own_budgets({0: "10GB"}, _world("cpu"))
    measured = own_budgets(None, _world("cpu", local_size=4))
    assert 0 < measured["cpu"] <= own_budgets(None, _world("cpu", local_size=1))["cpu"] // 4 + 1


def test_a_stage_downloads_the_index_first_and_then_only_its_own_shards(hub, tmp_path):
    from tiny_models import save_tiny_llama

    from hf_bigmodel.hf.hub import fetch_weight_files, resolve_model_files

    folder = save_tiny_llama(tmp_path / "llama", sharded=True, with_tokenizer=False).path
    hub.add_repo("org/llama", folder)
    files = resolve_model_files("org/llama", fetch_shards=False)
    assert set(hub.downloaded_files()) == {"config.json", "model.safetensors.index.json"}
    assert len(files.weight_files) > 2 and not any(p.exists() for p in files.weight_files)
    wanted = files.weight_files[-1:]
    fetch_weight_files(files, wanted)
    assert set(hub.downloaded_files()) == {"config.json", "model.safetensors.index.json", wanted[0].name}
    assert wanted[0].is_file() and not files.weight_files[0].exists()


def test_a_peer_that_goes_silent_interrupts_a_long_load(monitor):
    store = monitor.world.store
    for peer in (1, 2):
        store.add(f"alive/{peer}", 1)
    keep_beating = threading.Event()

    def beat():
        while not keep_beating.wait(0.01):
            store.add("alive/2", 1)  # rank 2 keeps beating, rank 1 (killed while loading) never again

    threading.Thread(target=beat, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(RankFailedError, match="lost rank 1 while loading: it did not answer .*no heartbeat"):
            with monitor.interruptible("loading"):
                while time.monotonic() - started < 10:
                    sum(range(1000))
    finally:
        keep_beating.set()
    assert time.monotonic() - started < 5
