"""Start the processes of a pipeline on this machine, as ``torchrun`` would, and collect what each wrote.

``launch(n, spec)`` runs ``pipeline_worker.py`` ``n`` times with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` set (plain processes, no torchrun agent: when one dies nobody kills the
others for us, so the library's own fault handling is what the tests see). ``prefix(rank)`` puts a command
in front of a rank's (``ip netns exec hostB``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("pipeline_worker.py")


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str
    result: dict[str, Any]
    seconds: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(home: Path) -> dict[str, str]:
    """A hermetic environment: temp HF caches, no token, no progress bars, short pipeline timeouts.

    Heartbeats are the library's default (a peer silent for 10 s is lost): on a loaded CI machine a
    process can go unscheduled for seconds, and 0.25 s beats lost healthy peers there. The fault tests
    rely on closed connections, not on heartbeats, to stop in time.
    """
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    return {**keep, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_BIGMODEL_DISABLE_PROGRESS_BARS": "1", "HF_BIGMODEL_PIPELINE_TIMEOUT": "300",
            "HF_BIGMODEL_PIPELINE_HEARTBEAT": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def launch(n: int, spec: dict[str, Any], work: Path, *, env: Mapping[str, str] | None = None,
           rank_env: Callable[[int], Mapping[str, str]] | None = None,
           prefix: Callable[[int], list[str]] | None = None, master: str = "127.0.0.1",
           timeout: float = 600) -> list[RankResult]:
    """Run ``n`` worker processes on ``spec`` (written to ``work``); wait for all (killing them past ``timeout``)."""
    import torch

    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out)}))
    common = {**(env or base_env(work / "hf_home")), "MASTER_ADDR": master, "MASTER_PORT": str(free_port()),
              "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n)}
    procs = []
    started = time.monotonic()
    for rank in range(n):
        rank_vars = {"RANK": str(rank), "LOCAL_RANK": str(rank), **(rank_env(rank) if rank_env else {})}
        command = [*(prefix(rank) if prefix else []), sys.executable, str(WORKER), str(spec_file)]
        procs.append(subprocess.Popen(command, env={**common, **rank_vars}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    results = []
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=max(timeout - (time.monotonic() - started), 1))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            output, _ = proc.communicate()
            raise AssertionError(f"rank {rank} still ran after {timeout} s (a hang):\n{output[-3000:]}") from None
        file = out / f"rank{rank}.pt"
        result = torch.load(file, weights_only=False) if file.exists() else {}
        results.append(RankResult(rank, proc.returncode, output, result, time.monotonic() - started))
    return results
