"""Kafka clients while the broker is away: failed metadata updates back off instead of spinning."""

from __future__ import annotations

import time

import pytest
from aiokafka.client import AIOKafkaClient

from infra import local
from streams.connections import back_off_failed_metadata_updates

#: the clients' retry backoff in these tests (aiokafka's default is 100 ms)
BACKOFF_MS = 200


async def updates_within(seconds: float, client: AIOKafkaClient) -> int:
    """How many metadata updates the client makes in ``seconds``, asking again as soon as one returns."""
    started = time.monotonic()
    updates = 0
    while time.monotonic() - started < seconds:
        assert await client._metadata_update(client.cluster, []) is False  # nobody to ask
        updates += 1
    return updates


@pytest.mark.parametrize("calls", [1, 2])
async def test_failed_metadata_updates_come_a_backoff_apart(calls: int) -> None:
    """With no broker listening, each failed update waits retry_backoff_ms (installing twice wraps once)."""
    for _ in range(calls):
        back_off_failed_metadata_updates()
    client = AIOKafkaClient(bootstrap_servers=f"{local.LOOPBACK}:{local.free_port()}", retry_backoff_ms=BACKOFF_MS)
    try:
        updates = await updates_within(1.0, client)
    finally:
        await client.close()
    # 1 s / 200 ms: five updates, six at most with the one started just before the end; without the
    # backoff aiokafka made tens of thousands here
    assert 4 <= updates <= 6
