"""Stop signals, installed only while the daemon runs, the old handlers restored after.

SIGTERM and SIGINT ask for a graceful stop; so does SIGHUP (a closed terminal must not cut a
drain short). Installed in a context manager, never in a constructor.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextmanager
def stop_signals(on_signal: Callable[[str], None]) -> Iterator[None]:
    """Call `on_signal(name)` for each stop signal while inside."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
