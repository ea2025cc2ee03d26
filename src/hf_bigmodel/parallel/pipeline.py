"""One rank's share of a model cut into stages, and what runs it together with the other ranks.

Every rank holds a :class:`Pipeline` (``model.pipeline``) and calls the same operations in the same
order (as with any torch.distributed program): ``pipeline.forward(...)`` (what ``model(...)`` runs) or
a generation. Operations are numbered identically everywhere and each message names its operation, so
ranks calling different things fail at once instead of exchanging the wrong tensors.

A failure on any rank is recorded for the others and tears this rank's process group down (closing its
connections, so nobody waits on it); the pipeline is then closed for good, on every rank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import PipelineError
from .channel import Channel, Incoming, Kind, MessageId
from .faults import Monitor, abandon
from .runtime import StageRuntime, map_tensors
from .stages import StagePlan
from .world import World

__all__ = ["OP_FORWARD", "OP_GENERATE", "Pipeline"]

logger = logging.getLogger(__name__)

OP_FORWARD, OP_GENERATE = 1, 2
_OP_KINDS = 4  # operation ids are ``count * _OP_KINDS + kind``: a rank running another kind of call is caught


class Pipeline:
    """This rank's stage of ``model`` and its links to the other ranks.

    ``pipeline.stage`` is this rank's stage (= its rank), ``pipeline.plan`` the whole cut,
    ``pipeline.device`` where this stage takes its inputs.
    """

    def __init__(self, world: World, monitor: Monitor, plan: StagePlan, model: nn.Module, device: torch.device) -> None:
        self.world, self.monitor, self.plan, self.model, self.device = world, monitor, plan, model, device
        self.channel = Channel(world, monitor)
        self.runtime = StageRuntime(model, plan, world.rank, self.channel, device)
        self._ops = 0
        self._failed: BaseException | None = None
        self._closed = False
        self._own_forward = model.__dict__.get("forward")  # a dispatch hook's wrapper, or None (the class's)
        inner = model.forward

        def routed(*args: Any, **kwargs: Any) -> Any:
            if self.runtime.call is None:  # the user's call: run it across the stages
                return self.forward(*args, **kwargs)
            return inner(*args, **kwargs)

        model.forward = routed  # type: ignore[method-assign]

    @property
    def stage(self) -> int:
        return self.world.rank

    @property
    def num_stages(self) -> int:
        return self.world.size

    @property
    def is_last(self) -> bool:
        return self.stage == self.world.last

    def __repr__(self) -> str:
        return f"Pipeline(stage {self.stage} of {self.num_stages} on {self.world.host}, device {self.device})"

    # -- failures ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run one operation: any failure is recorded for the other ranks and stops the pipeline everywhere."""
        if self._closed or self._failed is not None:
            raise PipelineError(
                f"The pipeline of rank {self.stage} is {'closed' if self._closed else 'stopped'}"
                + (f" after: {self._failed}" if self._failed is not None else "")
                + (": start the processes again." if self._failed is not None else "; load the model again."),
                rank=self.stage)
        try:
            yield
        except BaseException as err:
            self._failed = err
            self._restore()
            abandon(self.monitor, what, err)
            raise

    def abandoned(self) -> None:
        """The pipeline never started (a rank failed while it was set up): restore the model, accept no call."""
        self._failed = self._failed or PipelineError("the pipeline failed to start", rank=self.stage)
        self._restore()

    def close(self) -> None:
        """End the pipeline on this rank (call it on every rank): flush sends, restore the model's modules.

        The process group stays for later pipelines (it is destroyed when the process exits).
        """
        if self._closed:
            return
        self._closed = True
        if self._failed is not None:
            return
        try:
            self.channel.flush()
            self.monitor.exchange("closed", "", "closing the pipeline")
        finally:
            self._restore()
            self.monitor.close()

    def _restore(self) -> None:
        """Give the model its own forward back (its modules too); it then holds just this stage's weights."""
        self.runtime.close()
        if self._own_forward is None:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self._own_forward  # type: ignore[method-assign]

    # -- operations --------------------------------------------------------------------------------
    def begin(self, kind: int) -> int:
        """A new operation's id, the same on every rank that runs the same calls in the same order."""
        op = self._ops * _OP_KINDS + kind
        self._ops += 1
        return op

    def run(self, at: MessageId, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` (a forward of the model) as message ``at`` of this stage."""
        with self.runtime.calling(at):
            return call(*args, **kwargs)

    def share(self, value: torch.Tensor | None, *, kind: Kind, at: MessageId, shape: torch.Size | tuple[int, ...],
              dtype: torch.dtype, what: str) -> torch.Tensor | Incoming:
        """From the last stage to all: the last rank passes ``value`` (sent to the others, returned), the
        others get an :class:`Incoming` of ``shape``/``dtype`` whose ``wait()`` returns it."""
        if self.is_last:
            if value is None:
                raise PipelineError("The last stage must give the value it shares.", rank=self.stage)
            for peer in range(self.world.last):
                self.channel.send(value, peer, kind=kind, at=at, what=what)
            return value
        return self.channel.post(self.world.last, kind=kind, at=at, shape=shape, dtype=dtype, what=what)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` across the stages; every rank gets the last stage's output tensors.

        Input tensors go to this stage's device first (the last stage's outputs come back on it).
        """
        with self.guard("running a forward"):
            at = MessageId(self.begin(OP_FORWARD), 0, 0)
            args, kwargs = map_tensors((args, kwargs), lambda t: t.to(self.device))
            out = self.run(at, self.model, *args, **kwargs)  # reaches the model's own forward (see routed)
            return self._share_output(out, at)

    def _share_output(self, out: Any, at: MessageId) -> Any:
        received: list[Incoming | torch.Tensor] = []

        def exchange(tensor: torch.Tensor) -> torch.Tensor:
            plain = tensor.as_subclass(torch.Tensor)
            shared = self.share(plain if self.is_last else None, kind=Kind.OUTPUT, at=at, shape=plain.shape,
                                dtype=plain.dtype, what="sharing the output of the last stage")
            received.append(shared)
            return plain

        map_tensors(out, exchange)
        if self.is_last:
            self.channel.flush()
            return out
        values = iter([r.wait() if isinstance(r, Incoming) else r for r in received])
        return map_tensors(out, lambda t: next(values).to(t.device))
