"""The alert webhook (``LOYALTY_ALERT_WEBHOOK``): HTTP POSTs from a background task, never in the pipeline's way.

Alerts wait in a bounded in-memory queue (the oldest is dropped when it is full, and counted
as ``webhook_dropped``); one task posts them in order, each with a timeout and a few retries
with exponential backoff. Every failed attempt counts ``webhook_failures``, an alert given up
after the last attempt ``webhook_gave_up``, a delivered one ``webhook_sent`` (health counters).
The queue is memory only: the alerts themselves are durable in the ``loyalty-alerts`` topic
and the Redis stream; the webhook is a notification. The URL may hold a token: it is never logged.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Literal

import aiohttp
import orjson

from streams.logs import get_logger
from streams.sinks.health import HealthCounters

log = get_logger(__name__)

#: alerts waiting for the webhook, at most
QUEUE_SIZE = 1000
#: seconds one POST may take, attempts per alert, and the backoff between attempts
TIMEOUT_S = 5.0
ATTEMPTS = 5
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0


def slack_text(alert: dict[str, Any]) -> str:
    """The alert as a line of Slack text, with Slack's control characters escaped (store ids are data).

    >>> slack_text({"state": "firing", "kind": "churn_spike", "store_id": "<!here>", "message": "a & b"})
    'churn_spike firing for store &lt;!here&gt;: a &amp; b'
    """
    text = f"{alert['kind']} {alert['state']} for store {alert['store_id']}: {alert['message']}"
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_body(alert: dict[str, Any], body_format: Literal["json", "slack"]) -> bytes:
    """The POST body: the alert's JSON, or Slack's ``{"text": ...}``."""
    if body_format == "slack":
        return orjson.dumps({"text": slack_text(alert)})
    return orjson.dumps(alert)


class Webhook:
    """Posts alerts to one URL from a background task (:meth:`run`); :meth:`submit` never waits."""

    def __init__(self, url: str, body_format: Literal["json", "slack"], health: HealthCounters, *,
                 queue_size: int = QUEUE_SIZE, timeout_s: float = TIMEOUT_S, attempts: int = ATTEMPTS,
                 first_delay_s: float = FIRST_DELAY_S, max_delay_s: float = MAX_DELAY_S) -> None:
        self.url = url
        self.body_format = body_format
        self.health = health
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self._ready = asyncio.Event()

    def submit(self, alert: dict[str, Any]) -> None:
        """Queue an alert for the webhook (the oldest waiting one is dropped when the queue is full)."""
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.health.count("webhook_dropped")
        self.queue.append(alert)
        self._ready.set()

    async def run(self) -> None:
        """Post the queued alerts until cancelled."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if not self.queue:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                alert = self.queue[0]
                delivered = await self._deliver(session, alert)
                if self.queue and self.queue[0] is alert:
                    self.queue.popleft()
                self.health.count("webhook_sent" if delivered else "webhook_gave_up")

    async def _deliver(self, session: aiohttp.ClientSession, alert: dict[str, Any]) -> bool:
        body = webhook_body(alert, self.body_format)
        delay = self.first_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                async with session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as reply:
                    if reply.status < 300:
                        return True
                    error = f"HTTP {reply.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__
            self.health.count("webhook_failures")
            log.warning("webhook.failed", alert_id=alert.get("alert_id"), attempt=attempt, error=error)
            if attempt < self.attempts:
                await asyncio.sleep(delay)
                delay = min(self.max_delay_s, 2 * delay)
        return False
