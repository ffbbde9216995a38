"""A primary outage: liveness holds, readiness and writes fail fast, writes then recover."""

import time


def _timed(call):
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_primary_outage_fails_fast_and_recovers(cluster, app):
    client = app.test_client()
    assert client.post("/api/notes", json={"text": "before"}).status_code == 201  # warm pool
    cluster.wait_for_replay(0)

    cluster.stop_primary()

    assert client.get("/healthz").status_code == 200
    ready, elapsed = _timed(lambda: client.get("/readyz"))
    assert ready.status_code == 503
    assert elapsed < 3
    body = ready.get_json()
    assert body["status"] == "unavailable"
    assert body["primary"]["ok"] is False
    assert body["replicas"]["replica-0"] == {  # no lag without the primary's position
        "ok": True, "role": "replica", "lag": {"seconds": None, "bytes": None, "stale": False}}

    for _ in range(3):
        written, elapsed = _timed(lambda: client.post("/api/notes", json={"text": "during"}))
        assert written.status_code == 503
        assert written.get_json() == {"error": "database unavailable"}
        assert written.headers["Retry-After"]
        assert elapsed < 3

    # Reads by a client with no pending writes are still served by the replica.
    listed = app.test_client().get("/api/notes")
    assert listed.status_code == 200
    assert listed.headers["X-Served-By"] == "replica-0"
    assert client.get("/healthz").status_code == 200

    cluster.start_primary()
    deadline = time.monotonic() + 20
    while (written := client.post("/api/notes", json={"text": "after"})).status_code != 201:
        assert written.status_code == 503
        assert time.monotonic() < deadline, "writes did not recover after the primary came back"
        time.sleep(0.2)
    assert client.get("/readyz").status_code == 200
    pool = app.extensions["webstack"].database.primary.pool
    assert pool.checkedout() == 0


def test_an_app_that_never_reached_the_primary_answers_503(cluster, make_app):
    """A pool's first connection fails like any other."""
    cluster.stop_primary()
    client = make_app(DATABASE_REPLICA_URLS="").test_client()
    for response in (client.post("/api/notes", json={"text": "first"}), client.get("/api/notes")):
        assert response.status_code == 503, response.get_data()
        assert response.headers["Retry-After"]
