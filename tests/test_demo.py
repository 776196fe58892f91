"""The demo's alert tuning on the demo's traffic plan, in process: the injected spike fires, nothing else does."""

from __future__ import annotations

from itertools import chain

import pytest

from bench.alert_quality import alert_samples, detect_alerts, model_events
from metrics.alerts import CHURN_SPIKE
from metrics.catalog import ALL_STORES
from metrics.timegrid import parse_duration
from streams.cli import DEMO_CUSTOMERS_PER_RATE
from streams.settings import Settings
from streams.tools.demo import DEMO_ALERTS
from streams.tools.simulate import parse_churn_spike
from streams.tools.storefront import Storefronts

MINUTE_MS = 60_000
#: a live start off the minute, and a Wednesday afternoon (UTC): demand is changing by the hour
LIVE_START_MS = 1_764_165_600_000 + 17_123
#: a fifth of the demo's traffic keeps the test short; customers scale with it as the demo's do
RATE = 5.0


def demo_traffic_alerts(seed: int, spike: str | None, live_minutes: int) -> tuple[list[dict[str, object]], list[str]]:
    """Every alert of detectors with the demo's settings over the demo's traffic plan, and the store ids.

    The plan of ``loyalty demo``: a 3h backfill at the live rate before the live start, then
    live traffic at the same rate; event times evenly spaced, as the simulator's clock makes them.
    """
    settings = Settings(**{variable: value for variable, value in DEMO_ALERTS.values()})  # type: ignore[arg-type]
    config = settings.alert_config()
    assert config is not None and config.window == "1h"
    backfill_ms = parse_duration("3h")
    backfilled = round(RATE * backfill_ms / 1000)
    live = round(RATE * live_minutes * 60)
    times = chain((LIVE_START_MS - backfill_ms + int(i * backfill_ms / backfilled) for i in range(backfilled)),
                  (LIVE_START_MS + int(i * 1000 / RATE) for i in range(live)))
    churn_spike = parse_churn_spike(spike).resolve(0, LIVE_START_MS) if spike else None
    model = Storefronts(seed=seed, stores=3, customers=round(DEMO_CUSTOMERS_PER_RATE * RATE),
                        clock=times.__next__, churn_spike=churn_spike)
    events = model_events(model, backfilled + live, LIVE_START_MS + live_minutes * MINUTE_MS)
    samples = alert_samples(events, model.store_ids, config, settings.active_horizon_ms, 0)
    return detect_alerts(samples, config), model.store_ids


@pytest.mark.parametrize("seed", [3, 11])
def test_demo_spike_fires_for_its_store_only(seed: int) -> None:
    """The README's spike (x20 at 4 minutes) fires for its store within 5 minutes; the quiet stores never."""
    alerts, stores = demo_traffic_alerts(seed, "4m:20", live_minutes=15)
    firing = [alert for alert in alerts if alert["state"] == "firing"]
    spike_store = [alert for alert in firing if alert["store_id"] == stores[0]]
    assert [alert["kind"] for alert in spike_store] == [CHURN_SPIKE]
    onset = LIVE_START_MS + 4 * MINUTE_MS
    assert onset < spike_store[0]["as_of_ms"] <= onset + 5 * MINUTE_MS  # type: ignore[operator]
    assert {alert["store_id"] for alert in firing} <= {stores[0], ALL_STORES}


def test_demo_quiet_traffic_fires_nothing() -> None:
    """Without an injection the demo's backfill and an hour of live traffic fire no alert at all."""
    alerts, _ = demo_traffic_alerts(5, None, live_minutes=60)
    assert alerts == []
