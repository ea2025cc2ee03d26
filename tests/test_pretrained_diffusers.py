"""load_pretrained_dispatched on diffusers components of a pipeline folder, compared with diffusers' from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tiny_models import save_tiny_sd_components

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.errors import ModelClassNotFoundError
from hf_bigmodel.hf.registry import DiffusersLoader
from hf_bigmodel.load.loading import OFFLOAD_ATTR
from hf_bigmodel.runtime.model_device import own_class

# Outputs match to float rounding: the same weights at other addresses may pick other CPU kernels.
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_components(tmp_path_factory.mktemp("sd") / "pipe").path


@pytest.fixture(scope="module")
def sharded_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_components(tmp_path_factory.mktemp("sd") / "pipe", sharded=True).path


def part_on_disk(folder: Path, scale: float = 1.0) -> dict[str, int]:
    return {"cpu": int(sum(f.stat().st_size for f in folder.glob("*.safetensors")) * 0.75 * scale)}


def tensor_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    weights = getattr(model, OFFLOAD_ATTR, None)
    for name, tensor in model.state_dict().items():
        if tensor.device.type == "meta":
            assert weights is not None and weights.spec(name)[1] == tensor.dtype, name
    return {name: tensor.dtype for name, tensor in model.state_dict().items()}


def unet_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, int, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)  # [B, C, H, W] latents
    text = torch.randn(2, 3, 8, generator=generator)  # [B, tokens, cross_attention_dim]
    return sample.to(dtype), 10, text.to(dtype)


@pytest.mark.parametrize("dtype", [None, torch.float16])
@pytest.mark.parametrize("placement", ["ram", "ram+disk"])
def test_unet_matches_diffusers(pipeline, dtype, placement):
    reference = diffusers.UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", torch_dtype=dtype)
    scale = 0.5 if dtype == torch.float16 else 1.0
    max_memory = part_on_disk(pipeline / "unet", scale) if placement == "ram+disk" else None
    model = load_pretrained_dispatched(pipeline, subfolder="unet", torch_dtype=dtype, max_memory=max_memory)
    assert own_class(model) is diffusers.UNet2DConditionModel and not model.training
    expected_devices = {"cpu"} if placement == "ram" else {"cpu", "disk"}
    assert set(model.hf_device_map.values()) == expected_devices, model.hf_device_map
    assert tensor_dtypes(model) == tensor_dtypes(reference)
    assert set(tensor_dtypes(model).values()) == {dtype or torch.float32}
    assert model.config._name_or_path == str(pipeline)
    inputs = unet_inputs(dtype or torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs).sample, reference(*inputs).sample, **TOL[dtype or torch.float32])


@pytest.mark.parametrize("placement", ["ram", "ram+disk"])
def test_vae_encode_decode_match_diffusers(pipeline, placement):
    reference = diffusers.AutoencoderKL.from_pretrained(pipeline, subfolder="vae")
    max_memory = part_on_disk(pipeline / "vae") if placement == "ram+disk" else None
    model = load_pretrained_dispatched(pipeline, subfolder="vae", max_memory=max_memory)
    assert own_class(model) is diffusers.AutoencoderKL
    if placement == "ram+disk":
        assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    assert tensor_dtypes(model) == tensor_dtypes(reference)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, 16, 16, generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(image).latent_dist.mean, reference.encode(image).latent_dist.mean,
                                   **TOL[torch.float32])
        torch.testing.assert_close(model.decode(latents).sample, reference.decode(latents).sample, **TOL[torch.float32])


def test_sharded_unet_with_a_dict_device_map(sharded_pipeline):
    unet = sharded_pipeline / "unet"
    assert (unet / "diffusion_pytorch_model.safetensors.index.json").is_file()
    reference = diffusers.UNet2DConditionModel.from_pretrained(sharded_pipeline, subfolder="unet")
    device_map = {"conv_in": "cpu", "time_proj": "cpu", "time_embedding": "cpu", "down_blocks": "disk",
                  "up_blocks": "disk", "mid_block": "cpu", "conv_norm_out": "cpu", "conv_act": "cpu", "conv_out": "disk"}
    model = load_pretrained_dispatched(sharded_pipeline, subfolder="unet", device_map=device_map)
    assert model.hf_device_map == device_map
    with torch.no_grad():
        torch.testing.assert_close(model(*unet_inputs(torch.float32)).sample,
                                   reference(*unet_inputs(torch.float32)).sample, **TOL[torch.float32])


def test_the_diffusers_loader_is_chosen_from_class_name(pipeline):
    assert DiffusersLoader.can_load(json.loads((pipeline / "unet" / "config.json").read_text()))
    model = load_pretrained_dispatched(pipeline, subfolder="vae", loader=DiffusersLoader, device_map="cpu")
    assert model.hf_device_map == {"": "cpu"}


def test_config_overrides_and_unknown_kwargs(pipeline):
    model = load_pretrained_dispatched(pipeline, subfolder="vae", force_upcast=False)
    assert model.config.force_upcast is False
    with pytest.raises(TypeError, match="unexpected keyword argument.*upcast_typo"):
        load_pretrained_dispatched(pipeline, subfolder="vae", upcast_typo=False)


def copy_vae(pipeline: Path, folder: Path, class_name: str) -> Path:
    folder.mkdir()
    for f in (pipeline / "vae").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = class_name
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unknown_class_not_a_model_and_no_config(pipeline, tmp_path):
    with pytest.raises(ModelClassNotFoundError, match=r"'AutoencoderFromTheFuture'.*diffusers"):
        load_pretrained_dispatched(copy_vae(pipeline, tmp_path / "future", "AutoencoderFromTheFuture"))
    with pytest.raises(ModelClassNotFoundError, match=r"DDIMScheduler.*not a diffusers model.*subfolder="):
        load_pretrained_dispatched(copy_vae(pipeline, tmp_path / "scheduler", "DDIMScheduler"))
    with pytest.raises(FileNotFoundError, match=r"'config.json' is missing.*scheduler_config.json"):
        load_pretrained_dispatched(pipeline, subfolder="scheduler")
