"""A custom model family (examples/custom_family.py) through load_pretrained_dispatched and PretrainedLoader."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_bigmodel import PretrainedLoader, load_pretrained_dispatched, register_loader
from hf_bigmodel.errors import CheckpointMismatchError, ModelClassNotFoundError
from hf_bigmodel.hf.registry import unregister_loader
from hf_bigmodel.load.loading import OFFLOAD_ATTR

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_family.py"


@pytest.fixture(scope="module")
def family():
    spec = importlib.util.spec_from_file_location("custom_family", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_family"] = module  # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("custom_family", None)


@pytest.fixture
def saved(family, tmp_path):
    reference = family.save_tinymlp(tmp_path / "tinymlp", family.TinyMLPConfig(width=16, depth=6, classes=4))
    return tmp_path / "tinymlp", reference


def budget(reference: nn.Module, fraction: float, scale: float = 1.0) -> dict[str, int]:
    total = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    return {"cpu": int(total * fraction * scale)}


def run(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(dtype)  # [B, width]
    with torch.no_grad():
        return model(x)


def test_family_keys_are_renamed_and_outputs_match(family, saved):
    path, reference = saved
    model = load_pretrained_dispatched(path, loader=family.TinyMLPLoader)
    assert isinstance(model, family.TinyMLP) and not model.training
    assert model.hf_device_map == {"": "cpu"}
    assert model.config == reference.config
    assert set(model.state_dict()) == set(reference.state_dict())  # format.version was dropped
    torch.testing.assert_close(run(model), run(reference), rtol=0, atol=0)


def test_part_on_disk_with_fp32_kept_head(family, saved):
    path, reference = saved
    model = load_pretrained_dispatched(path, loader=family.TinyMLPLoader(), torch_dtype=torch.bfloat16,
                                       max_memory=budget(reference, 0.5, scale=0.5))
    values = list(model.hf_device_map.values())
    assert "cpu" in values and "disk" in values, model.hf_device_map
    assert model.hf_device_map["head"] == "disk"
    # The offloaded head is float32 in the weights map and in the placeholder forward code reads.
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.float32
    assert getattr(model, OFFLOAD_ATTR)["head.weight"].dtype == torch.float32
    assert model.blocks[0].linear.weight.dtype == torch.bfloat16
    expected = copy.deepcopy(reference)
    expected.blocks.to(torch.bfloat16)  # the head stays float32
    torch.testing.assert_close(run(model, torch.bfloat16), run(expected, torch.bfloat16), rtol=0, atol=0)


def test_registered_loader_is_selected_by_can_load(family, saved):
    path, reference = saved
    with pytest.raises(ModelClassNotFoundError, match=r"cannot read config.*loader="):
        load_pretrained_dispatched(path)  # unknown to transformers, and not registered yet
    register_loader(family.TinyMLPLoader)
    try:
        model = load_pretrained_dispatched(path, max_memory=budget(reference, 0.5))
    finally:
        unregister_loader(family.TinyMLPLoader)
    assert isinstance(model, family.TinyMLP) and "disk" in model.hf_device_map.values()
    torch.testing.assert_close(run(model), run(reference), rtol=0, atol=0)
    with pytest.raises(TypeError, match="PretrainedLoader subclass"):
        register_loader(family.TinyMLP)


def test_config_kwargs_and_unknown_kwargs(family, saved):
    path, _ = saved
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) widht"):
        load_pretrained_dispatched(path, loader=family.TinyMLPLoader, widht=8)
    with pytest.raises(CheckpointMismatchError, match=r"Size mismatch.*blocks\.0\.linear\.weight"):
        load_pretrained_dispatched(path, loader=family.TinyMLPLoader, width=8)  # a real override: shapes differ


def test_missing_block_is_reset_and_reported(family, saved, caplog):
    path, reference = saved
    weights = path / family.WEIGHTS_NAME
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("layer_5.")}
    save_file(tensors, weights)
    with caplog.at_level(logging.WARNING, logger="hf_bigmodel.hf.pretrained"):
        model = load_pretrained_dispatched(path, loader=family.TinyMLPLoader, max_memory=budget(reference, 0.5))
    assert "blocks.5.linear.weight" in caplog.text and "newly initialised" in caplog.text
    new = getattr(model, OFFLOAD_ATTR)["blocks.5.linear.weight"]
    assert torch.isfinite(new).all() and not torch.equal(new, reference.blocks[5].linear.weight)
    assert new.abs().max() <= 1 / 16**0.5  # nn.Linear.reset_parameters: U(-1/sqrt(width), 1/sqrt(width))
    kept = next(i for i in range(len(model.blocks)) if model.hf_device_map.get(f"blocks.{i}") == "cpu")
    torch.testing.assert_close(model.blocks[kept].linear.weight, reference.blocks[kept].linear.weight, rtol=0, atol=0)


class Scaled(nn.Module):
    """A module with a bare parameter and no reset_parameters()."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


class ScaledFromConfig(Scaled):
    def __init__(self, config: dict) -> None:
        super().__init__(config["width"])


def write_plain(folder: Path, keys_to_drop: tuple[str, ...] = ()) -> Scaled:
    folder.mkdir()
    torch.manual_seed(0)
    model = Scaled(4)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in keys_to_drop}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"width": 4}))
    return model


def test_base_loader_builds_model_class_from_the_config(tmp_path):
    reference = write_plain(tmp_path / "plain")
    model = load_pretrained_dispatched(tmp_path / "plain", loader=PretrainedLoader,
                                       model_class=ScaledFromConfig)
    torch.testing.assert_close(model(torch.ones(2, 4)), reference(torch.ones(2, 4)), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="override build_model"):
        load_pretrained_dispatched(tmp_path / "plain", loader=PretrainedLoader)


def test_missing_tensor_without_reset_parameters_fails_listing_it(tmp_path):
    write_plain(tmp_path / "plain", keys_to_drop=("scale",))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)Missing key\(s\).*scale.*reset_parameters"):
        load_pretrained_dispatched(tmp_path / "plain", loader=PretrainedLoader,
                                   model_class=ScaledFromConfig)


def test_the_example_runs_as_a_script(family, tmp_path):
    assert family.main([str(tmp_path / "demo")]) == 0
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["family"] == "tinymlp"
