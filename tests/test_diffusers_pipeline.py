"""Whole diffusers pipelines (hf/diffusers_pipeline.py): ``load_pretrained_dispatched`` on a ``model_index.json``
folder or repo against diffusers' own ``DiffusionPipeline.from_pretrained`` of the same files.

The pipeline is a tiny Stable Diffusion: a UNet and a VAE (diffusers), a CLIP text encoder and a tokenizer
(transformers), a DDIM scheduler. Its model components are planned together from one budget, part on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from hub_server import HubServer
from sweep_checks import assert_same, state
from tiny_models import save_tiny_sd_components, save_tiny_tokenizer

from hf_bigmodel import compute_module_sizes, load_pretrained_dispatched
from hf_bigmodel.hf.diffusers_pipeline import component_map
from hf_bigmodel.runtime.model_device import own_class

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = ("text_encoder", "unet", "vae")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline saved with ``save_pretrained`` (``model_index.json`` and a folder each)."""
    root = tmp_path_factory.mktemp("sd-pipeline")
    parts = save_tiny_sd_components(root / "parts").path
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=128, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(save_tiny_tokenizer(root / "tok"),
                                                                     model_max_length=16)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(parts, subfolder="vae"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(parts, subfolder="unet"),
        scheduler=diffusers.DDIMScheduler.from_pretrained(parts, subfolder="scheduler"),
        text_encoder=text_encoder, tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(root / "sd")
    return root / "sd"


def image(pipeline) -> torch.Tensor:
    with torch.no_grad():
        return pipeline("a cat on a mat", num_inference_steps=2, height=16, width=16, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).images


def budget(reference) -> dict[str, int]:
    """Three quarters of the model components' bytes: the rest goes to disk."""
    return {"cpu": int(sum(compute_module_sizes(getattr(reference, n))[""] for n in MODELS) * 0.75)}


def test_a_pipeline_folder_loads_every_component_planned_together(folder: Path):
    reference = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipeline = load_pretrained_dispatched(folder, max_memory=budget(reference))

    assert type(pipeline) is type(reference)
    plan = pipeline.hf_device_map
    assert set(plan.values()) == {"cpu", "disk"}, plan
    for name in MODELS:  # each model component: its own share of the one plan, loaded as diffusers loads it
        ours, theirs = getattr(pipeline, name), getattr(reference, name)
        assert own_class(ours) is type(theirs) and not ours.training
        assert ours.hf_device_map == component_map(plan, name)
        assert_same(state(ours), state(theirs), f"{name} tensor")
    for name in ("tokenizer", "scheduler"):  # the other components: diffusers' own load
        assert own_class(getattr(pipeline, name)) is type(getattr(reference, name))
    assert pipeline.scheduler.config == reference.scheduler.config
    assert pipeline.tokenizer("a cat").input_ids == reference.tokenizer("a cat").input_ids

    assert torch.equal(image(pipeline), image(reference))


def test_a_pipeline_in_bfloat16_matches_diffusers(folder: Path):
    reference = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    pipeline = load_pretrained_dispatched(folder, torch_dtype=torch.bfloat16, max_memory=budget(reference))

    assert "disk" in set(pipeline.hf_device_map.values())
    for name in MODELS:
        assert_same(state(getattr(pipeline, name)), state(getattr(reference, name)), f"{name} tensor")
    assert torch.equal(image(pipeline), image(reference))


def test_a_component_passed_in_is_used_as_it_is(folder: Path):
    vae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    pipeline = load_pretrained_dispatched(folder, vae=vae)
    assert pipeline.vae is vae
    assert not any(key.startswith("vae") for key in pipeline.hf_device_map)


def test_a_weights_variant_is_refused_before_anything_is_loaded(folder: Path):
    """diffusers would read ``*.fp16.safetensors``; the components here read the main files: refused."""
    with pytest.raises(TypeError, match="variant='fp16'"):
        load_pretrained_dispatched(folder, variant="fp16")


def test_a_pipeline_repo_downloads_only_what_the_pipeline_needs(hub: HubServer, folder: Path, tmp_path: Path):
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not needed")
    try:
        hub.add_repo("tiny-org/sd-pipeline", folder)
    finally:
        (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    reference = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipeline = load_pretrained_dispatched("tiny-org/sd-pipeline", max_memory=budget(reference),
                                          offload_folder=tmp_path / "offload")

    downloaded = set(hub.downloaded_files())
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in downloaded
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"} <= downloaded
    assert len(hub.downloaded_files()) == len(downloaded)  # each file once
    assert torch.equal(image(pipeline), image(reference))
