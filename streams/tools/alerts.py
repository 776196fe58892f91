"""``loyalty alerts``: the recent alerts of the Redis stream ``loyalty:alerts`` as a table or JSON, and ``--follow``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import redis
from rich.table import Table
from rich.text import Text

from streams.connections import RedisTarget, redis_failure, sync_redis
from streams.sinks.redis_sink import ALERTS_KEY
from streams.tools.snapshot import SnapshotUnavailable

#: how long one XREAD of ``--follow`` blocks (ms) before it asks again
FOLLOW_BLOCK_MS = 5_000


def _decode(entries: Sequence[Any], store: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(stream id, alert) of stream entries, unreadable ones skipped, only ``store``'s when given."""
    alerts = []
    for entry_id, fields in entries:
        raw = fields.get("json")
        try:
            alert = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            continue
        if isinstance(alert, dict) and (store is None or alert.get("store_id") == store):
            alerts.append((str(entry_id), alert))
    return alerts


def _client(target: RedisTarget) -> redis.Redis:
    return sync_redis(target, decode_responses=True, connect_timeout=5, timeout=(FOLLOW_BLOCK_MS / 1000) + 10)


def read_recent(target: RedisTarget, count: int, store: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The latest ``count`` alerts (of ``store`` when given), oldest first, with their stream ids.

    With a store, up to 20 times ``count`` entries are scanned to find ``count`` of it.
    Raises :class:`SnapshotUnavailable` when Redis cannot be reached.
    """
    client = _client(target)
    try:
        entries: list[Any] = client.xrevrange(ALERTS_KEY, count=count if store is None else 20 * count) or []
    except redis.RedisError as exc:
        raise SnapshotUnavailable(redis_failure(target, exc)) from None
    finally:
        client.close()
    return _decode(entries[::-1], store)[-count:]


def follow(target: RedisTarget, after: str, store: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The alerts added after the stream id ``after``, as they come (XREAD BLOCK), until interrupted."""
    client = _client(target)
    try:
        while True:
            try:
                reply: Any = client.xread({ALERTS_KEY: after}, block=FOLLOW_BLOCK_MS, count=100)
            except redis.RedisError as exc:
                raise SnapshotUnavailable(redis_failure(target, exc)) from None
            for _, entries in reply or []:
                if entries:
                    after = str(entries[-1][0])
                yield from _decode(entries, store)
    finally:
        client.close()


def _number(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else ""


def render_table(alerts: Sequence[dict[str, Any]]) -> Table:
    """The alerts as a table; every cell is plain text (store ids and messages are data, never markup)."""
    table = Table(title="loyalty alerts", title_justify="left")
    for column in ("as of", "store", "window", "kind", "state", "observed", "threshold", "baseline", "alert id"):
        table.add_column(column, justify="right" if column in ("observed", "threshold", "baseline") else "left")
    for alert in alerts:
        state = str(alert.get("state", ""))
        table.add_row(
            Text(str(alert.get("as_of", ""))),
            Text(str(alert.get("store_id", ""))),
            Text(str(alert.get("window", ""))),
            Text(str(alert.get("kind", ""))),
            Text(state, style="bold red" if state == "firing" else "green"),
            Text(_number(alert.get("observed"))),
            Text(_number(alert.get("threshold"))),
            Text(_number(alert.get("baseline"))),
            Text(str(alert.get("alert_id", ""))),
        )
    return table


def alert_line(alert: dict[str, Any]) -> Text:
    """One alert as a line of plain text (for ``--follow``)."""
    state = str(alert.get("state", ""))
    line = Text(f"{alert.get('as_of', '')}  ")
    line.append(state, style="bold red" if state == "firing" else "green")
    line.append(f"  {alert.get('kind', '')}  store {alert.get('store_id', '')} ({alert.get('window', '')}): "
                f"{alert.get('message', '')}  [{alert.get('alert_id', '')}]")
    return line
