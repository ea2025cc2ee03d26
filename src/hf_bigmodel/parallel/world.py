"""The processes of a pipeline: who this one is, where it computes, and the torch.distributed group they share.

A pipeline runs one process per stage, started by ``torchrun`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, as ``torchrun`` does for one host
or several). Each process computes on its own GPU (``cuda:LOCAL_RANK``) when CUDA is available, else on
the CPU; activations move with NCCL between GPUs and with gloo between CPUs. If the program already
created the default process group, it is used as it is.

The group, once created here, lasts as long as the process (later pipelines reuse it; it is destroyed
at exit), except after a failure, when it is torn down at once so that no other process waits on this
one: the processes must then be started again.

``HF_BIGMODEL_PIPELINE_TIMEOUT`` (seconds, default 600) bounds every wait for another process: a
process that hangs (or a host that vanishes) stops the others with an error after that long.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..env import text as env_text
from ..errors import PipelineError

__all__ = ["World", "join_world", "launched_world_size", "pipeline_timeout"]

DEFAULT_TIMEOUT = 600.0
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_runs = itertools.count()  # pipelines created by this process; every rank creates them in the same order


def launched_world_size() -> int:
    """``WORLD_SIZE`` as a launcher such as torchrun set it (1 when not launched that way)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def pipeline_timeout() -> float:
    """Seconds any process waits for another (``HF_BIGMODEL_PIPELINE_TIMEOUT``, default 600)."""
    raw = env_text("HF_BIGMODEL_PIPELINE_TIMEOUT")
    try:
        value = float(raw) if raw is not None else DEFAULT_TIMEOUT
    except ValueError:
        raise PipelineError(
            f"HF_BIGMODEL_PIPELINE_TIMEOUT={raw!r} is not a number of seconds; set it to e.g. 600."
        ) from None
    if value <= 0:
        raise PipelineError(f"HF_BIGMODEL_PIPELINE_TIMEOUT={raw!r} must be a positive number of seconds.")
    return value


@dataclass
class World:
    """This process's place in the pipeline: its rank (= its stage), the device it computes on, the store."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    host: str
    device: torch.device
    backend: str
    store: dist.Store
    timeout: float

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be to travel: the GPU for NCCL, the CPU for gloo."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    @property
    def last(self) -> int:
        return self.size - 1


def _destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise PipelineError(f"{name}={os.environ.get(name)!r} is not an integer; the launcher set it wrong.") from None


def join_world(*, timeout: float | None = None) -> World:
    """Join (creating it if needed) the default process group of the processes a launcher started.

    Example (each process, under ``torchrun --nproc-per-node 2 script.py``)::

        world = join_world()
        world.rank, world.size, world.device   # 1, 2, device(type='cpu')
    """
    seconds = pipeline_timeout() if timeout is None else timeout
    cuda = torch.cuda.is_available()
    local_rank = _env_int("LOCAL_RANK", 0)
    if not dist.is_initialized():
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        if missing:
            raise PipelineError(
                f"A pipeline runs one process per stage, but this process was not started by a launcher "
                f"({', '.join(missing)} unset). Start it with torchrun, e.g. "
                "'torchrun --nproc-per-node 2 -m hf_bigmodel run MODEL --prompt ...'."
            )
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=seconds))
        atexit.register(_destroy_at_exit)
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    run = next(_runs)
    store = dist.PrefixStore(f"hf_bigmodel/pipeline/{run}/", dist.distributed_c10d._get_default_store())
    return World(
        rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank,
        local_size=_env_int("LOCAL_WORLD_SIZE", 1), host=socket.gethostname(), device=device, backend=backend,
        store=store, timeout=seconds,
    )
