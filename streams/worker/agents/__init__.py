"""The pipeline's parts on Faust, one module per stage: each wires a stage of :mod:`streams.stages` to its
topics, tables and timers through the shared :class:`streams.worker.topology.Topology`.

- :mod:`.ingest`: the input topics' reader task (validation, routing by store, dead letters);
- :mod:`.gate`: the by-store agent (currency gate) and the timer that releases held events;
- :mod:`.facts`: the by-customer agent (dedupe, facts, deltas, event-clock watermarks);
- :mod:`.aggregate`: the deltas agent and the rebuild of the store shards;
- :mod:`.publish`: the emit timer (snapshots to the output topic and Redis, health counters).
"""
