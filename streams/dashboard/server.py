"""The dashboard's aiohttp application: the page, its JSON API, server-sent events, ``/metrics``, ``/healthz``.

Routes (SPEC section 8):

- ``/`` the page (``?store=S&window=W``), ``/static/...`` its files (all served from here, no CDN);
- ``/events?store=S&window=W`` server-sent events: ``snapshot`` (that store and window), ``cohorts``
  (that store's cohort matrix), ``alert``,
  ``status`` (Redis up or down), ``resync`` (read the state again);
- ``/api/meta`` stores and windows; ``/api/snapshot`` the current ``loyalty.metrics.v1`` JSON;
  ``/api/history?metric=M`` ``[{"as_of_ms", "value"}]``; ``/api/series`` the page's chart columns;
  ``/api/alerts`` the recent alerts; ``/api/cohorts?store=S`` the store's ``loyalty.cohorts.v1`` matrix;
- ``/metrics`` Prometheus; ``/healthz`` 200 when Redis answers PING, else 503.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

from metrics.catalog import METRIC_NAMES
from streams.connections import async_redis
from streams.dashboard import prometheus
from streams.dashboard.data import (
    NUMERIC_METRICS,
    list_stores,
    metric_value,
    payload_from_hash,
    read_alerts,
    read_cohorts,
    read_hash,
    read_history,
    series,
)
from streams.dashboard.hub import Hub
from streams.logs import get_logger
from streams.settings import Settings
from streams.sinks.redis_sink import REDIS_TIMEOUT_S
from streams.sinks.snapshots import dumps

log = get_logger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
#: the metrics the page charts (cards, sparklines, the two charts), in one read of the history
PAGE_METRICS = (
    "nps", "nps_ci_low", "nps_ci_high", "nps_responses", "csat", "ces", "cli", "customers_end", "retention_rate",
    "churn_rate", "repeat_purchase_rate", "clv", "cac", "revenue_churn_rate", "net_revenue_retention",
    "participation_rate", "redemption_rate", "net_revenue",
)  # fmt: skip
HEARTBEAT_S = 15.0  #: an SSE comment this often keeps proxies from closing an idle stream
MAX_ALERTS = 200
MAX_STORE_ID = 256
#: the page may load only from this origin (a guard besides the vendored files)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", aioredis.Redis)
HUB = web.AppKey("hub", Hub)
HUB_TASK = web.AppKey("hub_task", asyncio.Task)


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class BadRequest(Exception):
    """A query parameter is missing or wrong: a 400 with this message."""


def _store(request: web.Request) -> str:
    store = request.query.get("store", "")
    if not store:
        raise BadRequest("the parameter store is required (a store id, or * for all stores)")
    if len(store) > MAX_STORE_ID:
        raise BadRequest(f"store is longer than {MAX_STORE_ID} characters")
    return store


def _window(request: web.Request) -> str:
    windows = request.app[SETTINGS].windows
    window = request.query.get("window", "")
    if window not in windows:
        raise BadRequest(f"the parameter window must be one of {', '.join(windows)} (LOYALTY_WINDOWS)")
    return window


@web.middleware
async def _middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except BadRequest as exc:
        response = _error(400, str(exc))
    except (aioredis.RedisError, OSError) as exc:
        if request.path.startswith("/events"):
            raise
        log.warning("dashboard.redis_error", path=request.path, error=str(exc) or type(exc).__name__)
        response = _error(503, "Redis does not answer")
    if not response.prepared:
        response.headers.update(SECURITY_HEADERS)
    return response


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def meta(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    stores = await list_stores(request.app[REDIS])
    return _json({"stores": stores, "windows": list(settings.windows), "window_ms": settings.window_ms})


async def snapshot(request: web.Request) -> web.Response:
    store, window = _store(request), _window(request)
    fields = await read_hash(request.app[REDIS], store, window)
    if "as_of_ms" not in fields:
        return _error(404, f"no snapshot for store {store!r} and window {window}")
    return _json(payload_from_hash(store, window, fields))


async def cohorts(request: web.Request) -> web.Response:
    store = _store(request)
    matrix = await read_cohorts(request.app[REDIS], store)
    if matrix is None:
        return _error(404, f"no cohort matrix for store {store!r}")
    return web.Response(body=matrix, content_type="application/json")


async def history(request: web.Request) -> web.Response:
    store, window = _store(request), _window(request)
    metric = request.query.get("metric", "")
    if metric not in NUMERIC_METRICS:
        why = "a map, not a number" if metric in METRIC_NAMES else "not a metric name (SPEC section 5)"
        raise BadRequest(f"metric {metric!r} is {why}" if metric else "the parameter metric is required")
    client = request.app[REDIS]
    entries = await read_history(client, store, window)
    if not entries and "as_of_ms" not in await read_hash(client, store, window):
        return _error(404, f"no snapshot for store {store!r} and window {window}")
    return _json([{"as_of_ms": int(s["as_of_ms"]), "value": metric_value(s, metric)} for s in entries])


async def page_series(request: web.Request) -> web.Response:
    store, window = _store(request), _window(request)
    entries = await read_history(request.app[REDIS], store, window)
    return _json(series(entries, list(PAGE_METRICS)))


async def alerts(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise BadRequest("limit must be a whole number") from None
    if not 1 <= limit <= MAX_ALERTS:
        raise BadRequest(f"limit must be 1..{MAX_ALERTS}")
    return _json(await read_alerts(request.app[REDIS], limit))


async def events(request: web.Request) -> web.StreamResponse:
    store, window = _store(request), _window(request)
    hub = request.app[HUB]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            **SECURITY_HEADERS,
        }
    )
    await response.prepare(request)
    client = hub.add(store, window)
    try:
        await response.write(b"retry: 2000\n\n" + hub.status_frame())
        while True:
            try:
                frame = await asyncio.wait_for(client.queue.get(), HEARTBEAT_S)
            except TimeoutError:
                frame = b": keep-alive\n\n"
            if frame is None:
                break
            frames = [frame]
            while not client.queue.empty():  # what is waiting goes in one write
                more = client.queue.get_nowait()
                if more is None:
                    client.dropped = True
                    break
                frames.append(more)
            await response.write(b"".join(frames))
            if client.dropped:
                break
    except (ConnectionResetError, ConnectionError):
        pass  # the browser went away
    finally:
        hub.remove(client)
    return response


async def metrics_endpoint(request: web.Request) -> web.Response:
    data = await prometheus.read_scrape(request.app[REDIS], request.app[SETTINGS].windows)
    return web.Response(body=prometheus.exposition(data), headers={"Content-Type": prometheus.CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[REDIS].ping(), timeout=2.0)
    except (aioredis.RedisError, OSError, TimeoutError) as exc:
        return _json({"status": "unavailable", "redis": str(exc) or type(exc).__name__}, 503)
    return _json({"status": "ok", "redis": "ok", "sse_clients": len(request.app[HUB].clients)})


async def _start(app: web.Application) -> None:
    app[HUB_TASK] = asyncio.create_task(app[HUB].run(), name="dashboard-hub")


async def _shutdown(app: web.Application) -> None:
    app[HUB].close()  # ends the open event streams, or the server would wait for them


async def _cleanup(app: web.Application) -> None:
    task = app[HUB_TASK]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await app[REDIS].aclose()


def create_app(settings: Settings, hub: Hub | None = None) -> web.Application:
    """The dashboard application for ``settings`` (its hub starts with the app)."""
    app = web.Application(middlewares=[_middleware])
    app[SETTINGS] = settings
    app[REDIS] = async_redis(settings, timeout=REDIS_TIMEOUT_S, connect_timeout=REDIS_TIMEOUT_S)
    app[HUB] = hub or Hub(settings)
    app.router.add_get("/", index)
    app.router.add_get("/api/meta", meta)
    app.router.add_get("/api/snapshot", snapshot)
    app.router.add_get("/api/history", history)
    app.router.add_get("/api/series", page_series)
    app.router.add_get("/api/alerts", alerts)
    app.router.add_get("/api/cohorts", cohorts)
    app.router.add_get("/events", events)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static/", STATIC_DIR)
    app.on_startup.append(_start)
    app.on_shutdown.append(_shutdown)
    app.on_cleanup.append(_cleanup)
    return app


def dashboard_url(settings: Settings) -> str:
    """Where a browser on this machine finds the dashboard."""
    host = settings.dashboard_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.dashboard_port}/"


def run_dashboard(settings: Settings, print_url: Any = print) -> None:
    """Serve the dashboard until SIGINT/SIGTERM."""
    from streams.logs import configure_logging
    from streams.tools.snapshot import redact
    from streams.worker.run import use_uvloop

    configure_logging(settings.log_level)
    use_uvloop()
    print_url(f"dashboard: {dashboard_url(settings)} (Redis {redact(settings.redis_url)})")
    web.run_app(
        create_app(settings),
        host=settings.dashboard_host,
        port=settings.dashboard_port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
    )


__all__ = ["create_app", "dashboard_url", "run_dashboard"]
