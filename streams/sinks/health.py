"""The workers' health counters (events received, applied, duplicates, dead letters, snapshots) in Redis."""

from __future__ import annotations

from streams.sinks.redis_sink import RedisSink


class HealthCounters:
    """Counts added in memory by the stages and flushed to the ``loyalty:health`` hash by the emit timer."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        #: values set rather than added (``consumer_lag:{topic}:{partition}``), latest first
        self.gauges: dict[str, int] = {}

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a counter (nothing is written until :meth:`flush`).

        >>> health = HealthCounters(); health.count("dead_letters", 2); health.count("duplicates", 0)
        >>> health.pending
        {'dead_letters': 2}
        """
        if amount:
            self.pending[name] = self.pending.get(name, 0) + amount

    def gauge(self, name: str, value: int) -> None:
        """Set a value (nothing is written until :meth:`flush`; a later value replaces it).

        >>> health = HealthCounters(); health.gauge("consumer_lag:o:0", 5); health.gauge("consumer_lag:o:0", 2)
        >>> health.gauges
        {'consumer_lag:o:0': 2}
        """
        self.gauges[name] = value

    async def flush(self, sink: RedisSink) -> None:
        """Add the pending counts to Redis in one transaction; on a failure they stay pending for the next flush.

        The transaction applies all the counts or none, so a failure never re-adds counts that
        Redis has. (A reply lost after Redis applied them still counts them twice: Redis gives
        no way to tell.)
        """
        if not self.pending and not self.gauges:
            return
        counters, self.pending = self.pending, {}
        gauges, self.gauges = self.gauges, {}
        try:
            await sink.count(counters, gauges)
        except Exception:  # health counters are best effort; kept for the next flush
            for name, amount in counters.items():
                self.count(name, amount)
            for name, value in gauges.items():
                self.gauges.setdefault(name, value)
