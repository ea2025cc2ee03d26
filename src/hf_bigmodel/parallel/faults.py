"""Failures of one process made known to all: records in the shared store, heartbeats, bounded waits.

The rules every process follows:

- A process whose pipeline step raises records the cause in the store (``failed/<rank>``) and tears
  its process group down, which closes its connections: a peer blocked on it gets an error at once.
- A process whose communication fails reads the records and raises :class:`~hf_bigmodel.errors.RankFailedError`
  naming the process that failed first and why; with no record, it names the peer it lost and says
  that peer died without reporting (killed by a signal, the OOM killer, a crash) or did not answer in time.
- While a process loads (no communication yet), a monitor thread that sees another process's record
  interrupts the load, so nobody finishes a long load for nothing.
- Waits on the store (the barrier after loading, exchanging budgets) watch every peer's heartbeat: a
  peer silent for ten heartbeats (``HF_BIGMODEL_PIPELINE_HEARTBEAT`` seconds apart, default 1) is lost.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist

from ..env import text as env_text
from ..errors import PipelineError, RankFailedError
from .world import World

__all__ = ["Monitor", "abandon", "heartbeat_interval"]

logger = logging.getLogger(__name__)
_BEATS_TO_LOSE = 10


def heartbeat_interval() -> float:
    """Seconds between heartbeats (``HF_BIGMODEL_PIPELINE_HEARTBEAT``, default 1)."""
    raw = env_text("HF_BIGMODEL_PIPELINE_HEARTBEAT")
    try:
        value = float(raw) if raw is not None else 1.0
    except ValueError:
        raise PipelineError(f"HF_BIGMODEL_PIPELINE_HEARTBEAT={raw!r} is not a number of seconds.") from None
    return max(value, 0.01)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


class Monitor:
    """This process's link to the others' health: its heartbeat, failure records, monitored waits."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.interval = heartbeat_interval()
        self._stop = threading.Event()
        self._interruptible = False
        self._lock = threading.Lock()
        self.interrupted_by: dict[str, Any] | None = None
        store = world.store
        store.set(f"info/{world.rank}", json.dumps({"host": world.host, "pid": os.getpid()}))
        self._thread_store = store.clone() if hasattr(store, "clone") else store
        self._thread = threading.Thread(target=self._beat, name=f"hf_bigmodel-monitor-{world.rank}", daemon=True)
        self._thread.start()

    # -- the background thread ---------------------------------------------------------------------
    def _beat(self) -> None:
        store, rank = self._thread_store, self.world.rank
        seen: dict[int, tuple[int, float]] = {}
        while not self._stop.wait(self.interval):
            try:
                store.add(f"alive/{rank}", 1)
                if not self._interruptible or self.interrupted_by is not None:
                    continue
                cause = self._root_cause(store) if int(store.add("failures", 0)) > 0 else None
                silent = self._silent_peer(store, seen)
                if cause is None and silent is not None:
                    peer, quiet = silent
                    cause = {"rank": peer, "host": None, "phase": "loading", "lost": peer,
                             "error": f"no heartbeat for {quiet:.1f} s", "time": time.time()}
                with self._lock:
                    if self._interruptible and cause is not None and cause["rank"] != rank:
                        self.interrupted_by = cause
                        _thread.interrupt_main()
            except Exception as err:  # noqa: BLE001 - the store's host went away; the main thread will see it
                logger.debug("Pipeline monitor of rank %d stops: %s", rank, err)
                return

    def _silent_peer(self, store: dist.Store, seen: dict[int, tuple[int, float]]) -> tuple[int, float] | None:
        """A peer whose heartbeat stopped for ten beats, with how long (``seen``: the counters read so far)."""
        now = time.monotonic()
        for peer in range(self.world.size):
            if peer == self.world.rank or not store.check([f"alive/{peer}"]):
                continue  # not started yet: the rendezvous waits for it
            beats = int(store.add(f"alive/{peer}", 0))
            if seen.get(peer, (-1, 0.0))[0] != beats:
                seen[peer] = (beats, now)
            elif now - seen[peer][1] > _BEATS_TO_LOSE * self.interval:
                return peer, now - seen[peer][1]
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.interval + 1)

    # -- records -----------------------------------------------------------------------------------
    def record(self, phase: str, error: BaseException, *, lost: int | None = None) -> None:
        """Tell the others this process failed while ``phase`` (``lost``: because it lost that rank)."""
        entry = {"rank": self.world.rank, "host": self.world.host, "pid": os.getpid(), "phase": phase,
                 "error": _first_line(error), "lost": lost, "time": time.time()}
        try:
            self.world.store.set(f"failed/{self.world.rank}", json.dumps(entry))
            self.world.store.add("failures", 1)
        except Exception as err:  # noqa: BLE001 - the store is gone too; the others lose us by our closed sockets
            logger.debug("Could not record the failure of rank %d: %s", self.world.rank, err)

    def _root_cause(self, store: dist.Store) -> dict[str, Any] | None:
        """The first real error recorded, else the first loss of a rank that recorded nothing itself."""
        entries = []
        for rank in range(self.world.size):
            if store.check([f"failed/{rank}"]):
                entries.append(json.loads(store.get(f"failed/{rank}")))
        errors = sorted((e for e in entries if e["lost"] is None), key=lambda e: e["time"])
        if errors:
            return errors[0]
        reported = {e["rank"] for e in entries}
        losses = sorted((e for e in entries if e["lost"] not in reported), key=lambda e: e["time"])
        return losses[0] if losses else None

    def _info(self, rank: int) -> str:
        try:
            if self.world.store.check([f"info/{rank}"]):
                info = json.loads(self.world.store.get(f"info/{rank}"))
                return f"rank {rank} (host {info['host']}, pid {info['pid']})"
        except Exception:  # noqa: BLE001 - only decorates a message
            pass
        return f"rank {rank}"

    def failure(self, peer: int | None, what: str, err: BaseException | None) -> RankFailedError:
        """The error this process raises when ``what`` (with ``peer``) failed with ``err``."""
        try:
            cause = self.interrupted_by or self._root_cause(self.world.store)
        except Exception:  # noqa: BLE001 - the store died with its host
            cause = None
        rank = self.world.rank
        if cause is not None and cause["lost"] is None:
            return RankFailedError(
                f"Stopping rank {rank}: {self._info(cause['rank'])} failed while {cause['phase']}: {cause['error']}",
                rank=rank, failed_rank=cause["rank"], reason=cause["error"], host=cause["host"])
        if cause is not None:
            peer = cause["lost"]
        who = self._info(peer) if peer is not None else "another rank"
        detail = _first_line(err) if err is not None else cause["error"] if cause is not None else "no answer"
        if "imed out" in detail or "imeout" in detail or "no heartbeat" in detail:
            reason = (f"it did not answer within {self.world.timeout:.0f} s ({detail}): it hangs, is far slower than "
                      "the others, or its host is unreachable; raise HF_BIGMODEL_PIPELINE_TIMEOUT if it is just slow")
        else:
            reason = (f"its connection closed ({detail}) without an error being reported: it was killed (by a "
                      "signal or the OOM killer) or crashed; see its own output")
        return RankFailedError(f"Stopping rank {rank}: lost {who} while {what}: {reason}.", rank=rank,
                               failed_rank=-1 if peer is None else peer, reason=reason)

    # -- monitored waits ---------------------------------------------------------------------------
    def _check_peers(self, seen: dict[int, tuple[int, float]], started: float, what: str) -> None:
        store, now = self.world.store, time.monotonic()
        if int(store.add("failures", 0)) > 0:
            raise self.failure(None, what, None)
        silent = self._silent_peer(store, seen)
        if silent is not None:
            raise self.failure(silent[0], what, TimeoutError(f"no heartbeat for {silent[1]:.1f} s"))
        if now - started > self.world.timeout:
            raise self.failure(None, what, TimeoutError(f"Timed out after {self.world.timeout:.0f} s"))

    def exchange(self, name: str, value: str, what: str) -> list[str]:
        """Every rank's ``value`` for ``name``, in rank order, once all have given theirs (a monitored barrier)."""
        store = self.world.store
        store.set(f"x/{name}/{self.world.rank}", value)
        keys = [f"x/{name}/{r}" for r in range(self.world.size)]
        seen: dict[int, tuple[int, float]] = {}
        started, pause = time.monotonic(), 0.001
        try:
            while not store.check(keys):
                self._check_peers(seen, started, what)
                time.sleep(pause)
                pause = min(pause * 2, self.interval / 4)
            return [store.get(k).decode() for k in keys]
        except RankFailedError:
            raise
        except Exception as err:  # noqa: BLE001 - the store's host (rank 0 or the launcher) went away
            raise self.failure(0, what, err) from err

    @contextmanager
    def interruptible(self, what: str) -> Iterator[None]:
        """Within the block, another rank's recorded failure interrupts this (main) thread."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._interruptible = True
        try:
            yield
        except KeyboardInterrupt:
            if self.interrupted_by is None:
                raise  # the user's Ctrl-C
            raise self.failure(None, what, None) from None
        finally:
            with self._lock:
                self._interruptible = False
        if self.interrupted_by is not None:  # fired as the block ended: take the interrupt, then stop
            deadline = time.monotonic() + 1.0
            try:
                while time.monotonic() < deadline:
                    time.sleep(0.001)
            except KeyboardInterrupt:
                pass
            raise self.failure(None, what, None)


def abandon(monitor: Monitor, what: str, err: BaseException) -> None:
    """This rank failed while ``what``: record why for the others, close its connections, stop its monitor."""
    lost = err.failed_rank if isinstance(err, RankFailedError) and err.failed_rank >= 0 else None
    monitor.record(what, err, lost=lost)
    try:
        if dist.is_initialized():
            dist.destroy_process_group()  # closes this rank's connections: whoever waits on it learns at once
    except Exception as teardown:  # noqa: BLE001 - already broken; nothing more to close
        logger.debug("Tearing down the process group of rank %d: %s", monitor.world.rank, teardown)
    monitor.close()
