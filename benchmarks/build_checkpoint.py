"""Build (once, cached) the random-weight Llama checkpoint the benchmark loads.

The shape matches the anchors' figures in ``/work/shared/ANCHORS.md``: 942.7M parameters, bf16,
1.89 GB in 4 safetensors shards, with ``config.json`` and ``model.safetensors.index.json``. The model
is built directly in bf16 (one copy in RAM, ~1.9 GB) and written shard by shard.

Example::

    python benchmarks/build_checkpoint.py --work-dir benchmarks/_work
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.build_checkpoint")

#: Llama-architecture shape: 18 layers x 43M + 2 x 65.5M embeddings = 942.7M parameters.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 18,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
SEED = 20240601
MAX_SHARD_SIZE = "500MB"
_MARKER = "BENCH_CHECKPOINT.json"


def checkpoint_dir(work_dir: Path) -> Path:
    """Where the checkpoint lives inside ``work_dir`` (the name changes with the shape or seed)."""
    tag = f"llama-{MODEL_SHAPE['num_hidden_layers']}L-{MODEL_SHAPE['hidden_size']}h-seed{SEED}"
    return work_dir / tag


def _marker_content() -> dict[str, Any]:
    return {"shape": MODEL_SHAPE, "seed": SEED, "max_shard_size": MAX_SHARD_SIZE, "dtype": "bfloat16"}


def is_built(path: Path) -> bool:
    """True when ``path`` holds a finished checkpoint of the current shape and seed (every shard present)."""
    marker = path / _MARKER
    index = path / "model.safetensors.index.json"
    if not (marker.is_file() and index.is_file() and (path / "config.json").is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text())
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
    if recorded.get("build") != _marker_content():
        return False
    return all((path / shard).is_file() for shard in shards)


def build_checkpoint(work_dir: Path, *, force: bool = False) -> Path:
    """Return the checkpoint folder under ``work_dir``, building it first if missing or stale.

    Example::

        path = build_checkpoint(Path("benchmarks/_work"))   # ~1-3 min the first time, instant after
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = checkpoint_dir(work_dir)
    if not force and is_built(path):
        logger.info("checkpoint cached at %s", path)
        return path
    if path.exists():
        shutil.rmtree(path)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    started = time.perf_counter()
    config = LlamaConfig(**MODEL_SHAPE, dtype="bfloat16")
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are born bf16: one copy, never an fp32 one
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("built %.1fM-parameter model in %.1f s; saving shards", n_params / 1e6, time.perf_counter() - started)
    model.save_pretrained(partial, max_shard_size=MAX_SHARD_SIZE)
    del model
    marker = {"build": _marker_content(), "parameters": n_params, "seconds": round(time.perf_counter() - started, 1)}
    (partial / _MARKER).write_text(json.dumps(marker, indent=2))
    partial.rename(path)
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    logger.info("checkpoint ready at %s: %.2f GB in %d shards", path, total / 1e9, len(list(path.glob("*.safetensors"))))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path(__file__).resolve().parent / "_work")
    parser.add_argument("--force", action="store_true", help="rebuild even if a checkpoint is cached")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_checkpoint(args.work_dir, force=args.force))


if __name__ == "__main__":
    main()
