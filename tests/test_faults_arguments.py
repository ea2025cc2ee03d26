"""Bad arguments: max_memory, device maps, dtypes and 'disk' without a place for the weights.

Each error names the culprit (key, value, module, device) and says what to do, and is raised before the
model is touched (all-meta, no hooks) and before any file is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from core_models import empty_lm, reference_tiny_lm, save_state
from torch import nn

from hf_bigmodel import (
    CheckpointMismatchError,
    DeviceMapError,
    InvalidMaxMemoryError,
    OffloadError,
    dispatch_model,
    get_max_memory,
    load_checkpoint_and_dispatch,
)
from hf_bigmodel.load.loading import OFFLOAD_ATTR

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="absent-device cases assume a CPU-only machine")


def hooked(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "_hf_hook" in m.__dict__]


def assert_untouched(model: nn.Module) -> None:
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not hooked(model)
    assert not hasattr(model, OFFLOAD_ATTR) and not hasattr(model, "hf_device_map")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    ref = reference_tiny_lm()
    save_state(ref, root / "st")
    save_state(ref, root / "pt", fmt="torch")
    return {"safetensors": root / "st", "torch": root / "pt"}


def refused(ckpt: Path, error: type[Exception], tmp_path: Path, **kwargs) -> Exception:
    model = empty_lm()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error) as info:
        load_checkpoint_and_dispatch(model, ckpt, **kwargs)
    assert_untouched(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no folder created
    return info.value


# --- max_memory -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_memory", "key", "culprit", "why"), [
    ({"cpu": -5}, "cpu", "-5", "is negative"),
    ({"cpu": "-2GiB"}, "cpu", "'-2GiB'", "is negative"),
    ({"cpu": "lots"}, "cpu", "'lots'", "cannot read 'lots' as a size"),
    ({"cpu": "12 parsecs"}, "cpu", "'parsecs'", "unknown unit"),
    ({"cpu": float("nan")}, "cpu", "nan", "not a finite number"),
    ({5: "1GiB", "cpu": "1GiB"}, 5, "5", "this machine has no such device"),
    ({"cuda:0": "1GiB", "cpu": "1GiB"}, "cuda:0", "'cuda:0'", "this machine has no such device"),
    ({"gpu7": "1GiB"}, "gpu7", "'gpu7'", "is not a device"),
])
def test_bad_max_memory_is_refused_by_name(ckpts, tmp_path, max_memory, key, culprit, why):
    err = refused(ckpts["safetensors"], InvalidMaxMemoryError, tmp_path, device_map="auto", max_memory=max_memory,
                  offload_folder=tmp_path / "offload")
    assert culprit in str(err) and why in str(err)
    assert isinstance(err, ValueError) and err.key == key
    with pytest.raises(InvalidMaxMemoryError, match=why):
        get_max_memory(max_memory)


def test_max_memory_must_be_a_dict(ckpts, tmp_path):
    err = refused(ckpts["safetensors"], InvalidMaxMemoryError, tmp_path, device_map="auto", max_memory="10GiB")
    assert "max_memory must be a dict" in str(err) and "str" in str(err)


# --- device maps ------------------------------------------------------------------------------------------


def test_device_map_naming_modules_that_do_not_exist(ckpts, tmp_path):
    device_map = {"": "cpu", "blocks.9": "cpu", "blokcs.1": "disk"}
    err = refused(ckpts["safetensors"], DeviceMapError, tmp_path, device_map=device_map)
    text = str(err)
    assert "'blocks.9'" in text and "'blokcs.1' (did you mean 'blocks.1'?)" in text
    assert "name no module, parameter or buffer of TinyLM" in text
    assert {"blocks.9", "blokcs.1"} <= set(err.modules)


def test_device_map_leaving_weights_uncovered(ckpts, tmp_path):
    device_map = {"embed": "cpu", "blocks": "cpu"}  # norm and head have no device
    err = refused(ckpts["safetensors"], DeviceMapError, tmp_path, device_map=device_map)
    text = str(err)
    assert "have no device: norm.weight, norm.bias, head.weight" in text
    assert "Add their module(s) (norm, head)" in text and "'' entry" in text


@pytest.mark.parametrize(("value", "culprit"), [("gpu", "'gpu'"), (-1, "-1"), ("meta", "'meta'"), (1.5, "1.5")])
def test_device_map_values_that_are_not_devices(ckpts, tmp_path, value, culprit):
    err = refused(ckpts["safetensors"], DeviceMapError, tmp_path, device_map={"": "cpu", "blocks.2": value})
    assert "device for 'blocks.2'" in str(err) and culprit in str(err)


@pytest.mark.parametrize("device_map", [0, "cuda:1", {"": "cpu", "blocks.1": 0}, {"": "cpu", "head": "cuda:3"}])
def test_device_map_naming_a_device_this_machine_lacks(ckpts, tmp_path, device_map):
    err = refused(ckpts["safetensors"], DeviceMapError, tmp_path, device_map=device_map)
    text = str(err)
    assert "this machine does not have" in text and "CUDA available: False" in text
    if isinstance(device_map, dict):
        module = next(k for k in device_map if k)
        assert module in text and module in err.modules[0]
    assert "device_map='auto'" in text


def test_unknown_strategy_and_dtype(ckpts, tmp_path):
    err = refused(ckpts["safetensors"], DeviceMapError, tmp_path, device_map="fastest")
    assert "'fastest'" in str(err) and "'auto'" in str(err)
    err = refused(ckpts["safetensors"], ValueError, tmp_path, device_map={"": "cpu"}, dtype="lots")
    assert "Unknown dtype 'lots'" in str(err) and "float16" in str(err)


# --- 'disk' with nowhere to put or read the weights -------------------------------------------------------


def test_disk_for_a_torch_checkpoint_needs_an_offload_folder(ckpts, tmp_path):
    device_map = {"": "cpu", "blocks.2": "disk"}
    err = refused(ckpts["torch"], OffloadError, tmp_path, device_map=device_map)
    text = str(err)
    assert "blocks.2.fc1.weight" in text and str(ckpts["torch"] / "pytorch_model.bin") in text
    assert "Pass offload_folder=" in text
    # the same map over safetensors needs no folder: the checkpoint is read in place
    model = load_checkpoint_and_dispatch(empty_lm(), ckpts["safetensors"], device_map=device_map)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(ids), reference_tiny_lm()(ids))


def test_dispatch_of_an_empty_model_to_disk_without_a_source():
    model = empty_lm()
    with pytest.raises(CheckpointMismatchError) as info:
        dispatch_model(model, {"": "cpu", "blocks.1": "disk", "head": "disk"})
    text = str(info.value)
    assert "blocks.1.fc1.weight" in text and "still on the meta device" in text
    assert "load_checkpoint_and_dispatch" in text and "offload_dir=" in text
    assert_untouched(model)


def test_dispatch_of_a_real_model_to_disk_without_offload_dir():
    model = reference_tiny_lm()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(OffloadError) as info:
        dispatch_model(model, {"": "cpu", "blocks.3": "disk"})
    text = str(info.value)
    assert "blocks.3.fc1" in text and "pass offload_dir=" in text
    assert not hooked(model) and not hasattr(model, "hf_device_map")
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
