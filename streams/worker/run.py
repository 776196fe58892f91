"""Run one worker process: the pipeline's topics first, then the Faust app until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust

from streams.settings import Settings

#: the worker's garbage-collector thresholds: every event allocates dozens of short-lived lists
#: and tuples, and with Python's default (700) the collector rescans the cached customers' facts
#: thousands of times a second
GC_THRESHOLDS = (50_000, 20, 100)


#: glibc's malloc arenas for the worker's threads. By default a thread that allocates gets an arena of
#: its own (up to eight per core), and memory freed in one is reused only by the threads of that
#: arena: Faust's consumer thread, RocksDB's and the event loop's resolver threads each kept tens of
#: megabytes resident that the main thread could not reuse. ``MALLOC_ARENA_MAX``, when set, wins.
MALLOC_ARENAS = 2
#: mallopt's parameter number for the arena limit (glibc's malloc.h)
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Limit glibc's malloc arenas before any thread starts; ``False`` where that is not possible.

    Not glibc (macOS, musl), or ``MALLOC_ARENA_MAX`` set by the user: nothing is changed.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc
        return False


#: the exit code of a worker whose shutdown outlived ``LOYALTY_SHUTDOWN_TIMEOUT``
SHUTDOWN_TIMEOUT_EXIT = 3


def shutdown_watchdog(timeout_s: float, log: Any, exit_process: Callable[[int], object] = os._exit) -> threading.Timer:
    """A daemon timer (not started) that ends the process ``timeout_s`` after it starts, unless cancelled.

    A thread of its own, so an event loop that spins or blocks cannot hold it up: with Kafka gone,
    Faust's shutdown waits for commits and acknowledgements that never come. Ending there is safe:
    the state survives a SIGKILL at any point (the chaos tests kill workers at random moments).

    >>> ended = []; timer = shutdown_watchdog(0.01, None, ended.append); timer.start(); timer.join(); ended
    [3]
    """

    def expire() -> None:
        if log is not None:
            log.error("worker.shutdown_timeout", seconds=timeout_s, exit_code=SHUTDOWN_TIMEOUT_EXIT)
        exit_process(SHUTDOWN_TIMEOUT_EXIT)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    return timer


def worker_class(shutdown_timeout_s: float) -> type[faust.Worker]:
    """Faust's worker, whose first stop signal (SIGTERM, SIGINT) also starts a :func:`shutdown_watchdog`."""
    from streams.logs import get_logger

    log = get_logger(__name__)

    class Worker(faust.Worker):
        def _schedule_shutdown(self, signal: Any) -> None:
            if not self._signal_stop_time:  # the first signal: later ones change nothing in mode either
                log.info("worker.stopping", signal=getattr(signal, "name", str(signal)), timeout_s=shutdown_timeout_s)
                shutdown_watchdog(shutdown_timeout_s, log).start()
            super()._schedule_shutdown(signal)

    return Worker


class WorkerStartError(Exception):
    """The worker cannot start (Kafka unreachable): a message for the operator, not a traceback."""


def use_uvloop() -> None:
    """Make uvloop the event loop policy where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional on some platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def check_access(settings: Settings) -> None:
    """Kafka and Redis accept the configured credentials and certificates (else their access errors)."""
    from streams.connections import check_kafka, check_redis

    await check_kafka(settings)
    await check_redis(settings)


def run_worker(settings: Settings, extend: Callable[[faust.App], None] | None = None) -> None:
    """Create the pipeline's topics, then run a worker of :func:`streams.worker.app.create_app` until stopped.

    ``extend`` may register more agents on the app before it starts (the tests' smoke agent).
    """
    limit_malloc_arenas()  # first: the checks below already start resolver threads
    use_uvloop()
    gc.set_threshold(*GC_THRESHOLDS)
    import metrics
    from streams.connections import KafkaAccessError, RedisAccessError, back_off_failed_metadata_updates
    from streams.logs import configure_logging, get_logger, logging_config
    from streams.worker.app import create_app
    from streams.worker.topics import ensure_pipeline_topics

    configure_logging(settings.log_level)
    back_off_failed_metadata_updates()  # before any Kafka client exists
    try:
        # a wrong password or an untrusted certificate is a configuration error: say so and stop (Redis being
        # down is not: the worker waits for it)
        asyncio.run(check_access(settings))
    except (KafkaAccessError, RedisAccessError) as error:
        raise WorkerStartError(str(error)) from None
    try:
        asyncio.run(ensure_pipeline_topics(settings))
    except Exception as error:  # Kafka unreachable: say so, no traceback
        where = settings.kafka_bootstrap_servers
        raise WorkerStartError(f"cannot create the pipeline's topics on {where}: {error}") from None
    # "pure" where the mypyc build is missing or stale: the same numbers, slower (metrics/__init__.py)
    get_logger(__name__).info("worker.metrics_implementation", implementation=metrics.IMPLEMENTATION)
    app = create_app(settings)
    if extend is not None:
        extend(app)
    Path(app.conf.datadir).mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    worker_class(settings.shutdown_timeout_ms / 1000)(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        redirect_stdouts=False,
        quiet=not sys.stdout.isatty(),
    ).execute_from_commandline()
