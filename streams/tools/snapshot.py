"""``loyalty snapshot``: the current metrics from Redis (SPEC section 6) as a table or as JSON.

:func:`read_snapshots` reads the hash ``loyalty:{store}:{window}`` of every store of
``loyalty:stores`` (plus ``*``, all stores) and every window, in one round trip.
Values stay exact: counts become ints, every other number a ``Decimal`` from the
hash's decimal string, ``""`` becomes ``None`` and ``cac_by_channel`` its JSON map.
:func:`snapshots_json` writes them with decimals as JSON numbers of the same digits;
:func:`render_table` formats them for people.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import orjson
import redis
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from metrics.catalog import ALL_STORES, COUNT, MAP, METRIC_KINDS, METRIC_NAMES
from streams.connections import RedisTarget, redis_failure, sync_redis
from streams.settings import redact_url
from streams.sinks.redis_sink import STORES_KEY, metric_key
from streams.sinks.snapshots import decimal_text

#: hash fields that are not metrics
META_FIELDS = ("as_of_ms", "currency")
#: the last metric of each group of SPEC section 5 (a line is drawn after it)
GROUP_ENDS = frozenset({"cli_responses", "reactivated_customers", "net_revenue_retention", "cac_by_channel"})
#: the columns of the compact layout, when every store and window do not fit side by side
HEADLINE_METRICS = (
    "nps", "csat", "customers_end", "new_customers", "retention_rate", "churn_rate", "orders",
    "net_revenue", "aov", "clv", "cac", "participation_rate",
)
NAME_WIDTH = 26
VALUE_WIDTH = 14
CENT = Decimal("0.01")

Snapshots = dict[str, dict[str, dict[str, Any]]]


class SnapshotUnavailable(Exception):
    """Redis cannot be reached or read (the message is for the operator)."""


def redact(url: str) -> str:
    """A Redis URL without its password (:func:`streams.settings.redact_url`).

    >>> redact("redis://user:secret@cache:6379/0"), redact("redis://localhost:6379/0")
    ('redis://user:***@cache:6379/0', 'redis://localhost:6379/0')
    """
    return redact_url(url)


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort ``store-2`` before ``store-10``; ``*`` first.

    >>> sorted(["store-10", "*", "store-2"], key=natural_key)
    ['*', 'store-2', 'store-10']
    """
    parts = re.split(r"(\d+)", text)
    return (text != ALL_STORES, *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def parse_value(name: str, text: str) -> object:
    """One hash field as an exact value.

    >>> parse_value("orders", "12"), parse_value("gross_revenue", "1234.50"), parse_value("nps", "")
    (12, Decimal('1234.50'), None)
    >>> parse_value("cac_by_channel", '{"ads":12.5,"email":null}')
    {'ads': Decimal('12.5'), 'email': None}
    """
    if text == "":
        return None
    if METRIC_KINDS.get(name) == MAP:
        return json.loads(text, parse_float=Decimal, parse_int=Decimal)
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text  # not a number: shown as written
    if not number.is_finite():
        return None
    if METRIC_KINDS.get(name) == COUNT and number == number.to_integral_value():
        return int(number)
    return number


def _metric_order(name: str) -> tuple[int, str]:
    return (METRIC_NAMES.index(name), "") if name in METRIC_KINDS else (len(METRIC_NAMES), name)


def _snapshot(fields: dict[str, str]) -> dict[str, Any]:
    as_of = fields.get("as_of_ms", "")
    metrics = {name: parse_value(name, fields[name]) for name in sorted(fields, key=_metric_order)
               if name not in META_FIELDS}
    return {
        "as_of_ms": int(as_of) if as_of.lstrip("-").isdigit() else None,
        "currency": fields.get("currency") or None,
        "metrics": metrics,
    }


def read_snapshots(target: RedisTarget, stores: Sequence[str] | None, windows: Sequence[str]) -> Snapshots:
    """``{store: {window: {"as_of_ms", "currency", "metrics"}}}`` of the hashes that exist.

    ``stores`` ``None`` means ``*`` and every store of ``loyalty:stores``. Stores and
    windows without a hash are left out (an empty dict when Redis holds nothing).
    Raises :class:`SnapshotUnavailable` when Redis cannot be reached.
    """
    client = sync_redis(target, decode_responses=True, connect_timeout=5, timeout=15)
    try:
        if stores is None:
            members = {str(member) for member in client.smembers(STORES_KEY)}
            stores = sorted({ALL_STORES, *members}, key=natural_key)
        combos = [(store, window) for store in stores for window in windows]
        pipe = client.pipeline(transaction=False)
        for store, window in combos:
            pipe.hgetall(metric_key(store, window))
        hashes = pipe.execute()
    except redis.RedisError as exc:
        raise SnapshotUnavailable(redis_failure(target, exc)) from None
    finally:
        client.close()
    out: Snapshots = {}
    for (store, window), fields in zip(combos, hashes, strict=True):
        if fields:
            out.setdefault(store, {})[window] = _snapshot(fields)
    return out


def _json_default(value: object) -> Any:
    if isinstance(value, Decimal):
        return orjson.Fragment(decimal_text(value).encode())
    raise TypeError(f"cannot serialise {type(value).__name__}")


def snapshots_json(snapshots: Snapshots, indent: bool = True) -> bytes:
    """The ``--json`` output: decimals are JSON numbers with their exact digits.

    >>> snapshots_json({"s": {"1h": {"as_of_ms": 5, "currency": None,
    ...     "metrics": {"orders": 3, "net_revenue": Decimal("1234.50")}}}}, indent=False)
    b'{"s":{"1h":{"as_of_ms":5,"currency":null,"metrics":{"orders":3,"net_revenue":1234.5}}}}'
    """
    option = orjson.OPT_INDENT_2 if indent else 0
    return orjson.dumps(snapshots, default=_json_default, option=option)


def format_value(name: str, value: object) -> str:
    """A metric for people: counts as ints, every other number with 2 decimals, null as ``-``.

    >>> format_value("orders", 1234), format_value("gross_revenue", Decimal("1234.5")), format_value("nps", None)
    ('1,234', '1,234.50', '-')
    >>> format_value("churn_rate", Decimal("12.345")), format_value("cac_by_channel", {"ads": Decimal("2")})
    ('12.35', 'ads 2.00')
    """
    if value is None:
        return "-"
    if isinstance(value, dict):
        if not value:
            return "-"
        return ", ".join(f"{key} {format_value('', item)}" for key, item in sorted(value.items()))
    if METRIC_KINDS.get(name) == COUNT and isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (int, float, Decimal)):
        try:
            return f"{Decimal(value).quantize(CENT, rounding=ROUND_HALF_UP):,.2f}"
        except InvalidOperation:
            return f"{value:,}"
    return str(value)


def store_label(store: str) -> str:
    """``*`` as people read it."""
    return "* (all stores)" if store == ALL_STORES else store


def _as_of_text(as_of_ms: int | None) -> str:
    if as_of_ms is None:
        return "-"
    return datetime.fromtimestamp(as_of_ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _combos(snapshots: Snapshots) -> list[tuple[str, str, dict[str, Any]]]:
    return [(store, window, snap) for store, by_window in snapshots.items() for window, snap in by_window.items()]


def _wide_table(snapshots: Snapshots) -> Table:
    combos = _combos(snapshots)
    table = Table(title="Loyalty metrics", header_style="bold", show_lines=False)
    table.add_column("metric", style="cyan", no_wrap=True, min_width=12)
    for store, window, _ in combos:
        # store ids are data: Text renders them literally (a store named "[/]" is not rich markup)
        table.add_column(Text(f"{store_label(store)}\n{window}"), justify="right")
    table.add_row("as of (UTC)", *(_as_of_text(snap["as_of_ms"]) for _, _, snap in combos), style="dim")
    table.add_row("currency", *(snap["currency"] or "-" for _, _, snap in combos), style="dim", end_section=True)
    names = sorted({name for _, _, snap in combos for name in snap["metrics"]}, key=_metric_order)
    for name in names:
        table.add_row(
            name,
            *(format_value(name, snap["metrics"].get(name)) for _, _, snap in combos),
            end_section=name in GROUP_ENDS,
        )
    return table


def _compact_table(snapshots: Snapshots, width: int) -> Table:
    combos = _combos(snapshots)
    room = max(2, (width - 30) // 11)
    metrics = HEADLINE_METRICS[:room]
    times = sorted(snap["as_of_ms"] for _, _, snap in combos if snap["as_of_ms"] is not None)
    as_of = _as_of_text(times[0]) if times else "-"
    if len(times) > 1 and times[0] != times[-1]:
        as_of += f" .. {_as_of_text(times[-1])}"
    table = Table(
        title=f"Loyalty metrics: {len(combos)} store/window snapshots (compact view)",
        caption=f"as of {as_of}; every metric: --store S (and --window W), or --json",
        header_style="bold",
    )
    table.add_column("store", style="cyan", no_wrap=True)
    table.add_column("window", no_wrap=True)
    for name in metrics:
        table.add_column(name, justify="right")
    previous = None
    for store, window, snap in combos:
        table.add_row(
            Text(store_label(store)) if store != previous else "",
            window,
            *(format_value(name, snap["metrics"].get(name)) for name in metrics),
        )
        previous = store
    return table


def render_table(snapshots: Snapshots, width: int = 120) -> RenderableType:
    """Rows are metrics and columns store/window when they fit in ``width``; else one row per store/window."""
    combos = _combos(snapshots)
    if NAME_WIDTH + len(combos) * VALUE_WIDTH <= max(width, NAME_WIDTH + VALUE_WIDTH):
        return _wide_table(snapshots)
    return _compact_table(snapshots, width)
