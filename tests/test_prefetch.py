"""Prefetching of offloaded weights (hf_bigmodel.runtime.prefetch) and page-cache-free reads (hf_bigmodel.storage.direct_io).

Every comparison is exact: prefetched weights are the very bytes the synchronous path reads, so logits
must be bit-identical (``torch.equal``), not merely close.
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from page_cache import filesystem_type, resident_pages, spy_reads
from tiny_models import SMALL_LLAMA_LAYERS, save_small_bf16_llama, small_llama_config
from torch import nn

from hf_bigmodel import (
    OffloadError,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    remove_hook_from_submodules,
)
from hf_bigmodel.errors import CheckpointError
from hf_bigmodel.runtime import prefetch as prefetch_module
from hf_bigmodel.runtime import prefetch_cache, prefetch_plan
from hf_bigmodel.runtime.prefetch import ENV_VAR, prefetch_depth, prefetcher_of
from hf_bigmodel.storage.direct_io import (
    ALIGNMENT,
    DirectReader,
    aligned_empty,
    direct_io_enabled,
    drop_page_cache,
    padded_span,
)
from hf_bigmodel.storage.safetensors_io import read_header

LAYERS = SMALL_LLAMA_LAYERS


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 4-layer bf16 Llama saved as sharded safetensors, and the in-memory reference it came from."""
    saved = save_small_bf16_llama(tmp_path_factory.mktemp("llama"))
    return saved.path, saved.model


def _device_map(disk_layers=range(1, LAYERS)):
    dm = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    dm.update({f"model.layers.{i}": "disk" if i in disk_layers else "cpu" for i in range(LAYERS)})
    return dm


def _load(path, *, prefetch, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    return load_checkpoint_and_dispatch(model, path, device_map=_device_map(), dtype=dtype, prefetch=prefetch)


def _run(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                min_new_tokens=6, pad_token_id=0)
    return logits, tokens


def test_generation_with_prefetch_is_bit_identical_to_sync_and_reference(llama):
    path, ref = llama
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_tokens = _run(ref, ids)
    for depth in (0, 1, 2, 5):
        model = _load(path, prefetch=depth)
        logits, tokens = _run(model, ids)
        assert torch.equal(logits, ref_logits), f"prefetch={depth}: logits differ"
        assert torch.equal(tokens, ref_tokens), f"prefetch={depth}: tokens differ"
        fetcher = prefetcher_of(model)
        if depth == 0:
            assert fetcher is None
            continue
        stats = fetcher.stats()
        forwards = 1 + 6
        assert stats["groups"] == LAYERS  # layers 1..3 and lm_head
        assert stats["hits"] == forwards * LAYERS and stats["misses"] == 0 and stats["unscheduled"] == 0
        assert stats["buffers"] == min(depth, stats["groups"] - 1) + 1  # one in use, the rest ahead
        fetcher.close()


def test_dtype_cast_on_the_reader_thread_matches_sync_path(llama):
    path, _ = llama
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(2))
    sync = _run(_load(path, prefetch=0, dtype=torch.float32), ids)
    model = _load(path, prefetch=2, dtype=torch.float32)
    fetched = _run(model, ids)
    assert fetched[0].dtype == torch.float32
    assert torch.equal(sync[0], fetched[0]) and torch.equal(sync[1], fetched[1])
    assert prefetcher_of(model).stats()["misses"] == 0


def test_prefetch_depth_default_argument_and_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert prefetch_depth(None) == prefetch_module.DEFAULT_DEPTH
    assert prefetch_depth(0) == 0 and prefetch_depth(3) == 3
    monkeypatch.setenv(ENV_VAR, "0")
    assert prefetch_depth(None) == 0
    assert prefetch_depth(1) == 1  # an explicit argument wins
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(ValueError, match=ENV_VAR):
        prefetch_depth(None)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="prefetch"):
            prefetch_depth(bad)


class Block(nn.Linear):
    sink: list[torch.Tensor] | None = None

    def forward(self, x):
        if self.sink is not None:
            self.sink.append(self.weight.detach())  # a live view of the (pooled) weights, kept past the forward
        return super().forward(x)


class Chain(nn.Module):
    """Modules defined in the reverse of the order they run in; ``extra`` runs only when asked."""

    def __init__(self, n=5, width=8):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, width) for _ in range(n))
        self.extra = nn.Linear(width, width)
        self.keep: list[torch.Tensor] = []

    def forward(self, x, use_extra=False, keep=False):
        for block in reversed(self.blocks):
            block.sink = self.keep if keep else None
            x = torch.tanh(block(x))
        return self.extra(x) if use_extra else x


def _chain(tmp_path, prefetch):
    torch.manual_seed(3)
    ref = Chain().eval()
    model = Chain().eval()
    model.load_state_dict(ref.state_dict())
    model = disk_offload(model, tmp_path / "offload", execution_device="cpu", prefetch=prefetch)
    return ref, model


@pytest.fixture
def one_group_per_module(monkeypatch):
    monkeypatch.setattr(prefetch_plan, "GROUP_BYTES", 1)
    monkeypatch.setattr(prefetch_plan, "MERGE_BYTES", 0)


def test_order_is_learned_from_the_first_forward(tmp_path, one_group_per_module):
    ref, model = _chain(tmp_path, prefetch=2)
    fetcher = prefetcher_of(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(4):
            assert torch.equal(model(x), ref(x))
    order = [g.prefixes[0] for g in fetcher._groups]
    assert order == [f"blocks.{i}" for i in reversed(range(5))]  # the order they ran in, not model order
    # Model order is wrong for the first forward (misses), and the re-plan costs one more; then all hit.
    before = fetcher.stats()
    assert before["misses"] <= 5 + 1, before
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), ref(x))
    after = fetcher.stats()
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 2 * 5, after


def test_a_group_whose_modules_run_apart_is_cut_where_they_do(llama, monkeypatch):
    """A layer too large for one group is cut into its children, and its two norms (small neighbours in
    model order) are merged; they run apart (one before the attention, one before the MLP). Fetched as
    one group, the second norm asks for a group already used: every layer missed, cancelled its reads
    ahead and read them again. After the first forward the groups follow the runs: no miss, no re-read."""
    path, ref = llama
    monkeypatch.setattr(prefetch_plan, "GROUP_BYTES", 60_000)  # a layer is 73,984 bytes; its MLP 49,152
    monkeypatch.setattr(prefetch_plan, "MERGE_BYTES", 1_000)  # the two 128-byte norms merge, nothing else
    reads = spy_reads(monkeypatch)
    model = _load(path, prefetch="1MiB")
    fetcher = prefetcher_of(model)
    planned = [g.prefixes for g in fetcher._groups]
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for _ in range(2):  # the first forward teaches the order
            assert torch.equal(model(ids).logits, ref(ids).logits)
        before = fetcher.stats()
        reads.clear()
        for _ in range(3):
            assert torch.equal(model(ids).logits, ref(ids).logits)
    after = fetcher.stats()
    assert after["misses"] == before["misses"] and after["unscheduled"] == 0, (before, after)
    on_disk = sum(p.numel() * p.element_size() for n, p in ref.named_parameters()
                  if n.startswith(("lm_head", *(f"model.layers.{i}." for i in range(1, LAYERS)))))
    assert sum(e.nbytes for e in reads) == 3 * on_disk  # each offloaded weight read once per forward
    assert ["model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"] in planned
    assert ["model.layers.1.input_layernorm"] in [g.prefixes for g in fetcher._groups]


def test_conditional_and_out_of_order_modules_fall_back_without_wrong_results(tmp_path, one_group_per_module):
    ref, model = _chain(tmp_path, prefetch=1)
    fetcher = prefetcher_of(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        for use_extra in (False, False, True, False, True, True, False):
            assert torch.equal(model(x, use_extra=use_extra), ref(x, use_extra=use_extra))
        # Out of order: run one block directly, then the whole model again.
        assert torch.equal(model.blocks[2](x), ref.blocks[2](x))
        assert torch.equal(model(x), ref(x))
    stats = fetcher.stats()
    assert stats["unscheduled"] == 3  # `extra` never ran in the first forward: always fetched by its hook
    assert stats["hits"] > stats["misses"] > 0


def test_a_buffer_still_referenced_is_never_overwritten(tmp_path, one_group_per_module):
    ref, model = _chain(tmp_path, prefetch=1)
    x = torch.randn(2, 8)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x, keep=True), ref(x))
    expected = [b.weight for b in reversed(ref.blocks)] * 3
    assert len(model.keep) == len(expected)
    for kept, weight in zip(model.keep, expected):
        assert torch.equal(kept, weight)  # later reads went into other buffers
    assert prefetcher_of(model).stats()["abandoned"] > 0


@pytest.mark.parametrize("when", ["starting", "finishing"])
def test_reader_errors_surface_in_the_forward_naming_the_file(llama, tmp_path, monkeypatch, when):
    path, _ = llama
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    model = _load(path, prefetch=1)

    def fail(self, entry, buffer):
        if when == "starting":
            raise OSError(errno.EIO, "Input/output error")

        def finish():
            raise OSError(errno.EIO, "Input/output error")

        return finish

    monkeypatch.setattr(DirectReader, "start_read", fail)
    with torch.no_grad(), pytest.raises(OffloadError) as info:
        for _ in range(3):
            model(ids)
    assert ".safetensors" in str(info.value) and "Input/output error" in str(info.value)
    assert str(info.value.path).endswith(".safetensors")
    monkeypatch.undo()
    for module in model.modules():  # weights were released despite the error
        for p in module.parameters(recurse=False):
            assert p.device.type in ("cpu", "meta")
    with torch.no_grad():
        model(ids)  # the group is fetched again and the model works


def test_truncated_file_is_reported_by_name(llama, tmp_path):
    import shutil

    src, _ = llama
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    model = _load(path, prefetch=1)
    ids = torch.randint(3, 256, (1, 5))
    for shard in path.glob("*.safetensors"):
        os.truncate(shard, 1000)
    with torch.no_grad(), pytest.raises(CheckpointError, match=r"\.safetensors"):
        for _ in range(3):
            model(ids)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "hf_bigmodel-prefetch" and t.is_alive()]


def test_reader_thread_stops_when_hooks_are_removed_or_the_model_is_collected(llama):
    path, ref = llama
    ids = torch.randint(3, 256, (1, 5))
    gc.collect()
    before = len(_prefetch_threads())
    model = _load(path, prefetch=2)
    fetcher = prefetcher_of(model)
    assert fetcher.running and len(_prefetch_threads()) == before + 1
    remove_hook_from_submodules(model)
    assert not fetcher.running and len(_prefetch_threads()) == before
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # a plain model again

    model = _load(path, prefetch=2)
    with torch.no_grad():
        model(ids)
    thread = prefetcher_of(model)._thread
    del model
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_nothing_to_prefetch_means_no_thread(llama):
    path, _ = llama
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(small_llama_config())
    model = load_checkpoint_and_dispatch(model, path, device_map={"": "cpu"}, prefetch=2)
    assert prefetcher_of(model) is None and "_hf_hook" not in model.model.layers[0].self_attn.q_proj.__dict__
    cpu = Chain()
    dispatch_model(cpu, {"": "cpu"}, main_device="cpu", force_hooks=True, prefetch=2)
    assert prefetcher_of(cpu) is None  # weights already in RAM on a CPU run


# --- diskio --------------------------------------------------------------------------------------------

def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


@pytest.mark.parametrize(("direct", "keep_cache", "in_flight"),
                         [(True, False, 1), (False, False, 1), (False, True, 1), (True, False, 4), (False, True, 4)])
def test_direct_reader_returns_exact_bytes_at_any_offset(tmp_path, monkeypatch, direct, keep_cache, in_flight):
    from hf_bigmodel.storage import direct_io as diskio
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    monkeypatch.setattr(diskio, "CHUNK", 2 * ALIGNMENT)  # reads over two pages go in chunks, in flight
    data = torch.randint(0, 256, (3 * ALIGNMENT + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    file = tmp_path / "blob.bin"
    _write(file, data.numpy().tobytes())
    reader = DirectReader(direct=direct, keep_cache=keep_cache, in_flight=in_flight)
    cases = [(0, 10), (5, 4096), (4095, 4097), (100, data.numel()), (data.numel() - 3, data.numel()), (7, 7)]
    for start, end in cases:
        entry = TensorEntry(str(file), "k", torch.uint8, (end - start,), start, end)
        buf = aligned_empty(padded_span(entry)[1] or 1)
        view = reader.read_into(entry, buf)
        assert torch.equal(view, data[start:end]), (start, end)
    reader.close()


def test_whether_reads_keep_their_pages_follows_the_setting_and_the_room(monkeypatch):
    keeps = prefetch_module.keeps_page_cache
    gib = 2**30
    monkeypatch.delenv(prefetch_module.PAGE_CACHE_ENV, raising=False)
    assert keeps(gib, gib // 4, room=2 * gib)  # 1.5 GiB with the spare fits 2 GiB
    assert not keeps(gib, gib // 4, room=gib + gib // 4)
    assert not keeps(0, 0, room=100 * gib)  # nothing read from disk
    for value, expected in (("1", True), ("on", True), ("0", False), ("off", False), ("AUTO", False)):
        monkeypatch.setenv(prefetch_module.PAGE_CACHE_ENV, value)
        assert keeps(gib, 0, room=gib) is expected, value
    monkeypatch.setenv(prefetch_module.PAGE_CACHE_ENV, "sometimes")
    with pytest.raises(ValueError, match="HF_BIGMODEL_PAGE_CACHE"):
        keeps(gib, 0, room=gib)
    monkeypatch.delenv(prefetch_module.PAGE_CACHE_ENV)
    monkeypatch.setattr(prefetch_cache, "available_memory", lambda device: 3 * gib)
    assert keeps(2 * gib, 0) and not keeps(3 * gib, 0)  # measured when not given
    if sys.platform.startswith("linux"):  # what tells evicted pages from kept ones
        assert isinstance(prefetch_module.storage_read_bytes(), int)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_the_page_cache_keeps_disk_weights_only_when_told_or_when_they_fit(llama, tmp_path, monkeypatch, setting):
    """With pages kept, the disk layers' bytes stay cached after a forward (the next one reads RAM); without,
    ``O_DIRECT`` leaves them out. Either way the logits are the reference's, bit for bit."""
    path, ref = llama
    if filesystem_type(path) in ("tmpfs", "ramfs", ""):
        pytest.skip("pages of this filesystem cannot leave the page cache")
    monkeypatch.setenv(prefetch_module.PAGE_CACHE_ENV, setting)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    shards = sorted(path.glob("*.safetensors"))
    model = _load(path, prefetch=2)
    fetcher = prefetcher_of(model)
    assert fetcher.page_cache is (setting == "1") and fetcher.stats()["page_cache"] is (setting == "1")
    for shard in shards:
        drop_page_cache(str(shard))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    disk = sorted({ref_.entry.path for ref_ in model._hf_bigmodel_weights.disk.values()})
    cached = sum(sum(resident_pages(Path(f))) for f in disk) * mmap.PAGESIZE
    on_disk = sum(r.nbytes for r in model._hf_bigmodel_weights.disk.values())
    if setting == "1":
        assert cached >= on_disk
    else:  # what reading the headers back brought in (readahead) and no weight read since
        assert cached < on_disk / 2


@pytest.mark.parametrize(("setting", "read_per_forward", "falls_back"),
                         [(None, 10**12, True), (None, 0, False), ("1", 10**12, False)],
                         ids=["auto-evicted", "auto-stays", "forced"])
def test_reads_leave_the_page_cache_when_its_pages_do_not_stay(llama, monkeypatch, setting, read_per_forward,
                                                                 falls_back):
    """Chosen at dispatch (not forced), page-cache reads are given up when a forward after the first still
    fetched most of the disk part from storage (its pages were evicted): O_DIRECT from then on, the same logits."""
    path, ref = llama
    if setting is None:
        monkeypatch.delenv(prefetch_module.PAGE_CACHE_ENV, raising=False)
        monkeypatch.setattr(prefetch_module, "keeps_page_cache", lambda *args, **kwargs: True)  # room, as if
    else:
        monkeypatch.setenv(prefetch_module.PAGE_CACHE_ENV, setting)
    reads = iter(range(0, 100 * read_per_forward + 1, read_per_forward or 1) if read_per_forward else [0] * 100)
    monkeypatch.setattr(prefetch_module, "storage_read_bytes", lambda: next(reads))
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(6))
    expected = ref(ids).logits
    model = _load(path, prefetch=2)
    fetcher = prefetcher_of(model)
    assert fetcher.page_cache and fetcher._reader.keep_cache
    with torch.no_grad():
        for _ in range(5):
            assert torch.equal(model(ids).logits, expected)
    assert fetcher.page_cache is not falls_back
    fetcher.close()  # the reader thread has run every job, the switch included
    assert fetcher._reader.keep_cache is not falls_back
    if falls_back:
        assert fetcher._reader.direct == direct_io_enabled()


def test_direct_reader_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    from hf_bigmodel.storage import direct_io as diskio

    torch.manual_seed(6)
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(700).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    header = read_header(tmp_path / "t.safetensors")
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & diskio._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(diskio.os, "open", refuse_direct)
    reader = DirectReader(direct=True)
    for key, tensor in tensors.items():
        entry = header.entries[key]
        raw = reader.read_into(entry, aligned_empty(padded_span(entry)[1]))
        assert torch.equal(raw.view(entry.dtype).view(entry.shape), tensor)
    assert all(not direct for _, direct in reader._fds.values())
    reader.close()


def test_padded_span_and_alignment():
    from hf_bigmodel.storage.safetensors_io import TensorEntry

    entry = TensorEntry("f", "k", torch.uint8, (10,), 4100, 4110)
    assert padded_span(entry) == (4096, 4096)
    entry = TensorEntry("f", "k", torch.uint8, (4096,), 4000, 8096)
    assert padded_span(entry) == (0, 2 * 4096)
    assert aligned_empty(12345).data_ptr() % ALIGNMENT == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and /proc/self/mounts")
def test_drop_page_cache_drops_the_pages_of_a_range_or_of_the_whole_file(tmp_path):
    if mmap.PAGESIZE != ALIGNMENT or filesystem_type(tmp_path) in ("tmpfs", "ramfs", ""):
        pytest.skip("pages of this filesystem cannot leave the page cache (or pages are not 4 KiB)")
    file = tmp_path / "x.bin"
    _write(file, os.urandom(3 * ALIGNMENT))
    fd = os.open(file, os.O_RDONLY)
    try:  # cache it page by page (no readahead), so each page can leave the cache on its own
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for page in range(3):
            os.pread(fd, ALIGNMENT, page * ALIGNMENT)
    finally:
        os.close(fd)
    assert resident_pages(file) == [True, True, True]
    drop_page_cache(str(file), ALIGNMENT, 2 * ALIGNMENT)  # the middle page only
    assert resident_pages(file) == [True, False, True]
    drop_page_cache(str(file), 10, ALIGNMENT + 20)  # no whole page in the range: nothing dropped
    assert resident_pages(file) == [True, False, True]
    drop_page_cache(str(file))
    assert resident_pages(file) == [False, False, False]
    with pytest.raises(FileNotFoundError):
        drop_page_cache(str(tmp_path / "missing.bin"))


class _CpuStaging:
    """Stands in for the pinned staging ring of CUDA runs (same protocol, plain aligned CPU chunks)."""

    def __init__(self, chunk):
        self.chunk = chunk
        self.buffers = [aligned_empty(chunk) for _ in range(2)]
        self.index = self.releases = 0

    def acquire(self):
        return self.buffers[self.index]

    def release(self, stream):
        self.releases += 1
        self.index = (self.index + 1) % 2


@pytest.mark.parametrize("direct", [True, False])
def test_chunked_streaming_of_the_cuda_path_reassembles_every_tensor(tmp_path, direct):
    from safetensors.torch import save_file

    from hf_bigmodel.runtime.prefetch_cuda import to_device as _to_device
    from hf_bigmodel.storage.safetensors_io import read_tensor
    from hf_bigmodel.storage.weights_map import DiskTensor

    generator = torch.Generator().manual_seed(7)
    tensors = {
        "odd": torch.randn(3, 7, generator=generator).to(torch.bfloat16),  # leaves the next one unaligned
        "big": torch.randn(5000, generator=generator),  # 20000 bytes: spans several 8 KiB chunks
        "tiny": torch.randn(1, generator=generator),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    header = read_header(tmp_path / "t.safetensors")
    reader = DirectReader(direct=direct)
    staging = _CpuStaging(2 * ALIGNMENT)
    for key, tensor in tensors.items():
        entry = header.entries[key]
        for dtype in (entry.dtype, torch.float16):
            value = _to_device(DiskTensor(entry, dtype), reader, staging, torch.device("cpu"), None)
            assert value.dtype == dtype and torch.equal(value, tensor.to(dtype)), (key, dtype)
            assert torch.equal(value, read_tensor(entry).to(dtype))  # what the synchronous path reads
    # "big" crosses chunk boundaries: more pieces than tensors were staged.
    assert staging.releases > 2 * (len(tensors) - 1)
    reader.close()


@pytest.mark.parametrize("mode", ["chunked", "uncached"])
def test_read_shard_gives_every_tensor_exactly(tmp_path, monkeypatch, mode):
    from safetensors.torch import save_file

    from hf_bigmodel.storage import direct_io as diskio
    from hf_bigmodel.storage.checkpoint import find_checkpoint
    from hf_bigmodel.storage.direct_io import read_shard

    generator = torch.Generator().manual_seed(8)
    tensors = {
        "a": torch.randn(3, 3, generator=generator).to(torch.bfloat16),
        "b": torch.randn(4000, generator=generator),  # 16000 bytes: several 4 KiB chunks
        "c": torch.randint(0, 9, (5,), generator=generator),
        "d": torch.empty(0),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    before = (tmp_path / "model.safetensors").read_bytes()
    monkeypatch.setattr(diskio, "READ_CHUNK", ALIGNMENT)
    ckpt = find_checkpoint(tmp_path)
    got = dict(read_shard(ckpt, ckpt.files[0], {"a", "b", "c", "d"}, uncached=mode == "uncached"))
    assert got.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    got["b"].mul_(2)  # writes stay in the process, whatever the reading mode
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert dict(read_shard(ckpt, ckpt.files[0], {"c"})).keys() == {"c"}


def test_the_prefetcher_serves_any_streamed_weights_without_hooks(tmp_path):
    """Typed against StreamedWeights: units name tensors of a weights map; no hook or module is involved."""
    from safetensors.torch import save_file

    from hf_bigmodel.runtime.prefetch import Prefetcher
    from hf_bigmodel.runtime.prefetch_window import Window
    from hf_bigmodel.runtime.streaming import StreamedUnit
    from hf_bigmodel.storage.weights_map import DiskTensor, WeightsMap

    generator = torch.Generator().manual_seed(9)
    tensors = {f"t{i}": torch.randn(4, 3, generator=generator) for i in range(4)}
    save_file(tensors, tmp_path / "w.safetensors")
    header = read_header(tmp_path / "w.safetensors")
    weights = WeightsMap(disk={k: DiskTensor(header.entries[k], torch.float32) for k in tensors})
    cpu = torch.device("cpu")
    units = [StreamedUnit(f"m{i}", (f"t{i}", "t0"), weights, cpu) for i in range(4)]
    fetcher = Prefetcher.create(units, [[0], [1, 2], [3]], window=Window(groups=1), device=cpu)
    assert fetcher is not None
    try:
        for _ in range(2):
            for unit in reversed(units):  # not model order: learned during the first pass
                got = fetcher.take(unit)
                assert got is not None and len(got) == 2
                assert torch.equal(got[0], tensors[unit.names[0]]) and torch.equal(got[1], tensors["t0"])
        assert [g.prefixes for g in fetcher._groups] == [["m3"], ["m2", "m1"], ["m0"]]  # as they ran
        assert fetcher.take(StreamedUnit("other", ("t0",), weights, cpu)) is None  # not one of its units
        assert fetcher.stats()["unscheduled"] == 1
    finally:
        fetcher.close()
    assert fetcher.take(units[0]) is None  # closed: hooks read for themselves
