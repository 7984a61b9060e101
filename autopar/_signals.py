"""SIGINT and SIGTERM as an exception, so that a command unwinds and reports one line.

typer turns ``KeyboardInterrupt`` into a silent ``Exit(130)``, and SIGTERM's default
action kills the process without running ``finally`` blocks; ``signals_raise`` makes
both raise ``Interrupted`` in the main thread instead. Files written with
``autopar._io.write_atomic`` then leave no partial output.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(BaseException):  # noqa: N818 (not an error: a request to stop, like KeyboardInterrupt)
    """SIGINT or SIGTERM arrived; raised in the main thread so ``finally`` blocks and atomic writes unwind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        """The signal's number."""
        self.name = signal.Signals(signum).name
        """The signal's name, e.g. ``"SIGINT"``."""


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``Interrupted`` while a command runs (main thread only).

    typer would turn ``KeyboardInterrupt`` into a silent ``Exit(130)``, and SIGTERM would kill
    the process without unwinding; raising our own exception gives one line and exit 128 + N.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["Interrupted", "signals_raise"]
