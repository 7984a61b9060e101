"""One line per job: how a training script's ranks end when something goes wrong.

``run_main(main)`` runs a script's ``main`` on this rank and returns its exit status.
Under ``torchrun`` every rank runs it, and without it a bad plan or a corrupt
checkpoint prints one traceback per rank. Here:

- an ``AutoparError`` (the ranks raise it alike: a plan for another world size, a
  corrupt checkpoint) is printed by rank 0 alone, as one ``error:`` line; exit 2;
- a failed collective (a peer died or left) is not the root cause: the ranks that
  watch heartbeats (0 and 1, see ``autopar.emit.watchdog``) wait for the watchdog
  to name the silent rank; the others leave quietly; exit 1;
- anything else is a bug: one line naming the rank and the exception; exit 3;
- SIGINT/SIGTERM: exit 130/143.

``AUTOPAR_DEBUG=1`` adds the traceback. Error paths end with ``os._exit``: a process
group with a dead peer can block forever in its destructor.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

from autopar.errors import AutoparError

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_PEER_LOST, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
"""Exit statuses of a rank (the CLI's, with 1 meaning a collective failed because another rank did)."""

_PEER_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                      "socket timeout", "connection refused", "no route to host", "end of file")
"""Substrings of gloo/NCCL/store errors that mean another rank went away (lower case)."""


def run_main(main: Callable[[], object]) -> int:
    """Run ``main()`` on this rank and return its exit status, reporting a failure once per job."""
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        main()
    except AutoparError as e:
        return _leave(EXIT_USAGE, f"error: {e}" if _rank() == 0 else None)
    except KeyboardInterrupt:
        return _leave(130, None)
    except Exception as e:
        if _is_peer_lost(e):
            return _leave(EXIT_PEER_LOST, _await_verdict(e))
        return _leave(EXIT_INTERNAL, f"rank {_rank()}: internal error: {type(e).__name__}: {_first_line(e)} "
                                     f"(AUTOPAR_DEBUG=1 shows the traceback)")
    finally:
        signal.signal(signal.SIGTERM, previous)
    _finish()
    return EXIT_OK


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _is_peer_lost(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_LOST_MARKERS)


def _await_verdict(error: BaseException) -> str | None:
    """Wait (on the watching ranks) for the watchdog to name a silent rank; the line to print if it does not."""
    from autopar.emit.watchdog import active_watchdog

    watchdog = active_watchdog()
    if watchdog is None:
        return f"rank {_rank()}: a collective failed: {_first_line(error)}"
    watchdog.leave()  # this rank is alive: its watchers must not report it
    deadline = time.monotonic() + watchdog.config.silence_limit_s + 2 * watchdog.config.interval_s
    while time.monotonic() < deadline and not watchdog.peers_settled():
        time.sleep(min(0.2, watchdog.config.interval_s))  # the watchdog thread exits the process if it finds one
    if watchdog.rank == 0 and not watchdog.peers_settled():
        return f"error: a collective failed and no rank is silent: {_first_line(error)}"
    return None  # another rank reported (or will report) the root cause


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _leave(status: int, line: str | None) -> int:
    """Print ``line`` (if any, plus the traceback under AUTOPAR_DEBUG) and exit now with ``status``."""
    from autopar.emit.watchdog import stop_watchdog

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM may end the wait below, not the report
    if os.environ.get("AUTOPAR_DEBUG", "") not in ("", "0"):
        traceback.print_exc()
    if line is not None:
        sys.stderr.write(line + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    stop_watchdog()  # mark this rank done; rank 0 (the store's host) waits for the others first
    os._exit(status)


def _finish() -> None:
    """Normal end: mark this rank done, then tear the process group down."""
    import torch.distributed as dist

    from autopar.emit.watchdog import stop_watchdog

    stop_watchdog()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["EXIT_INTERNAL", "EXIT_OK", "EXIT_PEER_LOST", "EXIT_USAGE", "run_main"]
