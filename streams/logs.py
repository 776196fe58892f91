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
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "structlog",
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
