"""The framework ceiling: an empty Faust agent that only decodes every message (run by ``loyalty bench``).

    python -m bench.faust_ceiling   (configured by the BENCH_* variables below)

It consumes the given topics from the start with one worker, decodes each
message with orjson, counts messages and events (a JSON array counts its
elements) and, when ``BENCH_MESSAGES`` messages are in, writes
``{"messages", "events", "seconds"}`` (first message to last) to
``BENCH_RESULT``. The bench then stops it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import faust
import orjson

from streams.connections import faust_credentials
from streams.settings import load_settings


def build_app() -> faust.App:
    """The ceiling app, configured from the environment."""
    topics = os.environ["BENCH_TOPICS"].split(",")
    expected = int(os.environ["BENCH_MESSAGES"])
    result_path = Path(os.environ["BENCH_RESULT"])
    app = faust.App(
        os.environ["BENCH_APP_ID"],
        broker=os.environ["BENCH_BROKER"].split(";"),
        # the product's Kafka security settings (KAFKA_SECURITY_PROTOCOL...), inherited from the bench
        broker_credentials=faust_credentials(load_settings()),
        store="memory://",
        datadir=os.environ["BENCH_DATADIR"],
        autodiscover=False,
        web_enabled=False,
        topic_partitions=int(os.environ["BENCH_PARTITIONS"]),
        consumer_auto_offset_reset="earliest",
        consumer_max_fetch_size=4 * 1024 * 1024,
        broker_max_poll_records=2000,
        stream_buffer_maxsize=8192,
    )
    source = app.topic(*topics, key_serializer="raw", value_serializer="raw", internal=False)
    state: dict[str, Any] = {"messages": 0, "events": 0, "first": None}

    @app.agent(source, name="bench-ceiling")
    async def drain(stream: Any) -> None:
        async for value in stream:
            if state["first"] is None:
                state["first"] = time.perf_counter()
            decoded = orjson.loads(value)
            state["events"] += len(decoded) if isinstance(decoded, list) else 1
            state["messages"] += 1
            if state["messages"] == expected:
                seconds = time.perf_counter() - state["first"]
                result = {"messages": state["messages"], "events": state["events"], "seconds": seconds}
                result_path.write_bytes(orjson.dumps(result))

    return app


def main() -> None:
    """Run the ceiling worker until the bench stops it."""
    from faust import Worker

    app = build_app()
    Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()


if __name__ == "__main__":
    main()
