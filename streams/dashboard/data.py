"""Reading the Redis layout of SPEC sections 6 and 7 for the dashboard (no writes)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import redis.asyncio as aioredis

from metrics.catalog import ALL_STORES, MAP, METRIC_KINDS, METRIC_NAMES
from streams.sinks.redis_sink import STORES_KEY, metric_key, parse_redis_field
from streams.sinks.snapshots import COHORTS, snapshot_payload

ALERTS_KEY = "loyalty:alerts"  #: the alerts stream, and the channel of the same name (SPEC 7)
#: metrics with a number (or null) as value: every one but the ``cac_by_channel`` map
NUMERIC_METRICS: tuple[str, ...] = tuple(name for name in METRIC_NAMES if METRIC_KINDS[name] != MAP)
#: entries read per XRANGE call when reading a whole history stream
HISTORY_PAGE = 2_000


def text(raw: bytes | str | None) -> str:
    """A Redis reply as text (clients may or may not decode)."""
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else raw


async def list_stores(client: aioredis.Redis) -> list[str]:
    """``*`` first, then every store id of ``loyalty:stores``, sorted."""
    members = {text(m) for m in await client.smembers(STORES_KEY)}
    members.discard(ALL_STORES)
    return [ALL_STORES, *sorted(members)]


def hash_metrics(fields: dict[str, str]) -> dict[str, object]:
    """The metrics of a snapshot hash (Decimal, None, or a dict for maps), in catalogue order, unknown names last."""
    names = [n for n in METRIC_NAMES if n in fields] + sorted(
        n for n in fields if n not in METRIC_KINDS and n not in ("as_of_ms", "currency")
    )
    metrics: dict[str, object] = {}
    for name in names:
        try:
            metrics[name] = parse_redis_field(name, fields[name])
        except (ArithmeticError, ValueError):  # a field this version cannot read: null rather than a 500
            metrics[name] = None
    return metrics


async def read_hash(client: aioredis.Redis, store: str, window: str) -> dict[str, str]:
    """The snapshot hash of a store and window as text (empty when there is none)."""
    raw = await client.hgetall(metric_key(store, window))
    return {text(k): text(v) for k, v in raw.items()}


def payload_from_hash(store: str, window: str, fields: dict[str, str]) -> dict[str, Any]:
    """The ``loyalty.metrics.v1`` snapshot (SPEC 6) of a hash; money stays exact (Decimal)."""
    currency = fields.get("currency") or None
    return snapshot_payload(store, window, int(fields["as_of_ms"]), currency, hash_metrics(fields))


async def read_cohorts(client: aioredis.Redis, store: str) -> bytes | None:
    """The JSON of a store's ``loyalty.cohorts.v1`` matrix as the worker wrote it (``None``: none yet)."""
    raw = await client.hget(metric_key(store, COHORTS), "json")
    if raw is None:
        return None
    return raw if isinstance(raw, bytes) else raw.encode()


async def read_history(client: aioredis.Redis, store: str, window: str) -> list[dict[str, Any]]:
    """Every snapshot of the history stream, oldest first, one per ``as_of_ms`` (the last written wins)."""
    key = metric_key(store, window) + ":history"
    by_as_of: dict[int, dict[str, Any]] = {}
    start = "-"
    while True:
        entries: list[Any] = await client.xrange(key, min=start, max="+", count=HISTORY_PAGE) or []
        for _entry_id, fields in entries:
            raw = (fields or {}).get(b"json", (fields or {}).get("json"))
            if raw is None:
                continue
            try:
                snapshot = orjson.loads(raw)
                by_as_of[int(snapshot["as_of_ms"])] = snapshot
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a foreign entry is skipped, not fatal to the whole chart
        if len(entries) < HISTORY_PAGE:
            break
        start = "(" + text(entries[-1][0])
    return [by_as_of[t] for t in sorted(by_as_of)]


def metric_value(snapshot: dict[str, Any], name: str) -> float | int | None:
    """A numeric metric of a history snapshot, None when null or absent."""
    value = snapshot.get("metrics", {}).get(name)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def series(history: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Columns for the charts: ``{"as_of_ms": [...], "values": {name: [...]}}``."""
    return {
        "as_of_ms": [int(s["as_of_ms"]) for s in history],
        "values": {name: [metric_value(s, name) for s in history] for name in names},
    }


async def read_alerts(client: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    """The latest ``count`` alerts of the ``loyalty:alerts`` stream, oldest first."""
    entries: list[Any] = await client.xrevrange(ALERTS_KEY, count=count) or []
    alerts = []
    for _entry_id, fields in reversed(entries):
        raw = (fields or {}).get(b"json", (fields or {}).get("json"))
        try:
            alert = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(alert, dict):
            alerts.append(alert)
    return alerts


def as_float(value: object) -> float | None:
    """A metric value as a float for Prometheus, None when it has no number."""
    if isinstance(value, Decimal | int | float) and not isinstance(value, bool):
        return float(value)
    return None
