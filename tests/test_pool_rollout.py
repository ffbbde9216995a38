"""tools/pool_rollout.py: an autoscale pool's rollout judged from the API's history and members,
read page by page from a stand-in API on loopback."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from tools.pool_rollout import DONE, FAILED, WAITING, fetch, rollout_state, watch

T0 = "2026-11-30T20:00:00Z"
OLD = {"reason": "CONFIGURATION_CHANGE", "status": "success", "created_at": "2026-11-29T10:00:00Z"}
HEALTHY = [{"droplet_id": 1, "status": "active", "health_status": "healthy"},
           {"droplet_id": 2, "status": "active", "health_status": "healthy"}]


def change(status: str, at: str = "2026-11-30T20:01:00Z") -> dict:
    return {"reason": "CONFIGURATION_CHANGE", "status": status, "created_at": at}


@pytest.mark.parametrize("history,members,state,words", [
    ([OLD], HEALTHY, WAITING, "no configuration change since"),  # the PUT not seen yet
    ([OLD, change("in_progress")], HEALTHY, WAITING, "in_progress"),
    ([OLD, change("error")], HEALTHY, FAILED, "ended in error"),
    ([change("success"), {"reason": "SCALE_UP", "status": "in_progress",
                          "created_at": "2026-11-30T20:09:00Z"}], HEALTHY, DONE, "2 members"),
    ([change("success")], [HEALTHY[0], {"droplet_id": 3, "status": "provisioning",
                                        "health_status": "unhealthy"}], WAITING, "3 provisioning"),
    ([change("success")], [], WAITING, "none yet"),
    # The newest change counts: an earlier failure was fixed by a later template.
    ([change("error"), change("success", "2026-11-30T20:30:00Z")], HEALTHY, DONE, "healthy"),
])
def test_the_newest_configuration_change_and_every_member_decide(history, members, state, words):
    got, why = rollout_state(history, members, since=T0)
    assert got == state and words in why


def test_watch_polls_until_done_and_says_each_new_state():
    answers = iter([[change("in_progress")], HEALTHY, [change("success")], HEALTHY])
    said: list[str] = []
    assert watch(lambda what: next(answers), T0, timeout=60, interval=0, say=said.append) == 0
    assert [line.split(": ")[1] for line in said] == [WAITING, DONE]


def test_watch_gives_up_after_the_timeout():
    said: list[str] = []
    assert watch(lambda what: [] if what == "members" else [change("success")], T0, timeout=0,
                 interval=0, say=said.append) == 2
    assert said[-1].startswith("pool rollout: not done within")


@pytest.fixture
def api() -> Iterator[tuple[str, list]]:
    """History in two pages, members in one; requests recorded with their Authorization."""
    seen: list = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers["Authorization"]))
            if "/history" in self.path and "page=1" in self.path:
                body = {"history": [OLD], "links": {"pages": {"next": "page 2"}}}
            elif "/history" in self.path:
                body = {"history": [change("success")], "links": {}}
            else:
                body = {"droplets": HEALTHY, "links": {}}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()


def test_fetch_reads_every_page_with_the_token(api):
    url, seen = api
    history = fetch(url, "tok", "pool-1", "history")
    members = fetch(url, "tok", "pool-1", "members")
    assert history == [OLD, change("success")] and members == HEALTHY
    assert [path.split("?")[0] for path, _ in seen] == [
        "/v2/droplets/autoscale/pool-1/history"] * 2 + ["/v2/droplets/autoscale/pool-1/members"]
    assert {auth for _, auth in seen} == {"Bearer tok"}
    assert rollout_state(history, members, T0)[0] == DONE
