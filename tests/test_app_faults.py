"""Database faults and bad input (issue 12), against the real primary, replica and pgbouncer:
retried writes create one note, a stuck database leaves /healthz alone, a write URL on a node
in recovery is a 503 that heals by reconnecting, reads fall back to a skipped replica, and
input the app cannot use is a 4xx that leaves no state behind."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.api import INSERT
from app.db import Node, NoReply, Saturated, Unanswered, WorkSlots
from app.models import MAX_NOTE_LENGTH
from lab.process import free_port
from lab.proxy import DelayProxy, plain
from tests.runtime_helpers import GUNICORN, GUNICORN_CONF, running

NOTE = {"text": "retried note"}


def _proxied(url: str, proxy: DelayProxy) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)


def _target(url: str) -> tuple[str, int]:
    parsed = make_url(url)
    return parsed.host, parsed.port


@pytest.fixture
def proxies(pg_cluster) -> Iterator[dict[str, DelayProxy]]:
    """A delay proxy in front of the pool and of each replica."""
    urls = pg_cluster.urls
    made = {"pool": DelayProxy(_target(urls.pool)).start()}
    for index, url in enumerate(urls.replicas):
        made[f"replica-{index}"] = DelayProxy(_target(url)).start()
    yield made
    for proxy in made.values():
        proxy.stop()


# --------------------------------------------------------------------------- idempotent writes


def test_same_idempotency_key_creates_one_note(client, run_sql):
    key = str(uuid.uuid4())
    text = f"once {key}"
    first = client.post("/api/notes", json={"text": text}, headers={"Idempotency-Key": key})
    again = client.post("/api/notes", json={"text": text}, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert run_sql("SELECT count(*) FROM notes WHERE text = %s", (text,)) == [(1,)]

    other = client.post("/api/notes", json={"text": "another body"},
                        headers={"Idempotency-Key": key})
    assert other.status_code == 422
    assert "different body" in other.get_json()["error"]
    assert run_sql("SELECT count(*) FROM notes WHERE text = 'another body'") == [(0,)]


def test_concurrent_retries_on_several_droplets_agree(make_app, run_sql):
    """Eight clients on four apps (droplets) send the same key at once: one note."""
    apps = [make_app() for _ in range(4)]
    key = str(uuid.uuid4())
    text = f"raced {key}"

    def post(n: int):
        return apps[n % 4].test_client().post(
            "/api/notes", json={"text": text}, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.get_json()["id"] for r in responses}) == 1
    assert sum("Idempotent-Replayed" in r.headers for r in responses) == 7
    assert run_sql("SELECT count(*) FROM notes WHERE text = %s", (text,)) == [(1,)]


def test_an_expired_key_creates_a_new_note(client, run_sql):
    key = str(uuid.uuid4())
    first = client.post("/api/notes", json=NOTE, headers={"Idempotency-Key": key})
    run_sql("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"
            " WHERE key = %s", (key,))
    second = client.post("/api/notes", json=NOTE, headers={"Idempotency-Key": key})
    assert second.status_code == 201 and "Idempotent-Replayed" not in second.headers
    assert second.get_json()["id"] != first.get_json()["id"]


@pytest.mark.parametrize("key", ["", "a" * 256, "naïve", "has space"])
def test_bad_idempotency_keys_are_a_400(client, key):
    response = client.post("/api/notes", json=NOTE, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    assert "Idempotency-Key" in response.get_json()["error"]


def test_a_retry_after_a_lost_commit_reply_creates_no_duplicate(pg_cluster, proxies, make_app,
                                                               run_sql):
    """The issue's reproduction: the insert commits, its reply is lost, the client retries.
    Without TLS to the proxy, which must see the COMMIT reply to lose it."""
    proxy = proxies["pool"]
    client = make_app(DATABASE_URL=plain(pg_cluster.urls.pool, proxy.port)).test_client()
    key = str(uuid.uuid4())
    text = f"lost reply {key}"
    proxy.lose_commits = 1.0
    lost = client.post("/api/notes", json={"text": text}, headers={"Idempotency-Key": key})
    assert lost.status_code == 503 and lost.headers["Retry-After"]
    assert run_sql("SELECT count(*) FROM notes WHERE text = %s", (text,)) == [(1,)]
    proxy.lose_commits = 0.0
    retried = client.post("/api/notes", json={"text": text}, headers={"Idempotency-Key": key})
    assert retried.status_code == 201
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert run_sql("SELECT count(*) FROM notes WHERE text = %s", (text,)) == [(1,)]


# --------------------------------------------------------------------------- a stuck database


def test_work_slots_queue_behind_busy_work_and_refuse_behind_stuck_work():
    slots = WorkSlots(1, patience=1.0)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with slots.hold():
            entered.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    threading.Timer(0.1, release.set).start()
    with slots.hold():  # busy work ends within the patience: this waits, then gets the slot
        assert release.is_set() and slots.in_use == 1
    holder.join()

    entered.clear()
    release.clear()
    holder = threading.Thread(target=hold)
    holder.start()
    entered.wait()
    time.sleep(1.1)  # now held past the patience: stuck
    with pytest.raises(Saturated):
        with slots.hold():
            pass
    release.set()
    holder.join()


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, dict(response.headers), time.monotonic() - started
    finally:
        conn.close()


def test_a_failing_server_is_tried_by_one_attempt_at_a_time():
    node = Node("primary", pool=None)
    with node.attempt(), node.attempt():  # answering: attempts run side by side
        pass
    with pytest.raises(NoReply), node.attempt():
        raise NoReply("no reply from the database within 1.5 s")
    assert node.failing
    with node.attempt():  # alone, it tries...
        with pytest.raises(Unanswered), node.attempt():  # ...and a second meanwhile does not
            pass
    assert not node.failing  # the try got an answer
    with pytest.raises(psycopg.errors.QueryCanceled), node.attempt():
        raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    assert not node.failing  # a statement timeout is the server's answer


def test_writes_to_a_primary_that_stopped_answering_fail_at_once_but_one(pg_cluster, proxies,
                                                                           make_app):
    """Slots to spare (8), so none is refused as Saturated: after one write waited out its
    deadline, concurrent writes get a 503 at once while one of them tries the server."""
    proxy = proxies["pool"]
    app = make_app(DATABASE_URL=_proxied(pg_cluster.urls.pool, proxy), DATABASE_REPLICA_URLS="",
                   DB_STATEMENT_TIMEOUT_MS="300", DB_POOL_SIZE="8", DB_CONCURRENCY_LIMIT="8")
    assert app.test_client().post("/api/notes", json=NOTE).status_code == 201
    proxy.delay = 3.0
    try:
        first, waited = _timed_post(app)
        assert first == 503 and waited > 1.0  # its round trip's deadline (0.3 s a statement + 1 s)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: _timed_post(app), range(6)))
    finally:
        proxy.delay = 0
    print(f"first write: 503 after {waited:.2f} s; then {answers}")
    assert {status for status, _ in answers} == {503}
    assert sum(elapsed < 0.5 for _, elapsed in answers) >= 5  # all but the one trying
    deadline = time.monotonic() + 10
    while (status := _timed_post(app)[0]) != 201:
        assert status == 503 and time.monotonic() < deadline, "writes did not come back"
        time.sleep(0.2)
    assert not app.extensions["webstack"].database.primary.failing


def test_a_read_refused_while_a_replica_is_tried_leaves_it_unskipped(make_app, caplog):
    """A read that did not try the failing replica (another attempt was under way) goes to the
    primary without marking the replica skipped: that attempt's own outcome decides."""
    app = make_app()
    replica = app.extensions["webstack"].database.replicas[0]
    replica.failing, replica.in_flight = True, 1  # as while the lag sampler tries it
    try:
        listed = app.test_client().get("/api/notes")
    finally:
        replica.failing, replica.in_flight = False, 0
    assert listed.status_code == 200
    assert listed.headers["X-Served-By"] == "primary"
    assert replica.skip_until == 0
    assert "reading elsewhere" not in caplog.text


def _timed_post(app) -> tuple[int, float]:
    started = time.monotonic()
    status = app.test_client().post("/api/notes", json=NOTE).status_code
    return status, time.monotonic() - started


def test_healthz_answers_while_every_database_request_is_stuck(pg_cluster, proxies, tmp_path):
    """Acceptance: a 2 s delay to the database, 16 concurrent readers: every /healthz 200
    within 1 s; database routes answer a fast 503 with Retry-After. And /healthz fails once
    gunicorn cannot serve (its workers stopped)."""
    port = free_port()
    urls = pg_cluster.urls
    env = {
        "PATH": os.environ["PATH"], "SECRET_KEY": "faults-test-secret-key",
        "DATABASE_URL": _proxied(urls.pool, proxies["pool"]),
        "DATABASE_REPLICA_URLS": _proxied(urls.replicas[0], proxies["replica-0"]),
        "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_WORKERS": "2", "GUNICORN_THREADS": "3",
        "DB_POOL_SIZE": "2", "DB_MAX_OVERFLOW": "0", "DB_CONCURRENCY_LIMIT": "2",
    }
    command = [str(GUNICORN), "-c", str(GUNICORN_CONF), "app.wsgi:app"]
    with running(command, port=port, log=tmp_path / "gunicorn.log", env=env) as server:
        assert _get(port, "/api/notes")[0] == 200
        for proxy in proxies.values():
            proxy.delay = 2.0
        stop = threading.Event()
        answers: list[tuple[int, dict[str, str], float]] = []

        def reader():
            while not stop.is_set():
                try:
                    answers.append(_get(port, "/api/notes"))
                except OSError:
                    answers.append((0, {}, 0.0))

        readers = [threading.Thread(target=reader) for _ in range(16)]
        for thread in readers:
            thread.start()
        probes = []
        try:
            time.sleep(1.0)
            for _ in range(9):
                probes.append(_get(port, "/healthz", timeout=5))
                time.sleep(0.3)
        finally:
            stop.set()
            for proxy in proxies.values():
                proxy.delay = 0
            for thread in readers:
                thread.join()
        slowest = max(elapsed for _, _, elapsed in probes)
        print(f"/healthz under a 2 s database delay: {len(probes)} probes, slowest "
              f"{slowest:.3f} s; readers: {len(answers)} answers")
        assert [status for status, _, _ in probes] == [200] * 9
        assert slowest < 1.0
        busy = [headers for status, headers, _ in answers if status == 503]
        assert busy and all(headers.get("Retry-After") for headers in busy)
        assert {status for status, _, _ in answers} <= {200, 503}

        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text()
        workers = [int(pid) for pid in children.split()]
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                _get(port, "/healthz", timeout=1)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------- fail-over


def test_write_url_on_a_replica_is_a_503_and_readyz_says_why(pg_cluster, make_app, caplog):
    app = make_app(DATABASE_URL=pg_cluster.urls.replicas[0])
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "in recovery" in ready.get_json()["primary"]["error"]

    secret = f"private words {uuid.uuid4()}"
    written = client.post("/api/notes", json={"text": secret},
                          headers={"Idempotency-Key": "k-" + secret[-8:]})
    assert written.status_code == 503
    assert written.headers["Retry-After"]
    assert secret not in caplog.text and secret[-8:] not in caplog.text


def test_a_write_connection_on_a_node_in_recovery_is_dropped(pg_cluster, proxies, make_app):
    """The write URL's host name leads to a replica, then (a fail-over's DNS) back to the
    primary: the app reconnects by itself; no restart, no 500."""
    urls = pg_cluster.urls
    proxy = proxies["pool"]
    proxy.retarget(_target(urls.replicas[0]))
    app = make_app(DATABASE_URL=_proxied(urls.pool, proxy))
    client = app.test_client()
    assert client.post("/api/notes", json=NOTE).status_code == 503
    assert client.get("/readyz").status_code == 503

    proxy.retarget(_target(urls.pool))  # open connections stay on the replica
    assert client.post("/api/notes", json=NOTE).status_code == 201
    assert client.get("/readyz").status_code == 200


# --------------------------------------------------------------------------- replicas last


def test_reads_use_a_skipped_replica_when_the_primary_is_down(cluster, make_app):
    app = make_app(DB_REPLICA_RETRY_SECONDS="60")
    reader = app.test_client()
    cluster.stop_replica(0)
    assert reader.get("/api/notes").headers["X-Served-By"] == "primary"  # replica now skipped
    cluster.start_replica(0)
    cluster.stop_primary()
    listed = reader.get("/api/notes")
    assert listed.status_code == 200
    assert listed.headers["X-Served-By"] == "replica-0"


# --------------------------------------------------------------------------- bad input


def test_deeply_nested_json_is_a_400(client):
    body = b"[" * 100_000 + b"]" * 100_000
    response = client.post("/api/notes", data=body, content_type="application/json")
    assert response.status_code == 400
    assert "nest" in response.get_json()["error"]
    shallow = client.post("/api/notes", json={"text": "", "tags": [[["[[[{{{"]]]})
    assert shallow.get_json() == {"error": "text must not be empty"}  # parsed, then judged


def test_made_up_methods_share_one_metrics_label(client):
    def series() -> int:
        body = client.get("/metrics").get_data(as_text=True)
        return body.count("webstack_http_requests_total{")

    for n in range(5):
        client.open("/api/notes", method=f"BREW{n}")
    series()  # the scrape itself is counted from the next one on
    before = series()
    for n in range(5, 305):
        assert client.open("/api/notes", method=f"BREW{n}").status_code == 405
    assert series() == before
    assert 'method="other"' in client.get("/metrics").get_data(as_text=True)


@pytest.mark.parametrize("path", ["/api/notes/\u0661", "/api/notes/%D9%A1", "/api/notes/\uff11"])
def test_note_ids_are_ascii_digits_only(client, path):
    client.post("/api/notes", json=NOTE)  # note 1 exists
    assert client.get(path).status_code == 404


def test_a_write_that_failed_inside_its_transaction_leaves_no_failed_transaction_behind(
        make_app):
    """A write's message opens a transaction (BEGIN); a statement failing there leaves the
    connection in that failed transaction. With one pooled connection, the next write must
    not land in it ("current transaction is aborted")."""
    database = make_app(DB_POOL_SIZE="1", DB_MAX_OVERFLOW="0").extensions["webstack"].database
    with pytest.raises(psycopg.errors.CheckViolation):
        database.write(INSERT.bind(text="x" * (MAX_NOTE_LENGTH + 1)))
    (note,), = database.write(INSERT.bind(text="after the failure")).value
    assert note.text == "after the failure"
