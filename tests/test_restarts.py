"""The restart of a task that reads Kafka: growing delays, a fresh start after a good run, cancellation passes."""

from __future__ import annotations

import asyncio

import pytest

from streams.worker.restarts import RESTART_FIRST_S, RESTART_MAX_S, run_restarting


class Script:
    """Attempts that each run for a scripted time on a fake clock, then fail (or return, when last)."""

    def __init__(self, run_seconds: list[float], finally_raise: BaseException | None = None) -> None:
        self.run_seconds = list(run_seconds)
        self.finally_raise = finally_raise
        self.now = 0.0
        self.slept: list[float] = []
        self.failures_seen = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def attempt(self) -> None:
        seconds = self.run_seconds.pop(0)
        self.now += seconds
        if self.run_seconds:
            raise ConnectionError("broker away")
        if self.finally_raise is not None:
            raise self.finally_raise

    def on_failure(self) -> None:
        self.failures_seen += 1


def test_delays_double_up_to_the_longest_and_start_over_after_a_good_run() -> None:
    """Quick failures wait 1, 2, 4 ... 30 s; a failure after a run longer than 30 s waits 1 s again."""
    quick = [0.1] * 7
    script = Script([*quick, RESTART_MAX_S + 5, 0.1, 0.0])
    asyncio.run(run_restarting(script.attempt, "test.failed", script.on_failure, script.sleep, script.clock))
    assert script.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, RESTART_FIRST_S, 2.0]
    assert script.failures_seen == len(script.slept) and script.run_seconds == []


def test_cancellation_is_not_caught() -> None:
    """A cancelled attempt stops the task at once, without a retry or a failure callback."""
    script = Script([0.1, 0.1], finally_raise=asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run_restarting(script.attempt, "test.failed", script.on_failure, script.sleep, script.clock))
    assert script.slept == [RESTART_FIRST_S] and script.failures_seen == 1
