"""The diffusers models of the sweep (``test_sweep_diffusers.py``), one line each: class, tiny config, inputs.

diffusers configs are constructor arguments, so each line spells its own tiny sizes. Adding a model::

    Model("vq", "VQModel", {"latent_channels": 4, ...}, "image16"),
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["INPUTS", "MODELS", "Model", "build"]

SEED = 0
_UNET = {"layers_per_block": 1, "block_out_channels": (8, 16), "norm_num_groups": 4}
_CROSS = {"cross_attention_dim": 8, "attention_head_dim": 2}
_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 16), "layers_per_block": 1,
        "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
        "norm_num_groups": 4, "sample_size": 16}


@dataclass(frozen=True)
class Model:
    """One diffusers model: the test id, the class, its constructor arguments, its inputs (a key of INPUTS)."""

    id: str
    cls: str
    config: Mapping[str, Any]
    inputs: str
    xfail: str | Mapping[str, str] | None = None
    cpu_share: float = 0.75

    def xfail_reason(self, variant: str) -> str | None:
        return self.xfail.get(variant) if isinstance(self.xfail, Mapping) else self.xfail


MODELS: list[Model] = [
    Model("unet-2d-condition", "UNet2DConditionModel", {
        **_UNET, **_CROSS, "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
        "latents+text"),
    Model("unet-2d", "UNet2DModel", {
        **_UNET, "sample_size": 8, "in_channels": 3, "out_channels": 3, "attention_head_dim": 4,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
        "pixels8"),
    Model("controlnet", "ControlNetModel", {
        **_UNET, **_CROSS, "in_channels": 4, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "conditioning_embedding_out_channels": (4, 8)}, "controlnet"),
    Model("autoencoder-kl", "AutoencoderKL", _VAE, "image16"),
    Model("vq", "VQModel", {**_VAE, "num_vq_embeddings": 16, "vq_embed_dim": 4}, "image16"),
    Model("autoencoder-tiny", "AutoencoderTiny", {
        "latent_channels": 4, "encoder_block_out_channels": (8, 8), "decoder_block_out_channels": (8, 8),
        "num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1)}, "image16"),
    Model("dit", "DiTTransformer2DModel", {
        "num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 4, "out_channels": 4, "num_layers": 2,
        "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10, "norm_num_groups": 4}, "dit"),
    Model("pixart", "PixArtTransformer2DModel", {
        "num_attention_heads": 2, "attention_head_dim": 4, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "sample_size": 8, "patch_size": 2, "cross_attention_dim": 8, "caption_channels": 8, "norm_num_groups": 4,
        "use_additional_conditions": False}, "pixart"),
    Model("sd3", "SD3Transformer2DModel", {
        "sample_size": 8, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 4,
        "num_attention_heads": 2, "joint_attention_dim": 8, "caption_projection_dim": 8, "pooled_projection_dim": 8,
        "out_channels": 4, "pos_embed_max_size": 8}, "sd3"),
    Model("flux", "FluxTransformer2DModel", {
        "patch_size": 1, "in_channels": 8, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8,
        "num_attention_heads": 2, "joint_attention_dim": 8, "pooled_projection_dim": 8, "axes_dims_rope": (2, 2, 4)},
        "flux"),
]


def build(model: Model) -> torch.nn.Module:
    """The tiny model, built with seed :data:`SEED`, in eval mode."""
    import diffusers

    torch.manual_seed(SEED)
    return getattr(diffusers, model.cls)(**model.config).eval()


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))


#: Input kind -> the forward's inputs (floating-point tensors are cast to the model's dtype by the test).
INPUTS: dict[str, Callable[[], dict[str, Any]]] = {
    "latents+text": lambda: {"sample": _randn(1, 4, 8, 8), "timestep": 10, "encoder_hidden_states": _randn(1, 3, 8)},
    "pixels8": lambda: {"sample": _randn(1, 3, 8, 8), "timestep": 10},
    "image16": lambda: {"sample": _randn(1, 3, 16, 16)},
    "controlnet": lambda: {"sample": _randn(1, 4, 8, 8), "timestep": 10, "encoder_hidden_states": _randn(1, 3, 8),
                           "controlnet_cond": _randn(1, 3, 16, 16)},
    "dit": lambda: {"hidden_states": _randn(1, 4, 8, 8), "timestep": torch.tensor([3]), "class_labels": torch.tensor([1])},
    "pixart": lambda: {"hidden_states": _randn(1, 4, 8, 8), "encoder_hidden_states": _randn(1, 3, 8),
                       "timestep": torch.tensor([3]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    "sd3": lambda: {"hidden_states": _randn(1, 4, 8, 8), "encoder_hidden_states": _randn(1, 3, 8),
                    "pooled_projections": _randn(1, 8), "timestep": torch.tensor([3])},
    "flux": lambda: {"hidden_states": _randn(1, 16, 8), "encoder_hidden_states": _randn(1, 3, 8),
                     "pooled_projections": _randn(1, 8), "timestep": torch.tensor([0.5]),
                     "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(3, 3)},
}
