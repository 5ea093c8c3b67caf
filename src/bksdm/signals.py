"""Signal handlers for the long-running commands (``serve``, ``distill``), installed only while they run."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType

__all__ = ["handling"]


@contextlib.contextmanager
def handling(signals: Sequence[signal.Signals], handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Run the block with ``handler`` for ``signals``, then put the previous handlers back.

    Installed explicitly rather than relying on the defaults: a process started in the background by a
    non-interactive shell (``cmd &`` in a script, a CI runner) inherits SIGINT as *ignored*, so Python never
    raises KeyboardInterrupt there. Signals reach the main thread only: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)  # None: set outside Python
