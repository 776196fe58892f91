"""``loyalty demo``: a worker and simulated live traffic, with a live table of the headline metrics.

The ``demo`` command (``streams.cli``) first runs ``loyalty up``; then :func:`run_demo`
starts one worker subprocess (``loyalty worker``, its output in
``<LOYALTY_STATE_DIR>/demo/worker.log``), publishes a short history (the ``backfill``, so
that windows have a past and ``churn_rate`` is defined at once) and then live traffic
with :func:`streams.tools.simulate.run_simulation`, and redraws a rich table of
``customers_end``, ``churn_rate``, ``nps``, ``repeat_purchase_rate``, ``gross_revenue`` and
``as_of`` per store, read from Redis every second, with the latest alerts of the Redis stream
``loyalty:alerts`` under it; it also starts ``loyalty dashboard``
(``<LOYALTY_STATE_DIR>/demo/dashboard.log``) and prints its URL. Ctrl-C (SIGINT) or SIGTERM stops the
simulator (buffered events are still sent) and the worker; the command then stops the
Kafka and Redis it started itself (and nothing else).

The demo's worker runs the alert detectors on a demo's time scale (:data:`DEMO_ALERTS`: the
1h window sampled every minute, a 10-minute half-life, a 20-minute warm-up), so an injected
``--churn-spike`` fires within minutes rather than after the defaults' three days of warm-up;
any ``LOYALTY_ALERT_*`` the user set (environment or ``.env``) wins. The backfill (3 hours
before now by default) is sent at the live rate, 500 events per message: a baseline learnt
on a sparser past would see every store's 1h churn rate climb as live traffic fills the
window, and fire for all of them. Its first hour is the stores' growth, the next two let the
baselines settle on traffic like the live one. ``tests/test_demo.py`` runs these settings over
the demo's traffic plan in process: with the default 200 customers per event/s of ``--rate``,
``--churn-spike 4m:20`` fires for its store within minutes and the quiet stores never.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka.errors import KafkaError
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from infra import local
from streams.connections import async_redis, redis_failure
from streams.dashboard.server import dashboard_url
from streams.settings import Settings
from streams.sinks.redis_sink import ALERTS_KEY, metric_key, parse_redis_field, read_health
from streams.sinks.snapshots import rfc3339_ms
from streams.tools.simulate import SimulationError, SimulationOptions, SimulationStats, run_simulation
from streams.worker.topics import ensure_input_topics

HEADLINE = ("customers_end", "churn_rate", "nps", "repeat_purchase_rate", "gross_revenue")
COLUMNS = ("customers", "churn %", "NPS", "repeat %", "gross revenue")  # short labels: fits 80 columns
ALL_STORES = "*"
REFRESH_S = 1.0
WORKER_STOP_TIMEOUT_S = 30.0
#: alerts shown under the table, newest first
ALERTS_SHOWN = 5
#: the demo worker's alert settings (setting field -> variable, value), unless the user set them
DEMO_ALERTS = {
    "alert_window": ("LOYALTY_ALERT_WINDOW", "1h"),
    "alert_step_ms": ("LOYALTY_ALERT_STEP", "1m"),
    "alert_warmup_ms": ("LOYALTY_ALERT_WARMUP", "20m"),
    "alert_half_life_ms": ("LOYALTY_ALERT_HALF_LIFE", "10m"),
    "alert_cooldown_ms": ("LOYALTY_ALERT_COOLDOWN", "10m"),
    "alert_grace_ms": ("LOYALTY_ALERT_GRACE", "1m"),
    "alert_min_churned": ("LOYALTY_ALERT_MIN_CHURNED", "5"),
}


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs: the simulator's options (live), the window shown, an optional time limit."""

    simulation: SimulationOptions
    window: str
    duration_s: float | None = None


def worker_command() -> list[str]:
    """``loyalty worker`` with this Python."""
    return [sys.executable, "-m", "streams.cli", "worker"]


def demo_alert_env(settings: Settings) -> dict[str, str]:
    """The environment variables of :data:`DEMO_ALERTS` that the user did not set.

    >>> from streams.settings import Settings
    >>> env = demo_alert_env(Settings(LOYALTY_ALERT_STEP="5m"))
    >>> env["LOYALTY_ALERT_WINDOW"], "LOYALTY_ALERT_STEP" in env
    ('1h', False)
    """
    if settings.alert_window not in settings.windows and settings.is_set("alert_window"):
        return {}
    return {variable: value for field, (variable, value) in DEMO_ALERTS.items() if not settings.is_set(field)}


def start_worker(log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """One worker in its own session (the terminal's Ctrl-C reaches the demo only), logging to ``log_path``.

    ``env`` adds to this process's environment. On Linux it also gets SIGTERM if the demo dies
    without cleaning up.
    """
    return _start(worker_command(), log_path, env)


def dashboard_command() -> list[str]:
    """``loyalty dashboard`` with this Python."""
    return [sys.executable, "-m", "streams.cli", "dashboard"]


def start_dashboard(log_path: Path) -> subprocess.Popen[bytes]:
    """``loyalty dashboard`` beside the worker, the same way (own session, log file, dies with the demo)."""
    return _start(dashboard_command(), log_path)


def _start(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # the same guard `loyalty up` gives test sessions
            preexec_fn=local.exit_with_parent,
        )


def _bind_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def stop_worker(proc: subprocess.Popen[Any], timeout: float = WORKER_STOP_TIMEOUT_S) -> int:
    """SIGTERM (Faust shuts down cleanly), then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


async def read_headlines(client: aioredis.Redis, stores: list[str], window: str) -> dict[str, dict[str, Any]]:
    """The headline metrics, ``as_of_ms`` and ``currency`` of each store that has a snapshot in Redis."""
    fields = [*HEADLINE, "as_of_ms", "currency"]
    async with client.pipeline(transaction=False) as pipe:
        for store in stores:
            pipe.hmget(metric_key(store, window), fields)
        replies = await pipe.execute()
    out: dict[str, dict[str, Any]] = {}
    for store, values in zip(stores, replies, strict=True):
        if values[len(HEADLINE)] is None:
            continue
        row: dict[str, Any] = {}
        for name, raw in zip(fields, values, strict=True):
            text = raw.decode() if isinstance(raw, bytes) else (raw or "")
            if name == "currency":
                row[name] = text or None
            elif name == "as_of_ms":
                row[name] = int(text)
            else:
                row[name] = parse_redis_field(name, text)
        out[store] = row
    return out


async def read_alerts(client: aioredis.Redis, count: int = ALERTS_SHOWN) -> list[dict[str, Any]]:
    """The newest ``count`` alerts of the Redis stream ``loyalty:alerts``, newest first."""
    entries: Any = await client.xrevrange(ALERTS_KEY, count=count)
    alerts = []
    for _, fields in entries:
        raw = fields.get(b"json", fields.get("json"))
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            alerts.append(orjson.loads(raw))
    return alerts


def _number(value: object, digits: int, suffix: str = "") -> str:
    if value is None:
        return "-"
    assert isinstance(value, Decimal | int | float)
    return f"{Decimal(value):,.{digits}f}{suffix}"


def render(
    headlines: dict[str, dict[str, Any]],
    stores: list[str],
    window: str,
    status: str,
    now_ms: int,
    alerts: list[dict[str, Any]] | None = None,
) -> Group:
    """The table of the headline metrics per store, the latest alerts and a status line under it.

    >>> import io
    >>> from rich.console import Console
    >>> console = Console(width=120, record=True, file=io.StringIO())
    >>> console.print(render({"store-1": {"customers_end": Decimal(12), "churn_rate": Decimal("2.5"),
    ...     "nps": None, "repeat_purchase_rate": Decimal(40), "gross_revenue": Decimal("99.5"),
    ...     "as_of_ms": 1_700_000_000_000, "currency": "EUR"}}, ["store-1", "store-2"], "1h", "ok",
    ...     1_700_000_002_000))
    >>> text = console.export_text()
    >>> "2.50%" in text and "99.50 EUR" in text and "waiting" in text and "22:13:20 2s" in text
    True
    >>> alert = {"state": "firing", "kind": "churn_spike", "store_id": "[b]s1", "as_of_ms": 1_700_000_000_000,
    ...          "message": "churn_rate 9.00% in 1h is above the threshold 3.10%"}
    >>> console.print(render({}, ["s1"], "1h", "ok", 1_700_000_002_000, [alert]))
    >>> text = console.export_text()
    >>> "FIRING" in text and "churn_spike [b]s1 22:13:20: churn_rate 9.00% in 1h is above" in text
    True
    """
    table = Table(
        title=f"loyalty metrics, window {window}, from Redis every {REFRESH_S:g}s",
        caption="customers_end, churn_rate, nps, repeat_purchase_rate, gross_revenue; as_of UTC and age",
        title_justify="left",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    table.add_column("store", no_wrap=True)
    for label in COLUMNS:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("as of", no_wrap=True)
    for store in stores:
        row = headlines.get(store)
        if row is None:
            table.add_row(Text(store), *(["-"] * len(HEADLINE)), Text("waiting", style="dim"))
            continue
        age = max(0, now_ms - row["as_of_ms"]) / 1000
        revenue = _number(row["gross_revenue"], 2)
        if row["gross_revenue"] is not None and row["currency"]:
            revenue += f" {row['currency']}"
        table.add_row(
            Text(store),  # data, not rich markup
            _number(row["customers_end"], 0),
            _number(row["churn_rate"], 2, "%"),
            _number(row["nps"], 1),
            _number(row["repeat_purchase_rate"], 1, "%"),
            revenue,
            f"{rfc3339_ms(row['as_of_ms'])[11:19]} {age:,.0f}s",
        )
    parts: list[Any] = [table]
    if alerts:
        lines = Text("latest alerts (loyalty alerts --follow):\n", style="bold")
        for alert in alerts:
            firing = alert.get("state") == "firing"
            lines.append(f"{str(alert.get('state', '')).upper():<9}", style="bold red" if firing else "green")
            lines.append(f"{alert.get('kind', '')} {alert.get('store_id', '')} "
                         f"{rfc3339_ms(int(alert.get('as_of_ms', 0)))[11:19]}: {alert.get('message', '')}\n")
        parts.append(lines)
    parts.append(Text(status, style="cyan"))
    return Group(*parts)


def _status_line(stats: SimulationStats | None, rate: float, worker: subprocess.Popen[bytes],
                 health: dict[str, int], log_path: Path) -> str:
    sent = f"{stats.delivered:,} events sent ({stats.phase}), {rate:,.0f} events/s" if stats else "simulator starting"
    worker_state = f"worker pid {worker.pid} running" if worker.poll() is None else "worker exited"
    counts = ", ".join(f"{name.replace('_', ' ')} {health.get(name, 0):,}"
                       for name in ("events_applied", "duplicates", "dead_letters"))
    return f"simulator: {sent} | {worker_state} ({log_path}) | {counts} | Ctrl-C stops"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def _show(
    settings: Settings, options: DemoOptions, worker: subprocess.Popen[bytes], console: Console, log_path: Path
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    latest: list[SimulationStats] = []
    samples: list[tuple[float, int]] = []

    def on_progress(stats: SimulationStats) -> None:
        latest[:] = [stats]

    simulation = asyncio.create_task(run_simulation(settings, options.simulation, on_progress, stop))
    stores = [f"store-{index + 1}" for index in range(options.simulation.stores)] + [ALL_STORES]
    client = async_redis(settings, timeout=5)
    baseline: dict[str, int] | None = None
    failure = ""
    deadline = time.monotonic() + options.duration_s if options.duration_s else None
    try:
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                now = time.monotonic()
                stats = latest[0] if latest else None
                samples.append((now, stats.delivered if stats else 0))
                del samples[:-6]
                span = samples[-1][0] - samples[0][0]
                rate = (samples[-1][1] - samples[0][1]) / span if span > 0 else 0.0
                try:
                    headlines = await read_headlines(client, stores, options.window)
                    alerts = await read_alerts(client)
                    health = await read_health(client)
                    if baseline is None:
                        baseline = health
                    health = {name: count - baseline.get(name, 0) for name, count in health.items()}
                    status = _status_line(stats, rate, worker, health, log_path)
                except (aioredis.RedisError, OSError) as exc:
                    headlines, alerts, status = {}, [], redis_failure(settings, exc)
                live.update(render(headlines, stores, options.window, status, int(time.time() * 1000), alerts),
                            refresh=True)
                if stop.is_set():
                    break
                if worker.poll() is not None:
                    failure = f"the worker exited with code {worker.returncode}; the end of {log_path}:\n"
                    failure += _tail(log_path)
                    break
                if simulation.done() and simulation.exception() is not None:
                    break
                if deadline is not None and now >= deadline:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=REFRESH_S)
        if not console.is_terminal:
            console.line()  # the last frame is printed without a line end
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await client.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    try:
        stats = await simulation
    except SimulationError as exc:
        console.print(f"simulator: {exc}", style="red", markup=False, highlight=False)
        return 1
    console.print(f"simulator stopped: {stats.delivered:,} events sent in {stats.seconds:.0f}s, seed {stats.seed}")
    if failure:
        console.print(failure, style="red", markup=False, highlight=False, soft_wrap=True)
        return 1
    return 0


def run_demo(settings: Settings, options: DemoOptions, console: Console | None = None) -> int:
    """Start the worker, simulate and show the table until Ctrl-C (or ``duration_s``); 0 on a clean stop.

    The worker is always stopped before this returns. Kafka and Redis are the caller's business.
    """
    console = console or Console()
    log_path = settings.state_dir / "demo" / "worker.log"
    try:  # before the worker starts: it then finds its input topics at its first assignment
        asyncio.run(ensure_input_topics(settings))
    except (KafkaError, OSError) as exc:
        console.print(f"cannot reach Kafka at {settings.kafka_bootstrap_servers}: {exc}", style="red", markup=False)
        return 1
    alert_env = demo_alert_env(settings)
    worker = start_worker(log_path, alert_env)
    console.print(f"worker started (pid {worker.pid}), log: {log_path}")
    if alert_env:
        console.print("alerts on the demo's time scale: " + " ".join(f"{k}={v}" for k, v in alert_env.items()),
                      markup=False, highlight=False)
    dashboard_log = settings.state_dir / "demo" / "dashboard.log"
    dashboard: subprocess.Popen[bytes] | None = None
    if local.port_free(settings.dashboard_port, _bind_host(settings.dashboard_host)):
        dashboard = start_dashboard(dashboard_log)
        console.print(f"dashboard started (pid {dashboard.pid}): {dashboard_url(settings)}?window={options.window}"
                      f"  log: {dashboard_log}", markup=False, highlight=False)
    else:  # a dashboard (or something else) already serves that port: leave it be
        console.print(f"dashboard port {settings.dashboard_port} is taken (LOYALTY_DASHBOARD_PORT); not starting one; "
                      f"an already running dashboard is at {dashboard_url(settings)}", markup=False, highlight=False)
    try:
        return asyncio.run(_show(settings, options, worker, console, log_path))
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the worker
        try:
            if dashboard is not None:
                console.print("stopping the dashboard ...")
                stop_worker(dashboard)
            console.print("stopping the worker ...")
            code = stop_worker(worker)
            console.print(f"worker stopped (exit code {code})")
        finally:
            signal.signal(signal.SIGINT, previous)
