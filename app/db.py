"""Database access: the primary for writes, replicas for reads, and the routing between them.

Round trips: one per read, one per write (the budget is two and three)
    A unit of work travels as one simple-query message holding all its statements, bound on
    the client (``DeadlineConnection.bind``, with psycopg's adapters: no server-side prepared
    statements, which PgBouncer's transaction mode could not keep), and the server answers
    them in one reply. Connections are in autocommit mode, so psycopg sends no ``BEGIN``,
    ``COMMIT`` or ``ROLLBACK`` of its own, and the pool does not pre-ping:

    - a read sends ``SELECT set_config('statement_timeout', …, true), pg_is_in_recovery(),
      pg_last_wal_replay_lsn(); <the query>``;
    - a write sends ``BEGIN; <that first statement>; <its statements>; COMMIT;
      SELECT pg_current_wal_insert_lsn()``.

    The statements of a message run in one transaction (a read's is implicit), so the
    timeout is set for that transaction only (``SET LOCAL`` semantics, the only kind
    PgBouncer's transaction mode keeps); PostgreSQL starts each statement's timer afresh, so
    it bounds every statement after the first. The first statement's answer names the
    server in ``Result.served_by``: "primary" when it is not in recovery, else the replica's
    name ("replica-0", ...). ``tests/test_app_roundtrips.py`` counts the messages with
    pgbouncer's ``SHOW STATS`` and the replica's statement log.

Routing and read-your-writes
    Writes run on the primary (``DATABASE_URL``). A write's message reads the primary's WAL
    insert position after its ``COMMIT``, so the position is past the commit record, and the
    commit still travels in the last (the only) round trip: once it is acknowledged nothing
    can fail any more. The caller keeps that position in the client's signed session cookie.
    A read takes the replicas in round-robin order and uses the first that answers and has
    replayed up to that position (``pg_last_wal_replay_lsn()``), hence has replayed the
    commit: the client's note is visible there. (A position read before the commit, as
    until issue 14, could be passed by a replica that had not replayed the commit yet.) If no
    replica qualifies the read runs on the primary and ``on_fallback`` is told why
    ("lagging" or "unavailable"). A replica whose sampled replication lag exceeds
    ``replica_max_lag_seconds`` (``app.lag``) is skipped too, as "lagging", until a later
    sample finds it within the bound: it serves no client, not even as a last resort. A
    replica that fails is skipped for
    ``replica_retry_seconds``, except as a last resort: when the primary fails too, the
    skipped replicas are tried before the read fails. So a client sees its own writes, while
    other clients read from replicas that may lag.

Dead connections without a pre-ping
    A pooled connection that has anything to read while idle (the server's "terminating
    connection" message, or end of file: a restarted server or pgbouncer) is discarded at
    checkout, before anything is sent, and another taken: no round trip. A read whose
    connection breaks anyway (the server went away since) is tried once more on a fresh
    connection; a write is not, since the server may have run it (clients retry with their
    ``Idempotency-Key``). Neither is retried after the client's own deadline (``NoReply``).

Fail-over
    A server in recovery (a demoted primary after a fail-over, a stale pool or DNS entry)
    refuses a write's first data-changing statement (``read_only_sql_transaction``), so it
    changes nothing; the write raises ``NotPrimary`` and the connection is dropped from the
    pool, so the next attempt connects afresh (after a DigitalOcean fail-over the same host
    name leads to the new primary). ``/readyz`` asks ``pg_is_in_recovery()``.

Bounded database work (why ``/healthz`` stays fast while the database is stuck)
    gunicorn's threads serve both the database routes and ``/healthz``. At most
    ``concurrency_limit`` threads of a process do database work at once; gunicorn runs one
    more thread than that (``components/runtime.py``), so a thread is always free for
    ``/healthz``. A thread that finds every slot taken waits for one, but only while the
    oldest holder has held its slot less than ``SLOW_WORK_SECONDS``: while the database is
    healthy, bursts queue briefly as before; while it is stuck, further work is refused at
    once with ``Saturated`` (a 503 with ``Retry-After``) instead of tying up the spare thread.

    Slots fill only when the load is high enough; a server that does not answer is refused
    at once at any load. Once an attempt on a server got no answer (its client deadline, a
    connect timeout, a lost connection: not a statement timeout, which is an answer), one
    request at a time tries that server until one gets an answer; meanwhile the others are
    refused without trying (``Unanswered``: a 503 for a write, the next server for a read).
    The lag sampler tries too, so the server is found answering again without a client
    paying for the wait.

Statements are bound on the client, so a server error can quote note text (the statement's
line, a failing row): errors raised from here carry the server's primary message only.

Fork safety: connection pools are created by ``create_app`` and must not cross a fork. Run gunicorn
without ``preload_app``, or call ``Database.dispose()`` in gunicorn's ``post_fork`` hook.
"""

from __future__ import annotations

import itertools
import logging
import re
import select
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any, NamedTuple

import psycopg
from psycopg import errors as pg_errors
from psycopg.adapt import Transformer
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.pq.abc import PGresult
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.engine import URL
from sqlalchemy.sql import ClauseElement

from app.config import Settings
from app.lag import Replayed, ReplicationLag

log = logging.getLogger(__name__)

UNAVAILABLE = (psycopg.OperationalError,)
"""Errors meaning "the database did not answer" (``PoolTimeout``, ``NoReply`` and the others
below among them): mapped to 503, trigger replica fallback."""

ROUND_TRIP_MARGIN = 1.0
"""Seconds the client waits for a reply beyond the server's statement timeouts."""

SLOW_WORK_SECONDS = 0.5
"""Database work held longer than this is stuck, not busy: nobody waits behind it."""

_DIALECT = PGDialect_psycopg()
TUPLES_OK, FATAL_ERROR = ExecStatus.TUPLES_OK, ExecStatus.FATAL_ERROR
_FIRST = (
    "SELECT set_config('statement_timeout', '{timeout_ms:d}', true),"
    " pg_is_in_recovery() AS in_recovery, pg_last_wal_replay_lsn()::text AS replayed"
)
_WAL_POSITION = b"SELECT pg_current_wal_insert_lsn()::text AS lsn"
_PRIMARY_POSITION = (  # a server in recovery answers NULL (the message must not fail there)
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END AS lsn"
)
_COMMIT_AGE = (
    "SELECT extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8"
    " AS age"
)
LAG_SAMPLER_QUERIES = (_PRIMARY_POSITION, _COMMIT_AGE)
"""The lag sampler's messages (app/lag.py): sent in the background, never by a request."""


class NotPrimary(Exception):
    """``DATABASE_URL`` led to a server in recovery: no write is possible there."""


class Saturated(Exception):
    """Every database slot of this process is held by stuck work."""


class Unanswered(psycopg.OperationalError):
    """Not tried: the server did not answer lately, and another request is finding out
    whether it does again."""


class NoReply(psycopg.OperationalError):
    """The client's own deadline for a round trip passed (``DeadlineConnection``)."""


class ConnectionLost(psycopg.OperationalError):
    """The server or the network closed the connection during a round trip."""


class Statement(NamedTuple):
    """One SQL statement with ``%(name)s`` placeholders, and its parameters."""

    sql: str
    params: Mapping[str, Any]

    @classmethod
    def of(cls, statement: ClauseElement) -> Statement:
        """A SQLAlchemy statement compiled once (at import), with its literal parameters;
        ``bindparam("name")`` leaves ``name`` to ``bind``."""
        compiled = statement.compile(dialect=_DIALECT)
        return cls(str(compiled), compiled.params)

    def bind(self, **values: Any) -> Statement:
        return self._replace(params={**self.params, **values})


class DeadlineConnection(psycopg.Connection):
    """A psycopg connection that gives up on any server round trip after a deadline, and
    carries a unit of work's message (``exchange``).

    PgBouncer keeps a query waiting while it cannot reach the server, up to its
    ``query_wait_timeout`` (120 s by default) and ignores cancel requests for such a query,
    so neither the server's statement timeout nor a cancel can free the worker. When the
    deadline passes the connection is closed (its protocol state is unknown) and
    ``NoReply`` is raised. Every message of the app goes through ``exchange``.

    Beside libpq's calls (``psycopg.pq``, documented), this uses psycopg 3.3 objects its docs
    do not describe: ``Transformer``'s ``as_literal``, ``set_pgresult`` and ``load_rows``,
    and ``errors.error_from_result`` (hence the exact pin in app/requirements.txt);
    tests/test_app_roundtrips.py fails if they change.
    """

    round_trip_timeout: float | None = None

    def bind(self, statement: Statement) -> bytes:
        """``statement`` with its parameters as SQL literals (psycopg's adapters, as
        ``ClientCursor`` binds them), in the connection's encoding."""
        texts, names = _template(statement.sql, self._encoding)
        literal = self._loader.as_literal
        values = [literal(statement.params[name]) for name in names]
        return b"".join(itertools.chain.from_iterable(zip(texts, [*values, b""], strict=True)))

    @cached_property
    def _loader(self) -> Transformer:
        """Turns a result's values into Python objects; kept, so its loaders are looked up
        once per connection and column type, not per message."""
        return Transformer(self)

    @cached_property
    def _encoding(self) -> str:
        return self.info.encoding

    def exchange(self, message: bytes) -> list[PGresult]:
        """Send ``message`` (statements already bound) as one simple query and return its
        results, one per statement; raise the server's first error once the reply has been
        read to its end (the connection is then ready for the next message), ``NoReply``
        when the reply is not complete within ``round_trip_timeout``.

        libpq's own calls, without a cursor or psycopg's generators, which release the GIL
        around every libpq call (a chance for a waiting thread to take it, and for this one
        to wait to get it back) and keep a cursor's state per message (docs/benchmarks.md).
        Here the GIL is let go to send, to wait for the reply, and in ``is_busy`` (psycopg
        releases it there). After an error result the server may close the connection (a
        FATAL error): that error is raised, as psycopg does, not the lost connection.
        """
        pgconn = self.pgconn
        deadline = time.monotonic() + (self.round_trip_timeout or ROUND_TRIP_MARGIN)
        results: list[PGresult] = []
        with self.lock:
            pgconn.send_query(message)
            while pgconn.flush():  # what the socket's buffer did not take at once
                self._wait(select.POLLOUT, deadline)
            while True:
                try:
                    while pgconn.is_busy():
                        self._wait(select.POLLIN, deadline)
                        pgconn.consume_input()
                except NoReply:
                    raise
                except psycopg.DatabaseError:
                    if any(result.status == FATAL_ERROR for result in results):
                        break
                    raise
                if (result := pgconn.get_result()) is None:
                    break
                results.append(result)
        for result in results:
            if result.status == FATAL_ERROR:
                raise pg_errors.error_from_result(result, self._encoding)
        return results

    @cached_property
    def _reply_poller(self) -> select.poll:
        poller = select.poll()
        poller.register(self.pgconn.socket, select.POLLIN)
        return poller

    def _wait(self, events: int, deadline: float) -> None:
        if events == select.POLLIN:
            poller = self._reply_poller
        else:
            poller = select.poll()
            poller.register(self.pgconn.socket, events)
        if not poller.poll(max(deadline - time.monotonic(), 0) * 1000):
            self.close()
            raise NoReply(f"no reply from the database within {self.round_trip_timeout} s")

    def rows(self, result: PGresult) -> list:
        """A result's rows as named tuples of Python values; none for a statement without."""
        if result.status != TUPLES_OK:
            return []
        self._loader.set_pgresult(result)
        names = tuple(result.fname(column) for column in range(result.nfields))
        return self._loader.load_rows(0, result.ntuples, _row_type(names)._make)


_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%|%")


@lru_cache(maxsize=256)
def _template(sql: str, encoding: str) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
    """``sql`` cut at its ``%(name)s`` placeholders: the texts around them (``%%`` is a
    literal %) and the names, in order. Any other % is a mistake in the statement."""
    texts, names, text, start = [], [], [], 0
    for match in _PLACEHOLDER.finditer(sql):
        text.append(sql[start:match.start()])
        start = match.end()
        if match.group(0) == "%%":
            text.append("%")
        elif match.group(1) is None:
            raise ValueError(f"a lone % in a statement (write %% for a literal %): {sql!r}")
        else:
            texts.append("".join(text).encode(encoding))
            names.append(match.group(1))
            text = []
    texts.append("".join([*text, sql[start:]]).encode(encoding))
    return tuple(texts), tuple(names)


@lru_cache(maxsize=64)
def _row_type(names: tuple[bytes, ...]) -> type[tuple]:
    """A named tuple for rows with these column names (as libpq gives them: bytes)."""
    return namedtuple("Row", [name.decode() for name in names], rename=True)


def parse_lsn(value: str | bytes) -> int:
    """``'16/B374D848'`` -> an integer that orders like the WAL position."""
    high, low = value.split(b"/" if isinstance(value, bytes) else "/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass(frozen=True)
class Result:
    """What a unit of work returned (rows, one list per statement for a write), which
    server ran it, and for writes the WAL position just past the commit."""

    value: list
    served_by: str
    lsn: int = 0


@dataclass(frozen=True)
class _Reply:
    """The answer to one message: the server's state, then each statement's rows."""

    served_by: str
    replayed: int
    rows: list[list]
    lsn: int = 0


@dataclass
class Node:
    """One database server as the app sees it: a name, its connections, and whether it
    answers."""

    name: str
    pool: ConnectionPool
    skip_until: float = 0.0
    failing: bool = False
    """The last attempt to finish got no answer (see "Bounded database work")."""
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """One attempt on this server: refused with ``Unanswered`` while the server is failing
        and another attempt is under way."""
        with self._lock:
            if self.failing and self.in_flight:
                raise Unanswered(f"{self.name} did not answer lately; another request is trying")
            self.in_flight += 1
        failed = True
        try:
            yield
            failed = False
        except UNAVAILABLE as exc:
            failed = not isinstance(exc, pg_errors.QueryCanceled)
            raise
        except Exception:
            failed = False  # the server answered (an error of its own, NotPrimary)
            raise
        finally:
            with self._lock:
                self.in_flight -= 1
                self.failing = failed


class PoolTimeout(psycopg.OperationalError):
    """Every connection of the pool was in use for the whole pool timeout."""


class ConnectionPool:
    """The connections of one process to one server: at most ``size + overflow`` open, up to
    ``size`` kept idle for reuse (the last returned is the next taken). ``checkout`` waits up
    to ``timeout`` s for a connection to come back when all are in use (then
    ``PoolTimeout``), and discards an idle one the server has closed (see "Dead
    connections without a pre-ping"). Until issue 14 this was SQLAlchemy's ``QueuePool``,
    whose checkout and check-in (a proxy object per checkout, events, weak references) were
    about a third of a note list's Python time (docs/benchmarks.md).

    Its connections are in autocommit mode, bind parameters on the client and prepare
    nothing (``prepare_threshold=None``): PgBouncer in transaction mode may run each
    transaction on a different server connection.
    """

    def __init__(self, url: URL, settings: Settings) -> None:
        _, self._params = _DIALECT.create_connect_args(url)
        self._params.update(
            connect_timeout=settings.connect_timeout, prepare_threshold=None, autocommit=True,
            cursor_factory=psycopg.ClientCursor, application_name="webstack")
        self._size = settings.pool_size
        self._limit = settings.pool_size + settings.max_overflow
        self._timeout = settings.pool_timeout
        self._idle: list[DeadlineConnection] = []
        self._open = 0
        self._returned = threading.Condition(threading.Lock())

    def checkout(self) -> DeadlineConnection:
        deadline = time.monotonic() + self._timeout
        with self._returned:
            while True:
                while self._idle:
                    connection = self._idle.pop()
                    if not _closed_by_server(connection):
                        return connection
                    self._open -= 1
                    connection.close()
                if self._open < self._limit:
                    self._open += 1
                    break
                if not self._returned.wait(deadline - time.monotonic()):
                    raise PoolTimeout(f"all {self._limit} connections in use for"
                                      f" {self._timeout} s")
        try:
            return DeadlineConnection.connect(**self._params)
        except BaseException:
            self._forget()
            raise

    def checkin(self, connection: DeadlineConnection, *, reuse: bool = True) -> None:
        """Back into the pool when ``reuse`` and it is idle and open; closed otherwise."""
        if (reuse and not connection.closed
                and connection.info.transaction_status == TransactionStatus.IDLE):
            with self._returned:
                if len(self._idle) < self._size:
                    self._idle.append(connection)
                    self._returned.notify()
                    return
        self._forget()
        connection.close()

    def dispose(self) -> None:
        """Close the idle connections (those in use are closed as they come back)."""
        with self._returned:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for connection in idle:
            connection.close()

    def size(self) -> int:
        return self._size

    def checkedout(self) -> int:
        return self._open - len(self._idle)

    def checkedin(self) -> int:
        return len(self._idle)

    def _forget(self) -> None:
        with self._returned:
            self._open -= 1
            self._returned.notify()


def _closed_by_server(connection: psycopg.Connection) -> bool:
    """Whether an idle connection has anything to read: only a server that is leaving
    (an error such as "terminating connection", or end of file) sends one unasked."""
    if connection.closed:
        return True
    poller = select.poll()
    poller.register(connection.fileno(), select.POLLIN)
    return bool(poller.poll(0))


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
        self.primary = Node("primary", ConnectionPool(settings.database_url, settings))
        self.replicas = [
            Node(f"replica-{index}", ConnectionPool(url, settings))
            for index, url in enumerate(settings.replica_urls)
        ]
        self._statement_timeout_ms = settings.statement_timeout_ms
        self._first = _FIRST.format(timeout_ms=settings.statement_timeout_ms).encode()
        self._retry_seconds = settings.replica_retry_seconds
        self._on_fallback = on_fallback
        self._turn = itertools.count()
        self.slots = WorkSlots(settings.concurrency_limit)
        self.lag = ReplicationLag(
            [node.name for node in self.replicas], primary_position=self._primary_position,
            replayed=self._replayed, interval=settings.replica_lag_sample_seconds,
            max_seconds=settings.replica_max_lag_seconds)

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    def write(self, *statements: Statement) -> Result:
        """Run ``statements`` in one transaction on the primary, in one round trip; the
        value is their rows, one list per statement, ``lsn`` the WAL position past the commit.

        Raises ``NotPrimary`` (and drops the connection) when the server is in recovery.
        """
        with self.slots.hold():
            reply = self._send(self.primary, statements, write=True)
        return Result(reply.rows, "primary", reply.lsn)

    def read(self, query: Statement, min_lsn: int = 0) -> Result:
        """``query``'s rows from a replica that has replayed up to ``min_lsn``, else from the
        primary; when the primary fails too, from a replica that was being skipped."""
        lagging, skipped = False, []
        self.lag.start()
        with self.slots.hold():
            for node in self._replica_order():
                if self.lag.stale(node.name):
                    lagging = True
                    continue
                if node.skip_until > time.monotonic():
                    skipped.append(node)
                    continue
                try:
                    result = self._read_replica(node, query, min_lsn)
                except UNAVAILABLE:
                    continue
                if result is not None:
                    return result
                lagging = True
            if self.replicas:
                self._on_fallback("lagging" if lagging else "unavailable")
            try:
                return self._read_primary(query)
            except UNAVAILABLE:
                for node in skipped:
                    with suppress(*UNAVAILABLE):
                        if (result := self._read_replica(node, query, min_lsn)) is not None:
                            log.warning("primary unavailable, read served by %s", node.name)
                            return result
                raise

    def read_primary(self, query: Statement) -> Result:
        """``query``'s rows from the primary."""
        with self.slots.hold():
            return self._read_primary(query)

    def probe(self, node: Node) -> dict[str, object]:
        """Readiness of one server: reachable, and in recovery or not. The primary's answer
        names the reason when it cannot take writes."""
        try:
            with self.slots.hold():
                reply = self._send(node, (), write=False, for_writes=node is self.primary)
        except NotPrimary:
            return {"ok": False, "role": "replica", "error": "in recovery: cannot take writes"}
        except Saturated:
            return {"ok": False, "error": "busy: every database slot is held by stuck work"}
        except UNAVAILABLE as exc:
            return {"ok": False, "error": type(exc).__name__}
        return {"ok": True, "role": "primary" if reply.served_by == "primary" else "replica"}

    def dispose(self) -> None:
        """Stop the lag sampler and close every pooled connection (at shutdown, or in a
        forked child)."""
        self.lag.stop()
        for node in self.nodes:
            node.pool.dispose()

    def _primary_position(self) -> int:
        """The primary's WAL position (``app.lag``). A server in recovery raises
        ``NotPrimary`` and its connection leaves the pool, as for a write."""
        reply = self._send(self.primary, (Statement(_PRIMARY_POSITION, {}),), write=False,
                           for_writes=True)
        return parse_lsn(reply.rows[0][0].lsn)

    def _replayed(self, name: str) -> Replayed:
        """What replica ``name`` has replayed (``app.lag``); ValueError when it is not in
        recovery (a promoted server is no replica to measure)."""
        node = next(node for node in self.replicas if node.name == name)
        reply = self._send(node, (Statement(_COMMIT_AGE, {}),), write=False)
        if reply.served_by == "primary":
            raise ValueError("not in recovery")
        return Replayed(reply.replayed, reply.rows[0][0].age)

    def _replica_order(self) -> list[Node]:
        if not self.replicas:
            return []
        first = next(self._turn) % len(self.replicas)
        return self.replicas[first:] + self.replicas[:first]

    def _read_replica(self, node: Node, query: Statement, min_lsn: int) -> Result | None:
        """``query`` on ``node`` if it has replayed up to ``min_lsn``; None if it lags. A
        failure marks the replica skipped for the retry window and is raised."""
        try:
            reply = self._send(node, (query,), write=False)
        except Unanswered:
            raise  # not tried: the attempt under way decides whether the replica is skipped
        except UNAVAILABLE as exc:
            node.skip_until = time.monotonic() + self._retry_seconds
            log.warning("%s failed, reading elsewhere: %s", node.name, exc)
            raise
        if min_lsn and reply.replayed < min_lsn:
            return None
        return Result(reply.rows[0], reply.served_by)

    def _read_primary(self, query: Statement) -> Result:
        reply = self._send(self.primary, (query,), write=False)
        return Result(reply.rows[0], reply.served_by)

    def _send(self, node: Node, statements: Sequence[Statement], *, write: bool,
              for_writes: bool = False) -> _Reply:
        """Send ``statements`` to ``node`` as one message (see "Round trips"); a read whose
        connection was lost is sent once more, on a fresh connection. ``for_writes``: a
        server in recovery drops the connection and raises ``NotPrimary`` (implied by
        ``write``, which such a server refuses)."""
        for_writes = for_writes or write
        with node.attempt():
            try:
                return self._send_once(node, statements, write, for_writes)
            except ConnectionLost as exc:
                if write:
                    raise
                log.warning("%s: connection lost, reading again on a fresh one: %s",
                            node.name, exc)
                return self._send_once(node, statements, write, for_writes)

    def _send_once(self, node: Node, statements: Sequence[Statement], write: bool,
                   for_writes: bool) -> _Reply:
        connection = node.pool.checkout()
        reuse = False
        try:
            reply = self._exchange(connection, node, statements, write)
            if for_writes and reply.served_by != "primary":
                raise NotPrimary
            reuse = True
            return reply
        except (NotPrimary, pg_errors.ReadOnlySqlTransaction):
            raise NotPrimary("DATABASE_URL leads to a server in recovery") from None
        except psycopg.Error as exc:
            reuse = True  # unless closed, or a write's BEGIN left its transaction failed
            raise (ConnectionLost if connection.broken else type(exc))(_message(exc)) from None
        finally:
            node.pool.checkin(connection, reuse=reuse)

    def _exchange(self, connection: DeadlineConnection, node: Node,
                  statements: Sequence[Statement], write: bool) -> _Reply:
        """The message out, every statement's rows back: one round trip."""
        timeout_ms = self._statement_timeout_ms
        connection.round_trip_timeout = (
            timeout_ms / 1000 * max(len(statements), 1) + ROUND_TRIP_MARGIN
        )
        bound = [connection.bind(statement) for statement in statements]
        if write:
            results = connection.exchange(b"; ".join(
                [b"BEGIN", self._first, *bound, b"COMMIT", _WAL_POSITION]))
            _, first, *rows, _, position = results
            lsn = parse_lsn(position.get_value(0, 0))
        else:
            first, *rows = connection.exchange(b"; ".join([self._first, *bound]))
            lsn = 0
        in_recovery, replayed = first.get_value(0, 1) == b"t", first.get_value(0, 2)
        if not in_recovery:
            served_by = "primary"
        else:
            served_by = "primary-in-recovery" if node is self.primary else node.name
        rows = [connection.rows(result) for result in rows]
        return _Reply(served_by, parse_lsn(replayed) if replayed else 0, rows, lsn)


def _message(error: psycopg.Error) -> str:
    """The server's primary message only: no statement text, no detail (either may quote a
    note, bound into the statement on the client)."""
    return error.diag.message_primary or str(error)
