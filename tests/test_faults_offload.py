"""The offload folder under faults: unwritable, full, interrupted, or holding damaged files from an earlier run.

A failed load leaves the model untouched (all-meta, no hooks) and no file in the folder that a later run
would trust; a later run checks what it finds (sizes, headers, shapes) before using it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors.torch
import torch
from core_models import TinyLM, reference_tiny_lm, save_state
from safetensors.torch import save_file
from torch import nn

from hf_bigmodel import (
    OffloadError,
    disk_offload,
    dispatch_model,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from hf_bigmodel.errors import CheckpointError
from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.storage.offload_folder import load_offload_index
from hf_bigmodel.storage.safetensors_io import read_header

IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])
MAP = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu", "blocks.3": "disk",
       "norm": "cpu", "head": "cpu"}


def empty_lm(**kwargs) -> TinyLM:
    with init_empty_weights():
        return TinyLM(**kwargs)


def assert_untouched(model: nn.Module) -> None:
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not [n for n, m in model.named_modules() if "_hf_hook" in m.__dict__]
    assert not hasattr(model, OFFLOAD_ATTR) and not hasattr(model, "hf_device_map")


def weight_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.name.startswith("w-")}


def assert_trustworthy(folder: Path) -> None:
    """No temporary leftovers, and every weights file a later run may pick up is complete."""
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    for name in weight_files(folder):
        read_header(folder / name)


@pytest.fixture()
def ckpt(tmp_path) -> tuple[TinyLM, Path]:
    """A torch checkpoint in two shards: its disk entries must be converted into the offload folder."""
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt", fmt="torch", shards=2)
    return ref, tmp_path / "ckpt"


def load(path: Path, offload: Path, **kwargs) -> TinyLM:
    return load_checkpoint_and_dispatch(empty_lm(), path, device_map=MAP, offload_folder=offload, **kwargs)


def load_fails(path: Path, offload: Path, error: type[BaseException]) -> BaseException:
    model = empty_lm()
    with pytest.raises(error) as info:
        load_checkpoint_and_dispatch(model, path, device_map=MAP, offload_folder=offload)
    assert_untouched(model)
    return info.value


# --- folders that cannot be written -----------------------------------------------------------------------


def test_offload_folder_under_a_regular_file(ckpt, tmp_path):
    _, path = ckpt
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    err = load_fails(path, blocker / "offload", OffloadError)
    text = str(err)
    assert str(blocker / "offload") in text and f"{str(blocker)!r} is a file, not a folder" in text
    assert "Pass offload_folder=... on a writable disk" in text and err.path == str(blocker / "offload")
    assert blocker.read_text() == "keep me"


def test_offload_folder_that_is_a_file(ckpt, tmp_path):
    _, path = ckpt
    blocker = tmp_path / "offload"
    blocker.write_text("")
    err = load_fails(path, blocker, OffloadError)
    assert str(blocker) in str(err) and "is a file, not a folder" in str(err)


def test_read_only_offload_folder(ckpt, tmp_path):
    _, path = ckpt
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:  # chmod does not stop root (or some file systems): then this case cannot be staged honestly
            (folder / "probe").write_bytes(b"")
            (folder / "probe").unlink()
            pytest.skip("the folder stays writable after chmod 0o555 (running as root?)")
        except PermissionError:
            pass
        err = load_fails(path, folder, OffloadError)
        assert str(folder) in str(err) and "Permission denied" in str(err)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# --- full disks and interruptions -------------------------------------------------------------------------


def failing_save_file(monkeypatch: pytest.MonkeyPatch, *, fail_at: int, error: BaseException) -> list[str]:
    """Make the ``fail_at``-th safetensors write leave a partial file and raise ``error``."""
    calls: list[str] = []

    def save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == fail_at:
            Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")  # what a full disk leaves
            raise error
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save)
    return calls


@pytest.mark.parametrize("fail_at", [1, 2])
def test_disk_full_while_converting_leaves_nothing_half_done(ckpt, tmp_path, monkeypatch, fail_at):
    ref, path = ckpt
    offload = tmp_path / "offload"
    calls = failing_save_file(monkeypatch, fail_at=fail_at, error=OSError(errno.ENOSPC, "No space left on device"))
    err = load_fails(path, offload, OffloadError)
    assert len(calls) == fail_at
    text = str(err)
    assert str(offload) in text and "No space left on device" in text and "Free some space" in text
    assert f"blocks.{2 * fail_at - 1}.fc1.weight" in text and "4.19 KiB of offloaded weights" in text
    assert_trustworthy(offload)
    assert len(weight_files(offload)) == fail_at - 1  # only the shard written in full stays
    assert not (offload / "index.json").exists()
    monkeypatch.undo()
    model = load(path, offload)  # the next run completes, re-using what the failed run finished
    assert torch.equal(model(IDS), ref(IDS))
    assert_trustworthy(offload)
    assert set(load_offload_index(offload)) == {n for n in ref.state_dict() if n.startswith(("blocks.1.fc",
                                                                                              "blocks.3.fc"))}


def test_interrupt_while_converting_cleans_up_and_restores_the_model(ckpt, tmp_path, monkeypatch):
    ref, path = ckpt
    offload = tmp_path / "offload"
    failing_save_file(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    load_fails(path, offload, KeyboardInterrupt)
    assert_trustworthy(offload)
    monkeypatch.undo()
    assert torch.equal(load(path, offload)(IDS), ref(IDS))


Usage = namedtuple("Usage", "total used free")


def test_too_little_free_space_is_refused_before_writing(ckpt, tmp_path, monkeypatch):
    ref, path = ckpt
    offload = tmp_path / "offload"
    monkeypatch.setattr("hf_bigmodel.storage.offload_folder.shutil.disk_usage", lambda _: Usage(10**9, 10**9 - 100, 100))
    err = load_fails(path, offload, OffloadError)
    text = str(err)
    needed = sum(t.numel() * 4 for n, t in ref.state_dict().items() if n.startswith(("blocks.1.fc", "blocks.3.fc")))
    assert str(offload) in text and f"needs {needed / 1024:.2f} KiB" in text and "has 100 B free" in text
    assert "pass an offload_folder on a larger disk" in text
    assert weight_files(offload) == {}
    monkeypatch.undo()
    load(path, offload)  # now the converted files exist: a full disk no longer matters, they are re-used
    monkeypatch.setattr("hf_bigmodel.storage.offload_folder.shutil.disk_usage", lambda _: Usage(10**9, 10**9 - 100, 100))
    assert torch.equal(load(path, offload)(IDS), ref(IDS))


# --- damaged files left by an earlier run -----------------------------------------------------------------


def test_truncated_file_under_the_exact_content_name_is_detected_and_rewritten(ckpt, tmp_path, caplog):
    ref, path = ckpt
    good = tmp_path / "good"
    load(path, good)
    sizes = weight_files(good)
    assert len(sizes) == 2  # one converted file per shard holding disk entries
    planted = tmp_path / "planted"
    planted.mkdir()
    for name, size in sizes.items():  # the names another run derives from the same checkpoint
        (planted / name).write_bytes((good / name).read_bytes()[: size - 16])
    with caplog.at_level(logging.WARNING, logger="hf_bigmodel"):
        model = load(path, planted)
    assert torch.equal(model(IDS), ref(IDS))
    for name in sizes:
        assert f"Ignoring {planted / name}" in caplog.text
    assert "(16 B missing)" in caplog.text
    assert weight_files(planted) == sizes
    assert_trustworthy(planted)


def test_file_with_other_tensors_under_the_content_name_is_rewritten(ckpt, tmp_path, caplog):
    ref, path = ckpt
    good = tmp_path / "good"
    load(path, good)
    planted = tmp_path / "planted"
    planted.mkdir()
    for name in weight_files(good):
        save_file({"blocks.1.fc1.weight": torch.zeros(3, 3)}, planted / name)  # valid file, wrong content
    with caplog.at_level(logging.WARNING, logger="hf_bigmodel"):
        model = load(path, planted)
    assert torch.equal(model(IDS), ref(IDS))
    assert "does not hold 'blocks." in caplog.text and "writing it again" in caplog.text


def test_stale_temporary_files_are_never_used(ckpt, tmp_path):
    ref, path = ckpt
    good = tmp_path / "good"
    load(path, good)
    planted = tmp_path / "planted"
    planted.mkdir()
    for name in weight_files(good):  # what a killed writer leaves behind
        (planted / f".{name}.4242.deadbeef.tmp").write_bytes(b"\x00" * 40)
    assert torch.equal(load(path, planted)(IDS), ref(IDS))
    assert weight_files(planted) == weight_files(good)


def test_temporary_files_of_dead_writers_are_swept(tmp_path):
    import subprocess
    import sys

    from hf_bigmodel.storage.offload_folder import OffloadFolder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    folder = tmp_path / "off"
    folder.mkdir()
    old = time.time() - 3600
    orphan = folder / f".w-1.safetensors.{dead.pid}.deadbeef.tmp"
    busy = folder / f".w-2.safetensors.{os.getpid()}.deadbeef.tmp"  # a live writer, even if slow
    fresh = folder / f".index.json.{dead.pid}.cafebabe.tmp"  # too recent to judge
    for file in (orphan, busy, fresh):
        file.write_bytes(b"\x00" * 8)
    os.utime(orphan, (old, old))
    os.utime(busy, (old, old))
    OffloadFolder(folder).prepare()
    assert not orphan.exists() and busy.exists() and fresh.exists()


# --- damaged index.json -----------------------------------------------------------------------------------


@pytest.fixture()
def offloaded(tmp_path) -> tuple[TinyLM, Path]:
    """A folder filled by ``disk_offload`` of the reference model: every weight and buffer, plus index.json."""
    ref = reference_tiny_lm()
    folder = tmp_path / "offload"
    disk_offload(reference_tiny_lm(), folder, execution_device="cpu", offload_buffers=True)
    return ref, folder


def edit_index(folder: Path, edit) -> None:
    index = folder / "index.json"
    data = json.loads(index.read_text())
    edit(data)
    index.write_text(json.dumps(data))


def first_entry(data: dict) -> dict:
    return data["weights"]["blocks.0.fc1.weight"]


CORRUPTIONS = {
    "not json": (lambda f: (f / "index.json").write_text('{"format": "hf_bigmodel-offl'), "not JSON"),
    "foreign json": (lambda f: (f / "index.json").write_text('{"weight_map": {}}'), "not an hf_bigmodel offload index"),
    "missing file": (lambda f: edit_index(f, lambda d: first_entry(d).update(file="w-gone.safetensors")),
                     "blocks.0.fc1.weight (CheckpointNotFoundError"),
    "outside": (lambda f: edit_index(f, lambda d: first_entry(d).update(file="../w-1.safetensors")),
                "blocks.0.fc1.weight (ValueError: file '../w-1.safetensors' lies outside the folder"),
    "wrong key": (lambda f: edit_index(f, lambda d: first_entry(d).update(key="nope")), "blocks.0.fc1.weight (KeyError"),
    "bad dtype": (lambda f: edit_index(f, lambda d: first_entry(d).update(dtype="float7")), "Unknown dtype 'float7'"),
    "entry not a dict": (lambda f: edit_index(f, lambda d: d["weights"].update({"norm.bias": "w-1"})),
                         "norm.bias (TypeError"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_dispatch_refuses_a_damaged_offload_index(offloaded, case):
    _, folder = offloaded
    corrupt, expected = CORRUPTIONS[case]
    corrupt(folder)
    model = empty_lm()
    with pytest.raises(OffloadError) as info:
        dispatch_model(model, {"": "disk"}, offload_dir=folder, offload_buffers=True)
    text = str(info.value)
    assert expected in text and str(folder) in text
    assert "and load the checkpoint again" in text and f"Delete {str(folder)!r}" in text
    assert_untouched(model)


def test_dispatch_refuses_a_truncated_offloaded_file(offloaded):
    _, folder = offloaded
    victim = folder / json.loads((folder / "index.json").read_text())["weights"]["blocks.2.fc2.weight"]["file"]
    victim.write_bytes(victim.read_bytes()[:-4])
    model = empty_lm()
    with pytest.raises(OffloadError) as info:
        dispatch_model(model, {"": "disk"}, offload_dir=folder, offload_buffers=True)
    assert "blocks.2.fc2.weight (CorruptCheckpointError" in str(info.value) and victim.name in str(info.value)
    assert_untouched(model)


def test_dispatch_refuses_an_offload_index_of_another_model(offloaded):
    _, folder = offloaded
    model = empty_lm(dim=8)  # same names, other shapes
    with pytest.raises(OffloadError) as info:
        dispatch_model(model, {"": "disk"}, offload_dir=folder, offload_buffers=True)
    assert "blocks.0.fc1.bias (stored with shape [32], the model has [16])" in str(info.value)
    assert_untouched(model)


@pytest.mark.parametrize("case", ["not json", "missing file", "bad dtype"])
def test_disk_offload_of_an_empty_model_refuses_a_damaged_folder(offloaded, case):
    _, folder = offloaded
    CORRUPTIONS[case][0](folder)
    model = empty_lm()
    with pytest.raises(OffloadError, match=re.escape(CORRUPTIONS[case][1])) as info:
        disk_offload(model, folder, execution_device="cpu", offload_buffers=True)
    assert str(folder) in str(info.value)
    assert_untouched(model)


def test_disk_offload_of_other_weights_does_not_reuse_old_files(offloaded):
    ref, folder = offloaded
    other = reference_tiny_lm(seed=7)
    model = disk_offload(reference_tiny_lm(seed=7), folder, execution_device="cpu")
    assert torch.equal(model(IDS), other(IDS)) and not torch.equal(other(IDS), ref(IDS))


def test_disk_offload_of_an_empty_model_reads_the_folder(offloaded):
    ref, folder = offloaded
    model = disk_offload(empty_lm(), folder, execution_device="cpu")
    assert torch.equal(model(IDS), ref(IDS))  # buffers (scale) come from the folder, not from __init__


def test_a_good_offload_index_is_used(offloaded):
    ref, folder = offloaded
    model = dispatch_model(empty_lm(), {"": "disk"}, offload_dir=folder, offload_buffers=True)
    assert torch.equal(model(IDS), ref(IDS))


@pytest.mark.parametrize("case", ["not json", "missing file", "bad dtype"])
def test_disk_offload_of_a_real_model_rebuilds_a_damaged_folder(offloaded, case):
    ref, folder = offloaded
    CORRUPTIONS[case][0](folder)
    # the model has its weights: the damaged index is never trusted, content-named files are re-checked
    model = disk_offload(reference_tiny_lm(), folder, execution_device="cpu", offload_buffers=True)
    assert torch.equal(model(IDS), ref(IDS))
    refs = load_offload_index(folder)  # rebuilt: consistent again
    assert set(refs) == set(ref.state_dict())
    assert torch.equal(model._hf_bigmodel_weights["blocks.1.scale"], ref.blocks[1].scale)


def test_load_offload_index_errors_are_offload_errors(tmp_path):
    with pytest.raises(OffloadError, match="has no index.json; nothing was offloaded there") as info:
        load_offload_index(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert issubclass(OffloadError, OSError) and not issubclass(OffloadError, CheckpointError)
    os.mkdir(tmp_path / "index.json")
    with pytest.raises(OffloadError, match="Cannot read") as info:
        load_offload_index(tmp_path)
    assert str(tmp_path / "index.json") in str(info.value) and "Is a directory" in str(info.value)
