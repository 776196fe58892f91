"""Restarting a task that reads Kafka: a failure (Kafka away, a broker restart) does not stop the worker.

The task starts again after a delay that doubles from :data:`RESTART_FIRST_S` up to
:data:`RESTART_MAX_S`, and starts over from the first delay when the failed attempt had been
running longer than the longest delay (it had been running well).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from streams.logs import get_logger

log = get_logger(__name__)

#: the first and the longest wait before a task starts again after a failure
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0


async def run_restarting(
    attempt: Callable[[], Awaitable[None]],
    event: str,
    on_failure: Callable[[], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Await ``attempt()`` until it returns; after a failure, call ``on_failure``, log ``event`` and wait.

    Cancellation is never caught: it stops the task.
    """
    delay_s = 0.0
    while True:
        started = clock()
        try:
            await attempt()
            return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if clock() - started > RESTART_MAX_S:
                delay_s = 0.0
            delay_s = min(RESTART_MAX_S, max(RESTART_FIRST_S, 2 * delay_s))
            if on_failure is not None:
                on_failure()
            log.warning(event, error=str(error) or type(error).__name__, retry_in_s=delay_s)
            await sleep(delay_s)
