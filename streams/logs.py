"""Structured logging for every ``loyalty`` process (structlog over the standard library).

On a terminal the lines are human-readable and coloured; anywhere else (containers, CI,
files) each line is one JSON object. Libraries that log through the standard ``logging``
module (Faust, mode, aiokafka) go through the same renderer.

>>> config = logging_config("info", json_output=True)
>>> config["root"]["level"], config["handlers"]["default"]["stream"]
('INFO', 'ext://sys.stderr')
"""

from __future__ import annotations

import logging
import logging.config
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

# Loggers that are chatty at INFO and not useful to an operator.
_QUIET = {
    "aiokafka": "WARNING",
    "kafka": "WARNING",
    "asyncio": "WARNING",
    # a debug line per sent message, which the worker would otherwise format for every send
    "faust.topics": "INFO",
}


#: library loggers whose repeated messages are held back (see RepeatFilter): while a broker is away,
#: the Kafka clients log each failed connection, metadata and fetch request, some 150 lines a second
REPEATING_LOGGERS = ("aiokafka", "kafka")
#: a message held back is let through again this long after it last was, with how many were held back
REPEAT_INTERVAL_S = 30.0
#: distinct messages remembered; past this the memory starts afresh (a message may then pass early)
_REPEAT_KEYS = 1024


class RepeatFilter(logging.Filter):
    """Lets each message of the :data:`REPEATING_LOGGERS` through once per ``interval_s``.

    A message is its logger, level and template (the text before its arguments), so "Unable
    connect to node with id 1" and "... id 2" are one. The next one let through says how many
    were held back since the last, so an outage's lines stay countable; every other logger's
    records pass untouched. The count of the last burst shows only when the message recurs.

    >>> now = [0.0]; held = RepeatFilter(10.0, clock=lambda: now[0])
    >>> def record(): return logging.LogRecord("aiokafka.conn", logging.ERROR, "", 0, "node %s refused", (1,), None)
    >>> [held.filter(record()) for _ in range(3)]
    [True, False, False]
    >>> now[0] = 10.0; again = record(); held.filter(again), again.getMessage()
    (True, 'node 1 refused (2 more like it held back in the last 10 s)')
    >>> held.filter(logging.LogRecord("streams.worker", logging.ERROR, "", 0, "node %s refused", (1,), None))
    True
    """

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 loggers: tuple[str, ...] = REPEATING_LOGGERS) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self.loggers = loggers
        #: message -> (when it was last let through, how many were held back since)
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if not any(name == logger or name.startswith(logger + ".") for logger in self.loggers):
            return True
        key = (name, record.levelno, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= _REPEAT_KEYS:
            self._last.clear()
        self._last[key] = (now, 0)
        if last is not None and last[1]:
            seconds = f"{now - last[0]:.0f}"
            record.msg = f"{record.getMessage()} ({last[1]} more like it held back in the last {seconds} s)"
            record.args = None
        return True


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(json_output: bool) -> Any:
    if json_output:
        return structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())


def logging_config(level: str = "info", *, json_output: bool | None = None) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict sending every record through structlog's renderer.

    ``json_output`` defaults to "stderr is not a terminal".
    """
    if json_output is None:
        json_output = not sys.stderr.isatty()
    final: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_output:
        final.append(
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
        )
    final.append(_renderer(json_output))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processors": final,
                "foreign_pre_chain": _shared_processors(),
            }
        },
        "filters": {"repeats": {"()": RepeatFilter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "structlog",
                "filters": ["repeats"],
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {name: {"level": lvl} for name, lvl in _QUIET.items()},
        "root": {"level": level.upper(), "handlers": ["default"]},
    }


def configure_logging(level: str = "info", *, json_output: bool | None = None, stdlib: bool = True) -> dict[str, Any]:
    """Configure structlog (and, when ``stdlib``, the standard library's root logger).

    Returns the dictConfig used, so a Faust/mode worker can be handed the same one.
    """
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    config = logging_config(level, json_output=json_output)
    if stdlib:
        logging.config.dictConfig(config)
    return config


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A structlog logger (``log.info("event", key=value)``)."""
    return structlog.stdlib.get_logger(name).bind(**context) if context else structlog.stdlib.get_logger(name)
