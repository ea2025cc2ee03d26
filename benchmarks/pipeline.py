"""Batched generation: a 2-process pipeline, each process holding half the model, against one process
that holds half in RAM and streams the other half from disk, under the same per-process budget.

Both sides get the same cores: the single process runs torch on all of them, each pipeline process on
its share. The checkpoint is a random Llama in float32 (bf16 matmuls are slow on CPUs without AVX-512
bf16, which would measure the CPU rather than the placement). Each side runs in fresh processes; the
pipeline is started with torchrun. Results: ``benchmarks/_work/pipeline.json`` and a table on stdout.

    python benchmarks/pipeline.py                          # build (once) then both runs, ~3-6 min on 2 cores
    python benchmarks/pipeline.py --batch 8 --new-tokens 16 --layers 8 --hidden 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(path: Path, *, layers: int, hidden: int, vocab: int) -> Path:
    """A random Llama (float32, several shards) at ``path``, built once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    marker = path / "BENCH_PIPELINE.json"
    shape = {"layers": layers, "hidden": hidden, "vocab": vocab}
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return path
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="100MB")
    marker.write_text(json.dumps(shape))
    return path


def prompts(batch: int, length: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, vocab, (batch, length), generator=generator)


def measure(args: argparse.Namespace) -> None:
    """One side's run (in its own process, or in each process of the pipeline): load, generate, report."""
    import torch

    from hf_bigmodel import load_pretrained_dispatched

    torch.set_num_threads(args.threads)
    pipeline = int(os.environ.get("WORLD_SIZE", "1")) > 1
    started = time.perf_counter()
    model = load_pretrained_dispatched(args.model, pipeline=pipeline, torch_dtype=torch.float32,
                                       max_memory={"cpu": args.budget})
    load_s = time.perf_counter() - started
    ids = prompts(args.batch, args.prompt_length, model.config.vocab_size)
    kwargs = {"micro_batches": args.micro_batches} if pipeline else {}
    with torch.inference_mode():
        model.generate(input_ids=ids[:, :8], max_new_tokens=2, do_sample=False, **kwargs)  # warm-up
        started = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                             **kwargs)  # no EOS: both sides generate every token
        seconds = time.perf_counter() - started
    rank = int(os.environ.get("RANK", "0"))
    on_disk = sorted({k for k, v in model.hf_device_map.items() if v == "disk"})
    result = {"side": "pipeline" if pipeline else "single", "rank": rank, "load_s": load_s, "generate_s": seconds,
              "tokens": int(out.shape[1] - ids.shape[1]) * args.batch, "on_disk": on_disk,
              "resident_bytes": sum(p.numel() * p.element_size() for p in model.parameters()
                                    if p.device.type != "meta"),
              "output": out.tolist()}
    if pipeline:
        result["stages"] = model.pipeline.plan.describe()
        model.pipeline.close()
    Path(f"{args.result}.rank{rank}").write_text(json.dumps(result))


def _side(name: str, args: argparse.Namespace, model: Path, work: Path, nproc: int) -> dict:
    """Run one side in fresh processes; its figures (rank 0's, with every rank's placement)."""
    result = work / f"pipeline_{name}.json"
    for old in work.glob(f"{result.name}.rank*"):
        old.unlink()
    common = ["--measure", "--model", str(model), "--budget", args.budget, "--batch", str(args.batch),
              "--new-tokens", str(args.new_tokens), "--prompt-length", str(args.prompt_length),
              "--micro-batches", str(args.micro_batches), "--threads", str(max(args.cores // nproc, 1)),
              "--result", str(result)]
    if nproc == 1:
        command = [sys.executable, __file__, *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   __file__, *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(args.cores // nproc, 1)), "HF_BIGMODEL_DISABLE_PROGRESS_BARS": "1"}
    load_average = os.getloadavg()[0]
    subprocess.run(command, check=True, env=env)
    ranks = [json.loads(Path(f"{result}.rank{rank}").read_text()) for rank in range(nproc)]
    return {**ranks[0], "load_average": load_average, "processes": nproc,
            "on_disk": [r["on_disk"] for r in ranks], "resident_bytes": [r["resident_bytes"] for r in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, default=HERE / "_work")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--budget", default=None, help="RAM per process (default: just over half the model)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    model = build(work / f"pipeline-llama-{args.layers}L-{args.hidden}h", layers=args.layers, hidden=args.hidden,
                  vocab=args.vocab)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    args.budget = args.budget or str(int(size * 0.55))
    print(f"model: {size / 1e6:.0f} MB float32 in {len(list(model.glob('*.safetensors')))} shards; "
          f"{args.budget} bytes of RAM per process; {args.cores} cores; load average {os.getloadavg()[0]:.1f}")
    sides = {"single": _side("single", args, model, work, 1), "pipeline": _side("pipeline", args, model, work, 2)}
    same = sides["single"].pop("output") == sides["pipeline"].pop("output")
    (work / "pipeline.json").write_text(json.dumps({"args": vars(args) | {"work_dir": str(work)}, "same_tokens": same,
                                                   **sides}, indent=2))
    print("| run | processes | resident per process | on disk | load avg | generate s | tokens/s |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in sides.items():
        disk = "; ".join(", ".join(d) or "nothing" for d in r["on_disk"])
        resident = " + ".join(f"{b / 1e6:.0f} MB" for b in r["resident_bytes"])
        print(f"| {name} | {r['processes']} | {resident} | {disk} | {r['load_average']:.1f} | {r['generate_s']:.2f} | "
              f"{r['tokens'] / r['generate_s']:.1f} |")
    print(f"tokens equal on both sides: {same}")
    if "stages" in sides["pipeline"]:
        print(sides["pipeline"]["stages"])
    if not same:
        raise SystemExit("the pipeline's tokens differ from the single process's")


if __name__ == "__main__":
    main()
