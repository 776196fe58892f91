"""The ``loyalty`` command line (SPEC section 2).

``up``/``down``/``status`` manage the local Kafka and Redis (``infra.local``); ``worker`` runs
one Faust worker of the app from :func:`streams.app.create_app`.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click
from pydantic import ValidationError

from infra import local
from metrics.events import INPUT_TOPICS
from streams.settings import Settings, load_settings

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
    """Port for the local Kafka, and the external bootstrap string when KAFKA_BOOTSTRAP_SERVERS points elsewhere."""
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
            external_redis=r_external,
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
    if settings.is_set("redis_url"):
        click.echo(f"REDIS_URL={settings.redis_url}")


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional on some platforms
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@main.command()
def worker() -> None:
    """Run one Faust worker (start as many as you like with the same LOYALTY_APP_ID)."""
    settings = _settings()
    _use_uvloop()
    from faust import Worker

    from streams.app import create_app
    from streams.logging import configure_logging, logging_config

    configure_logging(settings.log_level)
    app = create_app(settings)
    Path(app.conf.datadir).mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        redirect_stdouts=False,
        quiet=not sys.stdout.isatty(),
    ).execute_from_commandline()


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

    from streams.replay import ReplayError
    from streams.replay import replay as run_replay

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

    from streams.snapshot import SnapshotUnavailable, read_snapshots, redact, render_table, snapshots_json

    settings = _settings()
    wanted = list(windows) or list(settings.windows)
    try:
        snapshots = read_snapshots(settings.redis_url, list(stores) or None, wanted)
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


if __name__ == "__main__":  # pragma: no cover
    main()
