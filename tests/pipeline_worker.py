"""One process of a pipeline test: ``python pipeline_worker.py SPEC.json`` (RANK, WORLD_SIZE... in the env).

SPEC names the models to load with ``pipeline=True`` and what to do with each; the process writes
``OUT/rank{R}.pt``: per model the generated tokens, the logits of a plain forward, the stage plan, and
the weight files it opened with the bytes it read from each. A process that fails writes the error
(type, message, seconds since it started) instead and exits with status 3.

Reads are counted by wrapping ``os.preadv``/``os.pread`` (with ``HF_BIGMODEL_MMAP=0`` the loader reads
tensors with them, from descriptors of ``os.open``) and files by an audit hook on ``open``; headers are
read with ``open()``. Paths are kept as opened (a Hub cache's snapshot names, not the blobs behind them).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections import defaultdict

PHASE = {"name": "starting", "since": time.monotonic()}
OPENED: list[str] = []
READ: dict[str, int] = defaultdict(int)
PATHS: dict[int, str] = {}  # file descriptor -> the path os.open was given


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        if path.endswith((".safetensors", ".bin")):
            OPENED.append(os.path.abspath(path))


def _count(original):
    def counted(fd, *args, **kwargs):
        n = original(fd, *args, **kwargs)
        READ[PATHS.get(fd, f"fd {fd}")] += n if isinstance(n, int) else len(n)
        return n

    return counted


def _remember(original):
    def remembered(path, *args, **kwargs):
        fd = original(path, *args, **kwargs)
        PATHS[fd] = os.path.abspath(os.fsdecode(path))
        return fd

    return remembered


def _kill_at(model, step: int) -> None:
    """SIGKILL this process when its stage's first held block runs for the ``step``-th time."""
    first = model.pipeline.plan.blocks[model.pipeline.plan.block_range(model.pipeline.stage)[0]]
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    model.get_submodule(first).register_forward_pre_hook(hook)


def _run(spec: dict, out: dict) -> None:
    import torch

    from hf_bigmodel import load_pretrained_dispatched

    rank = int(os.environ["RANK"])
    for entry in spec["models"]:
        PHASE.update(name="loading", since=time.monotonic())
        OPENED.clear()
        READ.clear()
        model = load_pretrained_dispatched(entry["model"], pipeline=True, max_memory=entry.get("max_memory"),
                                           torch_dtype=entry.get("dtype"))
        result = {"plan": model.pipeline.plan.to_dict(), "opened": sorted(set(OPENED)), "read": dict(READ),
                  "device_map": {k: str(v) for k, v in model.hf_device_map.items()}}
        if entry.get("kill_rank") == rank:
            _kill_at(model, entry.get("kill_step", 2))
        ids = torch.tensor(entry["input_ids"])
        mask = torch.tensor(entry["attention_mask"])
        PHASE.update(name="generating", since=time.monotonic())
        result["tokens"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=entry["new_tokens"],
                                          micro_batches=entry.get("micro_batches"))
        with torch.no_grad():
            result["logits"] = model(input_ids=ids, attention_mask=mask).logits
        model.pipeline.close()
        out[entry["name"]] = result


def main() -> int:
    import torch

    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("HF_BIGMODEL_MMAP", "0")
    sys.addaudithook(_audit)
    os.open = _remember(os.open)
    os.preadv = _count(os.preadv)
    os.pread = _count(os.pread)
    rank = int(os.environ["RANK"])
    out: dict = {}
    status = 0
    try:
        _run(spec, out)
    except BaseException as err:  # noqa: BLE001 - reported to the test
        out["error"] = {"type": type(err).__name__, "message": str(err), "phase": PHASE["name"],
                        "seconds_in_phase": time.monotonic() - PHASE["since"],
                        "failed_rank": getattr(err, "failed_rank", None), "traceback": traceback.format_exc()}
        status = 3
    torch.save(out, os.path.join(spec["out"], f"rank{rank}.pt"))
    return status


if __name__ == "__main__":
    sys.exit(main())
