"""The stop request of a serving process: SIGTERM or SIGINT set an event the main thread waits on."""

from __future__ import annotations

import signal
import threading


def stop_requested(stop: threading.Event | None = None) -> threading.Event:
    """An event (`stop`, or a new one) set by the next SIGTERM or SIGINT (handlers installed now,
    on the main thread; again after a library replaced them).

    A handler only sets the event: the main thread decides how to stop (drain, delete an
    application), so a signal never cuts a teardown half way.
    """
    stop = stop if stop is not None else threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop
