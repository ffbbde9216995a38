"""Settings read once from the environment (or a mapping in tests) and validated.

Environment variables, with defaults:

- ``DATABASE_URL`` (required): writes. In production the PgBouncer pool in transaction mode.
- ``DATABASE_REPLICA_URLS`` (""): comma-separated read replicas, direct connections.
- ``SECRET_KEY`` (required outside tests): signs the session cookie.
- ``DB_POOL_SIZE`` (2), ``DB_MAX_OVERFLOW`` (2): connections kept / added per server and worker.
- ``DB_POOL_TIMEOUT`` (2): seconds to wait for a free pooled connection.
- ``DB_CONNECT_TIMEOUT`` (2): seconds to open a connection (libpq treats 1 as 2).
- ``DB_STATEMENT_TIMEOUT_MS`` (3000): server-side limit per statement; the client gives up on a
  round trip one second after the limits of the statements it carries (see ``app.db``).
- ``DB_REPLICA_RETRY_SECONDS`` (5): how long a replica that failed is skipped for reads.
- ``DB_REPLICA_MAX_LAG_SECONDS`` (30): a replica further behind the primary is skipped for
  reads until it catches up, and ``/readyz/replication`` answers 503 (see ``app.lag``).
- ``DB_REPLICA_LAG_SAMPLE_SECONDS`` (2): how often each process measures the replicas' lag.
- ``DB_CONCURRENCY_LIMIT`` (pool size + overflow): threads per process that may do database
  work at once; keep it below gunicorn's thread count, so a thread stays free for ``/healthz``
  (see ``app.db``, "Bounded database work").
- ``MAX_BODY_MB`` (1): largest request body, in MiB; larger ones get 413. On a droplet it is
  the stack's ``app.maxBodyMb``, nginx's ``client_max_body_size`` too, so a body nginx lets
  through is never refused here for its size.

URLs may use the ``postgres://`` or ``postgresql://`` schemes DigitalOcean hands out.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

T = TypeVar("T", int, float)

POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "postgresql+psycopg"})


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated settings of one app instance."""

    database_url: URL
    replica_urls: tuple[URL, ...]
    secret_key: str
    pool_size: int = 2
    max_overflow: int = 2
    pool_timeout: float = 2.0
    connect_timeout: int = 2
    statement_timeout_ms: int = 3000
    replica_retry_seconds: float = 5.0
    replica_max_lag_seconds: float = 30.0
    replica_lag_sample_seconds: float = 2.0
    concurrency_limit: int = 4
    max_body_mb: int = 1

    @classmethod
    def from_mapping(cls, source: Mapping[str, object], *, testing: bool = False) -> Settings:
        """Build settings from environment-style keys; ``testing`` allows a missing SECRET_KEY."""
        secret_key = str(source.get("SECRET_KEY") or "")
        if not secret_key:
            if not testing:
                raise ConfigError("SECRET_KEY is required: set it to a long random string")
            secret_key = secrets.token_hex(32)
        database_url = source.get("DATABASE_URL")
        if not database_url:
            raise ConfigError("DATABASE_URL is required (postgresql://user:pass@host:port/db)")
        replicas = str(source.get("DATABASE_REPLICA_URLS") or "")
        pool_size = _number(source, "DB_POOL_SIZE", int, cls.pool_size, minimum=1)
        max_overflow = _number(source, "DB_MAX_OVERFLOW", int, cls.max_overflow, minimum=0)
        return cls(
            database_url=sqlalchemy_url(str(database_url), "DATABASE_URL"),
            replica_urls=tuple(
                sqlalchemy_url(url.strip(), "DATABASE_REPLICA_URLS")
                for url in replicas.split(",")
                if url.strip()
            ),
            secret_key=secret_key,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=_number(source, "DB_POOL_TIMEOUT", float, cls.pool_timeout, minimum=0.1),
            connect_timeout=_number(
                source, "DB_CONNECT_TIMEOUT", int, cls.connect_timeout, minimum=1
            ),
            statement_timeout_ms=_number(
                source, "DB_STATEMENT_TIMEOUT_MS", int, cls.statement_timeout_ms, minimum=100
            ),
            replica_retry_seconds=_number(
                source, "DB_REPLICA_RETRY_SECONDS", float, cls.replica_retry_seconds, minimum=0
            ),
            replica_max_lag_seconds=_number(
                source, "DB_REPLICA_MAX_LAG_SECONDS", float, cls.replica_max_lag_seconds,
                minimum=0.1),
            replica_lag_sample_seconds=_number(
                source, "DB_REPLICA_LAG_SAMPLE_SECONDS", float, cls.replica_lag_sample_seconds,
                minimum=0.1),
            concurrency_limit=_number(
                source, "DB_CONCURRENCY_LIMIT", int, pool_size + max_overflow, minimum=1
            ),
            max_body_mb=_number(source, "MAX_BODY_MB", int, cls.max_body_mb, minimum=1),
        )


def sqlalchemy_url(url: str, key: str) -> URL:
    """Turn a ``postgres://`` / ``postgresql://`` URL into one for SQLAlchemy with psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{key} is not a database URL") from None
    if parsed.drivername not in POSTGRES_SCHEMES:
        allowed = ", ".join(sorted(POSTGRES_SCHEMES))
        raise ConfigError(f"{key} must use one of the schemes {allowed}, not {parsed.drivername}")
    return parsed.set(drivername="postgresql+psycopg")


def _number(
    source: Mapping[str, object], key: str, kind: type[T], default: T, *, minimum: T
) -> T:
    raw = source.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a {kind.__name__}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return value
