"""How the prefetcher reads (CPU runs): one read per run of tensors adjacent in a file, not one per tensor."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from page_cache import spy_reads
from tiny_models import assert_same_outputs, greedy, save_small_bf16_llama, small_llama_config

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
    reads = spy_reads(monkeypatch)
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
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **greedy(ids, 4)), ref.generate(ids, **greedy(ids, 4)))


def _batches(monkeypatch) -> list[int]:
    """The number of spans of each ``lio_listio`` batch a DirectReader submits, from now on."""
    from hf_bigmodel.storage import aio

    sizes: list[int] = []
    original = aio.submit

    def recording(fds, address, spans):
        sizes.append(len(spans))
        return original(fds, address, spans)

    monkeypatch.setattr(aio, "submit", recording)
    return sizes


needs_aio = pytest.mark.skipif("not __import__('hf_bigmodel.storage.aio').storage.aio.available()",
                               reason="lio_listio needs Linux with glibc on a 64-bit machine")


def _blob(tmp_path, nbytes: int) -> tuple[str, torch.Tensor]:
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    file = tmp_path / "blob.bin"
    file.write_bytes(data.numpy().tobytes())
    return str(file), data


@needs_aio
@pytest.mark.parametrize("in_flight", [1, 3])
def test_reads_in_flight_give_the_exact_bytes_of_any_range(tmp_path, monkeypatch, in_flight):
    from hf_bigmodel.storage import direct_io
    from hf_bigmodel.storage.direct_io import ALIGNMENT, aligned_empty, padded_span
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    monkeypatch.setattr(direct_io, "CHUNK", 2 * ALIGNMENT)
    batches = _batches(monkeypatch)
    file, data = _blob(tmp_path, 9 * ALIGNMENT + 123)
    reader = DirectReader(direct=True, in_flight=in_flight)
    for start, end in [(0, data.numel()), (5, 5 * ALIGNMENT + 1), (ALIGNMENT - 1, 7 * ALIGNMENT), (10, 20)]:
        entry = TensorEntry(file, "k", torch.uint8, (end - start,), start, end)
        assert torch.equal(reader.read_into(entry, aligned_empty(padded_span(entry)[1])), data[start:end])
    reader.close()
    # 10 pages in 2-page chunks: 5 in one batch, then 3 and 4 (the 10..20 range is one chunk: read alone)
    assert batches == ([5, 3, 4] if in_flight > 1 else [])


class _FailingBatch:
    """A batch whose requests all failed (nothing was read): what ``aio.submit`` gives in some tests."""

    def __init__(self, fds, address, spans, error=errno.EAGAIN):
        self.spans = list(spans)
        self.error = error

    def wait(self):
        raise OSError(self.error, "lio_listio read failed")


@needs_aio
@pytest.mark.parametrize("when", ["submitting", "waiting"])
def test_a_failed_batch_is_read_again_one_read_at_a_time(tmp_path, monkeypatch, when):
    from hf_bigmodel.storage import aio, direct_io
    from hf_bigmodel.storage.direct_io import ALIGNMENT, aligned_empty, padded_span
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    def out_of_resources(fds, address, spans):
        if when == "submitting":
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return _FailingBatch(fds, address, spans)

    monkeypatch.setattr(direct_io, "CHUNK", 2 * ALIGNMENT)
    monkeypatch.setattr(aio, "submit", out_of_resources)
    file, data = _blob(tmp_path, 9 * ALIGNMENT + 123)
    entry = TensorEntry(file, "k", torch.uint8, (data.numel() - 7,), 7, data.numel())
    reader = DirectReader(direct=True, in_flight=4)
    assert torch.equal(reader.read_into(entry, aligned_empty(padded_span(entry)[1])), data[7:])
    reader.close()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_aio
def test_reads_started_together_survive_o_direct_refused_at_read_time(tmp_path, monkeypatch):
    """Two reads of one file in flight when the filesystem refuses O_DIRECT reads: both fall back to buffered
    reads with the exact bytes, the file is reopened once, and close() leaves no descriptor behind."""
    import fcntl

    from hf_bigmodel.storage import aio, direct_io
    from hf_bigmodel.storage.direct_io import ALIGNMENT, aligned_empty, padded_span
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    real_pread = direct_io.pread_exact

    def refuse_direct(fd, *args, **kwargs):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct_io._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pread(fd, *args, **kwargs)

    monkeypatch.setattr(direct_io, "CHUNK", 2 * ALIGNMENT)
    monkeypatch.setattr(direct_io, "pread_exact", refuse_direct)
    monkeypatch.setattr(aio, "submit", lambda fds, a, spans: _FailingBatch(fds, a, spans, errno.EINVAL))
    file, data = _blob(tmp_path, 12 * ALIGNMENT + 5)
    before = _open_descriptors()
    reader = DirectReader(direct=True, in_flight=3)
    ranges = [(3, 6 * ALIGNMENT + 9), (6 * ALIGNMENT + 9, data.numel())]
    entries = [TensorEntry(file, f"k{i}", torch.uint8, (b - a,), a, b) for i, (a, b) in enumerate(ranges)]
    finishers = [reader.start_read(e, aligned_empty(padded_span(e)[1])) for e in entries]
    assert all(direct for _, direct in reader._fds.values())
    for finish, (a, b) in zip(finishers, ranges):
        assert torch.equal(finish(), data[a:b])
    assert [direct for _, direct in reader._fds.values()] == [False]
    reader.close()
    assert _open_descriptors() == before


@needs_aio
def test_a_started_read_is_at_the_device_before_it_is_finished(tmp_path, monkeypatch):
    from hf_bigmodel.storage import aio, direct_io
    from hf_bigmodel.storage.direct_io import ALIGNMENT, aligned_empty, padded_span
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    events: list[str] = []
    real_submit = aio.submit

    def submit(fds, address, spans):
        events.append("submit")
        batch = real_submit(fds, address, spans)
        real_wait = batch.wait
        batch.wait = lambda: events.append("wait") or real_wait()
        return batch

    monkeypatch.setattr(direct_io, "CHUNK", 2 * ALIGNMENT)
    monkeypatch.setattr(aio, "submit", submit)
    file, data = _blob(tmp_path, 9 * ALIGNMENT)
    reader = DirectReader(direct=True, in_flight=2)
    halves = [(0, 4 * ALIGNMENT + 1), (4 * ALIGNMENT + 1, data.numel())]
    entries = [TensorEntry(file, f"k{i}", torch.uint8, (b - a,), a, b) for i, (a, b) in enumerate(halves)]
    finishers = [reader.start_read(e, aligned_empty(padded_span(e)[1])) for e in entries]
    assert events == ["submit", "submit"]
    assert [torch.equal(f(), data[a:b]) for f, (a, b) in zip(finishers, halves)] == [True, True]
    assert events == ["submit", "submit", "wait", "wait"]
    reader.close()


@needs_aio
def test_a_read_in_flight_of_a_truncated_file_names_the_tensor(tmp_path, monkeypatch):
    from hf_bigmodel.errors import CorruptCheckpointError
    from hf_bigmodel.storage import direct_io
    from hf_bigmodel.storage.direct_io import ALIGNMENT, aligned_empty, padded_span
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    monkeypatch.setattr(direct_io, "CHUNK", 2 * ALIGNMENT)
    batches = _batches(monkeypatch)
    file, _ = _blob(tmp_path, 3 * ALIGNMENT + 100)
    entry = TensorEntry(file, "model.layers.0.mlp.up_proj.weight", torch.uint8, (8 * ALIGNMENT,), 0, 8 * ALIGNMENT)
    reader = DirectReader(direct=True, in_flight=4)
    with pytest.raises(CorruptCheckpointError, match="up_proj.*truncated"):
        reader.read_into(entry, aligned_empty(padded_span(entry)[1]))
    reader.close()
    assert batches == [4]


@needs_aio
def test_the_prefetcher_keeps_several_reads_in_flight_and_gives_the_same_outputs(llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_bigmodel.storage import direct_io

    path, ref = llama
    monkeypatch.setattr(direct_io, "CHUNK", 2 * direct_io.ALIGNMENT)
    monkeypatch.setenv("HF_BIGMODEL_READS_IN_FLIGHT", "3")
    batches = _batches(monkeypatch)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  "model.layers": "disk"}
    model = load_checkpoint_and_dispatch(model, path, device_map=device_map, dtype=torch.bfloat16)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    assert_same_outputs(model, ref, ids, 3)
    assert prefetcher_of(model) is not None
    assert batches and max(batches) > 1  # the layers' runs went in chunks, several at once


def test_reads_in_flight_come_from_the_environment(monkeypatch):
    from hf_bigmodel.storage.direct_io import DEFAULT_IN_FLIGHT, reads_in_flight

    monkeypatch.delenv("HF_BIGMODEL_READS_IN_FLIGHT", raising=False)
    assert reads_in_flight() == DEFAULT_IN_FLIGHT
    monkeypatch.setenv("HF_BIGMODEL_READS_IN_FLIGHT", "1")
    assert reads_in_flight() == 1
    for bad in ("0", "two", "-3"):
        monkeypatch.setenv("HF_BIGMODEL_READS_IN_FLIGHT", bad)
        with pytest.raises(ValueError, match="HF_BIGMODEL_READS_IN_FLIGHT.*whole number >= 1"):
            reads_in_flight()
    with pytest.raises(ValueError, match="in_flight must be >= 1"):
        DirectReader(in_flight=0)


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "none"
    return text[text.index("[") + 1 : text.index("]")]


def _anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(x, 16) for x in head.split("-"))
            inside = low <= address < high
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_large_read_buffers_are_huge_pages_and_small_ones_are_not_padded():
    """O_DIRECT into 4 KiB pages is cut at the device's segment limit (half the speed on a virtio disk):
    read buffers of 2 MiB and more must be 2 MiB-aligned and backed by huge pages once touched."""
    from hf_bigmodel.storage.direct_io import ALIGNMENT, HUGE_PAGE, aligned_empty

    # Leave touched heap memory behind (glibc raises its mmap threshold once a large block is freed):
    # torch.empty of this size would then reuse 4 KiB pages that advice cannot turn into huge ones.
    torch.empty(30 * 2**20, dtype=torch.uint8).fill_(0)  # freed at once
    torch.empty(9 * HUGE_PAGE, dtype=torch.uint8).fill_(1)  # now from the heap, touched, freed
    big = aligned_empty(8 * HUGE_PAGE + 12345, huge=True)
    assert big.data_ptr() % HUGE_PAGE == 0 and big.numel() == 8 * HUGE_PAGE + 12345
    big.fill_(1)
    assert _anon_huge_bytes(big.data_ptr()) >= 4 * HUGE_PAGE  # the kernel may be short of some
    small = aligned_empty(HUGE_PAGE - ALIGNMENT, huge=True)
    assert small.data_ptr() % ALIGNMENT == 0 and small.numel() == HUGE_PAGE - ALIGNMENT
    once = aligned_empty(8 * HUGE_PAGE)  # memory read into once (a loaded tensor) stays on 4 KiB pages
    once.fill_(1)
    if _thp_mode() == "madvise":
        assert _anon_huge_bytes(once.data_ptr()) == 0


def test_the_prefetchers_buffers_are_huge_pages(llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hf_bigmodel.storage import direct_io

    asked = []
    real = direct_io.aligned_empty

    def spy(nbytes, **kwargs):
        asked.append(kwargs.get("huge", False))
        return real(nbytes, **kwargs)

    monkeypatch.setattr("hf_bigmodel.runtime.prefetch_pool.aligned_empty", spy)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    model = load_checkpoint_and_dispatch(model, llama[0], device_map={"": "disk"}, dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    assert prefetcher_of(model) is not None and asked and all(asked)


def test_the_reader_thread_starts_the_next_job_before_it_hands_out_the_current(monkeypatch):
    """Run on this thread with every job queued: the next job's reads start before the current one is
    handed out, an error stays with its job, a retired job is skipped, an action waits for every started
    read, and the reader closes only once nothing is running."""
    import queue

    from hf_bigmodel.runtime import prefetch_reader

    events: list[str] = []
    names: dict[int, str] = {}

    def start_fetch(job, reader, device, stream, staging=None):
        name = names[id(job)]
        events.append(f"start {name}")

        def finish():
            events.append(f"finish {name}")
            if name == "b":
                raise OSError(errno.EIO, "Input/output error")
            return [torch.full((1,), ord(name))]

        return finish

    class Reader:
        def close(self):
            events.append("close")

    monkeypatch.setattr(prefetch_reader, "start_fetch", start_fetch)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    made = {}
    for name in "abrc":
        made[name] = prefetch_reader.Job([], None, retired=name == "r")
        names[id(made[name])] = name
        jobs.put(made[name])
    action = prefetch_reader.Job([], None, action=lambda reader: events.append("action"))
    jobs.put(action)
    jobs.put(None)
    prefetch_reader.reader_loop(jobs, Reader(), torch.device("cpu"), None)
    assert events == ["start a", "start b", "finish a", "start c", "finish b", "finish c", "action", "close"]
    assert all(job.done.is_set() for job in [*made.values(), action])
    assert made["a"].values[0].item() == ord("a") and made["c"].values[0].item() == ord("c")
    assert isinstance(made["b"].error, OSError) and made["b"].values is None
    assert made["r"].values is None and made["r"].error is None
