"""The ``loyalty`` command line (SPEC section 2).

Thin: each command parses its options and calls the room that does the work: ``up``/``down``/
``status`` the local Kafka and Redis (:mod:`infra.local`), ``worker`` :mod:`streams.worker.run`,
``simulate``/``replay``/``snapshot``/``demo`` :mod:`streams.tools`, ``dashboard`` :mod:`streams.dashboard`,
``bench`` :mod:`bench.run`
(imported only when the command runs).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from infra import local
from metrics.events import INPUT_TOPICS
from streams.settings import Settings, load_settings, redact_url

if TYPE_CHECKING:
    from streams.tools.simulate import SimulationOptions

#: the demo's default customers per event/s of --rate: the churn level its alert tuning (the demo's
#: LOYALTY_ALERT_* values) was measured with; more customers per event/s, lower churn rates
DEMO_CUSTOMERS_PER_RATE = 200

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in exc.errors()]
        raise click.ClickException("invalid configuration:\n" + "\n".join(lines)) from None


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _local_kafka_port(settings: Settings, flag: int | None) -> tuple[int, str | None]:
    """Port for the local Kafka, and the external bootstrap string when KAFKA_BOOTSTRAP_SERVERS points elsewhere.

    A Kafka with another KAFKA_SECURITY_PROTOCOL than PLAINTEXT is always someone else's (as a Redis with a
    password or TLS is): `up` starts only plaintext servers.
    """
    if settings.kafka_security_protocol != "PLAINTEXT":  # `up` starts a plaintext Kafka only
        return flag or local.DEFAULT_KAFKA_PORT, settings.kafka_bootstrap_servers
    if not settings.is_set("kafka_bootstrap_servers"):
        return flag or local.DEFAULT_KAFKA_PORT, None
    servers = settings.bootstrap_servers
    host, _, port = servers[0].rpartition(":")
    if len(servers) == 1 and host in LOOPBACK_HOSTS:
        return flag or int(port), None  # it names a server on this machine: the one `up` runs
    return flag or local.DEFAULT_KAFKA_PORT, settings.kafka_bootstrap_servers


def _local_redis_port(settings: Settings, flag: int | None) -> tuple[int, str | None]:
    """Port for the local Redis, and the external URL when REDIS_URL points elsewhere."""
    if not settings.is_set("redis_url"):
        return flag or local.DEFAULT_REDIS_PORT, None
    url = urlsplit(settings.redis_url)
    loopback = url.scheme == "redis" and url.hostname in LOOPBACK_HOSTS and not url.password
    port = url.port or local.DEFAULT_REDIS_PORT
    if loopback:
        return flag or port, None
    return flag or local.DEFAULT_REDIS_PORT, settings.redis_url


def _echo_status(statuses: list[local.Status]) -> None:
    colours = {"started": "green", "running": "green", "stopped": "yellow", "external": "cyan"}
    for status in statuses:
        click.echo(click.style(status.line(), fg=colours.get(status.state)))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="loyalty-metrics", prog_name="loyalty")
def main() -> None:
    """Real-time customer-loyalty metrics: Kafka in, Faust agents, Kafka and Redis out.

    Configuration comes from environment variables (and a .env file); see the README.
    """


@main.command()
@click.option("--kafka-port", type=click.IntRange(1, 65535), help="Kafka client port (default 9092).")
@click.option("--controller-port", type=click.IntRange(1, 65535), help="KRaft controller port (default Kafka + 1).")
@click.option("--redis-port", type=click.IntRange(1, 65535), help="Redis port (default 6379).")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for readiness.")
def up(kafka_port: int | None, controller_port: int | None, redis_port: int | None, timeout: float) -> None:
    """Start local Kafka (KRaft) and Redis unless already running or configured elsewhere.

    Data and logs go to LOYALTY_STATE_DIR. When KAFKA_BOOTSTRAP_SERVERS or REDIS_URL name
    a server that is not on this machine, nothing is started for it.
    """
    settings = _settings()
    k_port, k_external = _local_kafka_port(settings, kafka_port)
    r_port, r_external = _local_redis_port(settings, redis_port)
    try:
        statuses = local.up(
            settings.state_dir,
            kafka_port=k_port,
            controller_port=controller_port,
            redis_port=r_port,
            external_kafka=k_external,
            external_redis=redact_url(r_external) if r_external is not None else None,  # for the status line
            timeout=timeout,
            echo=click.echo,
        )
    except local.InfraError as exc:
        raise _fail(exc) from None
    _echo_status(statuses)
    click.echo(f"state: {settings.state_dir}")
    exports = []
    kafka, redis = statuses
    if kafka.state != "external" and not settings.is_set("kafka_bootstrap_servers") and k_port != 9092:
        exports.append(f"KAFKA_BOOTSTRAP_SERVERS={kafka.address}")
    if redis.state != "external" and not settings.is_set("redis_url") and r_port != 6379:
        exports.append(f"REDIS_URL={redis.address}")
    if exports:
        click.echo("to point the other commands at them: export " + " ".join(exports))


@main.command()
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds before SIGKILL.")
def down(timeout: float) -> None:
    """Stop the Kafka and Redis that `loyalty up` started (from LOYALTY_STATE_DIR)."""
    settings = _settings()
    try:
        statuses = local.down(settings.state_dir, timeout=timeout)
    except local.InfraError as exc:
        raise _fail(exc) from None
    _echo_status(statuses)


@main.command()
def status() -> None:
    """Show whether the local Kafka and Redis run and answer."""
    settings = _settings()
    _echo_status(local.status(settings.state_dir))
    if settings.is_set("kafka_bootstrap_servers"):
        click.echo(f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}")
    if settings.kafka_security_protocol != "PLAINTEXT":
        click.echo(" ".join(f"{name}={value}" for name, value in kafka_security_view(settings)))
    if settings.is_set("redis_url"):
        click.echo(f"REDIS_URL={settings.redis_url_redacted}")
    if settings.redis_ssl_ca_file is not None:
        click.echo(f"REDIS_SSL_CA_FILE={settings.redis_ssl_ca_file}")


def kafka_security_view(settings: Settings) -> list[tuple[str, str]]:
    """The Kafka security settings that are set, the password as ``***``."""
    values = {
        "KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "KAFKA_SASL_USERNAME": settings.kafka_sasl_username,
        "KAFKA_SASL_PASSWORD": "***" if settings.kafka_sasl_password is not None else None,
        "KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile,
        "KAFKA_SSL_CERTFILE": settings.kafka_ssl_certfile,
        "KAFKA_SSL_KEYFILE": settings.kafka_ssl_keyfile,
    }
    return [(name, str(value)) for name, value in values.items() if value is not None]


@main.command()
def worker() -> None:
    """Run one Faust worker (start as many as you like with the same LOYALTY_APP_ID)."""
    from streams.worker.run import WorkerStartError, run_worker

    settings = _settings()
    try:
        run_worker(settings)
    except WorkerStartError as exc:
        raise _fail(exc) from None


@main.command()
@click.option("--host", help="Address to bind (default LOYALTY_DASHBOARD_HOST, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default LOYALTY_DASHBOARD_PORT, 8080).")
def dashboard(host: str | None, port: int | None) -> None:
    """Serve the live dashboard, its JSON API, /metrics (Prometheus) and /healthz, from Redis.

    The page (?store=S&window=W) updates live through server-sent events fed by one Redis
    pub/sub subscription, which reconnects by itself when Redis restarts.
    """
    from streams.dashboard.server import run_dashboard

    settings = _settings()
    overrides = {key: value for key, value in (("dashboard_host", host), ("dashboard_port", port)) if value}
    if overrides:
        settings = settings.model_copy(update=overrides)
    try:
        run_dashboard(settings, print_url=click.echo)
    except OSError as exc:  # the port is taken, the address is not ours
        raise _fail(exc) from None


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.option("--batch", type=click.IntRange(1, 10_000), default=500, show_default=True, metavar="N",
              help="At most N events per message (and at most ~900 KB).")
@click.option("--topic", type=click.Choice(INPUT_TOPICS), metavar="TOPIC",
              help=f"Send every event to this input topic ({', '.join(INPUT_TOPICS)}) "
              "instead of the one of its type.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def replay(file: Path, batch: int, topic: str | None, progress: bool) -> None:
    """Publish the events of a JSON-lines FILE (one event object per line) in batches.

    Invalid lines (not JSON, not an object, unknown type) are reported with their line
    numbers and not sent; the worker validates and dead-letters everything else.
    """
    import logging

    from streams.tools.replay import ReplayError
    from streams.tools.replay import replay as run_replay

    logging.getLogger("aiokafka").addHandler(logging.NullHandler())  # failures end in one clear message
    settings = _settings()
    try:
        summary = asyncio.run(run_replay(settings, file, batch, progress=progress, topic=topic))
    except ReplayError as exc:
        raise _fail(exc) from None
    click.echo(summary.text())


@main.command()
@click.option("--store", "stores", multiple=True, help="Only this store (repeatable; `*` is all stores).")
@click.option("--window", "windows", multiple=True, help="Only this window (repeatable; default LOYALTY_WINDOWS).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {store: {window: {as_of_ms, currency, metrics}}}.")
def snapshot(stores: tuple[str, ...], windows: tuple[str, ...], as_json: bool) -> None:
    """Print the current metrics from Redis (exit 1: no metrics there, 2: Redis unreachable)."""
    from rich.console import Console

    from streams.tools.snapshot import SnapshotUnavailable, read_snapshots, redact, render_table, snapshots_json

    settings = _settings()
    wanted = list(windows) or list(settings.windows)
    try:
        snapshots = read_snapshots(settings, list(stores) or None, wanted)
    except SnapshotUnavailable as exc:
        click.echo(click.style(f"Error: {exc}", fg="red"), err=True)
        sys.exit(2)
    missing = [store for store in stores if store not in snapshots]
    if not snapshots or missing:
        which = f"store(s) {', '.join(missing)}" if missing else "any store"
        click.echo(
            f"Error: no metrics in Redis ({redact(settings.redis_url)}) for {which} and window(s) "
            f"{', '.join(wanted)}. Is a worker running (`loyalty worker`) and have events arrived?",
            err=True,
        )
        if not snapshots:
            sys.exit(1)
    if as_json:
        click.echo(snapshots_json(snapshots).decode())
    else:
        console = Console()
        console.print(render_table(snapshots, width=console.width))
    if missing:
        sys.exit(1)



def _simulation_options(rate: float, duration: str | None, events: int | None, stores: int, customers: int,
                        seed: int | None, start: str | None, churn_spike: str | None, spike_store: str | None,
                        batch: int, nps_drop: str | None = None, **extra: object) -> SimulationOptions:
    """The options of ``simulate`` and ``demo`` checked and parsed (usage errors name the option)."""
    import random

    from metrics.timegrid import parse_duration
    from streams.tools.simulate import SimulationOptions, parse_churn_spike, parse_nps_drop, parse_start

    def parsed(option: str, parse: Callable[[str], T], text: str | None) -> T | None:
        try:
            return parse(text) if text is not None else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None

    spike = parsed("--churn-spike", parse_churn_spike, churn_spike)
    drop = parsed("--nps-drop", parse_nps_drop, nps_drop)
    store_index = 0
    if spike_store is not None:
        if spike is None and drop is None:
            raise click.BadParameter("only with --churn-spike or --nps-drop", param_hint="--spike-store")
        number = spike_store.removeprefix("store-")
        if not number.isdigit() or not 1 <= int(number) <= stores:
            raise click.BadParameter(f"{spike_store!r} is not one of store-1..store-{stores}",
                                     param_hint="--spike-store")
        store_index = int(number) - 1
    try:
        return SimulationOptions(
            rate=rate,
            duration_ms=parsed("--duration", parse_duration, duration),
            events=events,
            stores=stores,
            customers=customers,
            seed=seed if seed is not None else random.SystemRandom().randrange(1, 1_000_000),
            start_ms=parsed("--start", parse_start, start),
            churn_spike=spike,
            nps_drop=drop,
            spike_store=store_index,
            batch=batch,
            **extra,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _traffic_options(rate: float, stores: int = 3, customers: int | None = 3000) -> Callable[[F], F]:
    """The traffic options shared by ``simulate`` and ``demo``."""
    options = [
        click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=rate, show_default=True,
                     help="Events per second (live: the send rate; historical: events per second of event time)."),
        click.option("--stores", type=click.IntRange(1, 1000), default=stores, show_default=True,
                     help="Stores store-1..store-N, of decreasing size."),
        click.option("--customers", type=click.IntRange(1), default=customers, show_default=customers is not None,
                     help="Customers the stores grow to together (arrivals continue at a trickle)"
                     + (f"; default {DEMO_CUSTOMERS_PER_RATE} per event/s of --rate." if customers is None else ".")),
        click.option("--seed", type=int, help="Random seed (default: a random one, printed); same seed, same traffic."),
        click.option("--churn-spike", metavar="AT:FACTOR",
                     help="From AT (an offset from the start like 30s or 2d, or RFC 3339 / epoch ms) the spike "
                     "store closes accounts at FACTOR times its normal rate and its customers stop ordering."),
        click.option("--nps-drop", metavar="AT:DURATION",
                     help="From AT (as in --churn-spike) for DURATION (e.g. 1d) the spike store's NPS survey "
                     "answers are mostly detractors."),
        click.option("--spike-store", metavar="STORE",
                     help="Store of --churn-spike and --nps-drop (default store-1)."),
    ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _run_until_interrupted(coroutine_of_stop: Callable[[asyncio.Event], Awaitable[T]]) -> T:
    """Run ``coroutine_of_stop(stop)``; the first Ctrl-C (or SIGTERM) sets ``stop`` so the run ends cleanly."""
    import signal

    async def run() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            return await coroutine_of_stop(stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    return asyncio.run(run())


@main.command()
@_traffic_options(rate=200.0)
@click.option("--duration", metavar="DURATION",
              help="Live: stop after this long (e.g. 60s, 10m). Historical: the event-time span covered (e.g. 30d).")
@click.option("--events", type=click.IntRange(1), metavar="N", help="Stop after N events.")
@click.option("--start", metavar="TIME",
              help="Historical run: event times from TIME (RFC 3339 or epoch ms), spread over --duration "
              "(else advancing 1/--rate s per event), sent as fast as Kafka acknowledges.")
@click.option("--batch", type=click.IntRange(1, 10_000), default=1, show_default=True, metavar="N",
              help="Events per Kafka message (a JSON array when N > 1).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def simulate(rate: float, stores: int, customers: int, seed: int | None, churn_spike: str | None,
             nps_drop: str | None, spike_store: str | None, duration: str | None, events: int | None,
             start: str | None, batch: int, progress: bool) -> None:
    """Publish realistic storefront traffic to the five input topics.

    Live by default: event times are the wall clock when sent, at --rate events per second,
    until --duration, --events or Ctrl-C (what is buffered is still sent). Customers arrive
    through signup channels, order repeatedly with gaps, get refunds, close accounts, answer
    NPS/CSAT/CES/CLI surveys; stores spend on marketing by channel; loyalty members earn and
    redeem rewards; orders and arrivals peak on weekends and evenings and are quiet at night
    (UTC). With --start, a backfill of historical traffic.
    """
    import logging

    from streams.tools.simulate import SimulationError, progress_bar, run_simulation

    logging.getLogger("aiokafka").addHandler(logging.NullHandler())  # retries are not news; failures end the run
    options = _simulation_options(rate, duration, events, stores, customers, seed, start, churn_spike, spike_store,
                                  batch, nps_drop)
    if options.live and options.events is None and options.duration_ms is None:
        click.echo("live traffic until Ctrl-C", err=True)
    settings = _settings()
    bar, update = progress_bar(None) if progress else (None, None)
    try:
        stats = _run_until_interrupted(lambda stop: run_simulation(settings, options, update, stop))
    except SimulationError as exc:
        raise _fail(exc) from None
    finally:
        if bar is not None:
            bar.stop()
    click.echo(stats.text())


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Then print new alerts as they come (Ctrl-C stops).")
@click.option("--store", metavar="STORE", help="Only this store's alerts.")
@click.option("--json", "as_json", is_flag=True, help="Print one alert JSON object per line.")
@click.option("--count", type=click.IntRange(1, 10_000), default=20, show_default=True, metavar="N",
              help="How many recent alerts.")
def alerts(follow: bool, store: str | None, as_json: bool, count: int) -> None:
    """Print the recent alerts from Redis (stream loyalty:alerts); exit 2: Redis unreachable."""
    from rich.console import Console

    from streams.tools import alerts as tool
    from streams.tools.snapshot import SnapshotUnavailable

    settings = _settings()
    console = Console()

    def show(items: list[dict[str, Any]], table: bool) -> None:
        if as_json:
            for item in items:
                click.echo(orjson_text(item))
        elif table:
            console.print(tool.render_table(items))
        else:
            for item in items:
                console.print(tool.alert_line(item))

    try:
        recent = tool.read_recent(settings, count, store)
        if recent or not follow:
            show([alert for _, alert in recent], table=True)
        if not recent and not follow and not as_json:
            click.echo("no alerts in Redis", err=True)
        if follow:
            after = recent[-1][0] if recent else "$"
            for _, alert in tool.follow(settings, after, store):
                show([alert], table=False)
    except SnapshotUnavailable as exc:
        click.echo(click.style(f"Error: {exc}", fg="red"), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass


def orjson_text(value: object) -> str:
    """One JSON line."""
    import orjson

    return orjson.dumps(value).decode()


@main.command()
@_traffic_options(rate=25.0, customers=None)
@click.option("--window", metavar="WINDOW", help="Window shown in the table (default: the first of LOYALTY_WINDOWS).")
@click.option("--backfill", default="3h", show_default=True, metavar="DURATION",
              help="First publish the traffic of this long before now, at the live rate, so windows have a past "
              "and the alert baselines are learnt on traffic like the live one ('0': none).")
@click.option("--duration", metavar="DURATION", help="Stop by itself after this long (default: at Ctrl-C).")
def demo(rate: float, stores: int, customers: int | None, seed: int | None, churn_spike: str | None,
         nps_drop: str | None, spike_store: str | None, window: str | None, backfill: str,
         duration: str | None) -> None:
    """Run everything: `loyalty up`, a worker and live simulated traffic, with a live table of the metrics.

    Shows customers_end, churn_rate, nps, repeat_purchase_rate, gross_revenue and as_of per
    store, read from Redis every second. Ctrl-C stops what the demo started: the simulator,
    the worker, and Kafka/Redis when they were not running before.
    """
    import logging

    from metrics.timegrid import parse_duration
    from streams.tools.demo import DemoOptions, run_demo

    logging.getLogger("aiokafka").addHandler(logging.NullHandler())  # the live table is the output
    settings = _settings()
    shown = window or settings.windows[0]
    if shown not in settings.windows:
        raise click.BadParameter(f"{shown!r} is not one of LOYALTY_WINDOWS ({','.join(settings.windows)})",
                                 param_hint="--window")
    try:
        backfill_ms = 0 if backfill.strip() == "0" else parse_duration(backfill)
        limit_s = parse_duration(duration) / 1000 if duration else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    customers = customers or max(1, round(DEMO_CUSTOMERS_PER_RATE * rate))
    options = _simulation_options(rate, None, None, stores, customers, seed, None, churn_spike, spike_store, 1,
                                  nps_drop, backfill_ms=backfill_ms or None,
                                  backfill_events=round(rate * backfill_ms / 1000))
    before = {status.name: status.state for status in local.status(settings.state_dir)}
    click.get_current_context().invoke(up)
    started = [status.name for status in local.status(settings.state_dir)
               if status.state == "running" and before.get(status.name) != "running"]
    code = 1
    try:
        code = run_demo(settings, DemoOptions(options, shown, limit_s))
    finally:
        for service in (local.LocalRedis, local.LocalKafka):
            if service.name in started:
                click.echo(f"stopping {service.name} (started by the demo) ...")
                _echo_status([service(settings.state_dir).stop()])
    sys.exit(code)


@main.command()
@click.option("--events", type=click.IntRange(0), default=1_000_000, show_default=True, metavar="N",
              help="Events of the throughput runs (historical storefront traffic; 0: skip them).")
@click.option("--batch", type=click.IntRange(2, 10_000), default=500, show_default=True, metavar="N",
              help="Events per message of the batched run (the other run sends one per message).")
@click.option("--batched/--no-batched", default=True, show_default=True,
              help="Also run the batched shape (the single-event shape always runs).")
@click.option("--stores", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--customers", type=click.IntRange(1), default=200_000, show_default=True,
              help="Customers the simulated stores grow to.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--sample-stores", type=click.IntRange(0), default=2, show_default=True,
              help="Stores whose final snapshots are checked against the batch reference.")
@click.option("--rate", type=click.FloatRange(min=1, min_open=False), default=2_000.0, show_default=True,
              help="Events per second of the latency run.")
@click.option("--duration", default="60s", show_default=True, metavar="DURATION",
              help="Length of the latency run (0: skip it).")
@click.option("--memory-customers", type=click.IntRange(0), default=1_000_000, show_default=True, metavar="N",
              help="Distinct customers of the memory run (0: skip it).")
@click.option("--small-stores", type=click.IntRange(0), default=10_000, show_default=True, metavar="N",
              help="Stores of 5 customers each of the small-stores memory run (0: skip it).")
@click.option("--restart-events", default="200000,2000000", show_default=True, metavar="N,N",
              help="History lengths of the restart-time runs, comma-separated (0: skip them).")
@click.option("--scale-events", type=click.IntRange(0), default=300_000, show_default=True, metavar="N",
              help="Events of the one-worker against two-workers run (0: skip it).")
@click.option("--emit-interval", default="250ms", show_default=True, metavar="DURATION",
              help="LOYALTY_EMIT_INTERVAL of the bench's workers.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench/results"),
              show_default=True)
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Seconds any one part may take.")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Run the Quix Streams peer (one state update per event) on each shape.")
@click.option("--latency-runs", type=click.IntRange(1, 10), default=3, show_default=True, metavar="N",
              help="How many times the latency part runs, each with a fresh worker.")
def bench(events: int, batch: int, batched: bool, stores: int, customers: int, seed: int, sample_stores: int,
          rate: float, duration: str, memory_customers: int, small_stores: int, restart_events: str,
          scale_events: int, emit_interval: str, output_dir: Path, timeout: float, peer: bool,
          latency_runs: int) -> None:
    """Measure throughput beside the aiokafka and empty-Faust-agent ceilings and the Quix Streams peer,
    latency and memory (SPEC 9).

    Starts local Kafka and Redis like `loyalty up` when they are not running. Prints a
    table and writes OUTPUT_DIR/<date>.json and a PNG of it; the run ends by checking the final
    snapshots of the sample stores against the batch reference.
    """
    import logging

    from rich.console import Console

    from bench.run import BenchError, BenchOptions, render_table, run_bench
    from metrics.timegrid import parse_duration

    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    try:
        duration_s = 0.0 if duration.strip() == "0" else parse_duration(duration) / 1000
        emit_ms = parse_duration(emit_interval)
        restarts = tuple(int(part) for part in restart_events.split(",") if part.strip() and int(part) > 0)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    options = BenchOptions(events=events, batch=batch, stores=stores, customers=customers, seed=seed,
                           sample_stores=min(sample_stores, stores), rate=rate, duration_s=duration_s,
                           memory_customers=memory_customers, small_stores=small_stores, emit_interval_ms=emit_ms,
                           restart_events=restarts, scale_events=scale_events, timeout_s=timeout,
                           output_dir=output_dir, shapes=(1, batch) if batched else (1,), peer=peer,
                           latency_runs=latency_runs)
    click.get_current_context().invoke(up)
    settings = _settings()
    console = Console(stderr=True)
    from streams.worker.run import use_uvloop

    use_uvloop()
    try:
        results = asyncio.run(run_bench(settings, options, echo=lambda text: console.print(text)))
    except BenchError as exc:
        raise click.ClickException(str(exc)) from None
    Console().print(render_table(results))
    click.echo(f"written: {results['path']} and {results['plot']}")

if __name__ == "__main__":  # pragma: no cover
    main()
