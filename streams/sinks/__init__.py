"""Everything the worker writes outside the pipeline.

- :mod:`streams.sinks.snapshots`: the ``loyalty.metrics.v1`` JSON of SPEC section 6;
- :mod:`streams.sinks.redis_sink`: snapshots, history streams and updates in Redis, and their keys;
- :mod:`streams.sinks.kafka_outputs`: the ``loyalty-metrics`` and ``loyalty-dead-letters`` topics;
- :mod:`streams.sinks.dead_letters`: the dead-letter record of SPEC section 3;
- :mod:`streams.sinks.health`: the workers' health counters.
"""
