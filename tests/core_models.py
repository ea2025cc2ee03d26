"""Small hand-built modules for the core tests: blocks with buffers, tied weights, odd layouts."""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.register_buffer("scale", torch.ones(dim))  # persistent: comes from the checkpoint
        self.register_buffer("offset", torch.full((dim,), 0.5), persistent=False)  # built in __init__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]
        return self.fc2(torch.relu(self.fc1(x))) * self.scale + self.offset + x


class TinyLM(nn.Module):
    """Embedding -> blocks -> norm -> head tied to the embedding."""

    def __init__(self, dim: int = 16, depth: int = 4, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class SeedModel(nn.Module):
    """The seed's example: a plain module fed ``torch.randn(2, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(3, 64)
        self.blocks = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
        self.linear2 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(torch.relu(self.blocks(torch.relu(self.linear1(x)))))


def reference_tiny_lm(seed: int = 0, **kwargs: int) -> TinyLM:
    torch.manual_seed(seed)
    model = TinyLM(**kwargs)
    with torch.no_grad():
        for block in model.blocks:
            block.scale.uniform_(0.5, 1.5)
    return model.eval()


def save_state(model: nn.Module, path, *, shards: int = 1, fmt: str = "safetensors") -> None:
    """Save ``model``'s state dict (tied duplicates dropped) as one file or ``shards`` files plus an index."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = tensor.detach().clone().contiguous()
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"

    def write(tensors: dict[str, torch.Tensor], file: Path) -> None:
        if fmt == "safetensors":
            save_file(tensors, str(file))
        else:
            torch.save(tensors, file)

    if shards == 1:
        write(state, path / f"{stem}.{ext}")
        return
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        write({n: state[n] for n in part}, path / file)
        weight_map.update({n: file for n in part})
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def empty_lm() -> TinyLM:
    """A :class:`TinyLM` built on the meta device (``init_empty_weights``)."""
    from hf_bigmodel import init_empty_weights

    with init_empty_weights():
        return TinyLM()


def dispatched_tiny_lm(path, device_map, **kwargs) -> TinyLM:
    """An empty :class:`TinyLM` loaded from ``path`` and dispatched with ``load_checkpoint_and_dispatch``."""
    from hf_bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = TinyLM()
    return load_checkpoint_and_dispatch(model, path, device_map=device_map, **kwargs)


def saved_tiny_lm(folder):
    """The reference :class:`TinyLM` and the folder it was saved to in two safetensors shards."""
    from pathlib import Path

    ref = reference_tiny_lm()
    save_state(ref, Path(folder), shards=2)
    return ref, Path(folder)

