"""Malformed checkpoints: every problem raises a clear error naming the culprit, before the model is touched.

"Untouched" means: every parameter still on the meta device, no hook on any module, no weights map and
no ``hf_device_map`` attached. Error messages are checked for the key / file / value they must name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from core_models import TinyLM, reference_tiny_lm, save_state
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from hf_bigmodel import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidIndexError,
    UnsafeCheckpointError,
    init_empty_weights,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
)
from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.storage.checkpoint import find_checkpoint, load_torch_file, read_index
from hf_bigmodel.storage.safetensors_io import read_header

IDS = torch.tensor([[1, 5, 9, 3], [7, 2, 0, 4]])
MAP = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu", "blocks.3": "disk",
       "norm": "cpu", "head": "cpu"}


def empty_lm() -> TinyLM:
    with init_empty_weights():
        return TinyLM()


def assert_untouched(model: nn.Module) -> None:
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not [n for n, m in model.named_modules() if "_hf_hook" in m.__dict__]
    assert not hasattr(model, OFFLOAD_ATTR) and not hasattr(model, "hf_device_map")


def load_fails(path, error: type[Exception], **kwargs) -> Exception:
    """``load_checkpoint_and_dispatch`` of an empty TinyLM must raise ``error`` and leave the model untouched."""
    model = empty_lm()
    with pytest.raises(error) as info:
        load_checkpoint_and_dispatch(model, path, device_map=kwargs.pop("device_map", MAP), **kwargs)
    assert_untouched(model)
    return info.value


def edit_state(path: Path, edit) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.fixture()
def ckpt(tmp_path) -> tuple[TinyLM, Path]:
    ref = reference_tiny_lm()
    save_state(ref, tmp_path / "ckpt")
    return ref, tmp_path / "ckpt" / "model.safetensors"


# --- keys, shapes, dtypes ---------------------------------------------------------------------------------


def test_every_missing_key_is_listed_before_loading(ckpt):
    _, file = ckpt
    gone = [f"blocks.{i}.{m}.{p}" for i in range(3) for m in ("fc1", "fc2") for p in ("weight", "bias")]
    edit_state(file, lambda s: [s.pop(k) for k in gone])
    err = load_fails(file, CheckpointMismatchError)
    assert sorted(err.missing_keys) == sorted(gone)  # all 12, on the exception
    text = str(err)
    assert "Missing key(s) in state_dict (12)" in text and str(file) in text
    assert "blocks.0.fc1.weight" in text and "(+2 more)" in text  # the message cuts the list at 10
    assert "load a checkpoint that holds them" in text


def test_unexpected_keys_fail_with_strict_and_are_logged_otherwise(ckpt, caplog):
    ref, file = ckpt
    edit_state(file, lambda s: s.update({"extra.proj.weight": torch.zeros(3), "blocks.9.scale": torch.ones(2)}))
    err = load_fails(file, CheckpointMismatchError, strict=True)
    assert sorted(err.unexpected_keys) == ["blocks.9.scale", "extra.proj.weight"]
    assert "Unexpected key(s) in state_dict (2)" in str(err) and "extra.proj.weight" in str(err)
    with caplog.at_level(logging.WARNING, logger="hf_bigmodel"):
        model = load_checkpoint_and_dispatch(empty_lm(), file, device_map=MAP)
    assert "extra.proj.weight" in caplog.text and "blocks.9.scale" in caplog.text
    assert torch.equal(model(IDS), ref(IDS))


def test_shape_mismatch_names_the_key_and_both_shapes(ckpt):
    _, file = ckpt
    edit_state(file, lambda s: s.update({"blocks.2.fc2.bias": torch.zeros(7)}))
    err = load_fails(file, CheckpointMismatchError)
    assert err.mismatched_keys == [("blocks.2.fc2.bias", (7,), (16,))]
    assert "blocks.2.fc2.bias: checkpoint [7] vs model [16]" in str(err)


@pytest.mark.parametrize(("key", "bad"), [
    ("blocks.1.fc1.weight", torch.ones(32, 16, dtype=torch.int64)),  # int64 where the model has float
    ("norm.bias", torch.ones(16, dtype=torch.bool)),
])
def test_dtype_that_cannot_be_cast_is_refused(ckpt, key, bad):
    _, file = ckpt
    edit_state(file, lambda s: s.update({key: bad}))
    err = load_fails(file, CheckpointMismatchError)
    text = str(err)
    assert f"{key}: checkpoint {bad.dtype} cannot become model torch.float32" in text
    assert "load the checkpoint made for this model" in text


# --- damaged safetensors files ----------------------------------------------------------------------------


def raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


F32 = {"dtype": "F32"}
W = {**F32, "shape": [2, 2], "data_offsets": [0, 16]}
B = {**F32, "shape": [2], "data_offsets": [16, 24]}


@pytest.mark.parametrize(("header", "data", "expected"), [
    (b"{not json", b"", "its header is not JSON"),
    (b"[1, 2]", b"", "its header is not a JSON object"),
    ({"weight": W, "bias": {**B, "data_offsets": [8, 16]}}, bytes(24), "'bias' starts at data byte 8, which overlaps"),
    ({"weight": W, "bias": {**B, "data_offsets": [20, 28]}}, bytes(28), "'bias' starts at data byte 20, which leaves a"),
    ({"weight": {**W, "data_offsets": [0, 12]}, "bias": B}, bytes(24), "'weight' spans 12 bytes but shape [2, 2] of F32"),
    ({"weight": {**W, "dtype": "F128"}, "bias": B}, bytes(24), "'weight' has unknown dtype 'F128'"),
    ({"weight": {**W, "shape": [-2, 2]}, "bias": B}, bytes(24), "the entry for 'weight' is malformed"),
    ({"weight": {**W, "shape": "2x2"}, "bias": B}, bytes(24), "the entry for 'weight' is malformed"),
    ({"weight": {**W, "data_offsets": [0.5, 16]}, "bias": B}, bytes(24), "the entry for 'weight' is malformed"),
    ({"weight": W, "bias": B, "__metadata__": {"format": 3}}, bytes(24), "its __metadata__ is not a mapping"),
    ({"weight": W, "bias": B}, bytes(20), "(4 B missing); 1 tensor(s) are cut short, first 'bias'"),
])
def test_corrupt_safetensors_headers_name_the_file_and_the_problem(tmp_path, header, data, expected):
    file = raw_safetensors(tmp_path / "model.safetensors", header, data)
    model = nn.Linear(2, 2, device="meta")
    with pytest.raises(CorruptCheckpointError) as info:
        load_checkpoint_in_model(model, file, device_map={"": "cpu"})
    text = str(info.value)
    assert expected in text and str(file) in text and info.value.path == str(file)
    assert "truncated or corrupt" in text and "Download or save it again" in text
    assert model.weight.device.type == "meta"


def test_safetensors_header_length_beyond_the_file(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CorruptCheckpointError, match=r"header claims 1000 B but the file holds 10 B \(998 B missing\)"):
        read_header(file)
    file.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="holds 2 bytes, less than the 8-byte header length"):
        read_header(file)


def test_truncated_safetensors_says_which_tensor_and_how_much_is_missing(ckpt):
    _, file = ckpt
    size = file.stat().st_size
    first_cut = min((e for e in read_header(file).entries.values() if e.end > size - 100), key=lambda e: e.start)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    err = load_fails(file, CorruptCheckpointError)
    text = str(err)
    assert str(file) in text and f"its header needs {size} bytes but the file holds {size - 100} bytes" in text
    assert "(100 B missing)" in text and f"first {first_cut.key!r}" in text


def test_truncated_shard_of_a_sharded_checkpoint_is_named(tmp_path):
    save_state(reference_tiny_lm(), tmp_path, shards=3)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    err = load_fails(tmp_path, CorruptCheckpointError)
    assert err.path == str(shard) and str(shard) in str(err) and "(8 B missing)" in str(err)


# --- indexes and folders ----------------------------------------------------------------------------------


@pytest.fixture()
def sharded(tmp_path) -> Path:
    save_state(reference_tiny_lm(), tmp_path / "ckpt", shards=2)
    return tmp_path / "ckpt"


def rewrite_index(folder: Path, edit) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return index


def test_index_that_is_not_json(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"embed.weight": "model-00001-of-00002.safe')
    err = load_fails(sharded, InvalidIndexError)
    assert str(index) in str(err) and "is not valid JSON" in str(err)


def test_index_without_a_weight_map(sharded):
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weights": {}}))
    err = load_fails(sharded, InvalidIndexError)
    assert str(index) in str(err) and "no 'weight_map' object" in str(err)


def test_index_naming_a_missing_shard(sharded):
    index = rewrite_index(sharded, lambda wm: wm.update({"norm.weight": "model-00009-of-00009.safetensors"}))
    err = load_fails(sharded, CheckpointNotFoundError)
    assert isinstance(err, FileNotFoundError)
    assert str(index) in str(err) and "model-00009-of-00009.safetensors" in str(err)
    assert "fetch the missing shards" in str(err)


@pytest.mark.parametrize(("shard", "why"), [
    ("../model.safetensors", "points outside the index's folder"),
    ("sub/../../model.safetensors", "points outside the index's folder"),
    ("/etc/model.safetensors", "points outside the index's folder"),
    ("..\\model.safetensors", "points outside the index's folder"),
    ("C:/weights/model.safetensors", "points outside the index's folder"),
    ("model-00001-of-00002.py", "not a .safetensors file"),
    ("model-00001-of-00002.bin", "not a .safetensors file"),
    ("", "an empty name"),
])
def test_index_pointing_outside_its_folder_or_at_other_files(sharded, shard, why):
    (sharded.parent / "model.safetensors").write_bytes(b"")  # a real file out there must still be refused
    index = rewrite_index(sharded, lambda wm: wm.update({"head.weight": shard, "norm.weight": shard}))
    err = load_fails(sharded, InvalidIndexError)
    text = str(err)
    assert str(index) in text and f"{shard!r} ({why})" in text
    assert "plain weights file names next to the index" in text


def test_index_with_non_string_values_names_the_keys(sharded):
    rewrite_index(sharded, lambda wm: wm.update({"norm.weight": 3, "norm.bias": None}))
    err = load_fails(sharded, InvalidIndexError)
    assert "'norm.weight' -> '3' (not a string)" in str(err) and "'norm.bias' -> 'None'" in str(err)


def test_empty_folder_and_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    err = load_fails(tmp_path / "empty", CheckpointNotFoundError)
    assert str(tmp_path / "empty") in str(err) and "(it is empty)" in str(err)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    err = load_fails(tmp_path / "junk", CheckpointNotFoundError)
    assert "holds no checkpoint" in str(err) and "config.json" in str(err)
    err = load_fails(tmp_path / "nowhere", CheckpointNotFoundError)
    assert str(tmp_path / "nowhere") in str(err) and "does not exist" in str(err)


# --- torch pickles ----------------------------------------------------------------------------------------


class _PlantMarker:
    """Unpickling this would create a marker file: the proof that code in a checkpoint ran."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("layout", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, layout):
    marker = tmp_path / "PWNED"
    payload = _PlantMarker()
    payload.marker = str(marker)
    file = tmp_path / "pytorch_model.bin"
    if layout == "torch.save":
        torch.save({"embed.weight": torch.zeros(50, 16), "evil": payload}, file)
    else:  # the legacy (pre-zip) layout is a bare pickle stream
        with open(file, "wb") as f:
            pickle.dump({"evil": payload}, f, protocol=2)
    err = load_fails(file, UnsafeCheckpointError)
    assert not marker.exists()
    text = str(err)
    assert str(file) in text and "makedirs" in text  # the refused global is named
    assert "nothing inside it ran" in text and "convert it to safetensors" in text


def test_truncated_torch_zip_is_reported_as_truncated(tmp_path):
    ref = reference_tiny_lm()
    save_state(ref, tmp_path, fmt="torch")
    file = tmp_path / "pytorch_model.bin"
    file.write_bytes(file.read_bytes()[:5000])
    err = load_fails(tmp_path, CorruptCheckpointError)
    assert str(file) in str(err) and "truncated torch checkpoint" in str(err)
    assert "holds 4.88 KiB" in str(err) and "end was cut off" in str(err)


@pytest.mark.parametrize(("content", "expected"), [
    (b"", "is empty (0 bytes)"),
    (b"hello, not a pickle at all", "is not a readable torch checkpoint"),
    ("legacy-truncated", "is not a readable torch checkpoint (EOFError)"),
])
def test_unreadable_torch_files(tmp_path, content, expected):
    file = tmp_path / "pytorch_model.bin"
    if content == "legacy-truncated":
        torch.save({"w": torch.ones(64)}, file, _use_new_zipfile_serialization=False)
        content = file.read_bytes()[:40]
    file.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as info:
        load_torch_file(file)
    assert expected in str(info.value) and str(file) in str(info.value)


def test_torch_file_with_non_tensor_entries_names_them(tmp_path):
    file = tmp_path / "pytorch_model.bin"
    torch.save({"embed.weight": torch.zeros(50, 16), "step": 7, "optimizer": {"lr": 0.1}}, file)
    err = load_fails(file, CorruptCheckpointError)
    assert "'step' (int)" in str(err) and "'optimizer' (dict)" in str(err) and "model.state_dict()" in str(err)


# --- files in the Hugging Face cache ----------------------------------------------------------------------


def fake_hub_cache(home: Path, name: str, content: bytes) -> Path:
    """Lay out ``models--org--tiny`` like huggingface_hub: a blob, and a snapshot symlink to it."""
    repo = home / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_bytes(content)
    snapshot = repo / "snapshots" / ("f" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / "0123abcd")
    return snapshot / name


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_damaged_file_in_the_hub_cache_says_force_download(tmp_path, hermetic_hf, fmt):
    save_state(reference_tiny_lm(), tmp_path / "src", fmt=fmt)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    good = (tmp_path / "src" / name).read_bytes()
    cached = fake_hub_cache(hermetic_hf, name, good[: len(good) - 64])
    err = load_fails(cached.parent, CorruptCheckpointError, offload_folder=tmp_path / "offload")
    assert str(cached) in str(err) and "force_download=True" in str(err)
    # the same damage outside the cache gets the plain advice
    local = tmp_path / "local" / name
    local.parent.mkdir()
    local.write_bytes(good[: len(good) - 64])
    err = load_fails(local, CorruptCheckpointError, offload_folder=tmp_path / "offload")
    assert str(local) in str(err) and "force_download" not in str(err) and "Download or save it again" in str(err)


# --- read_index against random and malicious weight maps --------------------------------------------------

_GOOD = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "sub/model-3.safetensors")
_PIECES = ["..", ".", "", "a", "sub", "/", "\\", "~", "C:", "\x00", "\n", "\ud800", "é", " ", "x" * 300,
           "model-00001-of-00002", ".safetensors", ".py", ".bin", ".json", ".safetensors.tmp"]
_names = st.one_of(
    st.sampled_from(_GOOD),
    st.lists(st.sampled_from(_PIECES), max_size=6).map("".join),
    st.lists(st.sampled_from(["..", ".", "sub", "a", "", "/"]), max_size=4).map(
        lambda parts: "/".join(parts) + "/model-00001-of-00002.safetensors"),
    st.text(max_size=40),
    st.text(max_size=20).map(lambda t: t + ".safetensors"),
)
_values = st.one_of(
    _names, _names, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
    st.lists(_names, max_size=2), st.dictionaries(st.text(max_size=3), _names, max_size=2),
)
_documents = st.one_of(
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=10), _values, max_size=6)}),
    st.fixed_dictionaries({"metadata": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                           "weight_map": st.one_of(st.none(), st.lists(_names, max_size=3), _names)}),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children,
                                                                                   max_size=3), max_leaves=8),
)


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("index") / "ckpt"
    (folder / "sub").mkdir(parents=True)
    for name in _GOOD:
        (folder / name).write_bytes(b"")
    (folder.parent / "model-00001-of-00002.safetensors").write_bytes(b"")  # ../ targets exist
    return folder


def _check_read_index(index: Path) -> None:
    folder = index.parent.resolve()
    try:
        shards = read_index(index)
    except (InvalidIndexError, CheckpointNotFoundError) as err:
        assert str(index) in str(err)  # every refusal names the index
        return
    assert shards
    for shard in shards:
        normal = Path(os.path.normpath(shard)).resolve()
        assert os.path.commonpath([folder, normal]) == str(folder), shard
        assert normal.is_file() and normal.name.endswith(".safetensors")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=_documents)
def test_read_index_accepts_only_files_inside_the_folder(index_folder, document):
    index = index_folder / "model.safetensors.index.json"
    index.write_text(json.dumps(document), encoding="utf-8")  # ensure_ascii: lone surrogates become \\ud800
    _check_read_index(index)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_read_index_survives_arbitrary_bytes(index_folder, raw):
    index = index_folder / "model.safetensors.index.json"
    index.write_bytes(raw)
    _check_read_index(index)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shard=_names)
@example(shard="x" * 300 + ".safetensors")  # longer than a file name may be
@example(shard="\ud800.safetensors")  # not encodable for the file system
@example(shard="a\x00.safetensors")
@example(shard="../model-00001-of-00002.safetensors")  # exists, one level up
@example(shard=str(Path("/tmp/model.safetensors")))
def test_read_index_never_lets_a_single_shard_escape(index_folder, shard):
    index = index_folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}), encoding="utf-8")
    _check_read_index(index)
    printable = all(" " <= c and not "\ud800" <= c <= "\udfff" for c in shard)
    if printable and (".." in shard.replace("\\", "/").split("/") or shard.startswith("/")):
        with pytest.raises(InvalidIndexError, match="points outside the index's folder"):
            read_index(index)


def test_find_checkpoint_of_a_good_index(sharded):
    ckpt = find_checkpoint(sharded)
    assert ckpt.format == "safetensors" and [Path(f).name for f in ckpt.files] == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
