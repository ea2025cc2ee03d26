"""Adversarial inputs on the storage side: what is read must be what was planned, or a clear error.

Each case builds its files in a fresh ``tmp_path``. Cases that could crash (SIGBUS on a truncated map,
a recursion in a parser) or hang (a quadratic validator) run in a child process with an address-space
cap and a timeout (``adversarial.run_isolated``). Full disks and read-only file systems are real mounts.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from adversarial import run_isolated, tiny_tmpfs
from core_models import TinyLM, empty_lm, reference_tiny_lm, save_state
from safetensors.torch import save_file
from torch import nn

from hf_bigmodel import (
    CorruptCheckpointError,
    DeviceMapError,
    DtypeError,
    FileChangedError,
    InvalidIndexError,
    InvalidMaxMemoryError,
    OffloadError,
    dispatch_model,
    infer_auto_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
)
from hf_bigmodel.storage.checkpoint import find_checkpoint

IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])


def all_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def raw_safetensors(path: Path, header_json: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + data)
    return path


# --- safetensors headers that break parsers -------------------------------------------------------------


@pytest.mark.parametrize("case", ["deep nesting", "5000-digit integer", "astronomical shape"])
def test_hostile_safetensors_headers_are_named_errors(tmp_path, case):
    header = {
        "deep nesting": b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "5000-digit integer": b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
        "astronomical shape": json.dumps({"w": {"dtype": "F32", "shape": [2**62] * 1000,
                                                "data_offsets": [0, 4]}}).encode(),
    }[case]
    file = raw_safetensors(tmp_path / "model.safetensors", header, bytes(4))
    result = run_isolated(f"""
        import torch
        from torch import nn
        from hf_bigmodel import load_checkpoint_in_model
        try:
            load_checkpoint_in_model(nn.Linear(1, 1, bias=False, device="meta"), {str(file)!r})
            report("loaded")
        except Exception as err:
            report([type(err).__name__, str(err)])
    """)
    assert result[0] == "CorruptCheckpointError", result
    assert str(file) in result[1] and "Download or save it again" in result[1]


# --- indexes --------------------------------------------------------------------------------------------


def test_index_with_list_values_through_the_pretrained_loader(tmp_path):
    from tiny_models import save_tiny_llama

    from hf_bigmodel import load_pretrained_dispatched

    path = save_tiny_llama(tmp_path / "llama", sharded=True, with_tokenizer=False).path
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = [data["weight_map"][first]]
    index.write_text(json.dumps(data))
    with pytest.raises(InvalidIndexError) as info:
        load_pretrained_dispatched(path)
    assert str(index) in str(info.value) and f"{first!r} ->" in str(info.value) and "(not a string)" in str(info.value)


def test_an_index_naming_200000_shards_is_validated_in_linear_time(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {f"w{i}": f"model-{i:06d}.safetensors" for i in range(200_000)}}))
    # ~4 s of CPU here; the quadratic duplicate search of a growing list took minutes for half as many.
    result = run_isolated(f"""
        from hf_bigmodel.storage.checkpoint import read_index
        try:
            read_index({str(index)!r})
        except Exception as err:
            report([type(err).__name__, str(err)[:300]])
    """, timeout=120)
    assert result[0] == "CheckpointNotFoundError" and "model-000000.safetensors" in result[1], result


def two_shards(folder: Path, *, index: bool) -> tuple[Path, Path]:
    folder.mkdir()
    a, b = folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"
    save_file({"weight": torch.full((2, 2), 1.0)}, a)
    save_file({"weight": torch.full((2, 2), 2.0), "bias": torch.zeros(2)}, b)
    if index:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"weight": a.name, "bias": b.name}}))
    return a, b


@pytest.mark.parametrize("index", [True, False], ids=["by index", "folder without index"])
def test_a_tensor_in_two_shards_is_an_error_naming_both(tmp_path, index):
    a, b = two_shards(tmp_path / "ckpt", index=index)
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_in_model(model, tmp_path / "ckpt")
    assert str(a) in str(info.value) and str(b) in str(info.value) and "'weight'" in str(info.value)
    assert all_meta(model)


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_an_error(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"weight": torch.ones(2, 2)}, folder / "a.safetensors")
    save_file({"bias": torch.ones(2)}, folder / "b.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"weight": "b.safetensors", "bias": "b.safetensors", "other": "a.safetensors"}}))
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(CorruptCheckpointError, match="disagrees with its shards") as info:
        load_checkpoint_in_model(model, folder)
    assert "a.safetensors" in str(info.value) and all_meta(model)


# --- torch zip checkpoints read through a map -------------------------------------------------------------


def rewrite_zip(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data, method = edit(info.filename, src.read(info.filename))
            dst.writestr(info.filename, data, compress_type=method)
    return target


@pytest.fixture()
def torch_file(tmp_path) -> tuple[dict[str, torch.Tensor], Path]:
    """Records data/0 (weight), data/1 (bias) and a large data/2 after them: a map past data/0 reads its bytes."""
    state = {"weight": torch.arange(4000, dtype=torch.float32).view(100, 40) / 7, "bias": torch.arange(100.0) * 3,
             "unused": torch.arange(20000.0)}
    torch.save(state, tmp_path / "orig.pt")
    return state, tmp_path / "orig.pt"


def test_a_deflated_torch_record_is_read_correctly(torch_file, tmp_path):
    state, source = torch_file
    first = "data/0"
    target = rewrite_zip(source, tmp_path / "pytorch_model.bin", lambda name, data: (
        data, zipfile.ZIP_DEFLATED if name.endswith(first) else zipfile.ZIP_STORED))
    model = nn.Linear(40, 100, device="meta")
    load_checkpoint_in_model(model, target)
    assert torch.equal(model.weight, state["weight"]) and torch.equal(model.bias, state["bias"])


def test_a_torch_record_shorter_than_its_storage_is_refused(torch_file, tmp_path):
    _, source = torch_file
    target = rewrite_zip(source, tmp_path / "pytorch_model.bin", lambda name, data: (
        data[:100] if name.endswith("data/0") else data, zipfile.ZIP_STORED))
    model = nn.Linear(40, 100, device="meta")
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_in_model(model, target)
    assert str(target) in str(info.value) and "holds 100 B, its storage needs 16000 B" in str(info.value)
    assert all_meta(model)


def test_a_tied_torch_state_dict_can_be_disk_offloaded(tmp_path):
    ref = reference_tiny_lm()
    (tmp_path / "ckpt").mkdir()
    torch.save(ref.state_dict(), tmp_path / "ckpt" / "pytorch_model.bin")  # embed and head: one storage, two names
    device_map = {"embed": "disk", "blocks": "cpu", "norm": "cpu", "head": "disk"}
    model = load_checkpoint_and_dispatch(empty_lm(), tmp_path / "ckpt", device_map=device_map,
                                         offload_folder=tmp_path / "offload")
    assert torch.equal(model(IDS), ref(IDS))


# --- files that change after they were planned ------------------------------------------------------------


def resave_with_longer_header(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The same tensors saved again with metadata: every data offset moves."""
    save_file(tensors, file, metadata={"note": "x" * 40})


def test_a_checkpoint_changed_between_planning_and_loading_is_refused(tmp_path):
    from hf_bigmodel.load.loading import load_checkpoint

    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    ckpt = find_checkpoint(file)
    ckpt.scan()  # planned: offsets read from this header
    resave_with_longer_header(file, {k: v for k, v in ref.state_dict().items() if k != "head.weight"})
    model = empty_lm()
    with pytest.raises(FileChangedError) as info:
        load_checkpoint(model, ckpt, device_map={"": "cpu"})
    assert str(file) in str(info.value) and "changed after it was planned" in str(info.value)
    assert isinstance(info.value, OSError) and info.value.path == str(file)
    assert all_meta(model)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_resident_weights_do_not_change_when_the_checkpoint_is_rewritten_in_place(tmp_path, fmt):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt", fmt=fmt)
    file = next((tmp_path / "ckpt").iterdir())
    result = run_isolated(f"""
        import torch, os
        from core_models import TinyLM
        from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch
        ids = torch.tensor({IDS.tolist()})
        with init_empty_weights():
            model = TinyLM()
        model = load_checkpoint_and_dispatch(model, {str(tmp_path / "ckpt")!r}, device_map={{"": "cpu"}})
        before = model(ids)
        size = os.path.getsize({str(file)!r})
        with open({str(file)!r}, "r+b") as f:  # in place: same inode, other bytes
            f.seek(size // 3)
            f.write(os.urandom(size // 2))
        after_rewrite = model(ids)
        with open({str(file)!r}, "r+b") as f:
            f.truncate(64)
        after_truncate = model(ids)
        report([torch.equal(before, after_rewrite), torch.equal(before, after_truncate)])
    """)
    assert result == [True, True]


# --- the offload folder -----------------------------------------------------------------------------------


def test_offload_index_of_an_older_version_is_refused(tmp_path):
    from hf_bigmodel import disk_offload

    folder = tmp_path / "offload"
    disk_offload(reference_tiny_lm(), folder, execution_device="cpu")
    data = json.loads((folder / "index.json").read_text())
    data["version"] = 1
    data.pop("files", None)
    (folder / "index.json").write_text(json.dumps(data))
    model = empty_lm()
    with pytest.raises(OffloadError, match="written by an older hf_bigmodel") as info:
        dispatch_model(model, {"": "disk"}, offload_dir=folder)
    assert f"Delete {str(folder)!r}" in str(info.value) and all_meta(model)


def test_offload_file_replaced_by_other_content_under_its_name_is_refused(tmp_path):
    from hf_bigmodel import disk_offload

    folder = tmp_path / "offload"
    ref = reference_tiny_lm()
    disk_offload(reference_tiny_lm(), folder, execution_device="cpu")
    data = json.loads((folder / "index.json").read_text())
    entry = data["weights"]["blocks.0.fc1.weight"]
    victim = folder / entry["file"]
    from safetensors.torch import load_file

    tensors = load_file(victim)
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, victim, metadata={"x": "y"})
    model = empty_lm()
    with pytest.raises(OffloadError, match="changed since the folder was written") as info:
        dispatch_model(model, {"": "disk"}, offload_dir=folder)
    assert victim.name in str(info.value) and all_meta(model)
    assert not torch.equal(ref.blocks[0].fc1.weight, torch.zeros_like(ref.blocks[0].fc1.weight))


def test_a_checkpoint_read_in_place_that_changed_is_refused_by_the_offload_index(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    folder = tmp_path / "offload"
    load_checkpoint_and_dispatch(empty_lm(), tmp_path / "ckpt", device_map={"": "disk"}, offload_folder=folder,
                                 offload_buffers=True)
    assert "model.safetensors" in (folder / "index.json").read_text()  # read in place, recorded by identity
    resave_with_longer_header(tmp_path / "ckpt" / "model.safetensors",
                              {k: v for k, v in ref.state_dict().items() if k != "head.weight"})
    model = empty_lm()
    with pytest.raises(OffloadError, match="changed since the folder was written"):
        dispatch_model(model, {"": "disk"}, offload_dir=folder, offload_buffers=True)
    assert all_meta(model)


def test_offload_files_are_flushed_to_disk_before_they_are_published(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a header over unwritten blocks: fsync, then rename."""
    from hf_bigmodel import disk_offload

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("publish", str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    def link(src, dst, *args, **kwargs):
        events.append(("publish", str(dst)))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    folder = tmp_path / "offload"
    disk_offload(reference_tiny_lm(), folder, execution_device="cpu")
    published = [dst for kind, dst in events if kind == "publish"]
    assert published and any(p.endswith("index.json") for p in published)
    for dst in published:
        at = events.index(("publish", dst))
        name = Path(dst).name
        flushed = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and f".{name}." in path]
        assert flushed and flushed[-1] < at, f"{name} published before its data was flushed: {events}"
        assert ("fsync", str(folder)) in events[at:], f"the rename of {name} was not flushed"


def test_serializer_errors_on_a_full_disk_are_offload_errors(tmp_path):
    from hf_bigmodel import disk_offload

    with tiny_tmpfs(tmp_path / "small", "64k") as small:
        model = reference_tiny_lm(dim=64)  # ~90 KiB of weights
        with pytest.raises(OffloadError) as info:
            disk_offload(model, small / "offload", execution_device="cpu")
    text = str(info.value)
    assert str(small / "offload") in text and "No space left on device" in text
    assert "needed" in text and "free" in text and "Free some space or pass another offload_folder" in text


def test_serializer_errors_past_the_file_size_limit_are_offload_errors(tmp_path):
    result = run_isolated(f"""
        from core_models import reference_tiny_lm
        from hf_bigmodel import disk_offload
        try:
            disk_offload(reference_tiny_lm(dim=64), {str(tmp_path / "offload")!r}, execution_device="cpu")
            report("written")
        except Exception as err:
            report([type(err).__name__, str(err)])
    """, file_size=20_000)
    assert result[0] == "OffloadError", result
    assert "File too large" in result[1] and "ulimit -f" in result[1] and str(tmp_path / "offload") in result[1]


# --- budgets and dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1e309GB", "1e300PB", 10**400, 2**64 + 1])
def test_unbounded_max_memory_is_a_named_error(value):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(InvalidMaxMemoryError) as info:
        infer_auto_device_map(model, {"cpu": value})
    assert "max_memory['cpu']" in str(info.value) and "more bytes than any device holds" in str(info.value)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), "infGB", "nan"])
def test_infinite_or_nan_max_memory_is_a_named_error(value):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(InvalidMaxMemoryError, match=r"max_memory\['cpu'\]") as info:
        infer_auto_device_map(model, {"cpu": value})
    assert isinstance(info.value, ValueError)


def test_a_disk_budget_is_honoured():
    model = nn.Sequential(*[nn.Linear(100, 100) for _ in range(10)])  # 10 x 40,400 bytes
    plan = infer_auto_device_map(model, {"cpu": 100_000, "disk": 400_000})
    on_disk = sum(40_400 for device in plan.values() if device == "disk")
    assert on_disk <= 400_000 and set(plan.values()) == {"cpu", "disk"}
    with pytest.raises(DeviceMapError) as info:
        infer_auto_device_map(model, {"cpu": 100_000, "disk": 200_000})
    text = str(info.value)
    assert "does not fit in max_memory" in text and "'disk'" in text and "KiB of weights" in text


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool])
def test_an_integer_dtype_for_a_float_checkpoint_is_refused(tmp_path, dtype):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    model = empty_lm()
    with pytest.raises(DtypeError) as info:
        load_checkpoint_and_dispatch(model, tmp_path / "ckpt", device_map={"": "cpu"}, dtype=dtype)
    assert f"dtype={dtype}" in str(info.value) and str(tmp_path / "ckpt") in str(info.value)
    assert "embed.weight" in info.value.names and "blocks.0.fc1.bias" in str(info.value)
    assert isinstance(info.value, ValueError) and all_meta(model)


def test_an_integer_torch_dtype_through_the_pretrained_loader_is_refused(tmp_path):
    from tiny_models import save_tiny_llama

    from hf_bigmodel import load_pretrained_dispatched

    path = save_tiny_llama(tmp_path / "llama", with_tokenizer=False).path
    with pytest.raises(DtypeError, match=r"dtype=torch\.int8 cannot hold"):
        load_pretrained_dispatched(path, torch_dtype=torch.int8)


# --- accelerate compatibility -----------------------------------------------------------------------------


def test_init_empty_weights_with_buffers_patches_nothing():
    original = (nn.Module.register_parameter, nn.Module.register_buffer)
    with init_empty_weights(include_buffers=True):
        assert (nn.Module.register_parameter, nn.Module.register_buffer) == original
        model = TinyLM()
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def test_offload_state_dict_round_trips_and_dispatches(tmp_path):
    from hf_bigmodel import OffloadedWeightsLoader, offload_state_dict

    ref = reference_tiny_lm()
    offload_state_dict(tmp_path / "saved", ref.state_dict())  # tied names share one storage
    weights = OffloadedWeightsLoader(save_folder=tmp_path / "saved")
    assert set(weights) == set(ref.state_dict())
    for name, tensor in ref.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    model = dispatch_model(empty_lm(), {"": "disk"}, offload_dir=tmp_path / "saved", offload_buffers=True)
    assert torch.equal(model(IDS), ref(IDS))
