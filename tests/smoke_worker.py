"""A worker with one more agent, for ``test_smoke.py``: the plumbing end to end (Kafka topic in, Redis out).

Run as ``python tests/smoke_worker.py`` with the product's environment. The smoke agent reads
topic ``{LOYALTY_TOPIC_PREFIX}loyalty-smoke``, where each message is a JSON object
``{"key": str, "n": int}``, and runs ``INCRBY loyalty:smoke:{key} n`` on ``REDIS_URL``.
It is registered by the test, not by the product's worker.
"""

from __future__ import annotations

from typing import Any

import faust
import orjson
import redis.asyncio as aioredis

SMOKE_TOPIC = "loyalty-smoke"
SMOKE_KEY = "loyalty:smoke:{key}"


def parse_smoke(raw: bytes | str) -> tuple[str, int] | None:
    """``(key, n)`` of a smoke message, None when it is not one."""
    try:
        event = orjson.loads(raw)
        key, n = event["key"], event["n"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(key, str | int) or isinstance(n, bool) or not isinstance(n, int):
        return None
    return str(key), n


def register_smoke(app: faust.App, topic_name: str, redis_url: str) -> None:
    """The smoke agent: Kafka topic ``topic_name`` in, ``INCRBY`` in Redis out."""
    # internal=True: the worker creates the topic at start if missing
    topic = app.topic(topic_name, key_serializer="raw", value_serializer="raw", internal=True)

    @app.agent(topic, name="loyalty-smoke")
    async def smoke(stream: faust.StreamT[Any]) -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            async for raw in stream:
                parsed = parse_smoke(raw)
                if parsed is None:
                    continue
                key, n = parsed
                await client.incrby(SMOKE_KEY.format(key=key), n)
        finally:
            await client.aclose()


def main() -> None:
    from streams.settings import load_settings
    from streams.worker.run import run_worker

    settings = load_settings()
    run_worker(settings, lambda app: register_smoke(app, settings.topic(SMOKE_TOPIC), settings.redis_url))


if __name__ == "__main__":
    main()
