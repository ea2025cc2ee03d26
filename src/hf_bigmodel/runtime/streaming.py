"""The seam between offloading hooks and the prefetcher, named.

An offloading hook streams some tensors of a weights map to its execution device just before its
module runs: that is a :class:`StreamedWeights` (the hook builds a :class:`StreamedUnit` for it). A
:class:`WeightsFetcher` (the prefetcher) hands a hook those tensors, fetched ahead of time, or ``None``
to let the hook read them itself. Neither side knows the other's class; a unit holds no module, so
whatever holds a unit (the prefetcher's reader thread) never keeps a model alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..storage.weights_map import WeightsMap

__all__ = ["StreamedUnit", "StreamedWeights", "WeightsFetcher"]


class StreamedWeights(Protocol):
    """What the prefetcher needs from an offloading hook: which tensors, from where, to which device."""

    @property
    def prefix(self) -> str:
        """The module's name (``""`` for the root), in messages."""
        ...

    @property
    def names(self) -> Sequence[str]:
        """Full tensor names, in the order the hook takes their values."""
        ...

    @property
    def weights(self) -> WeightsMap:
        """Where the tensors are: in RAM or byte ranges of files."""
        ...

    @property
    def device(self) -> torch.device:
        """Where they are needed."""
        ...


class WeightsFetcher(Protocol):
    """What an offloading hook needs from the prefetcher."""

    def take(self, unit: StreamedWeights) -> list[torch.Tensor] | None:
        """``unit``'s tensors on its device, in ``names`` order; ``None``: the hook reads them itself."""
        ...

    def done_with(self, unit: StreamedWeights) -> None:
        """``unit``'s module has run and let go of the tensors :meth:`take` gave it."""
        ...

    def close(self) -> None:
        """Stop fetching; hooks then read their tensors themselves."""
        ...


@dataclass(frozen=True, eq=False)
class StreamedUnit:
    """A plain :class:`StreamedWeights` (compared and hashed by identity: one per hook)."""

    prefix: str
    names: tuple[str, ...]
    weights: WeightsMap
    device: torch.device
