"""Database access: the primary for writes, replicas for reads, and the routing between them.

Routing and read-your-writes
    Writes run on the primary (``DATABASE_URL``). The last statement of a write's own
    transaction reads the primary's WAL insert position (``pg_current_wal_insert_lsn()``), so
    the commit is the last round trip: once it is acknowledged nothing can fail any more. The
    caller keeps that position in the client's signed session cookie. A read takes the replicas
    in round-robin order and uses the first that answers and has replayed past that position
    (``pg_last_wal_replay_lsn()``); if none qualifies it runs on the primary and
    ``on_fallback`` is told why ("lagging" or "unavailable"). A replica that fails is skipped
    for ``replica_retry_seconds``, except as a last resort: when the primary fails too, the
    skipped replicas are tried before the read fails. So a client sees its own writes, while
    other clients read from replicas that may lag.

Fail-over
    A write transaction that finds its server in recovery (a demoted primary after a
    fail-over, a stale pool or DNS entry) raises ``NotPrimary`` before it changes anything,
    and the connection is dropped from the pool, so the next attempt connects afresh (after a
    DigitalOcean fail-over the same host name leads to the new primary).

Bounded database work (why ``/healthz`` stays fast while the database is stuck)
    gunicorn's threads serve both the database routes and ``/healthz``. At most
    ``concurrency_limit`` threads of a process do database work at once; gunicorn runs one
    more thread than that (``components/runtime.py``), so a thread is always free for
    ``/healthz``. A thread that finds every slot taken waits for one, but only while the
    oldest holder has held its slot less than ``SLOW_WORK_SECONDS``: while the database is
    healthy, bursts queue briefly as before; while it is stuck, further work is refused at
    once with ``Saturated`` (a 503 with ``Retry-After``) instead of tying up the spare thread.

Every transaction starts with one statement that sets the statement timeout for the
transaction only (``SET LOCAL`` semantics, the only kind PgBouncer's transaction mode keeps)
and reports whether the server is in recovery and how far it has replayed. That same answer
names the server in ``Result.served_by``: "primary" when the server is not in recovery, else
the replica's name ("replica-0", ...) or "primary-in-recovery".

Fork safety: engines are created by ``create_app`` and must not cross a fork. Run gunicorn
without ``preload_app``, or call ``Database.dispose()`` in gunicorn's ``post_fork`` hook.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Generic, TypeVar

import psycopg
from psycopg import errors as pg_errors
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

UNAVAILABLE = (OperationalError, PoolTimeoutError)
"""Errors meaning "the database did not answer": mapped to 503, trigger replica fallback."""

ROUND_TRIP_MARGIN = 1.0
"""Seconds the client waits for a reply beyond the server's statement timeout."""

SLOW_WORK_SECONDS = 0.5
"""Database work held longer than this is stuck, not busy: nobody waits behind it."""


class NotPrimary(Exception):
    """``DATABASE_URL`` led to a server in recovery: no write is possible there."""


class Saturated(Exception):
    """Every database slot of this process is held by stuck work."""

_START = text(
    "SELECT set_config('statement_timeout', :timeout, true),"
    " pg_is_in_recovery(), pg_last_wal_replay_lsn()::text"
)
_WAL_POSITION = text("SELECT pg_current_wal_insert_lsn()::text")


class DeadlineConnection(psycopg.Connection):
    """A psycopg connection that gives up on any server round trip after a deadline.

    PgBouncer keeps a query waiting while it cannot reach the server, up to its
    ``query_wait_timeout`` (120 s by default) and ignores cancel requests for such a query,
    so neither the server's statement timeout nor a cancel can free the worker. When the
    deadline passes the connection is closed (its protocol state is unknown) and
    ``psycopg.OperationalError`` is raised, which SQLAlchemy treats as a disconnect.
    ``wait(timeout=)`` and ``_WaitTimeout`` are psycopg 3.3 internals (hence the pin);
    tests/test_app_outage.py fails if they change.
    """

    round_trip_timeout: float | None = None

    def wait(self, gen, interval=0.1, timeout=None):
        """psycopg's own ``wait``; without an explicit timeout, ``round_trip_timeout`` applies."""
        if timeout is not None or self.round_trip_timeout is None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.round_trip_timeout)
        except pg_errors._WaitTimeout:
            self.close()
            raise psycopg.OperationalError(
                f"no reply from the database within {self.round_trip_timeout} s"
            ) from None


def parse_lsn(value: str) -> int:
    """``'16/B374D848'`` -> an integer that orders like the WAL position."""
    high, low = value.split("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class Result(Generic[T]):
    """What a unit of work returned, which server ran it, and for writes the WAL position."""

    value: T
    served_by: str
    lsn: int = 0


@dataclass
class Node:
    """One database server as the app sees it: a name and its engine."""

    name: str
    engine: Engine
    skip_until: float = 0.0


def make_engine(url: URL, settings: Settings) -> Engine:
    """An engine with pre-ping, bounded pool waits and a client-side deadline per round trip.
    Errors never show statement parameters (they carry note text).

    Prepared statements are off (``prepare_threshold=None``): PgBouncer in transaction mode
    may run each transaction on a different server connection.
    """
    engine = create_engine(
        url,
        hide_parameters=True,  # no note text or key in a logged error
        pool_pre_ping=True,
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        connect_args={
            "connect_timeout": settings.connect_timeout,
            "prepare_threshold": None,
            "application_name": "webstack",
        },
    )
    deadline = settings.statement_timeout_ms / 1000 + ROUND_TRIP_MARGIN

    @event.listens_for(engine, "do_connect")
    def connect(dialect, connection_record, cargs, cparams):
        connection = DeadlineConnection.connect(*cargs, **cparams)
        connection.round_trip_timeout = deadline
        return connection

    return engine


class WorkSlots:
    """At most ``limit`` threads in database work at once; waiting only behind work that moves.

    ``hold()`` waits for a free slot while the oldest holder has held its slot for less than
    ``patience`` seconds, and raises ``Saturated`` otherwise.
    """

    def __init__(self, limit: int, patience: float = SLOW_WORK_SECONDS) -> None:
        self.limit = limit
        self._patience = patience
        self._held: dict[object, float] = {}
        self._changed = threading.Condition()

    @contextmanager
    def hold(self) -> Iterator[None]:
        token = object()
        with self._changed:
            while len(self._held) >= self.limit:
                wait = min(self._held.values()) + self._patience - time.monotonic()
                if wait <= 0:
                    raise Saturated(f"all {self.limit} database slots held by stuck work")
                self._changed.wait(wait)
            self._held[token] = time.monotonic()
        try:
            yield
        finally:
            with self._changed:
                del self._held[token]
                self._changed.notify()

    @property
    def in_use(self) -> int:
        return len(self._held)


class Database:
    """The primary and the replicas of one app, and the read/write routing between them."""

    def __init__(self, settings: Settings, on_fallback: Callable[[str], None]) -> None:
        self.primary = Node("primary", make_engine(settings.database_url, settings))
        self.replicas = [
            Node(f"replica-{index}", make_engine(url, settings))
            for index, url in enumerate(settings.replica_urls)
        ]
        self._statement_timeout = str(settings.statement_timeout_ms)
        self._retry_seconds = settings.replica_retry_seconds
        self._on_fallback = on_fallback
        self._turn = itertools.count()
        self.slots = WorkSlots(settings.concurrency_limit)

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def write(self, work: Callable[[Connection], T]) -> Result[T]:
        """Run ``work`` in a transaction on the primary; ``lsn`` is the WAL position it reached.

        Raises ``NotPrimary`` (and drops the connection) when the server is in recovery.
        """
        with self.slots.hold(), self.primary.engine.connect() as conn:
            with conn.begin():
                self._require_primary(conn)
                value = work(conn)
                lsn = parse_lsn(conn.scalar(_WAL_POSITION))
        return Result(value, "primary", lsn)

    def read(self, work: Callable[[Connection], T], min_lsn: int = 0) -> Result[T]:
        """Run ``work`` on a replica that has replayed past ``min_lsn``, else on the primary;
        when the primary fails too, on a replica that was being skipped."""
        lagging, skipped = False, []
        with self.slots.hold():
            for node in self._replica_order():
                if node.skip_until > time.monotonic():
                    skipped.append(node)
                    continue
                try:
                    result = self._read_replica(node, work, min_lsn)
                except UNAVAILABLE:
                    continue
                if result is not None:
                    return result
                lagging = True
            if self.replicas:
                self._on_fallback("lagging" if lagging else "unavailable")
            try:
                return self._read_primary(work)
            except UNAVAILABLE:
                for node in skipped:
                    with suppress(*UNAVAILABLE):
                        if (result := self._read_replica(node, work, min_lsn)) is not None:
                            log.warning("primary unavailable, read served by %s", node.name)
                            return result
                raise

    def read_primary(self, work: Callable[[Connection], T]) -> Result[T]:
        """Run ``work`` in a transaction on the primary."""
        with self.slots.hold():
            return self._read_primary(work)

    def probe(self, node: Node) -> dict[str, object]:
        """Readiness of one server: reachable, and in recovery or not. The primary's answer
        names the reason when it cannot take writes."""
        try:
            with self.slots.hold(), node.engine.begin() as conn:
                if node is self.primary:
                    self._require_primary(conn)
                    return {"ok": True, "role": "primary"}
                served_by = self._start(conn, node)[0]
        except NotPrimary:
            return {"ok": False, "role": "replica", "error": "in recovery: cannot take writes"}
        except Saturated:
            return {"ok": False, "error": "busy: every database slot is held by stuck work"}
        except UNAVAILABLE as exc:
            return {"ok": False, "error": type(_cause(exc)).__name__}
        return {"ok": True, "role": "primary" if served_by == "primary" else "replica"}

    def dispose(self) -> None:
        """Close every pooled connection (at shutdown, or in a forked child)."""
        for node in self.nodes:
            node.engine.dispose()

    def _replica_order(self) -> list[Node]:
        if not self.replicas:
            return []
        first = next(self._turn) % len(self.replicas)
        return self.replicas[first:] + self.replicas[:first]

    def _read_replica(self, node: Node, work: Callable[[Connection], T],
                      min_lsn: int) -> Result[T] | None:
        """``work`` on ``node`` if it has replayed past ``min_lsn``; None if it lags. A failure
        marks the replica skipped for the retry window and is raised."""
        try:
            with node.engine.begin() as conn:
                served_by, replayed = self._start(conn, node)
                if min_lsn and replayed <= min_lsn:
                    return None
                return Result(work(conn), served_by)
        except UNAVAILABLE as exc:
            node.skip_until = time.monotonic() + self._retry_seconds
            log.warning("%s failed, reading elsewhere: %s", node.name, _cause(exc))
            raise

    def _read_primary(self, work: Callable[[Connection], T]) -> Result[T]:
        with self.primary.engine.begin() as conn:
            served_by = self._start(conn, self.primary)[0]
            return Result(work(conn), served_by)

    def _require_primary(self, conn: Connection) -> None:
        """Begin a transaction on the primary's URL; if that server is in recovery, drop the
        connection (the next checkout connects afresh) and raise ``NotPrimary``."""
        if self._start(conn, self.primary)[0] != "primary":
            conn.invalidate()
            raise NotPrimary("DATABASE_URL leads to a server in recovery")

    def _start(self, conn: Connection, node: Node) -> tuple[str, int]:
        """Begin a transaction: set its statement timeout; return (served_by, replayed LSN).
        served_by is "primary" for a server not in recovery, else the node's name, and
        "primary-in-recovery" for the primary's URL leading to a server in recovery."""
        row = conn.execute(_START, {"timeout": self._statement_timeout}).one()
        in_recovery, replayed = row[1], row[2]
        if not in_recovery:
            served_by = "primary"
        else:
            served_by = "primary-in-recovery" if node is self.primary else node.name
        return served_by, parse_lsn(replayed) if replayed else 0


def _cause(exc: Exception) -> BaseException:
    """The driver's exception behind a SQLAlchemy one, if any."""
    return getattr(exc, "orig", None) or exc
