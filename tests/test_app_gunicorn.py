"""The app under real gunicorn workers: ``app.wsgi``, connection pools built after the fork, and
metrics summed over workers with PROMETHEUS_MULTIPROC_DIR."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar

import pytest

from lab.process import free_port
from tests.pg_fixtures import ROOT


@pytest.fixture
def server(pg_cluster, tmp_path):
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": pg_cluster.urls.pool,
        "DATABASE_REPLICA_URLS": ",".join(pg_cluster.urls.replicas),
        "SECRET_KEY": "gunicorn-test-secret-key",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "3", "--bind", f"127.0.0.1:{port}",
         "app.wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=2)
            break
        except OSError:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.1)
    yield base
    process.send_signal(signal.SIGINT)  # quick shutdown
    process.wait(timeout=30)


def _request(opener, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=10) as response:
        return response.status, response.headers, response.read()


def test_workers_serve_notes_and_share_metrics(server):
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    for i in range(6):
        status, _, body = _request(opener, f"{server}/api/notes", {"text": f"worker {i}"})
        assert status == 201
        note_id = json.loads(body)["id"]
        status, _, body = _request(opener, f"{server}/api/notes/{note_id}")
        assert status == 200
        assert json.loads(body)["text"] == f"worker {i}"
    with pytest.raises(urllib.error.HTTPError) as bad:
        _request(opener, f"{server}/api/notes?limit=0")
    assert bad.value.code == 400

    # Whichever worker answers the scrape, the counters cover all workers.
    for _ in range(3):
        _, _, body = _request(opener, f"{server}/metrics")
        text = body.decode()
        posts = re.search(
            r'webstack_http_requests_total\{endpoint="/api/notes",method="POST",status="201"\}'
            r" (\S+)", text)
        assert posts and float(posts.group(1)) == 6


def test_a_foreign_host_is_never_echoed(server):
    """Issue 13, straight to gunicorn (no nginx in front): `POST /api/notes` with
    `Host: evil.example` answered `Location: http://evil.example/api/notes/2`."""
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=10)
    conn.request("POST", "/api/notes", body=json.dumps({"text": "foreign"}),
                 headers={"Host": "evil.example", "Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 201
    assert response.getheader("Location") == f"/api/notes/{body['id']}"
    assert "evil" not in str(response.headers).lower()
