"""A model family that is neither transformers nor diffusers, loaded by ``load_pretrained_dispatched``.

"tinymlp" models have their own ``config.json`` and their own checkpoint key names::

    config.json          {"family": "tinymlp", "width": 32, "depth": 6, "classes": 10}
    tinymlp.safetensors  layer_0.w, layer_0.b, ..., layer_5.b, head.w, head.b, format.version

while the PyTorch module calls the same tensors ``blocks.0.linear.weight`` ... ``head.weight`` (and has no
``format.version``). :class:`TinyMLPLoader` tells the generic call what differs: which weights file,
how to build the model from the config, which modules must not be split, which stay in float32, and
how keys are renamed. Everything else (planning, streaming the checkpoint, disk offload, hooks) is
the library's.

Run it (writes a demo model to a temporary folder, or to the folder given, and loads it half on disk)::

    PYTHONPATH=src python examples/custom_family.py [folder]
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hf_bigmodel import load_pretrained_dispatched
from hf_bigmodel.hf.loader import LoadContext, PretrainedLoader

logger = logging.getLogger("custom_family")

WEIGHTS_NAME = "tinymlp.safetensors"
_LAYER_KEY = re.compile(r"^layer_(\d+)\.([wb])$")
_LEAF = {"w": "weight", "b": "bias"}


@dataclass
class TinyMLPConfig:
    width: int = 32
    depth: int = 6
    classes: int = 10
    family: str = "tinymlp"


class Block(nn.Module):
    """One residual layer: ``x + gelu(linear(x))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, W]
        return x + nn.functional.gelu(self.linear(x))


class TinyMLP(nn.Module):
    """``depth`` residual blocks then a classification head (kept in float32 by the loader)."""

    def __init__(self, config: TinyMLPConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config.width) for _ in range(config.depth))
        self.head = nn.Linear(config.width, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, W] -> logits [B, C]
        for block in self.blocks:
            x = block(x)
        return self.head(x.to(self.head.weight.dtype))


class TinyMLPLoader(PretrainedLoader):
    """The tinymlp family's steps; the rest of :class:`PretrainedLoader` stays as it is."""

    weight_names = (WEIGHTS_NAME,)

    @classmethod
    def can_load(cls, config: Mapping[str, Any]) -> bool:
        return config.get("family") == "tinymlp"

    def read_config(self, ctx: LoadContext) -> TinyMLPConfig:
        raw = ctx.raw_config
        unknown = sorted(set(raw) - set(TinyMLPConfig.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{ctx.config_file}: unknown tinymlp config entries {unknown}.")
        return TinyMLPConfig(**raw)

    def build_model(self, ctx: LoadContext) -> nn.Module:
        return TinyMLP(ctx.config)

    def no_split_modules(self, ctx: LoadContext) -> list[str]:
        return ["Block"]

    def keep_in_fp32_modules(self, ctx: LoadContext) -> list[str]:
        return ["head"]

    def rename_key(self, key: str, ctx: LoadContext) -> str | None:
        if key.startswith("format."):
            return None  # bookkeeping, not a weight
        match = _LAYER_KEY.match(key)
        if match:
            return f"blocks.{match[1]}.linear.{_LEAF[match[2]]}"
        if key in ("head.w", "head.b"):
            return f"head.{_LEAF[key[-1]]}"
        return key  # anything else is reported as unexpected


def family_key(name: str) -> str:
    """Model name -> the family's checkpoint key (the inverse of :meth:`TinyMLPLoader.rename_key`)."""
    if name.startswith("head."):
        return "head." + name.rsplit(".", 1)[1][0]
    layer, leaf = name.split(".")[1], name.rsplit(".", 1)[1]
    return f"layer_{layer}.{leaf[0]}"


def save_tinymlp(folder: str | Path, config: TinyMLPConfig | None = None, *, seed: int = 0) -> TinyMLP:
    """Write a seeded tinymlp model in the family's own format; return the in-memory model (eval mode)."""
    config = config or TinyMLPConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = TinyMLP(config).eval()
    tensors = {family_key(name): t.detach().contiguous() for name, t in model.state_dict().items()}
    tensors["format.version"] = torch.tensor([1])
    save_file(tensors, str(folder / WEIGHTS_NAME))
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return model


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(argv[0]) if argv else Path(tmp) / "tinymlp"
        reference = save_tinymlp(folder)
        total = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
        model = load_pretrained_dispatched(folder, loader=TinyMLPLoader, max_memory={"cpu": total // 2})
        placement: dict[str, int | str] = model.hf_device_map  # type: ignore[assignment]  # set by dispatch
        logger.info("device map: %s", placement)
        x = torch.randn(4, reference.config.width)
        with torch.no_grad():
            same = torch.allclose(model(x), reference(x))
        logger.info("outputs match the in-memory model: %s", same)
        return 0 if same and "disk" in placement.values() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
