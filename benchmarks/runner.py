"""One measurement in a fresh process: load a checkpoint with one loader, forward, generate, report.

The harness (``run.py``) starts this script once per loader, scenario and repeat, so no run inherits
another's page cache state, allocator state or imported modules. Results go to ``--result`` as JSON,
rewritten after every phase: a run killed half-way still tells how far it got.

Example::

    python benchmarks/runner.py --loader accelerate --checkpoint benchmarks/_work/llama-18L-2048h-seed20240601 \\
        --result /tmp/r.json --max-memory-cpu 600MiB --offload-folder /tmp/offload
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import system

PROMPT_TOKENS = 32
NEW_TOKENS = 8
PROMPT_SEED = 1234


class RssSampler(threading.Thread):
    """Samples this process's resident memory every ``interval`` seconds and keeps the peaks."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_anon = 0
        self.peak_file = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            status = system.proc_status()
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class ForwardTimer:
    """Times each call of ``model`` (each forward ``generate`` makes) and counts the bytes read from storage.

    ``read_bytes`` is ``/proc/self/io``'s counter (every thread of the process, O_DIRECT reads and page
    faults of mapped files alike) taken around each forward; a prefetcher also reads between forwards, so
    the total over generation is what :meth:`start` / :meth:`stop` measure.
    """

    def __init__(self, model: Any) -> None:
        self.seconds: list[float] = []
        self.read_bytes: list[int] = []
        self.total_read_bytes = 0
        self._t = 0.0
        self._io = 0
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, module: Any, args: Any) -> None:
        self._io = system.proc_io()["read_bytes"]
        self._t = time.perf_counter()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        self.seconds.append(time.perf_counter() - self._t)
        self.read_bytes.append(system.proc_io()["read_bytes"] - self._io)

    def start(self) -> None:
        self._total_io = system.proc_io()["read_bytes"]

    def stop(self) -> None:
        self.total_read_bytes = system.proc_io()["read_bytes"] - self._total_io
        for handle in self._handles:
            handle.remove()


class Result:
    """The JSON record of one run, flushed to disk after each phase."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "RUNNING", "phase": "start", **fields}
        self.flush()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def prompt_ids(vocab_size: int, batch: int = 1) -> Any:
    """The fixed 32-token prompts every loader sees (``batch`` of them, all the same length: no padding)."""
    import torch

    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randint(3, vocab_size, (batch, PROMPT_TOKENS), generator=generator)


def placement_summary(model: Any) -> dict[str, Any]:
    """Bytes (bf16) of the modules the loader put on each device, from ``model.hf_device_map``."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict):
        return {"device_map": None}
    per_device: dict[str, int] = {}
    largest: dict[str, tuple[str, int]] = {}
    for name, device in device_map.items():
        module = model.get_submodule(name) if name else model
        size = sum(p.numel() * (2 if p.is_floating_point() else p.element_size()) for p in module.parameters())
        key = str(device)
        per_device[key] = per_device.get(key, 0) + size
        if size > largest.get(key, ("", -1))[1]:
            largest[key] = (name, size)
    return {
        "device_map_entries": len(device_map),
        "bytes_per_device": per_device,
        "largest_block_per_device": {k: {"module": n, "bytes": b} for k, (n, b) in largest.items()},
    }


def measure(args: argparse.Namespace, result: Result) -> None:
    config = json.loads((args.checkpoint / "config.json").read_text())
    started = time.perf_counter()
    import torch
    import transformers  # noqa: F401  (import cost is the same for every loader; keep it out of load time)
    from loaders import LIBRARIES, LOADERS

    # transformers imports a family's modules lazily, on first use: ~1.6 s for Llama here, paid by every
    # loader alike. Importing them (and the loader's own libraries) now keeps load s to what the loaders do.
    family = config["model_type"]
    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    for library in LIBRARIES.get(args.loader, ()):
        try:
            importlib.import_module(library)
        except ImportError:
            pass  # the load itself fails and is reported
    result.update(import_s=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    input_ids = prompt_ids(config["vocab_size"], args.batch)
    max_memory = {"cpu": args.max_memory_cpu} if args.max_memory_cpu else None
    assistant = None
    if args.assistant is not None:  # the draft model, kept whole in RAM (same for every loader)
        result.update(phase="assistant")
        t0 = time.perf_counter()
        assistant = transformers.AutoModelForCausalLM.from_pretrained(str(args.assistant), dtype=torch.bfloat16)
        assistant.eval()
        result.update(assistant_load_s=time.perf_counter() - t0)

    result.update(phase="load")
    t0 = time.perf_counter()
    model = LOADERS[args.loader](args.checkpoint, max_memory=max_memory, offload_folder=args.offload_folder)
    model.eval()
    result.update(load_s=time.perf_counter() - t0, rss_after_load=system.proc_status()["VmRSS"])
    result.update(**placement_summary(model))

    result.update(phase="forward")
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(input_ids).logits
        result.update(forward_s=time.perf_counter() - t0)
        logits = logits[:1].float().cpu()

        result.update(phase="generate")
        extra = {"assistant_model": assistant} if assistant is not None else {}
        timer = ForwardTimer(model)
        timer.start()
        busy = system.disk_busy_ms(args.checkpoint)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            use_cache=True,
            pad_token_id=config.get("eos_token_id", 0),
            **extra,
        )
        generate_s = time.perf_counter() - t0
        busy_after = system.disk_busy_ms(args.checkpoint)
        timer.stop()
    generated = out[:, PROMPT_TOKENS:].tolist()
    result.update(prefetch=_prefetch_stats(model))
    result.update(activation_bytes=activation_bytes(config, batch=args.batch, new_tokens=args.new_tokens))
    result.update(generate_s=generate_s, tokens_per_s=args.batch * args.new_tokens / generate_s,
                  batch=args.batch, new_tokens=args.new_tokens, assistant=str(args.assistant or ""),
                  generate_forward_s=timer.seconds, generate_forward_read_bytes=timer.read_bytes,
                  generate_read_bytes=timer.total_read_bytes, generated_all=generated,
                  generate_disk_busy_s=(busy_after - busy) / 1000 if busy is not None and busy_after is not None
                  else None,
                  generated=generated[0], phase="compare")

    if args.save_reference:
        torch.save({"input_ids": input_ids, "logits": logits, "generated": generated[0]}, args.save_reference)
    if args.reference and args.reference.is_file() and args.batch == 1:
        reference = torch.load(args.reference, weights_only=True)
        if not torch.equal(reference["input_ids"], input_ids):
            raise RuntimeError(f"reference {args.reference} was made for another prompt; delete it and rerun")
        result.update(logits_max_diff=float((logits - reference["logits"]).abs().max()))
        if assistant is None:  # assisted decoding verifies several tokens per forward: other kernels, own reference
            result.update(tokens_match=generated[0] == reference["generated"])
    result.update(phase="done")


def _prefetch_stats(model: Any) -> dict[str, Any] | None:
    """hf_bigmodel's prefetcher counters (window, memory bound, hits), or None for other loaders."""
    try:
        from hf_bigmodel.runtime.prefetch import prefetcher_of
    except ImportError:
        return None
    fetcher = prefetcher_of(model)
    return fetcher.stats() if fetcher is not None else None


def activation_bytes(config: dict[str, Any], *, batch: int, new_tokens: int) -> int:
    """What a run holds beside weights (bf16): the prompt forward's logits, as computed and as a float32
    copy, and the KV cache at the end of generation. An estimate for the memory formula, not a measurement.

    >>> activation_bytes({"vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...                   "hidden_size": 8}, batch=1, new_tokens=0) == 32 * 10 * 6 + 2 * 2 * 4 * 32 * 2
    True
    """
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    logits = batch * PROMPT_TOKENS * config["vocab_size"] * (2 + 4)
    cache = 2 * config["num_hidden_layers"] * kv_heads * head_dim * (PROMPT_TOKENS + new_tokens) * batch * 2
    return logits + cache


def measure_baseline(result: Result, checkpoint: Path) -> None:
    """RSS of a process that imported torch, transformers, the model family's modules and hf_bigmodel,
    built the empty (meta) model, and generated 2 tokens with a one-layer, 256-token-vocabulary model of
    the same shape and dtype (then freed): what every run holds before any weight. The generation
    brings in what a first forward does in every run: the pages of torch's kernels it executes (counted
    in RSS as mapped file pages) and the modules transformers imports on first use."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import hf_bigmodel  # noqa: F401

    config = AutoConfig.from_pretrained(str(checkpoint))
    family = config.model_type
    importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    small = AutoConfig.from_pretrained(str(checkpoint), num_hidden_layers=1, vocab_size=256)
    warm = AutoModelForCausalLM.from_config(small, dtype=torch.bfloat16).eval()
    ids = prompt_ids(256, 1)
    with torch.no_grad():
        warm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=2,
                      min_new_tokens=2, pad_token_id=0)
    del warm
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # give the freed weights back (glibc keeps freed heap memory otherwise)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.model.layers[0]
    status = system.proc_status()
    result.update(
        baseline_rss=status["VmRSS"],
        baseline_hwm=status["VmHWM"],
        decoder_layer_bytes=sum(p.numel() * 2 for p in layer.parameters()),
        lm_head_bytes=sum(p.numel() * 2 for p in model.lm_head.parameters()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loader", required=True, help="a name from loaders.LOADERS, or 'baseline'")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--max-memory-cpu", default=None, help="CPU budget, e.g. 600MiB (the rest goes to disk)")
    parser.add_argument("--offload-folder", type=Path, default=None)
    parser.add_argument("--reference", type=Path, default=None, help="reference logits to compare with")
    parser.add_argument("--save-reference", type=Path, default=None, help="save this run's logits there")
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens generated per prompt")
    parser.add_argument("--assistant", type=Path, default=None, help="draft model (kept in RAM) for assisted "
                        "generation: transformers' assistant_model=")
    args = parser.parse_args()

    result = Result(args.result, loader=args.loader, pid=os.getpid())
    sampler = RssSampler()
    sampler.start()
    try:
        if args.loader == "baseline":
            measure_baseline(result, args.checkpoint)
        else:
            measure(args, result)
        status, error = "OK", None
    except BaseException as exc:  # noqa: BLE001  (any failure of the loader is a result, not a crash)
        status = "FAILED"
        error = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result.update(traceback=traceback.format_exc())
    sampler.stop()
    final = system.proc_status()
    result.update(
        status=status,
        error=error,
        peak_rss=final["VmHWM"],
        peak_rss_anon=sampler.peak_anon,
        peak_rss_file=sampler.peak_file,
        total_s=time.perf_counter() - START,
    )
    raise SystemExit(0 if status == "OK" else 1)


START = time.perf_counter()

if __name__ == "__main__":
    main()
