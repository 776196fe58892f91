"""The Faust agents of the product, registered on the app by :func:`register_pipeline`.

The metric pipeline (ingest -> by-store gate -> by-customer facts -> per-store aggregation ->
``loyalty-metrics`` + Redis) lives in :mod:`streams.topology`. The smoke agent here proves the
plumbing end to end (a real Kafka topic in, a real Redis write out) for ``tests/test_smoke.py``.

Smoke agent: topic ``{LOYALTY_TOPIC_PREFIX}loyalty-smoke``; each message is a JSON object
``{"key": str, "n": int}``; it runs ``INCRBY loyalty:smoke:{key} n`` on ``REDIS_URL``.
"""

from __future__ import annotations

from typing import Any

import faust
import orjson
import redis.asyncio as aioredis

from streams.logging import get_logger
from streams.settings import Settings

SMOKE_TOPIC = "loyalty-smoke"
SMOKE_KEY = "loyalty:smoke:{key}"

log = get_logger(__name__)


def register_pipeline(app: faust.App, settings: Settings) -> None:
    """Register every agent, table and timer of the product on ``app``."""
    from streams.topology import register_metrics_pipeline

    register_metrics_pipeline(app, settings)
    register_smoke(app, settings)


def parse_smoke(raw: bytes | str) -> tuple[str, int] | None:
    """``(key, n)`` of a smoke message, None when it is not one.

    >>> parse_smoke(b'{"key": "a", "n": 3}'), parse_smoke(b"nope"), parse_smoke(b'{"key": "a", "n": "x"}')
    (('a', 3), None, None)
    """
    try:
        event = orjson.loads(raw)
        key, n = event["key"], event["n"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(key, str | int) or isinstance(n, bool) or not isinstance(n, int):
        return None
    return str(key), n


def register_smoke(app: faust.App, settings: Settings) -> None:
    """The smoke agent: Kafka topic ``loyalty-smoke`` in, ``INCRBY`` in Redis out."""
    # internal=True: the worker creates the topic at start (LOYALTY_PARTITIONS partitions) if missing.
    topic = app.topic(settings.topic(SMOKE_TOPIC), key_serializer="raw", value_serializer="raw", internal=True)

    @app.agent(topic, name="loyalty-smoke")
    async def smoke(stream: faust.StreamT[Any]) -> None:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            async for raw in stream:
                parsed = parse_smoke(raw)
                if parsed is None:
                    log.warning("smoke.bad_message", value=repr(raw)[:200])
                    continue
                key, n = parsed
                total = await client.incrby(SMOKE_KEY.format(key=key), n)
                log.debug("smoke.applied", key=key, n=n, total=total)
        finally:
            await client.aclose()
