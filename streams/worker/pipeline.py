"""``register_pipeline(app, settings)``: the one place where the metric pipeline is put on a Faust app."""

from __future__ import annotations

from typing import Any

import faust

from streams.settings import Settings
from streams.worker.agents import aggregate, facts, gate, ingest, publish
from streams.worker.tables import flush_idle
from streams.worker.topology import Topology


def register_pipeline(app: faust.App, settings: Settings) -> Topology:
    """Declare the topics, tables, agents and timers of the metric pipeline on ``app``."""
    topology = Topology(app, settings)
    ingest.register(topology)
    gate.register(topology)
    customers = facts.register(topology)
    aggregation = aggregate.register(topology)
    publish.register(topology, aggregation)

    async def flush_idle_tables() -> None:
        flush_idle(topology.currencies, topology.channels, topology.held, topology.facts)

    topology.timer(1.0, "flush-idle-tables", flush_idle_tables)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app: faust.App, revoked: Any, **_: Any) -> None:
        # the facts of batches sent before the revocation reach the changelog before a new owner reads it
        await customers.drain()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app: faust.App, assigned: Any, **_: Any) -> None:
        aggregation.on_assigned()
        # another worker may have changed customers' facts while their partitions were elsewhere
        customers.forget()

    app.topology = topology  # type: ignore[attr-defined]
    return topology
