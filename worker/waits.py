"""One way to wait in a background loop: until any of some events is set, always with a timeout,
so that liveness (the heartbeat, the systemd watchdog) never hangs on an event that never fires
(procrastinate's `utils.wait_any`)."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, seconds: float) -> bool:
    """Until one of `events` is set, or `seconds` pass; True when an event was set."""
    if any(event.is_set() for event in events):
        return True
    if len(events) == 1:  # the common case, without a task per waiter
        try:
            await asyncio.wait_for(events[0].wait(), max(0.0, seconds))
        except TimeoutError:
            return False
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)
