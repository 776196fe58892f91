"""The alert detectors of SPEC section 7 (metrics/alerts.py): definitions by tables, determinism by properties."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metrics.alerts import (
    CHURN_SPIKE,
    NPS_DROP,
    SCHEMA,
    AlertConfig,
    DetectorState,
    alert_id,
    churn_rate_low,
    due_boundaries,
    evaluate,
    ewma_alpha,
    initial_state,
    sample_bucket,
)

STEP = 900_000
#: small numbers so that every rule is reached within a few samples
CONFIG = AlertConfig(step_ms=STEP, warmup_ms=3 * STEP, half_life_ms=2 * STEP, cooldown_ms=2 * STEP, k=3.0,
                     min_churned=10, min_responses=30)
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
#: a quiet churn baseline: mean about 1, sigma well under 1, so 9.0 is far above mean + 3 sigma
QUIET = (1.0, 1.2, 0.8, 1.1)

Sample = tuple[int, dict[str, object]]


def churn(rate: float | None, churned: int = 20) -> dict[str, object]:
    return {"churn_rate": rate, "churned_customers": churned}


def nps(value: float | None, responses: int = 50, ci_high: float | None = None) -> dict[str, object]:
    high = None if value is None else (value + 10.0 if ci_high is None else ci_high)
    return {"nps": value, "nps_responses": responses, "nps_ci_high": high}


def run(kind: str, metrics: Sequence[dict[str, object]], config: AlertConfig = CONFIG,
        state: DetectorState | None = None, first: int = 1) -> tuple[DetectorState, list[tuple[int, str]]]:
    """Evaluate one sample per step boundary from ``first``; returns the state and (sample index, alert state)."""
    state = state or initial_state(kind, "store-1", config)
    seen: list[tuple[int, str]] = []
    for index, sample in enumerate(metrics):
        state, alerts = evaluate(state, (first + index) * STEP, sample, config)
        seen.extend((index, alert["state"]) for alert in alerts)  # type: ignore[misc]
    return state, seen


# -- definitions --------------------------------------------------------------------------------


@pytest.mark.parametrize(("quiet_samples", "fires"), [(0, False), (2, False), (3, True), (4, True)])
def test_warm_up(quiet_samples: int, fires: bool) -> None:
    """A spike fires only once the baseline holds the warm-up (3 samples here; 288 by default)."""
    samples = [churn(r) for r in QUIET[:quiet_samples]] + [churn(9.0)]
    _, seen = run(CHURN_SPIKE, samples)
    assert seen == ([(quiet_samples, "firing")] if fires else [])
    assert AlertConfig().warmup_samples == 288


@pytest.mark.parametrize(("churned", "fires"), [(0, False), (9, False), (10, True), (500, True)])
def test_minimum_churned_customers(churned: int, fires: bool) -> None:
    """A spike fires only with churned_customers >= min_churned; under it the sample feeds the baseline."""
    state, seen = run(CHURN_SPIKE, [churn(r) for r in QUIET] + [churn(9.0, churned)])
    assert seen == ([(4, "firing")] if fires else [])
    assert state.samples == (4 if fires else 5)


@pytest.mark.parametrize(("responses", "fires"), [(29, False), (30, True)])
def test_minimum_nps_responses(responses: int, fires: bool) -> None:
    """An NPS drop fires only with nps_responses >= min_responses (30)."""
    _, seen = run(NPS_DROP, [nps(v) for v in (40.0, 42.0, 38.0, 41.0)] + [nps(-50.0, responses)])
    assert seen == ([(4, "firing")] if fires else [])


@pytest.mark.parametrize(("ci_high", "fires"), [(-40.0, True), (38.0, False), (None, False)])
def test_nps_drop_needs_the_whole_interval_below(ci_high: float | None, fires: bool) -> None:
    """An NPS drop fires only when nps_ci_high is below the threshold too (38 is above mean - 3 sigma here)."""
    quiet = [nps(v) for v in (40.0, 42.0, 38.0, 41.0)]
    state, _ = run(NPS_DROP, quiet)
    mean, sigma = state.baseline()
    assert mean - 3 * sigma > -40.0 and mean - 3 * sigma < 38.0
    drop: dict[str, object] = {"nps": -50.0, "nps_responses": 60, "nps_ci_high": ci_high}
    _, seen = run(NPS_DROP, [*quiet, drop])
    assert seen == ([(4, "firing")] if fires else [])


@pytest.mark.parametrize(("responses", "fed"), [(50, False), (29, True)])
def test_inconclusive_nps_sample_stays_out_of_the_baseline(responses: int, fed: bool) -> None:
    """Below the threshold with nps_ci_high above it: no alert and no baseline change (under the minimum: fed)."""
    state, _ = run(NPS_DROP, [nps(v) for v in (40.0, 42.0, 38.0, 41.0)])
    mean, sigma = state.baseline()
    assert 30.0 < mean - 3 * sigma < 36.0
    after, seen = run(NPS_DROP, [nps(0.0, responses, ci_high=45.0)], state=state, first=5)
    assert seen == []
    assert after.samples == (5 if fed else 4)
    assert (after.mean < 35.0) if fed else (after.mean, after.var) == (state.mean, state.var)


def test_inconclusive_nps_samples_do_not_mask_a_building_drop() -> None:
    """A drop whose first samples are inconclusive still fires against the threshold of the quiet baseline."""
    quiet = [nps(v) for v in (40.0, 42.0, 38.0, 41.0)]
    building = [nps(v, ci_high=v + 60.0) for v in (20.0, 10.0, 0.0, -10.0)]
    state, seen = run(NPS_DROP, [*quiet, *building, nps(-20.0, ci_high=0.0)])
    assert seen == [(8, "firing")] and state.samples == 4
    # the same values under the minimum count feed the baseline and pull its threshold under -20
    fed = [nps(v, 29, ci_high=v + 60.0) for v in (20.0, 10.0, 0.0, -10.0)]
    state, seen = run(NPS_DROP, [*quiet, *fed, nps(-20.0, ci_high=0.0)])
    assert seen == [] and state.samples == 9


def test_nps_rise_does_not_fire_and_churn_drop_does_not_fire() -> None:
    """The detectors are one-sided: NPS fires downward only, churn upward only."""
    assert run(NPS_DROP, [nps(v) for v in (40.0, 42.0, 38.0, 41.0, 95.0)])[1] == []
    assert run(CHURN_SPIKE, [churn(r) for r in (*QUIET, 0.0)])[1] == []


@pytest.mark.parametrize(("gap", "fires_again"), [(1, False), (2, True), (3, True)])
def test_cooldown_after_resolution(gap: int, fires_again: bool) -> None:
    """After a resolution at B, no firing before B + cooldown (2 steps here), and cooldown samples feed the baseline."""
    quiet_between = [churn(1.0)] * (gap - 1)
    samples = [churn(r) for r in QUIET] + [churn(9.0), churn(1.0), *quiet_between, churn(9.0)]
    state, seen = run(CHURN_SPIKE, samples)
    expected = [(4, "firing"), (5, "resolved")] + ([(5 + gap, "firing")] if fires_again else [])
    assert seen == expected
    # quiet 4, the resolving sample, the samples between, and the refused spike when in cooldown
    assert state.samples == 4 + 1 + (gap - 1) + (0 if fires_again else 1)


def test_firing_samples_stay_out_of_the_baseline() -> None:
    """While firing the baseline does not move, whatever the samples (a long spike is not the new normal)."""
    before, seen = run(CHURN_SPIKE, [churn(r) for r in QUIET] + [churn(9.0)])
    after, more = run(CHURN_SPIKE, [churn(r) for r in (12.0, 30.0, 5.0, 9.5)], state=before, first=6)
    assert seen == [(4, "firing")] and more == []
    assert (after.samples, after.mean, after.var) == (before.samples, before.mean, before.var) == (
        4, before.mean, before.var)
    assert after.firing_id == before.firing_id is not None


@pytest.mark.parametrize("kind", [CHURN_SPIKE, NPS_DROP])
def test_resolves_at_the_first_sample_back_under_the_threshold_it_fired_against(kind: str) -> None:
    """Resolution: the first sample on the normal side of the firing's threshold (ties resolve), with its id."""
    make, quiet, spike = ((churn, QUIET, 9.0) if kind == CHURN_SPIKE else (nps, (40.0, 42.0, 38.0, 41.0), -60.0))
    state, _ = run(kind, [make(v) for v in quiet])
    state, fired = evaluate(state, 5 * STEP, make(spike), CONFIG)
    threshold = fired[0]["threshold"]
    assert isinstance(threshold, float)
    nearly = threshold + 0.5 if kind == CHURN_SPIKE else threshold - 0.5  # still beyond: stays firing
    state, none = evaluate(state, 6 * STEP, make(nearly), CONFIG)
    state, resolved = evaluate(state, 7 * STEP, make(threshold), CONFIG)
    assert none == []
    assert [(a["state"], a["alert_id"], a["as_of_ms"], a["threshold"], a["baseline"]) for a in resolved] == [
        ("resolved", fired[0]["alert_id"], 7 * STEP, threshold, fired[0]["baseline"])]
    assert fired[0]["alert_id"] == alert_id("store-1", "24h", kind, 5 * STEP)
    assert state.quiet_until_ms == 7 * STEP + CONFIG.cooldown_ms and not state.firing


@pytest.mark.parametrize("firing", [False, True])
def test_null_sample_is_skipped(firing: bool) -> None:
    """A null sample changes nothing but the last boundary: no baseline change, no alert, no resolution."""
    quiet = [churn(r) for r in QUIET] + ([churn(9.0)] if firing else [])
    state, _ = run(CHURN_SPIKE, quiet)
    after, alerts = evaluate(state, 10 * STEP, churn(None, churned=0), CONFIG)
    assert alerts == []
    assert after == DetectorState(**{**state.to_record(), "last_ms": 10 * STEP})


def test_a_boundary_already_evaluated_changes_nothing() -> None:
    """Evaluating a boundary at or before the last one is a no-op (a replay after a crash sends nothing twice)."""
    state, _ = run(CHURN_SPIKE, [churn(r) for r in QUIET])
    fired_state, fired = evaluate(state, 5 * STEP, churn(9.0), CONFIG)
    assert evaluate(fired_state, 5 * STEP, churn(9.0), CONFIG) == (fired_state, [])
    assert evaluate(fired_state, 4 * STEP, churn(0.0), CONFIG) == (fired_state, [])
    assert len(fired) == 1


def test_alert_event_is_the_spec_json() -> None:
    """A firing event has exactly the SPEC 7 fields, is JSON, and states observed, baseline and threshold."""
    state, _ = run(CHURN_SPIKE, [churn(r) for r in QUIET])
    mean, sigma = state.baseline()
    _, [event] = evaluate(state, 1_700_000_100_000 // STEP * STEP, churn(9.0, churned=44), CONFIG)
    assert list(event) == ["schema", "alert_id", "kind", "state", "store_id", "window", "as_of", "as_of_ms",
                           "observed", "baseline", "threshold", "message"]
    assert event["schema"] == SCHEMA and event["kind"] == "churn_spike" and event["state"] == "firing"
    assert event["store_id"] == "store-1" and event["window"] == "24h"
    assert event["as_of_ms"] == 1_700_000_100_000 and event["as_of"] == "2023-11-14T22:15:00.000Z"
    assert (event["observed"], event["baseline"], event["threshold"]) == (9.0, mean, mean + 3 * sigma)
    assert "churned_customers 44" in str(event["message"])
    assert json.loads(json.dumps(event)) == event


def test_ewma_baseline_values() -> None:
    """Baseline of 1, 2, 3 with half-life 1 sample (alpha 1/2): mean 2.25, variance 0.6875 by hand."""
    config = AlertConfig(step_ms=STEP, half_life_ms=STEP)
    state = initial_state(CHURN_SPIKE, "s", config)
    for index, rate in enumerate((1.0, 2.0, 3.0)):
        state, _ = evaluate(state, (index + 1) * STEP, churn(rate), config)
    # mean: 1 -> 1.5 -> 2.25; var: 0 -> 0.5*(0 + 1*0.5) = 0.25 -> 0.5*(0.25 + 1.5*0.75) = 0.6875
    assert (state.samples, state.mean, state.var) == (3, 2.25, 0.6875)
    assert math.isclose(ewma_alpha(Decimal(672)), 1 - 2 ** (-1 / 672), rel_tol=1e-12)


def test_first_samples_weigh_equally_until_one_over_alpha() -> None:
    """With a half-life of 2 samples (alpha 0.29), the first 3 samples give their plain mean and population variance."""
    config = AlertConfig(step_ms=STEP, half_life_ms=2 * STEP)
    assert round(1 / config.alpha, 3) == 3.414  # the weight is 1/n for n <= 3, alpha after
    state = initial_state(CHURN_SPIKE, "s", config)
    for index, rate in enumerate((30.0, 2.0, 1.0)):
        state, _ = evaluate(state, (index + 1) * STEP, churn(rate), config)
    assert (state.mean, round(state.var, 9)) == (11.0, round(((19**2) + 9**2 + 10**2) / 3, 9))
    state, _ = evaluate(state, 4 * STEP, churn(3.0), config)
    assert math.isclose(state.mean, 11.0 + config.alpha * (3.0 - 11.0))


@pytest.mark.parametrize(("after", "watermark", "grace", "expected"), [
    (0, 3_600_000, 0, [900_000, 1_800_000, 2_700_000, 3_600_000]),
    (0, 3_600_000, 3_600_000, []),
    (0, 2_700_000, 1_800_000, [900_000]),
    (0, 2_699_999, 1_800_000, []),  # 900_000 + grace is 1 ms ahead of the watermark
    (899_999, 1_800_000, 0, [900_000, 1_800_000]),  # a fresh start: the first event time minus 1
    (1_800_000, 1_800_000, 0, []),
    (-1, 0, 0, [0]),
])
def test_due_boundaries(after: int, watermark: int, grace: int, expected: list[int]) -> None:
    """Every step boundary after the last one whose boundary + grace the low watermark has reached, in order."""
    config = AlertConfig(step_ms=STEP, grace_ms=grace)
    assert due_boundaries(after, watermark, config) == expected
    assert due_boundaries(after, watermark, config, limit=1) == expected[:1]


def test_sample_bucket_and_config_checks() -> None:
    """The sample at B reads bucket B/b - 1; a step or window off the bucket grid is refused."""
    assert sample_bucket(1_800_000, 60_000) == 29
    with pytest.raises(ValueError, match="not on the bucket grid"):
        sample_bucket(1_800_001, 60_000)
    with pytest.raises(ValueError, match="not a multiple of the bucket"):
        AlertConfig(window="90s")
    with pytest.raises(ValueError, match="k must be"):
        AlertConfig(k=math.nan)


def test_state_survives_json() -> None:
    """A mid-firing state goes through JSON and back unchanged (floats round-trip exactly)."""
    state, _ = run(CHURN_SPIKE, [churn(r) for r in QUIET] + [churn(9.0)])
    assert state.firing
    assert DetectorState.from_record(json.loads(json.dumps(state.to_record()))) == state
    with pytest.raises(ValueError, match="unknown alert kind"):
        DetectorState.from_record({**state.to_record(), "kind": "revenue"})


@pytest.mark.parametrize(
    ("rate", "churned", "fires", "fed"),
    [
        (1.83, 90, False, False),  # past 3 sigma, but 90 of ~4,900 could be noise: inconclusive
        (1.30, 65, False, True),  # under the threshold: a normal sample
        (4.00, 200, True, False),  # past it with its 99% lower bound
    ],
)
def test_a_churn_sample_fires_only_when_its_whole_interval_is_past_the_threshold(
    rate: float, churned: int, fires: bool, fed: bool
) -> None:
    """Churn like NPS: past k sigma is not enough while the count's 99% lower bound is still under the threshold."""
    config = AlertConfig(step_ms=STEP, warmup_ms=4 * STEP, half_life_ms=100 * STEP)
    state = initial_state(CHURN_SPIKE, "store-1", config)
    for index, normal in enumerate((1.0, 1.2, 1.4, 1.2, 1.0, 1.2)):
        state, _ = evaluate(state, (index + 1) * STEP, {"churn_rate": normal, "churned_customers": 60}, config)
    mean, sigma = state.baseline()
    assert mean + 3 * sigma < 1.83 and churn_rate_low(90, 1.83) < mean + 3 * sigma < churn_rate_low(200, 4.0)
    after, alerts = evaluate(state, 7 * STEP, {"churn_rate": rate, "churned_customers": churned}, config)
    assert [alert["state"] for alert in alerts] == (["firing"] if fires else [])
    assert after.samples == state.samples + (1 if fed else 0)


# -- properties ---------------------------------------------------------------------------------


def _wilson_low_percent(churned: int, rate: float) -> float:
    """The one-sided 99% Wilson lower bound of ``churned`` out of the customers the rate implies, in percent."""
    if churned == 0 or rate == 0.0 or not math.isfinite(100.0 * churned / rate):
        return 0.0
    total = max(1, round(100.0 * churned / rate))
    share = min(1.0, churned / total)
    z = 2.3263478740408408  # a one-sided 99% bound
    low = (share + z * z / (2 * total) - z * math.sqrt(share * (1.0 - share) / total + z * z / (4.0 * total * total)))
    return max(0.0, 100.0 * low / (1.0 + z * z / total))


def reference_alerts(kind: str, samples: Sequence[Sample], config: AlertConfig) -> list[tuple[object, ...]]:
    """A plainly written detector loop: keeps the list of baseline samples and recomputes the EWMA from it."""
    metric, count_name, minimum, downward = (
        ("churn_rate", "churned_customers", config.min_churned, False) if kind == CHURN_SPIKE
        else ("nps", "nps_responses", config.min_responses, True))
    baseline: list[float] = []
    firing: tuple[str, float, float] | None = None  # id, baseline mean, threshold
    quiet_until = None
    out: list[tuple[object, ...]] = []
    last = None
    for boundary, metrics in samples:
        if last is not None and boundary <= last:
            continue
        last = boundary
        value = metrics[metric]
        if value is None:
            continue
        assert isinstance(value, float)
        if firing is not None:
            fired_id, fired_mean, fired_threshold = firing
            if (value >= fired_threshold) if downward else (value <= fired_threshold):
                out.append(("resolved", fired_id, boundary, value, fired_mean, fired_threshold))
                firing = None
                quiet_until = boundary + config.cooldown_ms
                baseline.append(value)
            continue
        mean, var = 0.0, 0.0
        for position, x in enumerate(baseline):
            if position == 0:
                mean, var = x, 0.0
            else:
                weight = max(config.alpha, 1.0 / (position + 1))
                diff = x - mean
                increment = weight * diff
                mean, var = mean + increment, (1.0 - weight) * (var + diff * increment)
        threshold = mean - config.k * math.sqrt(var) if downward else mean + config.k * math.sqrt(var)
        count = metrics[count_name]
        assert isinstance(count, int)
        allowed = len(baseline) >= config.warmup_samples and count >= minimum and (
            quiet_until is None or boundary >= quiet_until)
        if downward:
            high = metrics["nps_ci_high"]
            past = value < threshold
            beyond = past and high is not None and high < threshold  # type: ignore[operator]
        else:
            past = value > threshold
            beyond = past and _wilson_low_percent(count, value) > threshold
        if allowed and beyond:
            fired_id = alert_id("store-1", config.window, kind, boundary)
            firing = (fired_id, mean, threshold)
            out.append(("firing", fired_id, boundary, value, mean, threshold))
        elif allowed and past:
            pass  # inconclusive: past the threshold, its interval not wholly: neither fires nor feeds
        else:
            baseline.append(value)
    return out


@st.composite
def sample_runs(draw: st.DrawFn) -> tuple[str, AlertConfig, list[Sample]]:
    """A detector kind, a small config and a run of samples with spikes, gaps, nulls and small counts."""
    kind = draw(st.sampled_from((CHURN_SPIKE, NPS_DROP)))
    config = AlertConfig(step_ms=STEP, warmup_ms=draw(st.integers(0, 5)) * STEP,
                         half_life_ms=draw(st.integers(1, 8)) * STEP, cooldown_ms=draw(st.integers(0, 4)) * STEP,
                         k=draw(st.sampled_from((0.0, 1.0, 2.0, 3.0))), min_churned=10, min_responses=30)
    levels = (0.0, 1.0, 1.5, 2.0, 6.0, 20.0) if kind == CHURN_SPIKE else (-80.0, -20.0, 10.0, 35.0, 40.0, 45.0)
    samples: list[Sample] = []
    boundary = draw(st.integers(0, 100)) * STEP
    for _ in range(draw(st.integers(1, 60))):
        boundary += draw(st.sampled_from((1, 1, 1, 2, 5))) * STEP  # boundaries may be skipped
        value = draw(st.one_of(st.none(), st.sampled_from(levels), st.floats(levels[0], levels[-1])))
        count = draw(st.sampled_from((0, 9, 10, 29, 30, 200)))
        if kind == CHURN_SPIKE:
            samples.append((boundary, {"churn_rate": value, "churned_customers": count}))
        else:
            high = None if value is None else min(100.0, value + draw(st.sampled_from((0.0, 5.0, 30.0, 90.0))))
            samples.append((boundary, {"nps": value, "nps_responses": count, "nps_ci_high": high}))
    return kind, config, samples


def alerts_of(kind: str, samples: Sequence[Sample], config: AlertConfig,
              cut: int | None = None) -> list[dict[str, object]]:
    """All alert events of a run; with ``cut``, the state goes through JSON after ``cut`` samples."""
    state = initial_state(kind, "store-1", config)
    out: list[dict[str, object]] = []
    for index, (boundary, metrics) in enumerate(samples):
        if index == cut:
            state = DetectorState.from_record(json.loads(json.dumps(state.to_record())))
        state, alerts = evaluate(state, boundary, metrics, config)
        out.extend(alerts)
    return out


@given(run_=sample_runs(), data=st.data())
@PROPERTY_SETTINGS
def test_restored_state_gives_the_same_alerts(run_: tuple[str, AlertConfig, list[Sample]], data: st.DataObject) -> None:
    """Serialising the state through JSON at any point, or replaying boundaries already seen, changes no alert."""
    kind, config, samples = run_
    straight = alerts_of(kind, samples, config)
    cut = data.draw(st.integers(0, len(samples)))
    assert alerts_of(kind, samples, config, cut=cut) == straight
    # a crash after a cut: the boundaries before it are evaluated again from the restored state
    replayed = samples[:cut] + samples[max(0, cut - 3):]
    assert alerts_of(kind, replayed, config, cut=cut) == straight


@given(run_=sample_runs())
@PROPERTY_SETTINGS
def test_detector_equals_the_plain_reference(run_: tuple[str, AlertConfig, list[Sample]]) -> None:
    """The detector's alerts equal the plain reference loop's: same states, ids, boundaries and numbers."""
    kind, config, samples = run_
    got = [(a["state"], a["alert_id"], a["as_of_ms"], a["observed"], a["baseline"], a["threshold"])
           for a in alerts_of(kind, samples, config)]
    assert got == reference_alerts(kind, samples, config)
    # firings and resolutions alternate, and each resolution carries the id of the firing before it
    for position, alert in enumerate(got):
        assert alert[0] == ("firing" if position % 2 == 0 else "resolved")
        if alert[0] == "resolved":
            assert alert[1] == got[position - 1][1]
