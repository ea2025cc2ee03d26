"""Whether the prefetcher reads through the page cache and keeps the pages, or bypasses it.

When the RAM available to the process (cgroup limits included) holds the disk part read per forward
beside what the prefetcher holds and :data:`PAGE_CACHE_SPARE`, reads keep their pages, so from the second
forward on disk weights come from RAM at memory speed; otherwise they bypass the page cache
(``O_DIRECT``), which a memory-limited process needs. The budget is not touched either way (page cache is
not the process's memory, and the kernel takes it back under pressure). ``HF_BIGMODEL_PAGE_CACHE``
(``auto``, ``1``, ``0``) forces a way. :func:`storage_read_bytes` lets the prefetcher see, forward after
forward, whether the pages stayed.
"""

from __future__ import annotations

from ..env import flag
from ..env import text as env_text
from ..plan.memory import available_memory

__all__ = ["PAGE_CACHE_ENV", "PAGE_CACHE_SPARE", "keeps_page_cache", "page_cache_setting", "storage_read_bytes"]

PAGE_CACHE_ENV = "HF_BIGMODEL_PAGE_CACHE"
#: What keeping the disk part in the page cache must leave free: activations, the KV cache, the rest.
PAGE_CACHE_SPARE = 256 * 2**20


def storage_read_bytes() -> int | None:
    """Bytes this process has fetched from storage so far (``/proc/self/io``'s ``read_bytes``); None elsewhere."""
    try:
        with open("/proc/self/io") as io:
            for line in io:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def keeps_page_cache(disk_bytes: int, held_bytes: int, *, room: int | None = None) -> bool:
    """Whether the prefetcher should read through the page cache and keep the pages it reads.

    ``$HF_BIGMODEL_PAGE_CACHE``: ``1``/``on``: always; ``0``/``off``: never (``O_DIRECT``, the page cache
    stays empty); ``auto`` or unset: when ``disk_bytes`` (read per forward) + ``held_bytes`` (what the
    prefetcher will hold) + :data:`PAGE_CACHE_SPARE` fit ``room``, the RAM available to the process now
    (cgroup limits included; measured when None). A wrong guess costs speed, never a result.

    >>> keeps_page_cache(2**30, 2**28, room=4 * 2**30), keeps_page_cache(2**30, 2**28, room=2**30)
    (True, False)
    """
    forced = page_cache_setting()
    if forced is not None:
        return forced
    if disk_bytes <= 0:
        return False
    if room is None:
        room = available_memory("cpu")
    return disk_bytes + held_bytes + PAGE_CACHE_SPARE <= room


def page_cache_setting() -> bool | None:
    """``$HF_BIGMODEL_PAGE_CACHE`` when it forces a way (True: keep pages, False: ``O_DIRECT``); None: ``auto``."""
    if (env_text(PAGE_CACHE_ENV) or "auto").strip().lower() == "auto":
        return None
    return flag(PAGE_CACHE_ENV, default=False)
