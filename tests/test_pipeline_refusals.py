"""What a pipeline refuses, and says why: checked in a one-process pipeline (no other process to start).

Each test joins a fresh one-process gloo group on a free port (what torchrun would set up), so the
library's own setup, checks and failure handling run as in a real launch.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from tiny_models import save_tiny_llama, save_tiny_t5

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import PipelineError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch was built without torch.distributed / gloo")


@pytest.fixture
def one_process(monkeypatch):
    """The environment torchrun gives a one-process launch; the group is gone afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "HF_BIGMODEL_PIPELINE_TIMEOUT": "60"}.items():
        monkeypatch.setenv(name, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "m", with_tokenizer=False)


def test_without_a_launcher_the_error_says_to_use_torchrun(monkeypatch, llama):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PipelineError, match="not started by a launcher .*torchrun --nproc-per-node 2"):
        load_pretrained_dispatched(llama.path, pipeline=True)


def test_an_encoder_decoder_model_is_refused_with_the_reason(one_process, tmp_path):
    path = save_tiny_t5(tmp_path / "t5").path
    with pytest.raises(PipelineError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        load_pretrained_dispatched(path, pipeline=True)
    assert not dist.is_initialized()  # a failure tears the group down: no other process waits on this one


def test_a_device_map_cannot_be_imposed_on_the_stages(one_process, llama):
    with pytest.raises(PipelineError, match="every process plans its own stage; device_map="):
        load_pretrained_dispatched(llama.path, pipeline=True, device_map={"": "cpu"})


def test_settings_that_change_greedy_tokens_are_refused_then_the_pipeline_is_closed(one_process, llama):
    model = load_pretrained_dispatched(llama.path, pipeline=True)
    ids = torch.tensor([[5, 6, 7]])
    expected = llama.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4), expected)
    with pytest.raises(PipelineError, match=r"cannot apply do_sample=True, repetition_penalty=1.3"):
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, repetition_penalty=1.3)
    with pytest.raises(PipelineError, match="stopped after: .*start the processes again"):
        model.generate(input_ids=ids, max_new_tokens=4)


def test_a_cache_passed_to_the_forward_is_refused(one_process, llama):
    model = load_pretrained_dispatched(llama.path, pipeline=True)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(model(input_ids=ids).logits, llama.model(input_ids=ids).logits)
    with pytest.raises(PipelineError, match="keeps one KV cache per stage; model\\(...\\) takes no cache"):
        model(input_ids=ids, cache=transformers.DynamicCache())


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.seen.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


def test_a_streamer_gets_what_transformers_gives_it(one_process, llama):
    model = load_pretrained_dispatched(llama.path, pipeline=True)
    ids = torch.tensor([[5, 6, 7]])
    ours, theirs = _Recorder(), _Recorder()
    model.generate(input_ids=ids, max_new_tokens=4, streamer=ours)
    llama.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, streamer=theirs)
    assert ours.seen == theirs.seen and ours.ended and theirs.ended
    with pytest.raises(ValueError, match="A streamer takes one sequence; generate\\(\\) got a batch of 2"):
        model.generate(input_ids=torch.tensor([[5, 6], [7, 8]]), max_new_tokens=2, streamer=_Recorder())
