"""Kafka and Redis clients from the settings: the one place that knows about SASL and TLS.

Every Kafka client of the product (the Faust app, the input reader, the workers' own consumers
and admin clients, replay, simulate, bench) takes its keyword arguments from
:func:`kafka_client_options`, and the Faust app its credentials from :func:`faust_credentials`;
every Redis client (the worker's sinks, the dashboard, snapshot, alerts, demo) comes from
:func:`async_redis` or :func:`sync_redis`. A target is either the :class:`Settings`
(``KAFKA_SECURITY_PROTOCOL`` and friends, ``REDIS_URL`` with ``REDIS_SSL_CA_FILE``) or a plain
bootstrap string / Redis URL (no SASL, no custom CA: what the tests' plain servers use).

>>> kafka_client_options("127.0.0.1:9092")
{'bootstrap_servers': '127.0.0.1:9092'}
>>> kafka_client_options(Settings())["security_protocol"]
'PLAINTEXT'
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from typing import TYPE_CHECKING, Any

from infra.local import quiet
from streams.settings import Settings, redact_url

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis
    from faust.types.auth import CredentialsT

#: a Kafka to talk to: the settings, or a bootstrap string of a plain (PLAINTEXT) Kafka
KafkaTarget = Settings | str
#: a Redis to talk to: the settings, or a URL (``rediss://`` then trusts the system's CAs)
RedisTarget = Settings | str

#: default socket timeouts of the Redis clients (seconds)
REDIS_CONNECT_TIMEOUT_S = 5.0
REDIS_SOCKET_TIMEOUT_S = 5.0


class KafkaAccessError(Exception):
    """Kafka cannot be used with the configured access (unreachable, TLS, authentication): one line for the operator."""


class RedisAccessError(Exception):
    """Redis refuses the configured access (authentication, TLS): one line for the operator."""


# -- Kafka ---------------------------------------------------------------------------------------


def back_off_failed_metadata_updates() -> None:
    """Make aiokafka wait ``retry_backoff_ms`` after a metadata update that reached no broker.

    aiokafka (0.14) retries at once: its fetcher and sender ask for metadata again as soon as an
    update fails, and with the broker gone each attempt fails within microseconds, so a worker
    spun through thousands of attempts a second for as long as Kafka was away (a core's worth of
    CPU, and the log lines :class:`streams.logs.RepeatFilter` holds back). The Java client and
    kafka-python back off there. Successful updates are not delayed. Safe to call again.
    """
    from aiokafka.client import AIOKafkaClient

    update = AIOKafkaClient._metadata_update
    if getattr(update, "backs_off", False):
        return

    @functools.wraps(update)
    async def update_or_back_off(self: Any, cluster_metadata: Any, topics: Any) -> bool:
        updated: bool = await update(self, cluster_metadata, topics)
        if not updated:
            await asyncio.sleep(self._retry_backoff)
        return updated

    update_or_back_off.backs_off = True  # type: ignore[attr-defined]
    AIOKafkaClient._metadata_update = update_or_back_off


@functools.lru_cache(maxsize=16)
def ssl_context(cafile: str | None, certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """A client TLS context verifying the server (by ``cafile``, else the system's CAs), with a client cert if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def _kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    def text(path: object) -> str | None:
        return None if path is None else str(path)

    return ssl_context(
        text(settings.kafka_ssl_cafile), text(settings.kafka_ssl_certfile), text(settings.kafka_ssl_keyfile)
    )


def kafka_security(settings: Settings) -> dict[str, Any]:
    """The aiokafka keyword arguments of ``KAFKA_SECURITY_PROTOCOL`` and its SASL and TLS settings."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = _kafka_ssl_context(settings)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = password.get_secret_value() if password is not None else None
    return options


def kafka_client_options(kafka: KafkaTarget) -> dict[str, Any]:
    """``bootstrap_servers`` and the security keyword arguments of an aiokafka client (consumer, producer, admin)."""
    if isinstance(kafka, str):
        return {"bootstrap_servers": kafka}
    return {"bootstrap_servers": kafka.kafka_bootstrap_servers, **kafka_security(kafka)}


def bootstrap_of(kafka: KafkaTarget) -> str:
    """The bootstrap servers of ``kafka`` (for messages)."""
    return kafka if isinstance(kafka, str) else kafka.kafka_bootstrap_servers


def faust_credentials(settings: Settings) -> CredentialsT | None:
    """Faust's ``broker_credentials`` for the settings (``None``: PLAINTEXT).

    faust-streaming's aiokafka driver hands ``SASLCredentials``' mechanism (SCRAM-SHA-256/512
    included), username, password and TLS context to every consumer and producer it makes.
    """
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(_kafka_ssl_context(settings))
    security = kafka_security(settings)
    return faust.SASLCredentials(
        username=security["sasl_plain_username"],
        password=security["sasl_plain_password"],
        ssl_context=security.get("ssl_context"),
        mechanism=security["sasl_mechanism"],
    )


def describe_kafka_error(kafka: KafkaTarget, server: str, exc: BaseException) -> str:
    """One line saying why a connection to ``server`` failed, naming the settings to check."""
    from aiokafka import errors

    options = kafka_client_options(kafka)
    if isinstance(exc, errors.SaslAuthenticationFailed | errors.AuthenticationFailedError):
        return (
            f"Kafka authentication failed at {server} (SASL {options.get('sasl_mechanism')} as user "
            f"{options.get('sasl_plain_username')!r}): check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
        )
    if isinstance(exc, errors.UnsupportedSaslMechanismError | errors.AuthenticationMethodNotSupported):
        return f"Kafka at {server} does not accept SASL {options.get('sasl_mechanism')}: check KAFKA_SASL_MECHANISM"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"the TLS certificate of Kafka at {server} is not trusted ({exc.verify_message}): check KAFKA_SSL_CAFILE"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS with Kafka at {server} failed ({exc.reason}): check KAFKA_SECURITY_PROTOCOL and KAFKA_SSL_*"
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, errors.KafkaConnectionError) and "closed" in detail:
        # a TLS listener drops a plaintext client: say what to check
        detail += f" (does the listener expect another KAFKA_SECURITY_PROTOCOL than {options['security_protocol']}?)"
    return f"cannot reach Kafka at {server}: {detail}"


async def check_kafka(kafka: KafkaTarget, wait_s: float = 15.0) -> None:
    """Connect (and authenticate) to a bootstrap server once; :class:`KafkaAccessError` says why not.

    aiokafka's own clients only say "Unable to bootstrap" when authentication or TLS fails:
    this check, made before them, names the cause.
    """
    from aiokafka.conn import create_conn

    options = kafka_client_options(kafka)
    servers = [s.split("://", 1)[-1] for s in str(options.pop("bootstrap_servers")).split(",")]
    reasons = []
    with quiet("aiokafka"):
        for server in servers:
            host, _, port = server.rpartition(":")
            try:
                conn = await asyncio.wait_for(
                    create_conn(host, int(port), request_timeout_ms=int(wait_s * 1000), **options), wait_s
                )
            except TimeoutError:
                reasons.append(
                    f"Kafka at {server} did not answer within {wait_s:.0f}s: check KAFKA_BOOTSTRAP_SERVERS and "
                    "KAFKA_SECURITY_PROTOCOL"
                )
                continue
            except Exception as exc:
                reason = describe_kafka_error(kafka, server, exc)
                if "authentication" in reason or "TLS" in reason or "SASL" in reason:
                    raise KafkaAccessError(reason) from None  # the same for every server
                reasons.append(reason)
                continue
            conn.close()
            return
    raise KafkaAccessError(reasons[0] if len(reasons) == 1 else "; ".join(reasons))


# -- Redis ---------------------------------------------------------------------------------------


def redis_options(
    target: RedisTarget,
    *,
    timeout: float | None = REDIS_SOCKET_TIMEOUT_S,
    connect_timeout: float = REDIS_CONNECT_TIMEOUT_S,
) -> tuple[str, dict[str, Any]]:
    """The URL and keyword arguments of ``Redis.from_url`` (sync or asyncio) for ``target``."""
    options: dict[str, Any] = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout}
    if isinstance(target, str):
        return target, options
    if target.redis_ssl_ca_file is not None:
        options["ssl_ca_certs"] = str(target.redis_ssl_ca_file)
    return target.redis_url, options


def async_redis(
    target: RedisTarget,
    *,
    timeout: float | None = REDIS_SOCKET_TIMEOUT_S,
    connect_timeout: float = REDIS_CONNECT_TIMEOUT_S,
    **extra: Any,
) -> aioredis.Redis:
    """An asyncio Redis client (``rediss://`` with ``REDIS_SSL_CA_FILE``, the URL's password, socket timeouts)."""
    import redis.asyncio as aioredis

    url, options = redis_options(target, timeout=timeout, connect_timeout=connect_timeout)
    return aioredis.Redis.from_url(url, **options, **extra)


def sync_redis(
    target: RedisTarget,
    *,
    timeout: float | None = REDIS_SOCKET_TIMEOUT_S,
    connect_timeout: float = REDIS_CONNECT_TIMEOUT_S,
    **extra: Any,
) -> redis.Redis:
    """The blocking form of :func:`async_redis`."""
    import redis

    url, options = redis_options(target, timeout=timeout, connect_timeout=connect_timeout)
    return redis.Redis.from_url(url, **options, **extra)


def redis_access_problem(exc: BaseException) -> str | None:
    """One line when ``exc`` is a configuration problem (password, TLS), ``None`` for an outage."""
    import redis

    if isinstance(exc, redis.AuthenticationError | redis.AuthenticationWrongNumberOfArgsError):
        return "Redis authentication failed: check the password in REDIS_URL"
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("NOAUTH"):
        return "Redis authentication failed: Redis requires a password (REDIS_URL rediss://:PASSWORD@host:port/db)"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the TLS certificate of Redis is not trusted ({cause.verify_message}): check REDIS_SSL_CA_FILE"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, redis.ConnectionError) and "SSL" in str(exc) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return "the TLS certificate of Redis is not trusted: check REDIS_SSL_CA_FILE"
    return None


def redis_url_of(target: RedisTarget) -> str:
    """The Redis URL of ``target`` with its password shown as ``***``."""
    return redact_url(target if isinstance(target, str) else target.redis_url)


def redis_failure(target: RedisTarget, exc: BaseException) -> str:
    """One line for a failed Redis command: the configuration problem when it is one, else the outage."""
    problem = redis_access_problem(exc)
    where = redis_url_of(target)
    return f"{problem} ({where})" if problem is not None else f"cannot read Redis at {where}: {exc}"


async def check_redis(target: RedisTarget) -> None:
    """PING Redis once; :class:`RedisAccessError` when it refuses the password or TLS (an outage is no error)."""
    import redis.asyncio as aioredis

    client = async_redis(target)
    try:
        await client.ping()
    except (aioredis.RedisError, OSError) as exc:
        problem = redis_access_problem(exc)
        if problem is not None:
            raise RedisAccessError(f"{problem} ({redis_url_of(target)})") from None
    finally:
        await client.aclose()
