"""Prefetching offloaded weights: the next groups are read while the current one computes.

A :class:`Prefetcher` serves the offloading hooks of one dispatched model (``hook.fetcher``), typed
against what it needs from them (:class:`~.streaming.StreamedWeights`: tensor names, weights map,
device). The dispatch plan decides the *groups*, each fetched as a whole (:mod:`.prefetch_plan`: a
device-map entry such as a decoder layer; bigger entries cut into their children, small neighbours
merged). While a group runs, a background thread (:mod:`.prefetch_reader`) fetches the next groups,
cyclically (after the last group of a forward, the first of the next), as many as fit the prefetch
window (:mod:`.prefetch_window`: bytes, by default twice the median group):

- CPU runs: disk -> RAM into reusable aligned buffers, each sized for its group (the group in use plus
  those read ahead: at most ``largest group + window`` bytes), whose views the modules use; ``O_DIRECT``
  keeps the page cache empty (:mod:`hf_bigmodel.storage.direct_io`);
- CUDA runs: disk -> a few pinned staging chunks -> GPU, and pinned RAM -> GPU, with copies on a side
  stream; the compute stream waits on an event (``wait_event``) and the tensors are ``record_stream``-ed,
  so nothing synchronises the host.

The order of the groups starts as model order and is replaced by the order their hooks ran in during
the first forward (groups none of whose hooks ran are left out). A hook that runs out of order falls
back to a synchronous fetch of its group (and the prefetcher re-aligns behind it); a hook left out is
fetched synchronously by the hook itself.
Values are the very bytes the synchronous path reads, so outputs are bit-identical.

A buffer is reused only when no tensor but the pool's own references its storage (:mod:`.prefetch_pool`);
otherwise it is abandoned to whoever holds it and a fresh one takes its place. Errors of the reader thread surface in
the forward that needs the group, naming the file. The thread stops on :meth:`Prefetcher.close`
(called when hooks are removed) or when the prefetcher is garbage-collected with its model.

When the RAM available to the process (cgroup limits included) holds the disk part read per forward
beside everything else, the reader goes through the page cache and keeps the pages
(:func:`keeps_page_cache`): from the second forward on, disk weights come from RAM at memory speed. The
budget is not touched (page cache is not the process's memory, and the kernel takes it back under
pressure, the reads then going to the disk again); otherwise reads bypass the page cache (``O_DIRECT``;
:mod:`.prefetch_cache`).

If a later forward still fetches most of the disk part from storage (memory grew since), the reader
goes back to ``O_DIRECT`` and drops the pages it kept.

``HF_BIGMODEL_PREFETCH`` sets the default window (a size, a number of groups, or ``0``: off);
``HF_BIGMODEL_READS_IN_FLIGHT`` how many chunks of a CPU run's reads go at once (default 8; see
:mod:`hf_bigmodel.storage.direct_io`); ``HF_BIGMODEL_PAGE_CACHE`` (``auto``, ``1``, ``0``) whether
reads keep their pages.
:func:`~hf_bigmodel.runtime.prefetch_plan.plan_prefetch` tells, before loading, the memory it will hold.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
from torch import nn

from ..env import whole_number
from ..errors import BigModelError, OffloadError
from ..model.sizes import format_size
from ..storage.direct_io import DirectReader, reads_in_flight
from .prefetch_cache import PAGE_CACHE_ENV, keeps_page_cache, page_cache_setting, storage_read_bytes
from .prefetch_plan import GROUP_BYTES, MERGE_BYTES, PlannedPrefetch, plan_prefetch
from .prefetch_plan import rounded_buffer as _rounded
from .prefetch_pool import Buffer, BufferPool
from .prefetch_reader import Group, Job, plan_group, reader_loop, start_early, stop_reader
from .prefetch_window import Window, prefetch_memory
from .streaming import StreamedWeights

__all__ = [
    "DEFAULT_DEPTH",
    "ENV_VAR",
    "PAGE_CACHE_ENV",
    "GROUP_BYTES",
    "MERGE_BYTES",
    "PlannedPrefetch",
    "Prefetcher",
    "keeps_page_cache",
    "storage_read_bytes",
    "plan_prefetch",
    "prefetch_depth",
    "prefetcher_of",
]

logger = logging.getLogger(__name__)

ENV_VAR = "HF_BIGMODEL_PREFETCH"
DEFAULT_DEPTH = 2
def prefetch_depth(prefetch: int | None = None) -> int:
    """The prefetch depth to use: ``prefetch`` if given, else ``$HF_BIGMODEL_PREFETCH``, else 2.

    >>> prefetch_depth(0)
    0
    """
    if prefetch is None:
        depth = whole_number(ENV_VAR)
        return DEFAULT_DEPTH if depth is None else depth
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"Invalid prefetch: {prefetch!r}; pass a whole number >= 0 (0 turns prefetching off).")
    return prefetch


def prefetcher_of(model: nn.Module) -> Prefetcher | None:
    """The prefetcher serving ``model``'s offloaded modules (for :meth:`Prefetcher.stats`), if any."""
    for module in model.modules():
        hook = module.__dict__.get("_hf_hook")
        for h in getattr(hook, "hooks", None) or [hook]:
            fetcher = getattr(h, "fetcher", None)
            if isinstance(fetcher, Prefetcher):
                return fetcher
    return None


def _execution_groups(planned: Sequence[Sequence[int]], recording: Sequence[int]) -> list[list[int]]:
    """The planned groups (lists of unit indices) re-cut to the order the units first ran in (``recording``).

    A group stays whole while its units run one after another. One whose units run interleaved with
    another group's becomes one group per run: a decoder layer too large to be one group is cut into
    its children, and its two norms, merged as small neighbours, run one before the attention and one
    before the MLP; fetched as one group, the second norm would ask for a group already used, which
    cancels the reads ahead and reads them again (40% more bytes per token measured on a 4B model).
    Groups none of whose units ran are left out (their hooks fetch for themselves); units that did not
    run stay with their group's first run (a MoE block's experts not routed in the first forward).

    >>> _execution_groups([[0, 1], [2], [3, 4], [5]], [0, 2, 1, 3])
    [[0], [2], [1], [3, 4]]
    """
    group_of = {unit: g for g, group in enumerate(planned) for unit in group}
    runs: list[list[int]] = []
    first_run: dict[int, list[int]] = {}
    last: int | None = None
    for unit in recording:
        group = group_of.get(unit)
        if group is None:
            continue
        if group != last:
            runs.append([])
            first_run.setdefault(group, runs[-1])
            last = group
        runs[-1].append(unit)
    ran = set(recording)
    for group, run in first_run.items():
        run.extend(unit for unit in planned[group] if unit not in ran)
    return runs


class Prefetcher:
    """Fetches offloaded hooks' weights ahead of use (see the module docstring).

    ``units`` are the hooks' :class:`~.streaming.StreamedWeights` in model order, ``groups`` the lists of
    unit indices fetched together (decided by the dispatch plan, cut by :mod:`.prefetch_plan`). Build it
    with :meth:`create`, which returns None when prefetching cannot help (nothing read from disk on a CPU
    run) or the device is neither CPU nor CUDA. Call from one thread at a time (as forwards are).

    Example::

        model = load_checkpoint_and_dispatch(model, ckpt, device_map="auto", max_memory={"cpu": "2GiB"})
        prefetcher_of(model).stats()   # {'hits': ..., 'misses': ..., 'wait_s': ...}
    """

    @classmethod
    def create(cls, units: Sequence[StreamedWeights], groups: Sequence[Sequence[int]], *, window: Window,
               device: torch.device) -> Prefetcher | None:
        """A prefetcher for ``units`` fetched in ``groups``, or None (see above)."""
        if window.off or not units or device.type not in ("cpu", "cuda"):
            return None
        if device.type == "cpu" and not any(u.weights.is_on_disk(n) for u in units for n in u.names):
            return None
        return cls(units, groups, window=window, device=device)

    def __init__(self, units: Sequence[StreamedWeights], groups: Sequence[Sequence[int]], *, window: Window,
                 device: torch.device) -> None:
        self.window = window
        self.device = device
        self._units = list(units)
        self._position = {unit: i for i, unit in enumerate(self._units)}
        self._planned = [list(group) for group in groups]  # in model order
        self._recording: list[int] | None = []
        self._recorded: set[int] = set()
        self._inflight: deque[Job] = deque()
        self._current: Job | None = None
        self._closed = False
        self._lock = threading.RLock()
        self.hits = self.misses = self.unscheduled = 0
        self.wait_s = 0.0
        self._groups: list[Group] = []
        self._order(self._planned)
        # The window and the memory bound follow the plan (what plan_prefetch printed), whatever re-cut follows.
        sizes = [_rounded(g.fetch_bytes) for g in self._groups]
        self._limit = self.window.bytes_for(sizes)  # None: a number of groups
        self._bound = prefetch_memory([_rounded(g.host_bytes) for g in self._groups], self.window)
        self._pool = BufferPool(self._bound)
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._disk_bytes = sum(i.ref.nbytes for g in self._groups for i in g.items if i.ref is not None and not i.parts)
        self.page_cache = keeps_page_cache(self._disk_bytes, self._bound if device.type == "cpu" else 0)
        # Chosen here (not forced by the environment): given up if the pages do not stay (_watch_cache).
        self._cache_watched = self.page_cache and page_cache_setting() is None
        self._reads_at_start: int | None = None  # storage bytes read when the current forward began
        self._action: Job | None = None  # the last action queued for the reader thread
        self._released: int | None = None  # the last group let go as soon as its modules were done
        self._repeated: set[int] = set()  # groups whose modules ran again after that: kept to their turn
        reader = DirectReader(in_flight=reads_in_flight() if device.type == "cpu" else 1, keep_cache=self.page_cache)
        self._reader = reader
        self._thread = threading.Thread(target=reader_loop, args=(self._jobs, reader, device, stream),
                                        name="hf_bigmodel-prefetch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, stop_reader, self._jobs, self._thread)
        logger.debug("Prefetching %d group(s) (largest %s) %s ahead to %s, %s", len(self._groups),
                     format_size(self._capacity), window.describe(sizes), device,
                     "through the page cache (pages kept)" if self.page_cache else "around the page cache")
        self._fill(len(self._groups) - 1)  # the first forward finds its first groups on their way

    def _order(self, groups: Sequence[list[int]]) -> bool:
        """Fetch ``groups`` (lists of unit indices) in this order, cyclically.

        Returns False (and keeps the current groups) when nothing changes: the order of units inside a
        group does not matter, the whole group is fetched at once.
        """
        if self._groups and [set(g.slots) for g in self._groups] == [set(group) for group in groups]:
            return False
        on_cpu = self.device.type == "cpu"
        self._groups = [plan_group(i, [(u, self._units[u]) for u in group], on_cpu) for i, group in enumerate(groups)]
        self._group_of = {u: g for g in self._groups for u in g.slots}
        self._capacity = max((g.host_bytes for g in self._groups), default=0)
        self._largest_fetch = max((_rounded(g.fetch_bytes) for g in self._groups), default=0)
        count = len(self._groups)
        self.depth = min(self.window.groups if self.window.groups is not None else count, max(count - 1, 1))
        return True

    # What hooks call ------------------------------------------------------------------------------------

    def take(self, unit: StreamedWeights) -> list[torch.Tensor] | None:
        """``unit``'s tensors on its device, in ``names`` order; None: let the hook load them itself."""
        with self._lock:
            return None if self._closed else self._take(unit)

    def _take(self, unit: StreamedWeights) -> list[torch.Tensor] | None:
        index = self._position.get(unit)
        if index is None:  # not one of this prefetcher's units
            self.unscheduled += 1
            return None
        self._learn(index)
        current = self._current
        if current is not None and current.group is not None and index in current.group.slots:
            return self._hand_out(current, index)
        group = self._group_of.get(index)
        if group is None:
            self.unscheduled += 1
            return None
        if group.index == 0 and self._cache_watched and self._recording is None:
            self._watch_cache()
        position = next((i for i, job in enumerate(self._inflight) if job.group is group), None)
        if position is None:  # out of order: fetch this group now, then re-align behind it
            if group.index == self._released:  # it runs again after its modules finished: never let go early
                self._repeated.add(group.index)
            self.misses += 1
            self._cancel_inflight()
            self._inflight.append(self._submit(group))
            position = 0
        else:
            self.hits += 1
        for _ in range(position):
            self._retire(self._inflight.popleft())
        job = self._inflight.popleft()
        if self._current is not None:
            self._retire(self._current)  # its buffer is reused only once its views are gone (use counts)
        self._current = job
        self._top_up()  # before waiting: the reader queues the next reads while it finishes this group's
        if not job.done.is_set():
            started = time.perf_counter()
            job.done.wait()
            self.wait_s += time.perf_counter() - started
        if job.error is not None:
            self._current = None
            self._retire(job)
            self._raise(job, group)
        return self._hand_out(job, index)

    def done_with(self, unit: StreamedWeights) -> None:
        """``unit``'s module has run and dropped its tensors. Once every unit of the group in use has, the
        group is let go at once rather than at the next group's turn, and its room in the memory bound goes
        to reads ahead: while the model computes from RAM for a while (the output head, the sampling, the
        layers kept in RAM at the start of the next forward) the disk keeps reading instead of idling."""
        with self._lock:
            current = self._current
            if self._closed or self._recording is not None or current is None or current.group is None:
                return
            group, index = current.group, self._position.get(unit)
            if index not in group.slots or group.index in self._repeated:
                return
            current.finished.add(index)
            if len(current.finished) < len(group.slots):
                return
            self._retire(current)
            self._current = None
            self._released = group.index
            self._fill(group.index)

    def _hand_out(self, job: Job, index: int) -> list[torch.Tensor]:
        assert job.values is not None and job.group is not None
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if job.stream != stream:
                stream.wait_event(job.event)
                for value in job.values:
                    if value.device.type == "cuda":
                        value.record_stream(stream)
                job.stream = stream
        values = job.values
        return [values[i] for i in job.group.slots[index]]

    def _raise(self, job: Job, group: Group) -> None:
        err = job.error
        assert err is not None
        if isinstance(err, BigModelError):
            raise err
        raise OffloadError(
            f"Reading the offloaded weights of {group.names} from {job.path!r} failed: "
            f"{type(err).__name__}: {err}. Check that the file is still there and readable (it must not change "
            "while the model is in use), or dispatch again.",
            path=job.path,
        ) from err

    # Order -----------------------------------------------------------------------------------------------

    def _learn(self, index: int) -> None:
        """Record the first forward's order of units; once it is complete, order the groups by it."""
        recording = self._recording
        if recording is None:
            return
        if index in self._recorded:
            if index != recording[0]:
                return  # called again within the same forward
        else:
            recording.append(index)
            self._recorded.add(index)
            if len(recording) < len(self._units):
                return
        self._recording = None
        current, inflight = self._current, list(self._inflight)
        if self._order(_execution_groups(self._planned, recording)):
            logger.debug("Execution order differs from model order; re-ordered %d prefetch group(s)",
                         len(self._groups))
            for job in [current, *inflight]:
                if job is not None:
                    self._retire(job)
            self._current = None
            self._inflight.clear()

    def _watch_cache(self) -> None:
        """At the start of each forward after the first: if the last one fetched more than half the disk part
        from storage, its pages did not stay (the process or the machine needs the memory now), so reads go
        back to bypassing the page cache, and the pages kept are dropped. Never the other way back."""
        now = storage_read_bytes()
        last, self._reads_at_start = self._reads_at_start, now
        if now is None:
            self._cache_watched = False  # cannot tell here: keep the choice made at dispatch
            return
        if last is None or now - last <= self._disk_bytes // 2:
            return
        logger.info("Offloaded weights did not stay in the page cache (%s read from storage in one forward for %s "
                    "on disk): reading them with O_DIRECT from now on.", format_size(now - last),
                    format_size(self._disk_bytes))
        self.page_cache = self._cache_watched = False
        self._action = Job([], None, action=DirectReader.bypass_cache)
        self._jobs.put(self._action)  # between the reader's reads

    # Jobs and buffers ------------------------------------------------------------------------------------

    def _top_up(self) -> None:
        if self._current is None or self._current.group is None:
            return
        self._fill(self._current.group.index)

    def _fill(self, start: int) -> None:
        """Submit the groups after ``start`` (cyclically, never ``start`` itself) while they fit the window,
        widened by what the group in use leaves of the largest group's room (all of it once let go).

        One group is always read ahead, even one larger than the window; the others wait while the pool
        cannot hold them within the memory bound.
        """
        last = self._inflight[-1].group.index if self._inflight else start  # type: ignore[union-attr]
        ahead = sum(_rounded(job.group.fetch_bytes) for job in self._inflight if job.group is not None)
        count = len(self._groups)
        current = self._current
        held = _rounded(current.group.fetch_bytes) if current is not None and current.group is not None else 0
        limit = None if self._limit is None else self._limit + max(self._largest_fetch - held, 0)
        while len(self._inflight) < self.depth:
            nxt = (last + 1) % count
            if nxt == start:
                break
            size = _rounded(self._groups[nxt].fetch_bytes)
            if self._inflight and limit is not None and ahead + size > limit:
                break
            job = self._submit(self._groups[nxt], required=not self._inflight)
            if job is None:  # the pool has no room for it within the bound yet: read it at a later turn
                break
            self._inflight.append(job)
            ahead += size
            last = nxt

    @overload
    def _submit(self, group: Group, *, required: Literal[True] = True) -> Job: ...
    @overload
    def _submit(self, group: Group, *, required: bool) -> Job | None: ...

    def _submit(self, group: Group, *, required: bool = True) -> Job | None:
        """Queue ``group``'s fetch; None (nothing queued) when it is not ``required`` and no buffer is free."""
        buffer = None
        if group.host_bytes:
            buffer = self._acquire(group.host_bytes, required=required)
            if buffer is None:
                return None
        job = Job(group.items, buffer, group)
        if buffer is not None:
            buffer.job = job
        action = self._action
        if self.device.type == "cpu" and (action is None or action.done.is_set()):
            start_early(job, self._reader)  # not while the reader's descriptors are about to change
        self._jobs.put(job)
        return job

    def _acquire(self, nbytes: int, *, required: bool = True) -> Buffer | None:
        """A pool buffer for a group of ``nbytes`` (rounded up to 2 MiB, or 4 KiB when smaller), or None
        when it would exceed the memory bound and the group is not ``required`` (:mod:`.prefetch_pool`)."""
        return self._pool.acquire(_rounded(nbytes), required=required)

    def _retire(self, job: Job) -> None:
        job.retired = True
        job.values = None  # drop our views: the buffer is free once the hooks drop theirs

    def _cancel_inflight(self) -> None:
        while self._inflight:
            self._retire(self._inflight.popleft())

    # Lifecycle -------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: groups fetched ahead (``hits``), synchronously (``misses``, ``unscheduled``), and waits."""
        return {
            "depth": self.depth, "window_bytes": self._limit, "memory_bound": self._bound,
            "largest_group": self._capacity, "groups": len(self._groups), "hits": self.hits, "misses": self.misses,
            "unscheduled": self.unscheduled, "wait_s": round(self.wait_s, 4), "buffers": len(self._pool.buffers),
            "buffer_bytes": self._pool.held_bytes, "abandoned": self._pool.abandoned,
            "page_cache": self.page_cache,
        }

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stop the reader thread and free the buffers; hooks then load their weights themselves."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cancel_inflight()
            if self._current is not None:
                self._retire(self._current)
                self._current = None
            self._finalizer()
            self._pool.clear()

    def __repr__(self) -> str:
        return (f"Prefetcher(depth={self.depth}, groups={len(self._groups)}, device={self.device}, "
                f"closed={self._closed})")
