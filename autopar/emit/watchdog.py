"""Heartbeats that end a job whose rank went silent, naming the rank, in bounded time.

A rank that is stopped (SIGSTOP), dead (``kill -9``, OOM-killed) or wedged leaves
the others blocked in a collective until the process group's timeout, and the
backend's timeout error does not say which rank is missing. So every rank runs a
daemon thread that bumps its counter in the job's rendezvous store every
``interval_s``; rank 0 watches every other rank's counter, and rank 1 watches
rank 0's. A counter that has not moved for ``silence_limit_s`` (half the collective
timeout, so the watchdog speaks before the backend's anonymous timeout) ends the
job: the watcher prints one line naming the silent rank(s) and exits with
``EXIT_HUNG``. A rank that finishes normally marks itself done first.

The thread holds no lock the training loop needs and only talks to the store
(through its own clone of the client), so it keeps beating while the main thread
computes or waits in a collective: silence means the process itself stopped.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

EXIT_HUNG = 124
"""Exit status of the rank that ends a job because another rank went silent (as ``timeout(1)`` uses)."""

SILENCE_SHARE_OF_TIMEOUT = 0.5
"""Heartbeat silence limit as a share of the collective timeout: detect before the backend's timeout fires."""

BEATS_PER_LIMIT = 5
"""Heartbeats per silence limit: a rank must miss this many in a row to be called silent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchdogConfig:
    """How often ranks beat and how long a silence ends the job."""

    silence_limit_s: float
    """A rank whose counter has not moved for this long is reported, and the job ends."""
    interval_s: float
    """Seconds between two heartbeats (and between two checks)."""

    def __post_init__(self) -> None:
        if not (0 < self.interval_s < self.silence_limit_s):
            raise ValueError(f"need 0 < interval_s ({self.interval_s}) < silence_limit_s ({self.silence_limit_s})")

    @classmethod
    def from_timeout(cls, collective_timeout_s: float) -> WatchdogConfig:
        """The watchdog for a process group whose collectives time out after ``collective_timeout_s``.

        Example:
            >>> WatchdogConfig.from_timeout(120.0)
            WatchdogConfig(silence_limit_s=60.0, interval_s=12.0)
        """
        limit = collective_timeout_s * SILENCE_SHARE_OF_TIMEOUT
        return cls(silence_limit_s=limit, interval_s=limit / BEATS_PER_LIMIT)


def watched_ranks(rank: int, world: int) -> tuple[int, ...]:
    """The ranks whose heartbeats ``rank`` checks: rank 0 watches all others, rank 1 watches rank 0.

    Example:
        >>> watched_ranks(0, 4), watched_ranks(1, 4), watched_ranks(3, 4)
        ((1, 2, 3), (0,), ())
    """
    if rank == 0:
        return tuple(range(1, world))
    return (0,) if rank == 1 else ()


class Watchdog:
    """This rank's heartbeat thread and, on ranks 0 and 1, its watcher; see the module docstring."""

    def __init__(self, store: Any, *, rank: int, world: int, config: WatchdogConfig) -> None:
        self._store = store
        self.rank = rank
        """This process's global rank."""
        self.world = world
        """Ranks in the job."""
        self.config = config
        """Beat interval and silence limit."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"autopar-watchdog-{rank}", daemon=True)

    def start(self) -> Watchdog:
        """Start beating (and watching); returns self."""
        self._store.set(f"host/{self.rank}", f"{os.uname().nodename} pid {os.getpid()}")
        self._beat()
        self._thread.start()
        return self

    def stop(self, *, done: bool = True) -> None:
        """Stop the thread; with ``done``, tell the watchers this rank finished on purpose (once)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if done:
            with contextlib.suppress(Exception):  # the store may already be gone at exit
                self._store.add(f"done/{self.rank}", 1)

    def _beat(self) -> None:
        self._store.add(f"beat/{self.rank}", 1)

    def _run(self) -> None:
        watched = watched_ranks(self.rank, self.world)
        seen = {r: (-1, time.monotonic()) for r in watched}  # rank → (last counter, when it last moved)
        while not self._stop.wait(self.config.interval_s):
            try:
                self._beat()
                silent = self._silent(seen)
            except Exception as e:  # the store went away: the job is ending; nothing to watch any more
                logger.debug("watchdog on rank %d stops: %s", self.rank, e)
                return
            if silent:
                self._end_job(silent, seen)

    def leave(self) -> None:
        """Tell the watchers this rank is leaving on purpose (after an error); keep beating meanwhile."""
        with contextlib.suppress(Exception):
            self._store.add(f"done/{self.rank}", 1)

    def peers_settled(self) -> bool:
        """Whether every rank this one watches has finished or left (so no verdict is pending)."""
        try:
            return all(self._store.add(f"done/{r}", 0) > 0 for r in watched_ranks(self.rank, self.world))
        except Exception:  # the store is gone: nobody is left to report
            return True

    def _silent(self, seen: dict[int, tuple[int, float]]) -> list[int]:
        now, silent = time.monotonic(), []
        for r, (count, since) in list(seen.items()):
            if self._store.add(f"done/{r}", 0) > 0:  # finished, or left after an error: not silent
                del seen[r]
                continue
            current = self._store.add(f"beat/{r}", 0)
            if current != count:
                seen[r] = (current, now)
            elif now - since > self.config.silence_limit_s:
                silent.append(r)
        return silent

    def _end_job(self, silent: list[int], seen: dict[int, tuple[int, float]]) -> None:
        if self._stop.is_set():
            return
        now = time.monotonic()
        who = ", ".join(f"rank {r} ({self._host(r)}, silent {now - seen[r][1]:.1f} s)" for r in silent)
        sys.stderr.write(f"error: {who} sent no heartbeat for more than {self.config.silence_limit_s:g} s: "
                         f"stopped, hung or dead; rank {self.rank} ends the job (the limit is half of "
                         f"AUTOPAR_COLLECTIVE_TIMEOUT_S)\n")
        sys.stderr.flush()
        self.leave()  # so that rank 1 does not report this rank in turn
        os._exit(EXIT_HUNG)  # the main thread may be blocked in a collective: no clean way out

    def _host(self, rank: int) -> str:
        with contextlib.suppress(Exception):
            if self._store.check([f"host/{rank}"]):
                return bytes(self._store.get(f"host/{rank}")).decode()
        return "host unknown"


_ACTIVE: dict[tuple[int, int], Watchdog] = {}
"""The running watchdog of this process, by (rank, world): one per process, however often it is asked for."""


def start_watchdog(collective_timeout_s: float) -> Watchdog | None:
    """Start this rank's watchdog on the default process group's store (once per process).

    Returns None for a one-rank job, when ``AUTOPAR_WATCHDOG=0``, or when the group's
    store cannot be shared with a thread.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1 or os.environ.get("AUTOPAR_WATCHDOG", "1") == "0":
        return None
    if (rank, world) in _ACTIVE:
        return _ACTIVE[(rank, world)]
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"autopar/watchdog/{attempt}", _get_default_store().clone())
    except (AttributeError, RuntimeError, ValueError) as e:  # a store without clone(): run without a watchdog
        logger.warning("no heartbeat watchdog: the process group's store cannot be shared (%s)", e)
        return None
    watchdog = Watchdog(store, rank=rank, world=world, config=WatchdogConfig.from_timeout(collective_timeout_s))
    _ACTIVE[(rank, world)] = watchdog.start()
    atexit.register(watchdog.stop)
    logger.info("rank %d: heartbeat every %.1f s, silence limit %.1f s", rank, watchdog.config.interval_s,
                watchdog.config.silence_limit_s)
    return watchdog


def active_watchdog() -> Watchdog | None:
    """This process's running watchdog, if any."""
    return next(iter(_ACTIVE.values()), None)


def stop_watchdog(*, grace_s: float = 5.0) -> None:
    """Mark this rank done and stop its watchdog (before exiting on purpose).

    Rank 0 then waits (up to ``grace_s``) for the other ranks to be done too: it usually
    hosts the rendezvous store, and leaving first would make their last store calls fail
    with a C++ stack trace each.
    """
    for watchdog in _ACTIVE.values():
        watchdog.stop()
        if watchdog.rank == 0:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and not watchdog.peers_settled():
                time.sleep(0.02)
    _ACTIVE.clear()


__all__ = ["EXIT_HUNG", "Watchdog", "WatchdogConfig", "active_watchdog", "start_watchdog", "stop_watchdog",
           "watched_ranks"]
