"""One Redis pub/sub subscription fanned out to every browser (server-sent events).

However many pages are open, the dashboard holds ONE subscription to ``loyalty:updates`` and
``loyalty:alerts``: each message is parsed once, framed once as an SSE event, and put on the
queue of every client that wants it (a snapshot goes to the clients of its store and window, an
alert to all). When Redis goes away the hub tells the clients (``status``), retries with a
growing delay (capped, with jitter), and after it is back tells them to ``resync``: messages
published meanwhile are lost with pub/sub, so the pages read the current state again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from streams.connections import RedisTarget, async_redis
from streams.dashboard.data import ALERTS_KEY
from streams.logs import get_logger
from streams.sinks.redis_sink import UPDATES_CHANNEL
from streams.sinks.snapshots import COHORTS_SCHEMA

log = get_logger(__name__)

CHANNELS = (UPDATES_CHANNEL, ALERTS_KEY)
#: frames a client may have waiting; a client this far behind is dropped (its browser reconnects and resyncs)
CLIENT_QUEUE = 512


def sse_frame(event: str, data: bytes) -> bytes:
    """One server-sent event; ``data`` is one line of JSON.

    >>> sse_frame("alert", b'{"a":1}')
    b'event: alert\\ndata: {"a":1}\\n\\n'
    """
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def one_line(data: bytes) -> bytes:
    """JSON on one line (an SSE ``data:`` field ends at a line break), re-encoded only when needed."""
    if b"\n" not in data and b"\r" not in data:
        return data
    return orjson.dumps(orjson.loads(data))


def backoff_delays(first: float, cap: float, rng: Callable[[], float] = random.random) -> Any:
    """Delays between reconnection attempts: doubling from ``first`` up to ``cap``, each with up to 25% jitter.

    >>> gen = backoff_delays(0.5, 4.0, rng=lambda: 0.0)
    >>> [next(gen) for _ in range(6)]
    [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    """
    delay = first
    while True:
        yield delay * (1 + 0.25 * rng())
        delay = min(cap, delay * 2)


@dataclass(eq=False)
class Client:
    """One browser's stream: the snapshots of one store and window, the store's cohort matrix, and every alert."""

    store: str
    window: str
    queue: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(CLIENT_QUEUE))
    dropped: bool = False


class Hub:
    """The shared subscription and its clients; :meth:`run` is the subscription's task."""

    def __init__(
        self,
        redis: RedisTarget,
        *,
        first_backoff: float = 0.25,
        max_backoff: float = 10.0,
        health_check_interval: float = 5.0,
    ) -> None:
        self.redis = redis
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.health_check_interval = health_check_interval
        self.clients: set[Client] = set()
        self.connected = asyncio.Event()
        self.connections = 0  #: successful subscriptions so far (a reconnection makes it 2, 3, ...)
        self.messages = 0
        self._stopping = False

    # -- clients ---------------------------------------------------------------------------

    def add(self, store: str, window: str) -> Client:
        client = Client(store, window)
        self.clients.add(client)
        return client

    def remove(self, client: Client) -> None:
        self.clients.discard(client)

    def status_frame(self) -> bytes:
        return sse_frame("status", orjson.dumps({"redis": "up" if self.connected.is_set() else "down"}))

    def _send(self, client: Client, frame: bytes | None) -> None:
        if client.dropped:
            return
        try:
            client.queue.put_nowait(frame)
        except asyncio.QueueFull:
            # a stuck browser must not grow memory or slow the others: end its stream, it reconnects
            client.dropped = True
            self.clients.discard(client)
            with contextlib.suppress(asyncio.QueueEmpty):
                client.queue.get_nowait()
            client.queue.put_nowait(None)

    def broadcast(self, frame: bytes) -> None:
        for client in list(self.clients):
            self._send(client, frame)

    def dispatch(self, channel: str, data: bytes) -> None:
        """Frame one pub/sub message and queue it for the clients that want it."""
        self.messages += 1
        if channel == ALERTS_KEY:
            try:
                self.broadcast(sse_frame("alert", one_line(data)))
            except orjson.JSONDecodeError:
                log.warning("dashboard.bad_alert", size=len(data))
            return
        try:
            snapshot = orjson.loads(data)
            store = snapshot["store_id"]
            # a cohort matrix goes to every page of its store, a snapshot to those of its window too
            window = None if snapshot.get("schema") == COHORTS_SCHEMA else snapshot["window"]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            log.warning("dashboard.bad_update", size=len(data))
            return
        frame = sse_frame("snapshot" if window is not None else "cohorts", one_line(data))
        for client in list(self.clients):
            if client.store == store and (window is None or client.window == window):
                self._send(client, frame)

    # -- the subscription ------------------------------------------------------------------

    async def run(self) -> None:
        """Subscribe, dispatch, and on any Redis failure reconnect with backoff; until cancelled."""
        delays = backoff_delays(self.first_backoff, self.max_backoff)
        while not self._stopping:
            # no socket timeout: the subscription waits for messages; the health checks find a dead connection
            client = async_redis(self.redis, timeout=None, health_check_interval=self.health_check_interval)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*CHANNELS)
                self.connections += 1
                self.connected.set()
                delays = backoff_delays(self.first_backoff, self.max_backoff)
                log.info("dashboard.subscribed", channels=list(CHANNELS), connection=self.connections)
                self.broadcast(self.status_frame())
                if self.connections > 1:  # what was published while we were away is lost: pages read again
                    self.broadcast(sse_frame("resync", b"{}"))
                while True:
                    message = await pubsub.get_message(timeout=self.health_check_interval)
                    if message is None or message.get("type") != "message":
                        continue
                    channel = message["channel"]
                    self.dispatch(channel.decode() if isinstance(channel, bytes) else channel, message["data"])
            except asyncio.CancelledError:
                raise
            except (aioredis.RedisError, OSError) as exc:
                was_connected = self.connected.is_set()
                self.connected.clear()
                if was_connected:
                    self.broadcast(self.status_frame())
                delay = next(delays)
                log.warning("dashboard.redis_unavailable", error=str(exc) or type(exc).__name__, retry_in_s=delay)
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()

    def close(self) -> None:
        """End every client's stream (the server is shutting down)."""
        self._stopping = True
        for client in list(self.clients):
            client.dropped = True
            with contextlib.suppress(asyncio.QueueFull):
                client.queue.put_nowait(None)
        self.clients.clear()
