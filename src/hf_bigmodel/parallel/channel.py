"""Point-to-point messages between stages, on torch.distributed (``isend``/``irecv``), with a small header.

Every message is two tensors: a header (int64: a magic number, the kind, the operation (which forward
or ``generate`` call of the pipeline, and which kind of call), the step, the micro-batch, the dtype and
the shape) and the payload. The receiver knows what it expects (it ran the
same code up to that point, on shapes) and checks the header before reading the payload, so a stage
that drifted out of step, or a tensor of another shape, is an error naming both sides, never a silent
misreading. Kinds travel under their own tag (gloo keeps them apart; NCCL matches in issue order, which
the schedule keeps identical on both sides).

Sends are asynchronous: the payload is copied first (the sender may reuse its tensor), and finished
sends are reaped as new ones are made; :meth:`Channel.flush` waits for all of them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PipelineError
from .faults import Monitor
from .world import World

__all__ = ["Channel", "Incoming", "Kind", "MessageId"]

_MAGIC = 0x68666270  # "hfbp"
_MAX_DIMS = 8
_HEADER = 7 + _MAX_DIMS
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]


class Kind(IntEnum):
    """What a message carries (also its tag)."""

    ACTIVATION = 1  # the input of a stage's first block
    TOKENS = 2  # the tokens the last stage chose
    OUTPUT = 3  # a tensor of the last stage's output, shared with every rank


@dataclass(frozen=True)
class MessageId:
    """Which message: of operation ``op`` (numbered by the pipeline, identically on every rank), ``step``
    (a generation step), ``micro_batch``."""

    op: int
    step: int
    micro_batch: int


def _header(kind: Kind, at: MessageId, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _MAX_DIMS or tensor.dtype not in _DTYPES:
        raise PipelineError(f"Cannot send a {tensor.dtype} tensor of {tensor.dim()} dims between stages "
                            f"(supported: up to {_MAX_DIMS} dims of {', '.join(map(str, _DTYPES))}).")
    shape = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
    return torch.tensor([_MAGIC, int(kind), at.op, at.step, at.micro_batch, _DTYPES.index(tensor.dtype),
                         tensor.dim(), *shape], dtype=torch.int64)


def _describe(values: list[int]) -> str:
    if values[0] != _MAGIC:
        return "not a pipeline message"
    shape = tuple(values[7: 7 + values[6]])
    return (f"{Kind(values[1]).name.lower()} of operation {values[2]}, step {values[3]}, micro-batch {values[4]}, "
            f"{_DTYPES[values[5]]} {list(shape)}")


@dataclass
class Incoming:
    """A posted receive: :meth:`wait` returns the payload once its header matched what was expected."""

    channel: Channel
    src: int
    expected: list[int]
    header: torch.Tensor
    payload: torch.Tensor
    works: list[Any]
    what: str

    def wait(self) -> torch.Tensor:
        channel = self.channel
        try:
            self.works[0].wait()
        except Exception as err:  # noqa: BLE001 - transport errors: a peer died or timed out
            raise channel.monitor.failure(self.src, self.what, err) from err
        got = self.header.tolist()
        if got != self.expected:
            raise PipelineError(
                f"Rank {channel.world.rank} expected {_describe(self.expected)} from rank {self.src} while "
                f"{self.what}, but got {_describe(got)}: the stages ran different code (different model or "
                "library versions on the hosts?) or the model passes something else between blocks.",
                rank=channel.world.rank)
        try:
            self.works[1].wait()
        except Exception as err:  # noqa: BLE001
            raise channel.monitor.failure(self.src, self.what, err) from err
        return self.payload


class Channel:
    """This rank's sends and receives, each checked against what the schedule expects."""

    def __init__(self, world: World, monitor: Monitor) -> None:
        self.world = world
        self.monitor = monitor
        self._sending: deque[tuple[list[Any], tuple[torch.Tensor, torch.Tensor], int, str]] = deque()

    def send(self, tensor: torch.Tensor, dst: int, *, kind: Kind, at: MessageId, what: str) -> None:
        """Send ``tensor`` (a copy: the caller may change it right after) to rank ``dst``."""
        payload = tensor.detach().to(self.world.comm_device, copy=True).contiguous()
        header = _header(kind, at, payload).to(self.world.comm_device)
        try:
            works = [dist.isend(header, dst, tag=int(kind)), dist.isend(payload, dst, tag=int(kind))]
        except Exception as err:  # noqa: BLE001
            raise self.monitor.failure(dst, what, err) from err
        self._sending.append((works, (header, payload), dst, what))
        self._reap(keep=64)

    def post(self, src: int, *, kind: Kind, at: MessageId, shape: torch.Size | tuple[int, ...],
             dtype: torch.dtype, what: str) -> Incoming:
        """Post the receive of a ``dtype`` tensor of ``shape`` from rank ``src``; :meth:`Incoming.wait` gets it."""
        probe = torch.empty(shape, dtype=dtype, device="meta")
        expected = _header(kind, at, probe).tolist()
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.world.comm_device)
        payload = torch.empty(shape, dtype=dtype, device=self.world.comm_device)
        try:
            works = [dist.irecv(header, src, tag=int(kind)), dist.irecv(payload, src, tag=int(kind))]
        except Exception as err:  # noqa: BLE001
            raise self.monitor.failure(src, what, err) from err
        return Incoming(self, src, expected, header, payload, works, what)

    def _reap(self, keep: int) -> None:
        """Wait for the oldest sends until at most ``keep`` are in flight."""
        while len(self._sending) > keep or (self._sending and all(w.is_completed() for w in self._sending[0][0])):
            works, _, dst, what = self._sending.popleft()
            for work in works:
                try:
                    work.wait()
                except Exception as err:  # noqa: BLE001
                    raise self.monitor.failure(dst, what, err) from err

    def flush(self) -> None:
        """Wait until every send was received."""
        self._reap(keep=0)
