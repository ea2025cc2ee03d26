"""How far ahead the prefetcher reads: a window of bytes, or (as before) a number of groups.

The prefetcher keeps reading the next groups of offloaded weights while the current one computes, as
long as what it has read ahead fits the window. A window of bytes bounds the memory it holds whatever
the groups' sizes (a 125 MiB output head next to 86 MiB decoder layers no longer sizes every buffer):

    prefetch memory <= largest group + window          (a CPU run: host buffers)

The default window holds two typical groups (twice the median group's bytes): enough for the reader
to always have the next group queued while one is read, which is what keeps reads back to back. A
group larger than the window is still read ahead, alone.

``prefetch=`` (on ``dispatch_model`` and the loaders) and ``HF_BIGMODEL_PREFETCH`` take a size
(``"256MiB"``, ``"1GB"``: a window of bytes), a whole number of groups (``2``: at most two groups ahead,
each buffer sized for its own group), or ``0`` (off).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..env import text as env_text
from ..model.sizes import format_size, parse_size

__all__ = ["DEFAULT_GROUPS", "ENV_VAR", "Window", "prefetch_memory", "prefetch_window"]

ENV_VAR = "HF_BIGMODEL_PREFETCH"
#: The default window holds this many median-sized groups.
DEFAULT_GROUPS = 2


@dataclass(frozen=True)
class Window:
    """At most ``groups`` groups (None: no count limit) and ``nbytes`` bytes (None: the default) read ahead."""

    groups: int | None = None
    nbytes: int | None = None

    @property
    def off(self) -> bool:
        return self.groups == 0 or self.nbytes == 0

    def bytes_for(self, group_bytes: Sequence[int]) -> int | None:
        """The byte limit for groups of these sizes: ``nbytes``, the default, or None (a count of groups)."""
        if self.nbytes is not None:
            return self.nbytes
        if self.groups is not None:
            return None
        return DEFAULT_GROUPS * int(statistics.median(group_bytes)) if group_bytes else 0

    def describe(self, group_bytes: Sequence[int]) -> str:
        limit = self.bytes_for(group_bytes)
        if limit is None:
            return f"{self.groups} group(s)"
        return format_size(limit) + (" (2 x the median group)" if self.nbytes is None else "")


def prefetch_window(prefetch: int | str | None = None) -> Window:
    """The window to use: ``prefetch`` if given, else ``$HF_BIGMODEL_PREFETCH``, else the default.

    >>> prefetch_window(0).off, prefetch_window(3), prefetch_window("256MiB").nbytes
    (True, Window(groups=3, nbytes=None), 268435456)
    """
    source: str = "prefetch"
    value: int | str | None = prefetch
    if value is None:
        raw = env_text(ENV_VAR)
        if raw is None:
            return Window()
        source, value = ENV_VAR, raw
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"Invalid {source}: {value!r}; pass a size such as '256MiB', a whole number of groups "
                         "(2), or 0 (off).")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"Invalid {source}: {value}; pass a whole number >= 0 (0 turns prefetching off).")
        return Window(groups=value)
    try:
        return Window(nbytes=parse_size(value, what=source))
    except ValueError as err:
        raise ValueError(f"Invalid {source}={value!r}: {err}; pass a size such as '256MiB', a whole number of "
                         "groups (2), or 0 (off).") from None


def prefetch_memory(group_bytes: Sequence[int], window: Window) -> int:
    """The most host memory the prefetcher's buffers hold for groups of these sizes (a CPU run).

    >>> prefetch_memory([86, 86, 125], Window())       # the largest group + 2 x the median
    297
    >>> prefetch_memory([86, 86, 125], Window(groups=2))  # (groups + 1) buffers, each at most the largest
    375
    """
    if not group_bytes or window.off:
        return 0
    largest = max(group_bytes)
    limit = window.bytes_for(group_bytes)
    if limit is None:
        return (min(window.groups or 0, len(group_bytes) - 1) + 1) * largest
    return largest + max(limit, largest)  # the group in use, and what is read ahead (one group at least)
