"""Progress bars for long work: tqdm, off when stderr is not a terminal or when silenced.

Silence them with ``HF_BIGMODEL_DISABLE_PROGRESS_BARS=1`` (or huggingface_hub's
``HF_HUB_DISABLE_PROGRESS_BARS=1``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")


def progress_enabled() -> bool:
    for var in ("HF_BIGMODEL_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return True


def progress(items: Iterable[T], *, desc: str, unit: str = "it", min_items: int = 2) -> Iterator[T]:
    """Iterate ``items`` with a bar when there are at least ``min_items`` of them and bars are on."""
    items = list(items)
    if len(items) < min_items or not progress_enabled():
        yield from items
        return
    from tqdm.auto import tqdm

    # disable=None: tqdm turns itself off when stderr is not a terminal.
    yield from tqdm(items, desc=desc, unit=unit, disable=None, leave=False)
