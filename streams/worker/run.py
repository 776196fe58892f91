"""Run one worker process: the pipeline's topics first, then the Faust app until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

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
    from faust import Worker

    import metrics
    from streams.connections import KafkaAccessError, RedisAccessError
    from streams.logs import configure_logging, get_logger, logging_config
    from streams.worker.app import create_app
    from streams.worker.topics import ensure_pipeline_topics

    configure_logging(settings.log_level)
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
    Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        redirect_stdouts=False,
        quiet=not sys.stdout.isatty(),
    ).execute_from_commandline()
