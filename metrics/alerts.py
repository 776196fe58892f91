"""Online alert detectors of SPEC section 7: churn spikes and NPS drops.

Pure: no I/O, no Faust, no clock reads; every time is an argument (epoch ms).

How a caller (the worker) uses it, per store (and ``*``) of the alert window:

1. keep one :class:`DetectorState` per (store, kind), created by :func:`initial_state`,
   stored as :meth:`DetectorState.to_record` (a plain JSON-able dict) in the worker's table
   and restored with :meth:`DetectorState.from_record`;
2. on a new low watermark, :func:`due_boundaries` lists the step boundaries now due, in
   order; for each boundary B, read the store's metrics of the alert window from the
   aggregate at bucket :func:`sample_bucket` (B) and call :func:`evaluate` on each kind's
   state; send the returned alert events and keep the new state (with the boundary).

Evaluating a boundary the state has already seen (B <= ``state.last_ms``) changes nothing
and returns no alert, so a worker that replays boundaries after a crash re-sends nothing
new and can never produce a second id for one firing.

Definitions (x is the sample's value, n the samples already in the baseline, B the boundary):

* baseline: exponentially weighted mean and variance of the baseline's samples, with
  ``alpha = 1 - 2 ** (-1 / h)``, h = half-life / step in samples (7d / 15m = 672). Update of
  the n-th sample (West 1979, Finch 2009), with ``a = max(alpha, 1 / n)``:
  ``d = x - mean; mean += a * d; var = (1 - a) * (var + a * d * d)``. So the first sample sets
  ``mean = x, var = 0``, the first 1/alpha samples (970 by default) weigh equally (the plain
  mean and population variance, Welford's update), and later ones decay with the half-life: a
  store's first, tiny-count samples (a churn rate of 1 in 3) must not stand for weeks of
  history, as they would if the first sample started an EWMA. sigma = sqrt(var).
* churn spike on ``churn_rate`` (0-100): threshold = mean + k * sigma; fires when x > threshold
  and x's one-sided 99% lower bound (Wilson score, ``churned_customers`` out of the customers
  at the window's start, :func:`churn_rate_low`) is above it too, as an NPS drop's whole
  interval must be below its threshold.
* NPS drop on ``nps`` (-100..100): threshold = mean - k * sigma; fires when x < threshold and
  ``nps_ci_high`` < threshold (the whole 95% interval below it).
* A sample can fire only when: n >= the warm-up (warm-up / step samples, 3d / 15m = 288), its
  count (``churned_customers`` >= min_churned, or ``nps_responses`` >= min_responses) is met,
  and B is not in a cooldown (B >= resolution boundary + cooldown). A sample that could not
  fire (or did not) feeds the baseline, except an inconclusive sample.
* Inconclusive sample (the product's choice where SPEC 7 is silent): one that may fire and is
  beyond the threshold, but whose interval is not wholly beyond it (NPS: ``nps_ci_high``;
  churn: :func:`churn_rate_low`), neither fires nor feeds the baseline. For churn this is the
  counterpart of SPEC 7's NPS rule: a quiet store's 24h churn rate (about 1.2% of a few
  thousand customers, 45 to 110 a day) has a binomial noise as large as its EWMA sigma, so
  3 sigma alone fired on noise (``bench/alert_quality.py``: 14 false alerts in 120 days on 4
  quiet stores; with a 95% bound 1, with the 99% bound 0). An NPS drop fills the 24h window
  gradually, so for hours its samples are below the threshold while their interval still
  overlaps it; fed to the baseline they widened
  sigma and pushed the threshold away from the drop (in the bench's 48h drop, before this rule:
  sigma 13.7 -> 20.6 and the threshold -35 -> -60 before the drop could fire, found after
  25.8 h; on the same samples with the rule, after about 19 h). Samples under the minimum
  count or in a cooldown still feed it (SPEC 7). At k = 3 the samples left out are rare (the
  tail beyond 3 sigma), so the baseline stays unbiased; at small k more of the lower tail is
  left out and sigma is underestimated.
* A null value is skipped: no baseline change, no alert, no resolution.
* A firing sample, and every sample while firing, stay out of the baseline. The first sample
  back on the normal side of the threshold it fired against (churn: x <= threshold; NPS:
  x >= threshold) resolves it, with the firing's id, and feeds the baseline (it is a normal
  value again); the cooldown starts at that boundary.

Determinism: the arithmetic is IEEE-754 doubles in a fixed order (one update per sample, in
boundary order) and ``math.sqrt`` (correctly rounded); alpha is computed by the decimal module
at 40 digits and rounded once to a float, not by the platform's ``pow``. The same samples give
bit-identical baselines, thresholds and alerts on any CPython; floats survive a JSON round
trip exactly (shortest repr), so a restored state continues identically.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from decimal import Context, Decimal
from typing import Any

from metrics.timegrid import DAY_MS, format_duration, parse_duration

__all__ = [
    "CHURN_SPIKE",
    "KINDS",
    "NPS_DROP",
    "SCHEMA",
    "AlertConfig",
    "DetectorState",
    "alert_id",
    "churn_rate_low",
    "due_boundaries",
    "evaluate",
    "ewma_alpha",
    "initial_state",
    "sample_bucket",
]

SCHEMA = "loyalty.alert.v1"
CHURN_SPIKE = "churn_spike"
NPS_DROP = "nps_drop"
KINDS = (CHURN_SPIKE, NPS_DROP)

_HOUR_MS = 3_600_000
_MINUTE_MS = 60_000
#: per kind: the watched metric, its count metric, and whether a drop (True) or a rise is bad
_WATCHED: dict[str, tuple[str, str, bool]] = {
    CHURN_SPIKE: ("churn_rate", "churned_customers", False),
    NPS_DROP: ("nps", "nps_responses", True),
}


def ewma_alpha(half_life_samples: Decimal) -> float:
    """EWMA weight of a new sample for a half-life in samples: ``1 - 2 ** (-1 / h)``, in (0, 1].

    Computed in decimal at 40 digits and rounded once, so it is the same float on every platform.

    >>> ewma_alpha(Decimal(1)), round(ewma_alpha(Decimal(672)), 8)
    (0.5, 0.00103094)
    """
    context = Context(prec=40)
    decay = context.power(Decimal(2), context.divide(Decimal(-1), half_life_samples))
    return float(context.subtract(Decimal(1), decay))


@dataclass(frozen=True)
class AlertConfig:
    """The settings of SPEC section 7 (``LOYALTY_ALERT_*``) in milliseconds and counts.

    ``window`` (the alert window's name as in ``LOYALTY_WINDOWS``, e.g. ``24h``), ``step_ms``
    (sampling step, a multiple of ``bucket_ms``),
    ``k`` (sigmas), ``min_churned``, ``min_responses``, ``cooldown_ms``, ``half_life_ms``
    and ``warmup_ms`` are the detector's; ``grace_ms`` is used by :func:`due_boundaries`;
    ``idle_ms`` (processing time after which an idle partition stops holding the watermark
    back) is only the caller's.

    >>> config = AlertConfig()
    >>> config.window_ms, config.half_life_samples, config.warmup_samples, round(config.alpha, 6)
    (86400000, Decimal('672'), 288, 0.001031)
    >>> AlertConfig(step_ms=90_000)
    Traceback (most recent call last):
    ValueError: the alert step 90s is not a multiple of the bucket 1m
    """

    window: str = "24h"
    step_ms: int = 15 * _MINUTE_MS
    k: float = 3.0
    min_churned: int = 10
    min_responses: int = 30
    cooldown_ms: int = 6 * _HOUR_MS
    half_life_ms: int = 7 * DAY_MS
    warmup_ms: int = 3 * DAY_MS
    grace_ms: int = _HOUR_MS
    idle_ms: int = 30_000
    bucket_ms: int = _MINUTE_MS
    #: derived once: the EWMA weight (see :func:`ewma_alpha`)
    alpha: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("step_ms", "half_life_ms", "bucket_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("cooldown_ms", "warmup_ms", "grace_ms", "idle_ms", "min_churned", "min_responses"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not (math.isfinite(self.k) and self.k >= 0):
            raise ValueError("k must be a finite number >= 0")
        step, bucket = format_duration(self.step_ms), format_duration(self.bucket_ms)
        if self.step_ms % self.bucket_ms:
            raise ValueError(f"the alert step {step} is not a multiple of the bucket {bucket}")
        if self.window_ms % self.bucket_ms:
            raise ValueError(f"the alert window {format_duration(self.window_ms)} is not a multiple of the bucket "
                             f"{bucket}")
        object.__setattr__(self, "alpha", ewma_alpha(self.half_life_samples))

    @property
    def window_ms(self) -> int:
        """The alert window's length (``parse_duration(window)``).

        >>> AlertConfig(window="7d").window_ms
        604800000
        """
        return parse_duration(self.window)

    @property
    def half_life_samples(self) -> Decimal:
        """Half-life in samples: ``half_life_ms / step_ms`` (exact; 672 by default)."""
        return Decimal(self.half_life_ms) / Decimal(self.step_ms)

    @property
    def warmup_samples(self) -> int:
        """Samples the baseline must hold before a sample may fire: ``ceil(warmup_ms / step_ms)`` (288)."""
        return -(-self.warmup_ms // self.step_ms)


@dataclass(frozen=True)
class DetectorState:
    """What one detector (store, window, kind) remembers between samples; immutable.

    ``samples`` samples are in the baseline (``mean``, ``var``); ``last_ms`` is the last
    boundary evaluated; while firing, ``firing_id``, ``firing_ms``, ``firing_baseline`` and
    ``firing_threshold`` describe the firing; ``quiet_until_ms`` ends the last cooldown.

    >>> state = initial_state(NPS_DROP, "store-1", AlertConfig())
    >>> DetectorState.from_record(state.to_record()) == state
    True
    """

    kind: str
    store_id: str
    window: str
    samples: int = 0
    mean: float = 0.0
    var: float = 0.0
    last_ms: int | None = None
    firing_id: str | None = None
    firing_ms: int | None = None
    firing_baseline: float | None = None
    firing_threshold: float | None = None
    quiet_until_ms: int | None = None

    @property
    def firing(self) -> bool:
        """Whether an alert of this detector is open."""
        return self.firing_id is not None

    def to_record(self) -> dict[str, Any]:
        """A plain dict of JSON types (str, int, float, None); :meth:`from_record` inverts it.

        >>> initial_state(CHURN_SPIKE, "s", AlertConfig()).to_record()["samples"]
        0
        """
        return asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DetectorState:
        """The state of a :meth:`to_record` dict (after any JSON round trip; unknown keys are an error).

        >>> DetectorState.from_record({"kind": "nps_drop", "store_id": "s", "window": "24h", "mean": 41.5}).mean
        41.5
        """
        state = cls(**record)
        if state.kind not in _WATCHED:
            raise ValueError(f"unknown alert kind {state.kind!r}")
        # JSON writes 3.0 as 3.0 but some encoders write an integral float as 3: keep floats floats
        return replace(state, mean=float(state.mean), var=float(state.var))

    def baseline(self) -> tuple[float, float]:
        """(mean, sigma) of the baseline; sigma >= 0.

        >>> DetectorState(CHURN_SPIKE, "s", "24h", samples=5, mean=2.0, var=0.25).baseline()
        (2.0, 0.5)
        """
        return self.mean, math.sqrt(self.var)


def initial_state(kind: str, store_id: str, config: AlertConfig) -> DetectorState:
    """A detector that has seen nothing, for ``kind`` (``churn_spike`` or ``nps_drop``).

    >>> initial_state(CHURN_SPIKE, "*", AlertConfig()).window
    '24h'
    """
    if kind not in _WATCHED:
        raise ValueError(f"unknown alert kind {kind!r} (one of {', '.join(KINDS)})")
    return DetectorState(kind=kind, store_id=store_id, window=config.window)


def alert_id(store_id: str, window: str, kind: str, firing_ms: int) -> str:
    """Deterministic id of a firing: ``<kind>-<16 hex of SHA-256 of (store, window, kind, as_of_ms)>``.

    >>> alert_id("store-1", "24h", "churn_spike", 1_700_000_000_000)
    'churn_spike-83dfad1b67949584'
    """
    # length-prefixed fields: no store id can make two keys collide by containing a separator
    key = "".join(f"{len(part)}:{part}" for part in (store_id, window, kind, str(firing_ms)))
    return f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def sample_bucket(boundary_ms: int, bucket_ms: int) -> int:
    """The bucket K at which a sample at boundary B reads the aggregate: ``B / b - 1``.

    The sample at B covers the alert window's complete buckets before B (events with
    ``occurred_at < B``, i.e. "as of B - 1 ms" of SPEC section 4): a bucket is read whole,
    and the bucket starting at B also holds events after B.

    >>> sample_bucket(900_000, 60_000)
    14
    """
    if boundary_ms % bucket_ms:
        raise ValueError(f"{boundary_ms} is not on the bucket grid of {bucket_ms} ms")
    return boundary_ms // bucket_ms - 1


def due_boundaries(after_ms: int, low_watermark_ms: int, config: AlertConfig, limit: int | None = None) -> list[int]:
    """Step boundaries B with ``after_ms < B`` and ``B + grace <= low_watermark_ms``, oldest first.

    ``after_ms`` is the last boundary already sampled (on a fresh start, the first event
    time minus 1, so the first sample is the first boundary at or after it). Boundaries
    are the multiples of ``step_ms``; ``limit`` keeps only the oldest ones, so a caller
    far behind can yield between batches.

    >>> config = AlertConfig(grace_ms=3_600_000)
    >>> [b // 60_000 for b in due_boundaries(0, 3 * 3_600_000, config)]
    [15, 30, 45, 60, 75, 90, 105, 120]
    >>> due_boundaries(900_000, 900_000 + 3_600_000 - 1, config)
    []
    """
    step = config.step_ms
    first = (after_ms // step + 1) * step
    last = (low_watermark_ms - config.grace_ms) // step * step
    if last < first:
        return []
    count = (last - first) // step + 1
    if limit is not None:
        count = min(count, limit)
    return [first + i * step for i in range(count)]


def _number(metrics: Mapping[str, object], name: str) -> float | None:
    """A metric as a float, ``None`` when null or missing (bools are not numbers here)."""
    value = metrics.get(name)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"{name} is not a number: {value!r}")


#: z of a one-sided 99% bound: the churn rate's lower bound must be past the threshold
_Z99 = 2.3263478740408408


def churn_rate_low(churned: float, rate: float) -> float:
    """The one-sided 99% lower confidence bound of a churn rate (percent; Wilson score), in [0, rate].

    ``rate`` = 100 * c / N for ``churned`` c out of N customers at the window's start, so
    N = round(100 * c / rate); with p = c / N and z = 2.326 (the lower end of the 98% interval):
    ``100 * (p + z^2/2N - z * sqrt(p(1-p)/N + z^2/4N^2)) / (1 + z^2/N)``. A rate of 0 gives 0.

    >>> round(churn_rate_low(90, 1.8), 4), round(churn_rate_low(400, 8.0), 4), churn_rate_low(0, 0.0)
    (1.4119, 7.1522, 0.0)
    """
    if churned <= 0 or rate <= 0:
        return 0.0
    estimate = 100.0 * churned / rate
    if not math.isfinite(estimate):
        return 0.0
    customers = max(1, round(estimate))
    p = min(1.0, churned / customers)
    z2 = _Z99 * _Z99
    centre = p + z2 / (2 * customers)
    spread = _Z99 * math.sqrt(p * (1.0 - p) / customers + z2 / (4.0 * customers * customers))
    return max(0.0, 100.0 * (centre - spread) / (1.0 + z2 / customers))


def _rfc3339_ms(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms // 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def _event(state: DetectorState, firing: bool, boundary_ms: int, observed: float, baseline: float,
           threshold: float, alert: str, count: int | None) -> dict[str, object]:
    metric, count_name, _ = _WATCHED[state.kind]
    unit = "%" if state.kind == CHURN_SPIKE else ""
    if firing:
        side = "above" if state.kind == CHURN_SPIKE else "below"
        message = (f"{metric} {observed:.2f}{unit} in {state.window} is {side} the threshold {threshold:.2f}{unit} "
                   f"(baseline {baseline:.2f}{unit}, {count_name} {count})")
    else:
        message = f"{metric} {observed:.2f}{unit} in {state.window} is back within the threshold {threshold:.2f}{unit}"
    return {
        "schema": SCHEMA,
        "alert_id": alert,
        "kind": state.kind,
        "state": "firing" if firing else "resolved",
        "store_id": state.store_id,
        "window": state.window,
        "as_of": _rfc3339_ms(boundary_ms),
        "as_of_ms": boundary_ms,
        "observed": observed,
        "baseline": baseline,
        "threshold": threshold,
        "message": message,
    }


def _changed(state: DetectorState, **changes: Any) -> DetectorState:
    """``dataclasses.replace`` without its per-call field introspection: a copy with ``changes``.

    A replay evaluates every boundary of every store (10,000 stores x 30 days is 58 million
    evaluations), where ``replace`` took most of the time. No validation is skipped: the
    fields are plain values.
    """
    copy = object.__new__(DetectorState)
    fields = copy.__dict__
    fields.update(state.__dict__)
    fields.update(changes)
    return copy


def _fed(state: DetectorState, value: float, alpha: float) -> DetectorState:
    """The state with one more sample in its baseline (module docstring: the update)."""
    if state.samples == 0:
        return _changed(state, samples=1, mean=value, var=0.0)
    weight = max(alpha, 1.0 / (state.samples + 1))
    diff = value - state.mean
    increment = weight * diff
    return _changed(state, samples=state.samples + 1, mean=state.mean + increment,
                   var=(1.0 - weight) * (state.var + diff * increment))


def evaluate(state: DetectorState, boundary_ms: int, metrics: Mapping[str, object],
             config: AlertConfig) -> tuple[DetectorState, list[dict[str, object]]]:
    """One sample: the metrics of the alert window at boundary B; returns (new state, alert events).

    ``metrics`` holds at least the watched metric and its count (``churn_rate`` and
    ``churned_customers``; ``nps``, ``nps_responses`` and ``nps_ci_high``), as the
    aggregate publishes them. An event is the JSON object of SPEC section 7. A boundary at
    or before ``state.last_ms`` was evaluated already: nothing changes.

    >>> config = AlertConfig(warmup_ms=3 * 900_000)
    >>> state = initial_state(CHURN_SPIKE, "store-1", config)
    >>> for i, rate in enumerate([1.0, 1.2, 0.8]):
    ...     state, _ = evaluate(state, (i + 1) * 900_000, {"churn_rate": rate, "churned_customers": 12}, config)
    >>> state, fired = evaluate(state, 4 * 900_000, {"churn_rate": 9.0, "churned_customers": 40}, config)
    >>> fired[0]["state"], fired[0]["observed"], state.samples
    ('firing', 9.0, 3)
    >>> state, resolved = evaluate(state, 5 * 900_000, {"churn_rate": 0.9, "churned_customers": 11}, config)
    >>> resolved[0]["state"], resolved[0]["alert_id"] == fired[0]["alert_id"], state.quiet_until_ms
    ('resolved', True, 26100000)
    """
    if state.last_ms is not None and boundary_ms <= state.last_ms:
        return state, []
    metric, count_name, downward = _WATCHED[state.kind]
    value = _number(metrics, metric)
    state = _changed(state, last_ms=boundary_ms)
    if value is None:
        return state, []

    if state.firing_id is not None:
        threshold = state.firing_threshold
        assert threshold is not None and state.firing_baseline is not None
        back = value >= threshold if downward else value <= threshold
        if not back:
            return state, []  # still firing: kept out of the baseline
        event = _event(state, False, boundary_ms, value, state.firing_baseline, threshold, state.firing_id, None)
        resolved = _changed(state, firing_id=None, firing_ms=None, firing_baseline=None, firing_threshold=None,
                           quiet_until_ms=boundary_ms + config.cooldown_ms)
        return _fed(resolved, value, config.alpha), [event]

    mean, sigma = state.baseline()
    threshold = mean - config.k * sigma if downward else mean + config.k * sigma
    count = _number(metrics, count_name)
    minimum = config.min_responses if downward else config.min_churned
    may_fire = (
        state.samples >= config.warmup_samples
        and count is not None
        and count >= minimum
        and (state.quiet_until_ms is None or boundary_ms >= state.quiet_until_ms)
    )
    if may_fire:
        assert count is not None
        if downward:
            ci_high = _number(metrics, "nps_ci_high")
            past = value < threshold
            beyond = past and ci_high is not None and ci_high < threshold
        else:
            past = value > threshold
            beyond = past and churn_rate_low(count, value) > threshold
        if past and not beyond:
            # inconclusive: beyond the threshold but its interval still reaches back over it; it
            # neither fires nor feeds the baseline, so a change building up in the window cannot
            # widen the baseline it is measured against before it is allowed to fire
            return state, []
        if beyond:
            alert = alert_id(state.store_id, state.window, state.kind, boundary_ms)
            event = _event(state, True, boundary_ms, value, mean, threshold, alert, int(count))
            return _changed(state, firing_id=alert, firing_ms=boundary_ms, firing_baseline=mean,
                           firing_threshold=threshold), [event]
    return _fed(state, value, config.alpha), []
