"""Dead letters: the record of SPEC section 3 for an input element that was not accepted.

The stages build these records (:func:`dead_letter`); the worker sends them to the
``loyalty-dead-letters`` topic with the rest of what a stage routes
(:meth:`streams.worker.topology.Topology.send_routed`).
"""

from __future__ import annotations

import base64
from typing import Any

DEAD_LETTER_SCHEMA = "loyalty.dead_letter.v1"


def dead_letter(
    reason: str,
    detail: str,
    raw: bytes,
    source: tuple[str, int, int],
    index: int | None,
    now_ms: int,
) -> dict[str, Any]:
    """The dead-letter record of SPEC section 3 (original bytes in base64)."""
    topic, partition, offset = source
    return {
        "schema": DEAD_LETTER_SCHEMA,
        "reason": reason,
        "detail": detail,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "index": index,
        "raw_base64": base64.b64encode(raw).decode(),
        "rejected_at_ms": now_ms,
    }

