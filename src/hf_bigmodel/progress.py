"""Progress bars for long work: tqdm, off when stderr is not a terminal or when silenced.

Silence them with ``HF_BIGMODEL_DISABLE_PROGRESS_BARS=1`` (or huggingface_hub's
``HF_HUB_DISABLE_PROGRESS_BARS=1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .env import flag

if TYPE_CHECKING:
    import torch

__all__ = ["ByteProgress", "progress_enabled"]


def progress_enabled() -> bool:
    return not (flag("HF_BIGMODEL_DISABLE_PROGRESS_BARS", default=False)
                or flag("HF_HUB_DISABLE_PROGRESS_BARS", default=False, strict=False))


class ByteProgress:
    """A bar counting ``total`` bytes (KiB, MiB...), for work whose size is in bytes rather than items.

    A single-file checkpoint moves its bar tensor by tensor. Off when stderr is
    not a terminal, when silenced, or when ``total`` is 0. Call :meth:`close` when done (or use ``with``).

    Example::

        with ByteProgress(total_bytes, desc="Loading weights") as bar:
            for key, tensor in bar.count(read_shard(...)):
                ...
    """

    def __init__(self, total: int, *, desc: str) -> None:
        self._bar: Any = None
        if total > 0 and progress_enabled():
            from tqdm.auto import tqdm

            # disable=None: tqdm turns itself off when stderr is not a terminal.
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None,
                             leave=False)

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def count(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` pairs passed through, each advancing the bar by the tensor's bytes."""
        for key, tensor in items:
            self.advance(tensor.nbytes)
            yield key, tensor

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
