"""The droplet site's micro-cache (`app.microcache`, issue 14), on real nginx in front of an
upstream that counts what reaches it: anonymous GETs under the listed prefixes are served from
the cache, a client with a session never is (nor is its response stored), a response that sets
a cookie or says private/no-store/no-cache is never stored, a burst of misses makes one
request upstream, and nothing outside the prefixes or beyond GET/HEAD is cached."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app import create_app
from components.runtime import SESSION_COOKIE, render_nginx_site
from components.settings import ConfigError
from tests.factories import make_settings
from tests.runtime_helpers import Response, nginx_command, nginx_conf, request, running
from tests.test_runtime_files import free_port

SESSION = {"Cookie": f"{SESSION_COOKIE}=signed-session-value"}
ORDINARY_HEADERS = {
    "/api/notes/set-cookie": ("Set-Cookie", f"{SESSION_COOKIE}=new; HttpOnly"),
    "/api/notes/private": ("Cache-Control", "private"),
    "/api/notes/no-store": ("Cache-Control", "no-store"),
    "/api/notes/no-cache": ("Cache-Control", "no-cache"),
}
"""A response header each of these paths adds: each forbids storing the response."""


class _Counting(BaseHTTPRequestHandler):
    """Answers 200 with how many requests for its path (and method) it has seen."""

    protocol_version = "HTTP/1.1"
    seen: Counter = Counter()
    lock = threading.Lock()
    delay = 0.0

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        with self.lock:
            self.seen[self.command, path] += 1
            count = self.seen[self.command, path]
        time.sleep(self.delay)
        body = json.dumps({"path": path, "count": count}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Cookie")  # what Flask says once the session was read
        if path in ORDINARY_HEADERS:
            self.send_header(*ORDINARY_HEADERS[path])
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 (http.server's names)

    def log_message(self, *args):
        pass


class Site:
    def __init__(self, port: int, server: ThreadingHTTPServer) -> None:
        self.port = port
        self.server = server

    def get(self, path: str, **kwargs) -> Response:
        return request(self.port, path, **kwargs)

    def upstream(self, path: str, method: str = "GET") -> int:
        return _Counting.seen[method, path]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """The rendered droplet site with the micro-cache on for /api/notes, 60 s (long enough
    that nothing expires during a test)."""
    _Counting.seen = Counter()
    _Counting.delay = 0.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    settings = make_settings(app={"microcache": {"seconds": 60, "paths": ["/api/notes"]}},
                             frontend={"rateLimit": {"requestsPerSecond": 10000,
                                                     "burst": 10000}})
    (tmp_path / "cache").mkdir()
    text = render_nginx_site(settings, listen=f"127.0.0.1:{port}",
                             upstream=f"127.0.0.1:{server.server_port}", static_dir=str(tmp_path),
                             metrics_allow=[], cache_dir=str(tmp_path / "cache"))
    try:
        with running(nginx_command(nginx_conf(tmp_path, text), "-g", "daemon off;"), port=port,
                     log=tmp_path / "nginx.log"):
            yield Site(port, server)
    finally:
        server.shutdown()
        server.server_close()


def _count(response: Response) -> int:
    assert response.status == 200, response.body
    return json.loads(response.body)["count"]


def test_anonymous_reads_come_from_the_cache(site):
    first, second = site.get("/api/notes"), site.get("/api/notes?limit=5")
    again = site.get("/api/notes")
    statuses = [r.headers["X-Cache-Status"] for r in (first, second, again)]
    assert statuses == ["MISS", "MISS", "HIT"]  # a query string is an entry of its own
    assert _count(again) == _count(first) == 1
    assert site.upstream("/api/notes") == 2
    assert again.headers["X-Content-Type-Options"] == "nosniff"  # the site's headers stay


def test_a_client_with_a_session_never_gets_a_cached_response(site):
    """A session (a client that wrote: its reads must see its writes) bypasses the cache
    whether or not an entry exists, and what it gets is never stored for others."""
    mine = [site.get("/api/notes", headers=SESSION) for _ in range(3)]
    assert [_count(r) for r in mine] == [1, 2, 3]
    assert {r.headers["X-Cache-Status"] for r in mine} == {"BYPASS"}
    anonymous = site.get("/api/notes")
    assert (anonymous.headers["X-Cache-Status"], _count(anonymous)) == ("MISS", 4)
    assert site.get("/api/notes").headers["X-Cache-Status"] == "HIT"  # an entry exists now
    after = site.get("/api/notes", headers=SESSION)
    assert (after.headers["X-Cache-Status"], _count(after)) == ("BYPASS", 5)
    assert site.upstream("/api/notes") == 5


@pytest.mark.parametrize("path", sorted(ORDINARY_HEADERS))
def test_a_response_that_sets_a_cookie_or_forbids_storing_is_never_cached(site, path):
    counts = [_count(site.get(path)) for _ in range(3)]
    assert counts == [1, 2, 3]


def test_only_gets_under_the_listed_prefixes_are_cached(site):
    others = [site.get("/api/other") for _ in range(2)]
    assert [_count(r) for r in others] == [1, 2]
    assert {r.headers["X-Cache-Status"] for r in others} == {"BYPASS"}
    posts = [site.get("/api/notes", method="POST", body=b"{}",
                      headers={"Content-Type": "application/json"}) for _ in range(2)]
    assert [_count(r) for r in posts] == [1, 2]


def test_a_burst_of_misses_makes_one_request_upstream(site):
    """The cache lock: while the first request is upstream, the others wait for its answer."""
    _Counting.delay = 0.5
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda _: site.get("/api/notes/burst"), range(10)))
    assert {_count(r) for r in answers} == {1}
    assert site.upstream("/api/notes/burst") == 1


def test_the_app_s_session_cookie_is_the_one_the_site_bypasses_for():
    app = create_app({"TESTING": True, "DATABASE_URL": "postgresql://u@127.0.0.1:1/db"})
    assert app.session_interface.get_cookie_name(app) == SESSION_COOKIE


@pytest.mark.parametrize(("microcache", "key", "says"), [
    ({"seconds": 1}, "app.microcache.paths", "at least one path prefix"),
    ({"seconds": 1, "paths": ["api/notes"]}, "app.microcache.paths[0]", "must be a path"),
    ({"seconds": 1, "paths": ["/api/notes;"]}, "app.microcache.paths[0]", "must be a path"),
    ({"seconds": 61, "paths": ["/api/notes"]}, "app.microcache.seconds", "from 0 to 60"),
    ({"ttl": 1}, "app.microcache.ttl", "unknown key"),
])
def test_bad_microcache_settings_name_the_key(microcache, key, says):
    with pytest.raises(ConfigError, match=says) as raised:
        make_settings(app={"microcache": microcache})
    assert raised.value.key == key and str(raised.value).startswith(f"webstack:{key}: ")
