"""Reads on replicas, writes on the primary, fallbacks, and read-your-writes under lag.

``X-Served-By`` is computed from the connection that ran the query (``pg_is_in_recovery()``),
so these tests observe where a query ran rather than where the app meant to send it.
"""

import time

from tests.test_app_api import _metric


def _post(client, text="routed"):
    response = client.post("/api/notes", json={"text": text})
    assert response.status_code == 201
    return response


def _ids(response):
    return [note["id"] for note in response.get_json()["notes"]]


def _fallbacks(client, reason):
    body = client.get("/metrics").get_data(as_text=True)
    return _metric(body, "webstack_db_replica_fallbacks_total", reason=reason)


def test_writes_land_on_the_primary_and_reads_on_the_replica(pg_cluster, client, run_sql):
    created = _post(client)
    assert created.headers["X-Served-By"] == "primary"
    note_id = created.get_json()["id"]
    assert run_sql("SELECT count(*) FROM notes WHERE id = %s", (note_id,)) == [(1,)]

    pg_cluster.wait_for_replay(0)
    listed = client.get("/api/notes")
    assert listed.headers["X-Served-By"] == "replica-0"
    assert note_id in _ids(listed)
    fetched = client.get(f"/api/notes/{note_id}")
    assert fetched.headers["X-Served-By"] == "replica-0"
    assert _fallbacks(client, "unavailable") == _fallbacks(client, "lagging") == 0


def test_reads_fall_back_to_the_primary_while_the_replica_is_down(cluster, app):
    note_id = _post(app.test_client()).get_json()["id"]
    cluster.wait_for_replay(0)
    reader = app.test_client()  # no session cookie: any fallback is the outage's doing
    assert reader.get("/api/notes").headers["X-Served-By"] == "replica-0"

    cluster.stop_replica(0)
    for _ in range(3):
        listed = reader.get("/api/notes")
        assert listed.status_code == 200
        assert listed.headers["X-Served-By"] == "primary"
        assert note_id in _ids(listed)
    assert reader.get(f"/api/notes/{note_id}").headers["X-Served-By"] == "primary"
    assert _fallbacks(reader, "unavailable") >= 4

    cluster.start_replica(0)
    deadline = time.monotonic() + 10
    while reader.get("/api/notes").headers["X-Served-By"] != "replica-0":
        assert time.monotonic() < deadline, "reads did not return to the replica"
        time.sleep(0.2)


def test_read_your_writes_while_the_replica_lags(cluster, app, run_sql):
    writer, other = app.test_client(), app.test_client()
    cluster.set_apply_delay(0, 3)

    note_id = _post(writer, "fresh").get_json()["id"]
    # The lag is real: the replica has not applied the insert yet.
    assert run_sql("SELECT count(*) FROM notes WHERE id = %s", (note_id,), node="replica-0") == [
        (0,)
    ]

    fetched = writer.get(f"/api/notes/{note_id}")
    assert fetched.status_code == 200
    assert fetched.get_json()["text"] == "fresh"
    assert fetched.headers["X-Served-By"] == "primary"
    listed = writer.get("/api/notes")
    assert note_id in _ids(listed)
    assert listed.headers["X-Served-By"] == "primary"
    assert _fallbacks(writer, "lagging") == 2

    # Another client reads the lagging replica: eventual consistency for the list...
    others_list = other.get("/api/notes")
    assert others_list.headers["X-Served-By"] == "replica-0"
    assert note_id not in _ids(others_list)
    # ...but a note fetched by id is looked up on the primary when the replica misses it.
    others_fetch = other.get(f"/api/notes/{note_id}")
    assert others_fetch.status_code == 200
    assert others_fetch.headers["X-Served-By"] == "primary"

    cluster.set_apply_delay(0, 0)
    cluster.wait_for_replay(0)
    assert writer.get("/api/notes").headers["X-Served-By"] == "replica-0"
