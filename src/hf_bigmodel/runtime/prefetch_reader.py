"""The prefetcher's reader thread and what it works on: group plans, host buffers, jobs.

A :class:`Group` lists the distinct tensors some hooks need and, on CPU runs, where each lands in a host
buffer (the aligned span an ``O_DIRECT`` read fetches, plus room for a dtype cast). A :class:`Job` asks
the reader thread to fetch one group: on CPU into one :class:`Buffer` whose views the hooks use; on
CUDA through a few pinned staging chunks into GPU memory, with copies on a side stream and an event the
compute stream waits on (:mod:`.prefetch_cuda`). Nothing here references hooks or modules, so the thread never
keeps a model alive.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import summarize
from ..storage.direct_io import ALIGNMENT, DirectReader, padded_span
from ..storage.fused import FusedDiskTensor, read_fused_into, scratch_bytes
from ..storage.safetensors_io import TensorEntry
from ..storage.weights_map import BuiltDiskTensor, DiskRef, DiskTensor
from .prefetch_cuda import Staging, fetch_to_device, typed_view
from .prefetch_pool import Buffer
from .streaming import StreamedWeights

__all__ = ["Group", "Item", "Job", "fetch", "plan_group", "reader_loop",
           "start_early", "start_fetch", "stop_reader"]


@dataclass
class Item:
    """One distinct tensor of a group: from RAM (``memory``) or a byte range of a file (``ref``)."""

    memory: torch.Tensor | None = None
    ref: DiskRef | None = None
    offset: int = 0  # of the padded span (a fused tensor: of the assembled tensor) in the host buffer
    cast_offset: int = -1  # CPU execution with a dtype change: where the cast copy goes
    #: A built tensor: the items (earlier in the group) holding its parts, by part name.
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Group:
    """Hooks' units fetched together. Holds no reference to hooks or modules: the reader thread sees it."""

    index: int
    prefixes: list[str]  # of its units' modules, in order
    items: list[Item]
    slots: dict[int, list[int]]  # unit index (in the prefetcher) -> item index per tensor name
    host_bytes: int
    scratch: tuple[int, int] = (0, 0)  # CPU runs: (offset, bytes) where fused tensors' pieces are read first
    #: CPU runs: one read per run of adjacent tensors in a file, (the run's byte range, its offset in the buffer)
    reads: list[tuple[TensorEntry, int]] = field(default_factory=list)

    @property
    def names(self) -> str:
        return summarize([p or "<root>" for p in self.prefixes], 3)

    @property
    def fetch_bytes(self) -> int:
        """What reading this group ahead holds: its host buffer (CPU runs), else its tensors on the device."""
        if self.host_bytes:
            return self.host_bytes
        return sum(i.ref.nbytes if i.ref is not None else (i.memory.nbytes if i.memory is not None else 0)
                   for i in self.items if not i.parts)  # what is built is counted by its parts


def plan_group(index: int, members: Sequence[tuple[int, StreamedWeights]], on_cpu: bool) -> Group:
    """The tensors ``members`` (``(unit index, unit)`` pairs) need, deduplicated, and their buffer layout.

    A tensor several units share (tied weights) is read once. ``on_cpu``: the group runs on the CPU and
    its disk tensors live in a host buffer (a tensor cast to another dtype gets room for its cast copy);
    otherwise they stream to the device through the reader's staging chunks and need no buffer.
    """
    items: list[Item] = []
    seen: dict[Any, int] = {}
    slots: dict[int, list[int]] = {}

    def add(key: Any, item: Item) -> int:
        if key not in seen:
            seen[key] = len(items)
            items.append(item)
        return seen[key]

    for position, unit in members:
        weights = unit.weights
        picks = []
        for name in unit.names:
            tensor = weights.memory.get(name)
            if tensor is not None:
                picks.append(add(("m", id(tensor)), Item(memory=tensor)))
                continue
            ref = weights.disk[name]
            parts = {inner: add(_disk_key(part), Item(ref=part)) for inner, part in ref.parts} \
                if isinstance(ref, BuiltDiskTensor) else {}
            picks.append(add(_disk_key(ref), Item(ref=ref, parts=parts)))
        slots[position] = picks
    size = 0
    scratch = (0, 0)
    reads: list[tuple[TensorEntry, int]] = []
    if on_cpu:
        reads, size = _coalesce([i for i in items if isinstance(i.ref, DiskTensor)])
        for item in items:
            if isinstance(item.ref, FusedDiskTensor):
                item.offset = size
                size += _host_span(item.ref)
        for item in items:
            if isinstance(item.ref, (DiskTensor, FusedDiskTensor)) and item.ref.dtype != _stored_dtype(item.ref):
                item.cast_offset = size
                size += _aligned(item.ref.nbytes)
        fused = [i.ref for i in items if isinstance(i.ref, FusedDiskTensor)]
        if fused:
            scratch = (size, max(scratch_bytes(r, lambda e: padded_span(e)[1]) for r in fused))
            size += scratch[1]
    return Group(index, [unit.prefix for _, unit in members], items, slots, size, scratch, reads)


def _disk_key(ref: DiskRef) -> Any:
    """What makes two disk items one read (tied names, a tensor needed by several units)."""
    if isinstance(ref, DiskTensor):
        return ("d", ref.entry.path, ref.entry.start, ref.entry.end, ref.dtype)
    return ("f", id(ref)) if isinstance(ref, BuiltDiskTensor) else ("f", ref)


def _coalesce(items: list[Item]) -> tuple[list[tuple[TensorEntry, int]], int]:
    """Lay ``items`` (plain disk tensors) out in a host buffer as their files hold them, one read per run.

    Tensors adjacent in a file (a decoder layer's, in a safetensors shard) form one run: a single aligned
    read fetches them all, so the reader thread makes one system call, and takes the GIL back once, per
    run instead of per tensor. Sets each item's ``offset`` (its aligned first page in the buffer);
    returns the reads and the bytes they need.
    """
    runs: list[list[Item]] = []
    for item in sorted(items, key=lambda i: (i.ref.entry.path, i.ref.entry.start)):  # type: ignore[union-attr]
        entry = item.ref.entry  # type: ignore[union-attr]
        if runs:
            last = runs[-1][-1].ref.entry  # type: ignore[union-attr]
            end = max(i.ref.entry.end for i in runs[-1])  # type: ignore[union-attr]
            if last.path == entry.path and padded_span(entry)[0] <= -(-end // ALIGNMENT) * ALIGNMENT:
                runs[-1].append(item)
                continue
        runs.append([item])
    reads: list[tuple[TensorEntry, int]] = []
    size = 0
    for run in runs:
        entries = [i.ref.entry for i in run]  # type: ignore[union-attr]
        start, end = entries[0].start, max(e.end for e in entries)
        span = replace(entries[0], key=summarize([e.key for e in entries], 2), dtype=torch.uint8,
                       shape=(end - start,), start=start, end=end)
        first = padded_span(span)[0]
        for item, entry in zip(run, entries):
            item.offset = size + padded_span(entry)[0] - first
        reads.append((span, size))
        size += padded_span(span)[1]
    return reads, size


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def _stored_dtype(ref: DiskTensor | FusedDiskTensor) -> torch.dtype:
    return ref.entry.dtype if isinstance(ref, DiskTensor) else ref.stored_dtype


def _host_span(ref: DiskTensor | FusedDiskTensor) -> int:
    """Host-buffer bytes a disk tensor's read needs: its padded span, or a fused tensor's aligned size."""
    return padded_span(ref.entry)[1] if isinstance(ref, DiskTensor) else _aligned(ref.stored_nbytes)


@dataclass(eq=False)
class Job:
    """One group to fetch (into one buffer on CPU runs); ``done`` is set when ``values`` or ``error`` is."""

    items: list[Item]
    buffer: Buffer | None
    group: Group | None = None
    done: threading.Event = field(default_factory=threading.Event)
    values: list[torch.Tensor] | None = None
    error: BaseException | None = None
    path: str | None = None  # file being read when ``error`` happened
    event: Any = None  # CUDA: recorded on the side stream after the group's copies
    stream: Any = None  # CUDA: the compute stream the values were last handed to
    retired: bool = False
    #: Not a group: something the reader thread does to its reader between reads (``items`` empty).
    action: Callable[[DirectReader], None] | None = None
    #: Its reads were started where it was submitted (:func:`start_early`): what finishes them.
    finish: Callable[[], list[torch.Tensor]] | None = None
    #: Units (prefetcher indices) whose modules have finished with the values, while the group is in use.
    finished: set[int] = field(default_factory=set)


def fetch(job: Job, reader: DirectReader, device: torch.device, stream: Any,
          staging: Staging | None = None) -> list[torch.Tensor]:
    """Run ``job`` on the calling (reader) thread: one value per item, on ``device``.

    CPU: disk tensors are views into the job's buffer (cast in place when needed), RAM tensors as they
    are. CUDA: everything is copied on ``stream`` (disk bytes through ``staging``), and ``job.event``
    marks the end of those copies for the compute stream to wait on.
    """
    return start_fetch(job, reader, device, stream, staging)()


def start_fetch(job: Job, reader: DirectReader, device: torch.device, stream: Any,
                staging: Staging | None = None) -> Callable[[], list[torch.Tensor]]:
    """Start :func:`fetch` and return the function that finishes it (and returns its values).

    On CPU runs the group's reads that can go in flight are at the device when this returns
    (:meth:`~hf_bigmodel.storage.direct_io.DirectReader.start_read`): the reader thread queues the next
    group's reads before it finishes this one, so the disk does not idle while the thread, needing the
    GIL, makes views and hands the group out. Everything else happens in the returned function, which
    must be called exactly once, also when the job was retired meanwhile (the device may still be
    writing into its buffer until then).
    """
    if device.type == "cuda":
        return lambda: fetch_to_device(job, reader, device, stream, staging)
    buf = job.buffer.tensor if job.buffer is not None else None
    reads = job.group.reads if job.group is not None else []
    finishers: list[Callable[[], torch.Tensor]] = []
    try:
        for span, offset in reads:
            assert buf is not None
            job.path = span.path
            finishers.append(reader.start_read(span, buf[offset:]))
    except BaseException:
        _finish_all(finishers)  # those started: their reads must end before the buffer can be reused
        raise

    def finish() -> list[torch.Tensor]:
        failure = _finish_all(finishers, job, [span.path for span, _ in reads])
        if failure is not None:
            raise failure
        return _host_values(job, reader, buf)

    return finish


def start_early(job: Job, reader: DirectReader) -> None:
    """Start a CPU ``job``'s reads on the submitting (hooks') thread; the reader thread finishes them.

    A reader thread busy finishing one group cannot start the next one's reads the moment the window
    lets it be submitted: the disk idles from the end of the group it works on until the thread, the
    GIL taken back, gets to the queue. Started where the group is submitted, the reads are at the device
    at once. An error is the job's, raised where the hooks take the group, as the reader thread's are.
    """
    try:
        job.finish = start_fetch(job, reader, torch.device("cpu"), None)
    except BaseException as err:  # noqa: BLE001  (raised where the group is taken)
        failure = err

        def failed() -> list[torch.Tensor]:
            raise failure

        job.finish = failed


def _finish_all(finishers: list[Callable[[], torch.Tensor]], job: Job | None = None,
                paths: Sequence[str] = ()) -> BaseException | None:
    """Call every finisher (whatever the others do); the first error, with its file as ``job.path``."""
    failure: BaseException | None = None
    for index, finish in enumerate(finishers):
        try:
            finish()
        except BaseException as err:  # noqa: BLE001  (the first one is raised by the caller)
            if failure is None:
                failure = err
                if job is not None:
                    job.path = paths[index]
    return failure


def _host_values(job: Job, reader: DirectReader, buf: torch.Tensor | None) -> list[torch.Tensor]:
    """A CPU job's values once its runs are read: views into ``buf``, fused and built tensors, casts."""
    values: list[torch.Tensor] = []
    for item in job.items:
        if item.memory is not None:
            values.append(item.memory)
            continue
        ref = item.ref
        assert ref is not None and buf is not None
        if isinstance(ref, BuiltDiskTensor):  # built from its parts, earlier items
            values.append(ref.build({inner: values[i] for inner, i in item.parts.items()}))
            continue
        if isinstance(ref, FusedDiskTensor):
            job.path = ", ".join(ref.paths)
            offset, size = job.group.scratch if job.group is not None else (0, 0)
            value = read_fused_into(ref, reader.read_into, buf[item.offset :], buf[offset : offset + size])
        else:  # read with its run
            skip = ref.entry.start % ALIGNMENT
            value = typed_view(buf[item.offset + skip : item.offset + skip + ref.entry.nbytes], ref)
        if item.cast_offset >= 0:
            out = buf[item.cast_offset : item.cast_offset + ref.nbytes].view(ref.dtype).view(ref.shape)
            value = out.copy_(value)
        values.append(value)
    return values


def reader_loop(jobs: queue.SimpleQueue[Job | None], reader: DirectReader, device: torch.device,
                stream: Any) -> None:
    """The reader thread: run jobs (skipping retired ones) until ``None`` arrives; errors go to the job.

    Two jobs overlap: the next job's reads are started (:func:`start_fetch`) before the current one is
    finished and handed out, when the next is already queued; a job started early (:func:`start_early`)
    is only finished here. An action runs once no read is started.
    """
    staging: Staging | None = None
    started: deque[tuple[Job, Callable[[], list[torch.Tensor]]]] = deque()

    def finish_oldest() -> None:
        job, finish = started.popleft()
        try:
            job.values = finish()
        except BaseException as err:  # noqa: BLE001  (handed to the main thread)
            job.error = err
        job.done.set()

    def take_on(job: Job) -> None:
        nonlocal staging
        if job.action is not None:
            while started:
                finish_oldest()
            try:
                job.action(reader)
            except BaseException as err:  # noqa: BLE001  (handed to the main thread)
                job.error = err
            job.done.set()
        elif job.finish is not None:  # its reads are at the device: finished in turn, even when retired
            started.append((job, job.finish))
            job.finish = None  # the function holds views of the buffer: only ``started`` may keep it
        elif job.retired:
            job.done.set()
        else:
            try:
                if device.type == "cuda" and staging is None:
                    with torch.cuda.device(device):
                        staging = Staging()
                started.append((job, start_fetch(job, reader, device, stream, staging)))
            except BaseException as err:  # noqa: BLE001  (handed to the main thread)
                job.error = err
                job.done.set()

    try:
        while True:
            if started:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    finish_oldest()  # nothing queued behind it: the main thread may be waiting for it
                    continue
            else:
                job = jobs.get()
            if job is None:
                return
            take_on(job)
            job = None  # no reference left on this thread while it waits for the next job
            while len(started) > 1:
                finish_oldest()
    finally:
        while started:  # reads still at the device must end before their buffers and descriptors go
            finish_oldest()
        reader.close()


def stop_reader(jobs: queue.SimpleQueue[Job | None], thread: threading.Thread) -> None:
    """Ask the reader thread to finish and wait for it (unless called from it, e.g. by the GC there)."""
    jobs.put(None)
    if thread is not threading.current_thread():
        thread.join(timeout=30)
