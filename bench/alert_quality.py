"""Detection quality of the alert detectors (``metrics/alerts.py``) on simulated stores; in process, no Kafka.

    python bench/alert_quality.py [--days 120] [--history 365d] [--lead 28d] [--ks 2,3,4] [--output FILE]
                                  [--samples-cache FILE]

``--samples-cache`` keeps the samples (the costly part: the engine over the whole history) in a
file and reads them back on a later run with the same model settings, so detector changes and
values of k are measured again in seconds.

The storefront model (:mod:`streams.tools.storefront`, seasonal demand) makes ``--stores``
stores' events for ``--history`` and then ``--days`` of event time, evenly spaced. The
history is there because real stores have one: the model starts with no customers, so its
first months are a growth phase, and 90 days (the activity horizon) after it the customers
of that phase expire in a churn wave that lasts months (the churn rate of the quiet stores
went from 0.6% to 3.3% a day at day 90 when the run started at day 0). After a year the
customers' ages are in steady state. The engine folds in the whole history; the detectors
start ``--lead`` before day 0 (a baseline of four half-lives) and only the ``--days``
measured days count (firings in the lead are reported apart). One store gets a churn spike
(closures x``--spike-factor`` for ``--spike-duration``) and another an NPS drop (answers
mostly detractors for ``--drop-duration``). The events go through validation into the
incremental engine (:mod:`metrics.engine`) in time order; at every step boundary B each
store's 24h metrics are read as of the complete buckets before B (``sample_bucket``) and
fed to a churn and an NPS detector per store (and ``*``), once per k.

Reported per k: detection delay (first firing after the onset), resolution time after the
injection ends, and false alerts: firings of a kind on the stores without that injection,
per store-month of sampled time (30 days). Deterministic: same arguments, same figures.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from metrics.alerts import (
    CHURN_SPIKE,
    KINDS,
    NPS_DROP,
    AlertConfig,
    DetectorState,
    evaluate,
    initial_state,
    sample_bucket,
)
from metrics.catalog import ALL_STORES
from metrics.engine import LoyaltyEngine
from metrics.events import Event
from metrics.store import StoreAggregate
from metrics.timegrid import DAY_MS, Grid, parse_duration
from metrics.validation import parse_message
from streams.tools.storefront import ChurnSpike, NpsDrop, Storefronts

HOUR_MS = 3_600_000
MONTH_MS = 30 * DAY_MS
#: Monday 2024-01-01 00:00 UTC: weeks start with the data
START_MS = 1_704_067_200_000


def _events(args: argparse.Namespace, spike: ChurnSpike, drop: NpsDrop) -> tuple[list[Event], list[str]]:
    """The validated events of the history and the measured days in time order, and the store ids."""
    history_ms = parse_duration(args.history)
    span = args.days * DAY_MS + history_ms
    total = span * args.events_per_day // DAY_MS
    first_ms = START_MS - history_ms
    position = iter(range(total))
    model = Storefronts(seed=args.seed, stores=args.stores, customers=args.customers,
                        clock=lambda: first_ms + next(position) * span // total, churn_spike=spike, nps_drop=drop)
    return model_events(model, total, first_ms + span), model.store_ids


#: (boundary, {store: metrics}) in boundary order
Samples = list[tuple[int, dict[str, dict[str, object]]]]


def model_events(model: Storefronts, count: int, now_ms: int) -> list[Event]:
    """The next ``count`` events of ``model``, validated (as of ``now_ms``) as the worker would."""
    events: list[Event] = []
    for _ in range(count):
        topic, body = next(model)
        for item in parse_message(orjson.dumps(body), topic, now_ms=now_ms, max_future_skew_ms=0):
            assert isinstance(item, Event), item  # the model makes only valid events
            events.append(item)
    return events


def alert_samples(events: list[Event], store_ids: list[str], config: AlertConfig, horizon_ms: int,
                  from_ms: int) -> Samples:
    """(boundary, {store: metrics of the alert window before it}) for every step boundary from ``from_ms`` on."""
    grid = Grid(config.bucket_ms, horizon_ms, (config.window_ms,))
    window = grid.windows[0]
    engine = LoyaltyEngine(grid)
    step = config.step_ms
    boundary = max(events[0].occurred_at_ms // step + 1, -(-from_ms // step)) * step
    samples: Samples = []

    def sample(at: int) -> None:
        k = sample_bucket(at, config.bucket_ms)
        scopes = {store: engine.stores.get(store) or StoreAggregate() for store in store_ids}
        scopes[ALL_STORES] = engine.all_stores
        samples.append((at, {store: aggregate.metrics(grid, window, k) for store, aggregate in scopes.items()}))

    for event in events:
        while event.occurred_at_ms >= boundary:  # every event before B is in, none at or after it
            if boundary >= from_ms:
                sample(boundary)
            boundary += step
        engine.ingest(event)
    sample(boundary)
    return samples


def detect_alerts(samples: Samples, config: AlertConfig) -> list[dict[str, object]]:
    """Every alert event of a run of the detectors over the samples."""
    states: dict[tuple[str, str], DetectorState] = {}
    alerts: list[dict[str, object]] = []
    for boundary, by_store in samples:
        for store, metrics in by_store.items():
            for kind in KINDS:
                state = states.get((store, kind)) or initial_state(kind, store, config)
                states[(store, kind)], fired = evaluate(state, boundary, metrics, config)
                alerts.extend(fired)
    return alerts


def _at_ms(alert: dict[str, object]) -> int:
    """An alert's ``as_of_ms``."""
    at = alert["as_of_ms"]
    assert isinstance(at, int)
    return at


def _hours(ms: int | None) -> float | None:
    return None if ms is None else round(ms / HOUR_MS, 2)


def _quality(alerts: list[dict[str, object]], kind: str, store: str, onset_ms: int, end_ms: int,
             stores: list[str], sampled_ms: int) -> dict[str, Any]:
    """Detection delay and resolution of one injection, and false alerts of its kind elsewhere."""
    mine = [a for a in alerts if a["kind"] == kind and a["store_id"] == store]
    firing = next((a for a in mine if a["state"] == "firing" and int(a["as_of_ms"]) >= onset_ms), None)  # type: ignore[call-overload]
    resolved = None
    if firing is not None:
        resolved = next((a for a in mine if a["state"] == "resolved" and a["alert_id"] == firing["alert_id"]), None)
    early = [a for a in mine if a["state"] == "firing" and START_MS <= _at_ms(a) < onset_ms]
    quiet = [s for s in stores if s != store]
    elsewhere = [a for a in alerts if a["kind"] == kind and a["state"] == "firing" and a["store_id"] in quiet]
    false = [a for a in elsewhere if _at_ms(a) >= START_MS]
    lead = [a for a in alerts if a["kind"] == kind and a["state"] == "firing" and a["store_id"] != ALL_STORES
            and _at_ms(a) < START_MS]
    return {
        "store": store,
        "detected": firing is not None,
        "delay_h": _hours(int(firing["as_of_ms"]) - onset_ms) if firing else None,  # type: ignore[call-overload]
        "observed": firing["observed"] if firing else None,
        "threshold": firing["threshold"] if firing else None,
        "resolved_after_end_h": _hours(int(resolved["as_of_ms"]) - end_ms) if resolved else None,  # type: ignore[call-overload]
        "firings_on_this_store": sum(1 for a in mine if a["state"] == "firing"),
        "firings_before_onset": len(early),
        "false_alerts_quiet_stores": len(false),
        "false_alerts_per_store_month": round(len(false) / (len(quiet) * sampled_ms / MONTH_MS), 3),
        "false_alert_stores": sorted({str(a["store_id"]) for a in false}),
        "false_alert_days": [round((int(a["as_of_ms"]) - START_MS) / DAY_MS, 2) for a in false],  # type: ignore[call-overload]
        "firings_in_lead_all_stores": len(lead),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--days", type=int, default=120, help="measured days")
    parser.add_argument("--history", default="365d", help="simulated before day 0, folded in but not measured")
    parser.add_argument("--lead", default="28d", help="the detectors start this long before day 0")
    parser.add_argument("--stores", type=int, default=5)
    parser.add_argument("--customers", type=int, default=20_000, help="population of all stores together")
    parser.add_argument("--events-per-day", type=int, default=8_000, help="all stores together")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--horizon", default="90d", help="LOYALTY_ACTIVE_HORIZON")
    parser.add_argument("--spike-store", type=int, default=2, help="store number of the churn spike")
    parser.add_argument("--spike-at", default="70d", help="onset, after the start")
    parser.add_argument("--spike-factor", type=float, default=5.0)
    parser.add_argument("--spike-duration", default="24h")
    parser.add_argument("--drop-store", type=int, default=4, help="store number of the NPS drop")
    parser.add_argument("--drop-at", default="95d", help="onset, after the start")
    parser.add_argument("--drop-duration", default="48h")
    parser.add_argument("--ks", default="2,3,4", help="values of k to compare")
    parser.add_argument("--output", type=Path, default=Path("bench/results/alert_quality.json"))
    parser.add_argument("--samples-cache", type=Path, default=None,
                        help="read the samples from this file when it holds those of the same settings, else write it")
    args = parser.parse_args()

    # onsets off the hour, so a delay is not a multiple of the step by construction
    spike = ChurnSpike(args.spike_store - 1, START_MS + parse_duration(args.spike_at) + 37 * 60_000,
                       args.spike_factor, parse_duration(args.spike_duration))
    drop = NpsDrop(args.drop_store - 1, START_MS + parse_duration(args.drop_at) + 13 * 60_000,
                   parse_duration(args.drop_duration))
    started = time.process_time()
    base = AlertConfig()
    model = {key: value for key, value in vars(args).items() if key not in ("ks", "output", "samples_cache")}
    cache = args.samples_cache
    cached = orjson.loads(cache.read_bytes()) if cache is not None and cache.exists() else None
    if cached is not None and cached["model"] == model:
        stores, counts = cached["stores"], cached["counts"]
        from_cache = True
        samples = [(boundary, by_store) for boundary, by_store in cached["samples"]]
        generated = sampled = time.process_time()
    else:
        from_cache = False
        events, stores = _events(args, spike, drop)
        generated = time.process_time()
        lead_ms = parse_duration(args.lead)
        samples = alert_samples(events, stores, base, parse_duration(args.horizon), START_MS - lead_ms)
        sampled = time.process_time()
        measured = [e for e in events if e.occurred_at_ms >= START_MS]
        counts = {"events": len(measured), "events_with_history": len(events),
                  "per_store": {store: sum(1 for e in measured if e.store_id == store) for store in stores}}
        if args.samples_cache:
            watched = ("churn_rate", "churned_customers", "nps", "nps_responses", "nps_ci_high")
            kept = [(boundary, {store: {name: metrics[name] for name in watched}
                                for store, metrics in by_store.items()})
                    for boundary, by_store in samples]
            args.samples_cache.write_bytes(orjson.dumps({"model": model, "stores": stores, "counts": counts,
                                                         "samples": kept}))
    sampled_ms = samples[-1][0] - START_MS
    spike_store, drop_store = stores[spike.store_index], stores[drop.store_index]
    assert spike.duration_ms is not None

    results: list[dict[str, Any]] = []
    for k in (float(text) for text in args.ks.split(",")):
        config = replace(base, k=k)
        alerts = detect_alerts(samples, config)
        results.append({
            "k": k,
            CHURN_SPIKE: _quality(alerts, CHURN_SPIKE, spike_store, spike.at_ms, spike.at_ms + spike.duration_ms,
                                  stores, sampled_ms),
            NPS_DROP: _quality(alerts, NPS_DROP, drop_store, drop.at_ms, drop.at_ms + drop.duration_ms, stores,
                               sampled_ms),
            "all_stores_firings": {kind: sum(1 for a in alerts if a["store_id"] == ALL_STORES and a["kind"] == kind
                                             and a["state"] == "firing" and _at_ms(a) >= START_MS)
                                   for kind in KINDS},
        })
    detected = time.process_time()

    per_store = {store: count / args.days for store, count in counts["per_store"].items()}
    report = {
        "what": "alert detection quality (bench/alert_quality.py): 24h window, 15m step, other settings default",
        "settings": {**{key: value for key, value in vars(args).items() if key not in ("output", "samples_cache")},
                     "step_ms": base.step_ms, "warmup_samples": base.warmup_samples,
                     "half_life_samples": int(base.half_life_samples), "min_churned": base.min_churned,
                     "min_responses": base.min_responses, "cooldown_ms": base.cooldown_ms},
        "events": counts["events"],
        "events_with_history": counts["events_with_history"],
        "events_per_store_day": {store: round(value) for store, value in per_store.items()},
        "boundaries": sum(1 for boundary, _ in samples if boundary >= START_MS),
        "boundaries_with_lead": len(samples),
        "sampled_days": round(sampled_ms / DAY_MS, 2),
        "samples_from_cache": from_cache,
        "cpu_seconds": {"generate": round(generated - started, 1), "engine_and_samples": round(sampled - generated, 1),
                        "detectors": round(detected - sampled, 1)},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"{counts['events_with_history']:,} events, {len(samples):,} boundaries x {len(stores) + 1} scopes; "
          f"wrote {args.output}")
    print(f"{'k':>3} | {'churn: delay h':>14} {'resolved h':>10} {'false/store-mo':>14} | "
          f"{'NPS: delay h':>12} {'resolved h':>10} {'false/store-mo':>14} | * firings")
    for row in results:
        churn, nps = row[CHURN_SPIKE], row[NPS_DROP]
        print(f"{row['k']:>3g} | {churn['delay_h']!s:>14} {churn['resolved_after_end_h']!s:>10} "
              f"{churn['false_alerts_per_store_month']:>14} | {nps['delay_h']!s:>12} "
              f"{nps['resolved_after_end_h']!s:>10} {nps['false_alerts_per_store_month']:>14} | "
              f"{row['all_stores_firings']}")


if __name__ == "__main__":
    main()
