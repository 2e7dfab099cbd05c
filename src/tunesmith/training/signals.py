"""SIGTERM/SIGINT: finish the current optimizer step, commit a checkpoint, exit 143/130.

The first signal only sets a flag the loop reads between steps (a checkpoint written from inside a
signal handler could interleave with one already being written). A second signal exits at once;
the last committed checkpoint is untouched because commits are a single rename.
"""

from __future__ import annotations

import os
import signal
import threading


class GracefulStop:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or 0)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # second signal: leave now, without touching committed state
        self.received = signum
        previous = self._previous.get(signum)
        # Chain to a handler the host program installed, but not to Python's KeyboardInterrupt raiser.
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
