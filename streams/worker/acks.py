"""Waiting for Kafka's acknowledgements of sends, which a stopping agent must not cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def acknowledged(futures: Iterable[asyncio.Future[Any]], return_exceptions: bool = False) -> list[Any]:
    """Wait for sends' acknowledgements without cancelling them if the waiter is cancelled (a stopping agent).

    ``asyncio.gather`` cancels what it waits for when it is cancelled itself: a send future
    cancelled at shutdown made Faust's own done-callback (``Topic._on_published``) raise
    ``CancelledError``, logged as an error. The sends stay in the producer's hands, which flushes
    or fails them as it stops.
    """
    return await asyncio.gather(*(asyncio.shield(future) for future in futures), return_exceptions=return_exceptions)
