"""Database round trips per request (issue 14), counted by the servers themselves, and
read-your-writes on a replica that has replayed everything of a write but its commit.

The budget: a read at most 2 round trips, a write at most 3 (``app.db``, "Round trips").
pgbouncer's ``SHOW STATS`` counts the primary's (``total_query_count`` goes up by one per
request/reply cycle, whatever the message holds); the replica, reached directly, counts its
own in its statement log (``log_statement = all``: one entry per simple-query message, one
per extended-protocol execute). Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import errors as pg_errors

from app.db import LAG_SAMPLER_QUERIES, Statement, _template
from tests.pg_fixtures import pgcluster
from tests.test_app_api import _metric

READ_BUDGET = 2
WRITE_BUDGET = 3
REQUESTS = 10
"""Requests counted per kind, after one that warms the pool up."""



@pytest.fixture
def app(make_app):
    """The lag sampler samples once, before the test, not while round trips are counted or
    connections closed."""
    app = make_app(DB_REPLICA_LAG_SAMPLE_SECONDS="3600")
    assert app.extensions["webstack"].database.lag.wait_sampled(5)
    return app


@pytest.fixture
def statement_logs(pg_cluster) -> Iterator[dict[str, pgcluster.StatementLog]]:
    """Every statement the primary and the replica receive, logged while the test runs."""
    logs = {node: pg_cluster.statement_log(node, ignore=LAG_SAMPLER_QUERIES).start()
            for node in ("primary", "replica-0")}
    yield logs
    for log in logs.values():
        log.stop()


def _kinds(client) -> dict[str, Callable[[], object]]:
    known_key = str(uuid.uuid4())

    def post(headers: dict[str, str] | None = None):
        response = client.post("/api/notes", json={"text": "counted"}, headers=headers or {})
        assert response.status_code == 201, response.get_data()
        return response

    def read():
        response = client.get("/api/notes")
        assert response.status_code == 200, response.get_data()
        return response

    return {
        "read": read,
        "write": post,
        "write with a new Idempotency-Key": lambda: post({"Idempotency-Key": str(uuid.uuid4())}),
        "write with a known Idempotency-Key": lambda: post({"Idempotency-Key": known_key}),
    }


def _per_request(send: Callable[[], object], count: Callable[[], int]) -> float:
    send()  # the pool's first connection, and its one-off set-up queries
    before = count()
    for _ in range(REQUESTS):
        send()
    return (count() - before) / REQUESTS


def test_round_trips_through_pgbouncer_stay_within_the_budget(pg_cluster, make_app):
    """Reads on the primary (no replica configured) and writes, through pgbouncer."""
    client = make_app(DATABASE_REPLICA_URLS="").test_client()
    counted = {kind: _per_request(send, lambda: pg_cluster.pgbouncer_queries())
               for kind, send in _kinds(client).items()}
    print("\nround trips per request, pgbouncer SHOW STATS:", counted)
    assert counted.pop("read") <= READ_BUDGET
    assert max(counted.values()) <= WRITE_BUDGET, counted


def test_a_read_on_the_replica_stays_within_the_budget(pg_cluster, app, statement_logs):
    read = _kinds(app.test_client())["read"]
    pg_cluster.wait_for_replay(0)
    assert read().headers["X-Served-By"] == "replica-0"
    log = statement_logs["replica-0"]
    per_read = _per_request(read, lambda: len(log.messages()))
    print(f"\nround trips per read, replica-0's statement log: {per_read}")
    assert per_read <= READ_BUDGET


def test_the_commit_travels_in_the_write_s_last_round_trip(app, statement_logs):
    """After the COMMIT only the WAL position is read, in the same message: an acknowledged
    commit cannot be followed by an error reply, and a lost reply is the client's to retry
    (with its Idempotency-Key)."""
    client = app.test_client()
    client.post("/api/notes", json={"text": "warm-up"})
    log = statement_logs["primary"].mark()
    assert client.post("/api/notes", json={"text": "committed"}).status_code == 201
    *_, last = log.messages()
    assert re.search(r";\s*COMMIT;\s*SELECT pg_current_wal_insert_lsn\(\)[^;]*$", last), last


def test_the_statement_timeout_bounds_the_statements_of_one_transaction_only(make_app):
    """The timeout set by a message's first statement cancels the statements after it, reads
    and writes alike, and is gone once the message's transaction ends."""
    database = make_app(DB_STATEMENT_TIMEOUT_MS="300").extensions["webstack"].database
    slow = Statement("SELECT pg_sleep(2)", {})
    for send in (database.read, database.read_primary, database.write):
        with pytest.raises(pg_errors.QueryCanceled):
            send(slow)
    pool = database.replicas[0].pool
    connection = pool.checkout()  # the one the read above used
    try:
        assert connection.execute("SHOW statement_timeout").fetchone() == ("0",)
    finally:
        pool.checkin(connection)


def test_a_connection_serves_the_message_after_a_failed_one(make_app):
    """A refused message is read to its end: the same pooled connection answers the next."""
    database = make_app(DB_STATEMENT_TIMEOUT_MS="300", DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0",
                        DB_REPLICA_RETRY_SECONDS="0", DB_REPLICA_LAG_SAMPLE_SECONDS="3600",
                        ).extensions["webstack"].database
    assert database.lag.wait_sampled(5)
    pool = database.replicas[0].pool
    connection = pool.checkout()
    pool.checkin(connection)
    with pytest.raises(pg_errors.QueryCanceled):
        database.read(Statement("SELECT pg_sleep(2)", {}))
    result = database.read(Statement("SELECT %(n)s::int AS n", {"n": 7}))
    assert (result.served_by, result.value) == ("replica-0", [(7,)])
    assert result.value[0].n == 7
    again = pool.checkout()
    try:
        assert again is connection
    finally:
        pool.checkin(again)


WHEN = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
BIND_CASES = [  # a statement, its parameters, the row the server answers
    ("SELECT %(n)s::int, %(s)s, %(none)s, %(when)s, %(blob)s, 100 %% 7 AS rest",
     {"n": -12, "s": "it's \\ %(s)s %% é 🚀", "none": None, "when": WHEN, "blob": b"\x00'\\"},
     (-12, "it's \\ %(s)s %% é 🚀", None, WHEN, b"\x00'\\", 2)),
    ("SELECT '%%(n)s' AS not_a_placeholder, %(n)s AS n", {"n": 7}, ("%(n)s", 7)),
]


@pytest.mark.parametrize(("sql", "params", "row"), BIND_CASES)
def test_the_app_binds_parameters_as_psycopg_s_client_cursor_does(make_app, sql, params, row):
    """``DeadlineConnection.bind`` writes the same literals as ``ClientCursor.mogrify``, and
    the server reads the values back unchanged."""
    pool = make_app().extensions["webstack"].database.primary.pool
    connection = pool.checkout()
    try:
        bound = connection.bind(Statement(sql, params))
        assert bound == psycopg.ClientCursor(connection).mogrify(sql, params).encode()
        assert tuple(connection.rows(connection.exchange(bound)[0])[0]) == row
    finally:
        pool.checkin(connection)


def test_a_lone_percent_in_a_statement_is_refused():
    with pytest.raises(ValueError, match="lone %"):
        _template("SELECT 100 % 7", "utf-8")


@pytest.mark.parametrize("text", [
    "it's 100% \\ %(text)s %s $1 '; DELETE FROM notes; -- \" \t é 🚀",
    "'); COMMIT; SELECT 1; --",
])
def test_text_and_keys_bound_on_the_client_arrive_unchanged(client, run_sql, text):
    key = "k'\\%(key)s;" + str(uuid.uuid4())
    created = client.post("/api/notes", json={"text": text}, headers={"Idempotency-Key": key})
    assert created.status_code == 201 and created.get_json()["text"] == text
    again = client.post("/api/notes", json={"text": text}, headers={"Idempotency-Key": key})
    assert again.get_json() == created.get_json()
    assert client.get(f"/api/notes/{created.get_json()['id']}").get_json()["text"] == text
    assert run_sql("SELECT text FROM notes n JOIN idempotency_keys k ON k.note_id = n.id"
                   " WHERE k.key = %s", (key,)) == [(text,)]


def test_a_server_error_does_not_quote_the_note(app):
    """PostgreSQL quotes the statement's line around an error's position: with parameters
    bound on the client, that line holds the note. The error keeps the primary message."""
    secret = f"private words {uuid.uuid4()}"
    database = app.extensions["webstack"].database
    with pytest.raises(pg_errors.UndefinedColumn) as raised:
        database.write(Statement("INSERT INTO notes (txt) VALUES (%(text)s)", {"text": secret}))
    assert str(raised.value) == 'column "txt" of relation "notes" does not exist'


def _close_the_app_s_connections(run_sql, node: str) -> None:
    """The server ends the app's connections (as a restart would) and they are gone."""
    app_backends = "FROM pg_stat_activity WHERE application_name = 'webstack'"
    run_sql(f"SELECT pg_terminate_backend(pid) {app_backends}", node=node)
    deadline = time.monotonic() + 5
    while run_sql(f"SELECT count(*) {app_backends}", node=node) != [(0,)]:
        assert time.monotonic() < deadline, "the app's connections were not closed"
        time.sleep(0.02)


def test_a_pooled_connection_the_server_closed_costs_no_round_trip(pg_cluster, app, run_sql,
                                                                    statement_logs, caplog):
    """What the pool's pre-ping bought, for free: the server closed the pooled connection;
    the next read is not sent on it but on a fresh one, and the replica serves it."""
    reader = app.test_client()
    pg_cluster.wait_for_replay(0)
    assert reader.get("/api/notes").headers["X-Served-By"] == "replica-0"
    _close_the_app_s_connections(run_sql, "replica-0")
    log = statement_logs["replica-0"].mark()
    listed = reader.get("/api/notes")
    assert (listed.status_code, listed.headers["X-Served-By"]) == (200, "replica-0")
    assert len(log.messages()) == 1
    assert "connection lost" not in caplog.text


def test_a_read_whose_connection_is_lost_is_sent_again(pg_cluster, app, run_sql, monkeypatch,
                                                       caplog):
    """A connection lost between checkout and reply (the check at checkout cannot see it):
    the read goes out once more on a fresh connection, and the replica is not skipped."""
    reader = app.test_client()
    pg_cluster.wait_for_replay(0)
    assert reader.get("/api/notes").headers["X-Served-By"] == "replica-0"
    monkeypatch.setattr("app.db._closed_by_server", lambda connection: False)
    _close_the_app_s_connections(run_sql, "replica-0")
    listed = reader.get("/api/notes")
    assert (listed.status_code, listed.headers["X-Served-By"]) == (200, "replica-0")
    assert "replica-0: connection lost, reading again on a fresh one" in caplog.text
    metrics = reader.get("/metrics").get_data(as_text=True)
    assert _metric(metrics, "webstack_db_replica_fallbacks_total", reason="unavailable") == 0


@pytest.fixture
def wal_before_commit(run_sql) -> Iterator[None]:
    """Every transaction that inserts a note writes a WAL record at its COMMIT, before the
    commit record (a deferred trigger), as concurrent transactions may do at any time."""
    run_sql("""
        CREATE FUNCTION roundtrips_wal_record() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_logical_emit_message(false, 'webstack-test', 'before commit');
        RETURN NULL; END $$""")
    run_sql("""
        CREATE CONSTRAINT TRIGGER roundtrips_wal_record AFTER INSERT ON notes
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION roundtrips_wal_record()""")
    yield
    run_sql("DROP TRIGGER roundtrips_wal_record ON notes")
    run_sql("DROP FUNCTION roundtrips_wal_record()")


def test_read_your_writes_waits_for_the_replica_to_replay_the_commit(cluster, app, run_sql,
                                                                    wal_before_commit):
    """The replica replays every record of the write but its commit (commit records wait
    for recovery_min_apply_delay, others don't): it has passed any position read before
    the commit, yet the note is not visible there. The writer must still see its note."""
    cluster.wait_for_replay(0)
    cluster.set_apply_delay(0, 3)
    writer = app.test_client()
    note_id = writer.post("/api/notes", json={"text": "mine"}).get_json()["id"]

    deadline = time.monotonic() + 5
    while run_sql("SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'startup'",
                  node="replica-0") != [("RecoveryApplyDelay",)]:
        assert time.monotonic() < deadline, "the replica did not stop at the commit"
        time.sleep(0.02)
    assert run_sql("SELECT count(*) FROM notes WHERE id = %s", (note_id,),
                   node="replica-0") == [(0,)]

    listed = writer.get("/api/notes")
    assert note_id in [note["id"] for note in listed.get_json()["notes"]]
    assert listed.headers["X-Served-By"] == "primary"
