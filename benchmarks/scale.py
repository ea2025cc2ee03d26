"""How cost grows with model size: ~1B, 4B and 8B Llama checkpoints (and one larger than RAM) at one budget.

Not part of CI (it reads tens of gigabytes). For each size, in turn: build the random bf16 checkpoint
(streamed shard by shard: never more than one shard in RAM), evict it from the page cache, run every
loader in a fresh process under the same budget (``max_memory={"cpu": <budget>}``, the rest on disk,
a memory cgroup), measure the disk's O_DIRECT bandwidth, report time per generated token against the
floor (bytes read per token / bandwidth) and peak RSS, then delete the checkpoint unless ``--keep``
(so the disk holds one large checkpoint at a time). Checkpoints larger than what ``--min-free`` leaves
free on the disk are skipped, and so is accelerate where its offload-folder copy would be.

Example::

    python benchmarks/scale.py                          # 1b, 4b, 8b: ~30-60 min on the 2-core machine
    python benchmarks/scale.py --sizes 1b,4b --loaders hf_bigmodel,transformers --new-tokens 2
    python benchmarks/scale.py --sizes 14b              # 25.2 GiB: larger than this machine's 23.5 GiB of RAM
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import report
import system
from loaders import LOADERS

from hf_bigmodel.model.sizes import format_size, parse_size

logger = logging.getLogger("benchmarks.scale")

#: Llama shapes; "14b" (13.5B parameters, 48 layers: 27.1 GB, 25.2 GiB in bf16) is larger than the development
#: machine's 23.5 GiB of RAM (with 44 layers it was 23.2 GiB, just under it).
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 32000},
    "4b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 36, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 32000},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "14b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 32000},
}
SHARD_BYTES = 2 * 10**9
SEED = 20240601


def tensor_specs(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM of ``shape`` (untied head), in the model's order."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}"
        specs += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                  (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                  (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                  (f"{p}.mlp.down_proj.weight", (h, i)), (f"{p}.input_layernorm.weight", (h,)),
                  (f"{p}.post_attention_layernorm.weight", (h,))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def checkpoint_bytes(shape: dict[str, Any]) -> int:
    total = 0
    for _, dims in tensor_specs(shape):
        n = 2
        for d in dims:
            n *= d
        total += n
    return total


def build(work_dir: Path, size: str) -> Path:
    """The random bf16 checkpoint of ``size`` under ``work_dir`` (built once; one shard in RAM at a time)."""
    import torch
    from safetensors.torch import save_file

    shape = SHAPES[size]
    path = work_dir / f"scale-{size}"
    done = path / "BUILT.json"
    if done.is_file() and json.loads(done.read_text()).get("shape") == shape:
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(SEED)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, str] = {}
    sizes = [0]
    specs = tensor_specs(shape)
    names: list[str] = []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shards[-1], str(path / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shards[-1]})
        names.append(name)
        shards[-1] = {}
        sizes[-1] = 0

    for key, dims in specs:
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(dims, generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        if sizes[-1] and sizes[-1] + tensor.nbytes > SHARD_BYTES:
            flush()
        shards[-1][key] = tensor
        sizes[-1] += tensor.nbytes
    flush()
    count = len(names)
    for index, old in enumerate(names):  # name the shards as transformers does: model-0000k-of-0000n
        new = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        (path / old).rename(path / new)
        weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
    total = checkpoint_bytes(shape)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "max_position_embeddings": 2048, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
              "bos_token_id": 1, "eos_token_id": 2, **shape}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    done.write_text(json.dumps({"shape": shape, "seconds": round(time.perf_counter() - started, 1)}))
    logger.info("built %s (%s) in %.0f s", path.name, format_size(total), time.perf_counter() - started)
    return path


def main() -> None:
    import run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1b,4b,8b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--loaders", default="transformers,accelerate,hf_bigmodel")
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work")
    parser.add_argument("--cpu-budget", default="1GiB", help="max_memory['cpu'] for every size")
    parser.add_argument("--memory-limit", default="3GB", help="memory cgroup limit of every run")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--min-free", default="20GB", help="never leave less free on the disk")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete each after use)")
    parser.add_argument("--no-cgroup", action="store_true")
    parser.add_argument("--run-timeout", type=float, default=1800)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    min_free = parse_size(args.min_free)
    loaders = [name for name in args.loaders.split(",") if name]
    unknown = [name for name in loaders if name not in LOADERS]
    if unknown:
        parser.error(f"unknown loader(s) {unknown}; choose from {list(LOADERS)}")
    results: dict[str, Any] = {"machine": system.machine_description(), "disk": system.disk_description(args.work_dir),
                               "settings": {k: str(v) for k, v in vars(args).items()}, "sizes": {}}
    offload = args.work_dir / "offload"
    for size in [s for s in args.sizes.split(",") if s]:
        need = checkpoint_bytes(SHAPES[size])
        free = shutil.disk_usage(args.work_dir).free
        existing = args.work_dir / f"scale-{size}"
        if not existing.is_dir() and free - need < min_free:
            logger.warning("%s skipped: %s needed, %s free, --min-free %s", size, format_size(need), format_size(free),
                           args.min_free)
            results["sizes"][size] = {"skipped": "disk"}
            continue
        started = time.perf_counter()
        checkpoint = build(args.work_dir, size)
        entry: dict[str, Any] = {"bytes": need, "build_s": time.perf_counter() - started, "runs": {}}
        harness = run.Harness(argparse.Namespace(no_cgroup=args.no_cgroup, run_timeout=args.run_timeout,
                                                 work_dir=args.work_dir), checkpoint)
        for loader in loaders:
            free = shutil.disk_usage(args.work_dir).free
            if loader == "accelerate" and free - need < min_free:  # it copies offloaded weights first
                entry["runs"][loader] = {"status": "SKIPPED", "error": f"its offload folder would leave under {args.min_free}"}
                continue
            system.reset_folder(offload)
            system.evict_from_page_cache([checkpoint])
            entry["runs"][loader] = harness.launch(
                loader, f"scale-{size}-{loader}", memory_limit=parse_size(args.memory_limit),
                extra=["--max-memory-cpu", args.cpu_budget, "--offload-folder", str(offload),
                       "--new-tokens", str(args.new_tokens)])
            system.reset_folder(offload)
        entry["bandwidth"] = system.direct_read_bandwidth([checkpoint])
        entry["table"] = report.scale_rows(size, entry, new_tokens=args.new_tokens)
        results["sizes"][size] = entry
        print("\n".join(entry["table"]))
        if not args.keep:
            shutil.rmtree(checkpoint)
    out = args.work_dir / "scale_results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    lines = [report.SCALE_HEADER] + [row for e in results["sizes"].values() for row in e.get("table", [])]
    (args.work_dir / "scale_results.md").write_text(
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['ram']} RAM, "
        f"disk {results['disk']}; cpu budget {args.cpu_budget}, cgroup {args.memory_limit}\n\n" + "\n".join(lines) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
