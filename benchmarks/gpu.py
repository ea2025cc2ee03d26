"""GPU offload benchmark (``python benchmarks/run.py --gpu``): generation speed with half the layers on CPU.

Separate from the CPU benchmark and skipped without CUDA. A 7B-shaped random Llama (hidden 4096,
intermediate 11008, 32 layers, bf16, ~13.5 GB) is built empty and random-initialised on CPU, one
parameter at a time (no checkpoint on disk), then dispatched with one device map shared by every library: embeddings, norm,
lm_head and the first half of the layers on GPU 0, the second half stored on CPU and streamed to the
GPU at each forward. The map is fixed (not planned from ``max_memory``) so the comparison measures the
offload hooks, not the planners; the ``max_memory`` that gives the same split is reported alongside.

Measured per library, each in a fresh process: tokens/s of greedy generation, prefill time, GPU peak,
host peak RSS. Measured once: pinned and pageable host-to-device bandwidth, and from it the transfer
bound, ``tokens/s <= bandwidth / bytes offloaded per token``.

Example::

    python benchmarks/run.py --gpu --gpu-new-tokens 16 --gpu-loaders accelerate,hf_bigmodel
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.gpu")
HERE = Path(__file__).resolve().parent

SHAPE_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
GPU_LOADERS = ("accelerate", "hf_bigmodel")


# ---------------------------------------------------------------- child side (one library per process)


def build_random_model(shape: dict[str, Any], *, seed: int = 0) -> Any:
    """The model built with empty (meta) parameters, then each one materialised on CPU in bf16 and
    filled N(0, 0.02) (1-d norm weights at 1). Buffers (rotary frequencies) are built normally."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, dtype="bfloat16")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with init_empty_weights():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            data = torch.empty(param.shape, dtype=torch.bfloat16)
            if param.ndim == 1:
                data.fill_(1.0)
            else:
                data.normal_(0.0, 0.02, generator=generator)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    return model.eval()


def half_offload_map(num_layers: int, offloaded: int) -> dict[str, int | str]:
    """GPU 0 for everything but the last ``offloaded`` decoder layers, which are stored on CPU."""
    device_map: dict[str, int | str] = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = "cpu" if i >= num_layers - offloaded else 0
    return device_map


def _dispatch(loader: str, model: Any, device_map: dict[str, int | str]) -> Any:
    if loader == "accelerate":
        from accelerate import dispatch_model
    elif loader == "hf_bigmodel":
        from hf_bigmodel import dispatch_model
    else:
        raise ValueError(f"unknown GPU loader {loader!r}; choose from {', '.join(GPU_LOADERS)}")
    return dispatch_model(model, device_map=device_map, main_device=0)


def measure_bandwidth(size: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` host-to-device copy bandwidth in GB/s, from pinned and from pageable memory."""
    import torch

    device_buf = torch.empty(size, dtype=torch.uint8, device="cuda")
    out: dict[str, float] = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.ones(size, dtype=torch.uint8, pin_memory=pinned)
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            device_buf.copy_(host, non_blocking=pinned)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[f"{kind}_gb_s"] = size / best / 1e9
        del host
    return out


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    import system

    if args.child == "bandwidth":
        return measure_bandwidth()
    shape = dict(SHAPE_7B, num_hidden_layers=args.layers)
    t0 = time.perf_counter()
    model = build_random_model(shape)
    build_s = time.perf_counter() - t0
    offloaded = args.layers // 2
    device_map = half_offload_map(args.layers, offloaded)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    gpu_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - offloaded * layer_bytes
    t0 = time.perf_counter()
    model = _dispatch(args.child, model, device_map)
    dispatch_s = time.perf_counter() - t0

    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, shape["vocab_size"], (1, args.prompt_tokens), generator=generator).to("cuda:0")
    kwargs = {"do_sample": False, "use_cache": True, "attention_mask": torch.ones_like(input_ids), "pad_token_id": 2}
    with torch.no_grad():
        model.generate(input_ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up: kernels, pinning
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model(input_ids)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
        torch.cuda.synchronize()
        generate_s = time.perf_counter() - t0
    return {
        "status": "OK",
        "build_s": build_s,
        "dispatch_s": dispatch_s,
        "prefill_s": prefill_s,
        "generate_s": generate_s,
        "tokens_per_s": args.new_tokens / generate_s,
        "generated": out[0, args.prompt_tokens :].tolist(),
        "offloaded_layers": offloaded,
        "offloaded_bytes_per_token": offloaded * layer_bytes,
        "gpu_weight_bytes": gpu_bytes,
        "equivalent_max_memory": {"0": gpu_bytes, "cpu": offloaded * layer_bytes},
        "gpu_peak_allocated": torch.cuda.max_memory_allocated(),
        "host_peak_rss": system.proc_status()["VmHWM"],
    }


# ---------------------------------------------------------------- harness side


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py --gpu", description="GPU offload benchmark (needs CUDA)")
    parser.add_argument("--gpu-loaders", default=",".join(GPU_LOADERS))
    parser.add_argument("--gpu-layers", dest="layers", type=int, default=SHAPE_7B["num_hidden_layers"])
    parser.add_argument("--gpu-new-tokens", dest="new_tokens", type=int, default=16)
    parser.add_argument("--gpu-prompt-tokens", dest="prompt_tokens", type=int, default=32)
    parser.add_argument("--gpu-timeout", type=float, default=600)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _launch(name: str, args: argparse.Namespace, work_dir: Path, env: dict[str, str]) -> dict[str, Any]:
    result_path = work_dir / "logs" / f"gpu-{name}.json"
    log_path = work_dir / "logs" / f"gpu-{name}.log"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result_path),
           "--gpu-layers", str(args.layers), "--gpu-new-tokens", str(args.new_tokens),
           "--gpu-prompt-tokens", str(args.prompt_tokens)]
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=args.gpu_timeout).returncode
        except subprocess.TimeoutExpired:
            return {"status": "TIMEOUT", "error": f"no result after {args.gpu_timeout} s", "log": str(log_path)}
    try:
        return json.loads(result_path.read_text())
    except (OSError, ValueError):
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        return {"status": "CRASHED", "error": f"exit code {rc}: {lines[-1] if lines else ''}", "log": str(log_path)}


def main(argv: list[str], *, work_dir: Path) -> dict[str, Any] | None:
    """Run the GPU benchmark; returns ``None`` (and logs why) on a machine without CUDA."""
    import os

    import torch

    args = _parse(argv)
    if not torch.cuda.is_available():
        logger.warning("GPU benchmark skipped: torch.cuda.is_available() is False on this machine")
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))
    bandwidth = _launch("bandwidth", args, work_dir, env)
    runs = {name: _launch(name.strip(), args, work_dir, env) for name in args.gpu_loaders.split(",") if name.strip()}
    per_token = next((r["offloaded_bytes_per_token"] for r in runs.values() if "offloaded_bytes_per_token" in r), None)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "bandwidth": bandwidth, "runs": runs}
    lines = [f"GPU: {results['device']}; {args.layers} layers, half stored on CPU; {args.new_tokens} greedy tokens"]
    if bandwidth.get("pinned_gb_s"):
        lines.append(f"host->device: pinned {bandwidth['pinned_gb_s']:.1f} GB/s, pageable {bandwidth['pageable_gb_s']:.1f} GB/s")
        if per_token:
            bound = bandwidth["pinned_gb_s"] * 1e9 / per_token
            results["transfer_bound_tokens_per_s"] = bound
            lines.append(f"transfer bound: {per_token / 1e9:.2f} GB offloaded per token -> <= {bound:.2f} tokens/s (pinned)")
    reference = next((r.get("generated") for r in runs.values() if r.get("status") == "OK"), None)
    lines.append("| library | tokens/s | prefill s | GPU peak GiB | host peak RSS GiB | same tokens | status |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        if r.get("status") == "OK":
            lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {r['prefill_s']:.2f} | {r['gpu_peak_allocated'] / 2**30:.1f} "
                         f"| {r['host_peak_rss'] / 2**30:.1f} | {'yes' if r['generated'] == reference else 'NO'} | OK |")
        else:
            lines.append(f"| {name} | - | - | - | - | - | {r.get('status')} ({r.get('error')}) |")
    text = "\n".join(lines)
    print("\n" + text)
    (work_dir / "gpu_results.json").write_text(json.dumps(results, indent=2, default=str))
    (work_dir / "gpu_results.md").write_text(text + "\n")
    return results


def _child_main() -> None:
    import traceback

    args = _parse(sys.argv[1:])
    try:
        result = child(args)
    except Exception as exc:  # noqa: BLE001  (a failing library is a result)
        result = {"status": "FAILED", "error": traceback.format_exception_only(type(exc), exc)[-1].strip(),
                  "traceback": traceback.format_exc()}
    args.result.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    _child_main()
