"""The HTTP interface: notes, health, metrics, proxy headers and errors, all in JSON."""

import json
import re

import pytest

NOTE = {"text": "buy milk"}


def test_create_then_get_and_list(client, run_sql):
    response = client.post("/api/notes", json=NOTE)
    assert response.status_code == 201
    note = response.get_json()
    assert note["text"] == "buy milk"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", note["created_at"])
    assert response.headers["Location"].endswith(f"/api/notes/{note['id']}")
    assert run_sql("SELECT text FROM notes WHERE id = %s", (note["id"],)) == [("buy milk",)]

    assert client.get(f"/api/notes/{note['id']}").get_json() == note
    assert client.get("/api/notes").get_json()["notes"][0] == note


def test_list_is_newest_first_and_limited(client):
    ids = [client.post("/api/notes", json={"text": f"n{i}"}).get_json()["id"] for i in range(3)]
    listed = client.get("/api/notes?limit=2").get_json()["notes"]
    assert [note["id"] for note in listed] == ids[::-1][:2]
    assert len(client.get("/api/notes?limit=100").get_json()["notes"]) <= 100


def test_the_list_postgresql_writes_is_what_each_note_s_own_url_gives(client, run_sql, pg_cluster):
    """The list's JSON comes from PostgreSQL, a note's from Python: the same values, the same
    time format (microseconds even when they are 0), the same order (ties by id)."""
    texts = ['quote " backslash \\ tab \t newline \n', "é ✓ \u2028 😀", "</script>"]
    ids = [client.post("/api/notes", json={"text": text}).get_json()["id"] for text in texts]
    run_sql("UPDATE notes SET created_at = '2030-01-02 03:04:05+00' WHERE id = ANY(%s)", (ids,))
    pg_cluster.wait_for_replay(0)
    listed = client.get("/api/notes?limit=3").get_json()["notes"]
    assert [note["id"] for note in listed] == ids[::-1]
    assert listed == [client.get(f"/api/notes/{id_}").get_json() for id_ in ids[::-1]]
    assert listed[0]["created_at"] == "2030-01-02T03:04:05.000000+00:00"
    assert [note["text"] for note in listed] == texts[::-1]


def test_an_empty_list_is_an_empty_array(client, run_sql, pg_cluster):
    run_sql("TRUNCATE notes CASCADE")
    pg_cluster.wait_for_replay(0)
    response = client.get("/api/notes")
    assert (response.status_code, response.mimetype) == (200, "application/json")
    assert response.get_json() == {"notes": []}


def test_default_limit_is_20(client):
    for i in range(21):
        client.post("/api/notes", json={"text": f"bulk {i}"})
    assert len(client.get("/api/notes").get_json()["notes"]) == 20


def test_longest_text_is_accepted(client):
    text = "é" * 10_000
    response = client.post("/api/notes", json={"text": text})
    assert response.status_code == 201
    assert response.get_json()["text"] == text


BAD_POSTS = {
    "text/plain body": (dict(data="buy milk", content_type="text/plain"), 415),
    "no content type": (dict(data=json.dumps(NOTE)), 415),
    "form body": (dict(data={"text": "x"}), 415),
    "invalid JSON": (dict(data="{", content_type="application/json"), 400),
    "empty body": (dict(data="", content_type="application/json"), 400),
    "JSON list": (dict(json=["buy milk"]), 400),
    "JSON string": (dict(json="buy milk"), 400),
    "JSON null": (dict(data="null", content_type="application/json"), 400),
    "missing text": (dict(json={"note": "buy milk"}), 400),
    "null text": (dict(json={"text": None}), 400),
    "number text": (dict(json={"text": 5}), 400),
    "list text": (dict(json={"text": ["a"]}), 400),
    "object text": (dict(json={"text": {"a": 1}}), 400),
    "empty text": (dict(json={"text": ""}), 400),
    "blank text": (dict(json={"text": " \n\t"}), 400),
    "text too long": (dict(json={"text": "a" * 10_001}), 400),
    "NUL in text": (dict(json={"text": "a\x00b"}), 400),
    "lone surrogate": (dict(data='{"text": "\\ud800"}', content_type="application/json"), 400),
    "body too large": (dict(json={"text": "a" * 1024 * 1024}), 413),  # MAX_BODY_MB 1
}


@pytest.mark.parametrize("case", BAD_POSTS.values(), ids=BAD_POSTS.keys())
def test_bad_posts_get_a_json_4xx(client, case):
    kwargs, status = case
    response = client.post("/api/notes", **kwargs)
    assert response.status_code == status
    assert isinstance(response.get_json()["error"], str)


BAD_GETS = {
    "limit zero": ("/api/notes?limit=0", 400),
    "negative limit": ("/api/notes?limit=-1", 400),
    "limit over 100": ("/api/notes?limit=101", 400),
    "word limit": ("/api/notes?limit=ten", 400),
    "decimal limit": ("/api/notes?limit=1.5", 400),
    "empty limit": ("/api/notes?limit=", 400),
    "huge limit": ("/api/notes?limit=" + "9" * 5000, 400),
    "unicode digit limit": ("/api/notes?limit=%D9%A3", 400),
    "absent note": ("/api/notes/2000000000", 404),
    "note id zero": ("/api/notes/0", 404),
    "id beyond bigint": ("/api/notes/99999999999999999999", 404),
    "non-numeric id": ("/api/notes/abc", 404),
    "unknown path": ("/nope", 404),
}


@pytest.mark.parametrize("case", BAD_GETS.values(), ids=BAD_GETS.keys())
def test_bad_gets_get_a_json_4xx(client, case):
    path, status = case
    response = client.get(path)
    assert response.status_code == status
    assert response.content_type == "application/json"
    assert isinstance(response.get_json()["error"], str)


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/api/notes"), ("PUT", "/api/notes/1"),
                                              ("POST", "/healthz")])
def test_wrong_method_is_a_json_405(client, method, path):
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert "Allow" in response.headers
    assert isinstance(response.get_json()["error"], str)


def test_unexpected_error_is_a_logged_json_500(make_app, caplog):
    app = make_app()

    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal server error"}
    assert "kaboom" not in response.get_data(as_text=True)
    assert any(record.exc_info and "kaboom" in str(record.exc_info[1]) for record in caplog.records)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Host": "evil.example"}, {"Host": "10.0.0.7:8080"}, {"Host": ""},
     {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "other.example"}],
)
def test_healthz_is_ok_whatever_the_host(client, headers):
    response = client.get("/healthz", headers=headers)
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "ok"
    assert response.mimetype == "text/plain"


def test_readyz_reports_each_server(pg_cluster, app, client):
    pg_cluster.wait_for_replay(0)
    assert app.extensions["webstack"].database.lag.wait_sampled(5)
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ready",
        "primary": {"ok": True, "role": "primary"},
        "replicas": {"replica-0": {"ok": True, "role": "replica", "lag": {
            "seconds": 0.0, "bytes": 0, "stale": False}}},
    }


@pytest.mark.parametrize("headers", [
    {"Host": "evil.example"},
    {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
])
def test_location_names_no_host(client, headers):
    """Issue 13: `Location` echoed the request's Host (`http://evil.example/api/notes/2`)."""
    response = client.post("/api/notes", json=NOTE, headers=headers)
    assert response.status_code == 201
    assert response.headers["Location"] == f"/api/notes/{response.get_json()['id']}"
    assert "evil" not in str(response.headers)


@pytest.mark.parametrize(("proto", "secure"), [("https", True), ("https, http", False)])
def test_only_the_last_forwarded_value_is_trusted(client, proto, secure):
    """A client cannot spoof the scheme by prepending its own X-Forwarded-Proto value: the
    session cookie is `Secure` only when the one proxy hop said https."""
    response = client.post("/api/notes", json=NOTE, headers={"X-Forwarded-Proto": proto})
    cookie = response.headers["Set-Cookie"].lower()
    assert ("; secure" in cookie) is secure


def _metric(body: str, name: str, **labels: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(key) == value for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_and_report_pools(client):
    client.post("/api/notes", json=NOTE)
    client.get("/api/notes")
    client.get("/api/notes?limit=0")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    body = response.get_data(as_text=True)
    requests = "webstack_http_requests_total"
    assert _metric(body, requests, endpoint="/api/notes", method="POST", status="201") == 1
    assert _metric(body, requests, endpoint="/api/notes", method="GET", status="200") == 1
    assert _metric(body, requests, endpoint="/api/notes", method="GET", status="400") == 1
    latency = "webstack_http_request_duration_seconds_count"
    assert _metric(body, latency, endpoint="/api/notes", method="POST", status="201") == 1
    assert _metric(body, "webstack_db_pool_size", engine="primary") == 2
    assert _metric(body, "webstack_db_pool_size", engine="replica-0") == 2
    assert "webstack_db_pool_checked_out{" in body
    assert "# TYPE webstack_db_replica_fallbacks_total counter" in body


def test_each_app_has_its_own_metrics(make_app):
    first, second = make_app().test_client(), make_app().test_client()
    first.get("/healthz")
    first.get("/healthz")
    second.get("/healthz")
    endpoint = {"endpoint": "/healthz", "method": "GET", "status": "200"}
    first_body = first.get("/metrics").get_data(as_text=True)
    second_body = second.get("/metrics").get_data(as_text=True)
    assert _metric(first_body, "webstack_http_requests_total", **endpoint) == 2
    assert _metric(second_body, "webstack_http_requests_total", **endpoint) == 1
