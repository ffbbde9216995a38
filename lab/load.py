"""A small, bounded HTTP load generator: every request counted exactly once, by outcome.

    with Load("http://127.0.0.10:8080", plan, workers=8, rate=60, max_seconds=30) as load:
        load.mark("kill")          # a point in time the scenario refers to later
        ...                        # break something
    counts(load.samples)           # {"ok": 1790, "http_5xx": 3, ...}

`plan(n)` returns the n-th `Request` (0, 1, 2, ...): the scenario decides the mix. Requests are
paced on one schedule (`rate` per second over all workers) and bounded by `max_requests` and
`max_seconds`, whichever comes first; `stop()` (or leaving the `with`) ends it sooner. Each
request opens its own connection (`Connection: close`), so a failure is the server's, never a
stale keep-alive connection of the client's. Loopback only: the lab's servers.

Outcomes:
- ok: a 2xx response;
- http_5xx: a 5xx response (from the app, the droplet's nginx or the load balancer);
- http_other: any other status (a 4xx means the scenario or the app is wrong);
- connection_error: refused, reset, or closed before a complete response;
- timeout: no progress within the client's `timeout` (connecting or reading).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

OUTCOMES = ("ok", "http_5xx", "http_other", "connection_error", "timeout")
FAILURES = OUTCOMES[1:]
BODY_LIMIT = 4096
"""Bytes of each response body kept in its sample (enough for a note or a short list)."""


@dataclass(frozen=True)
class Request:
    method: str = "GET"
    path: str = "/"
    body: bytes | None = None
    """Sent as `application/json`."""
    tag: str = ""
    """Groups samples in a scenario's criteria ("read", "write", "health", ...)."""
    headers: dict[str, str] = field(default_factory=dict)
    """Sent besides Connection, Content-Type and Cookie (e.g. an Idempotency-Key)."""


@dataclass(frozen=True)
class Sample:
    """One request and what became of it. Times are seconds since the load started."""

    tag: str
    method: str
    path: str
    start: float
    elapsed: float
    outcome: str
    status: int | None = None
    served_by: str | None = None
    """The app's `X-Served-By` header: which database server answered."""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    """The response's headers (names lower-cased)."""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def end(self) -> float:
        return self.start + self.elapsed

    def json(self) -> object:
        return json.loads(self.body)


def outcome_of(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    return "http_5xx" if 500 <= status < 600 else "http_other"


def counts(samples: Iterable[Sample]) -> dict[str, int]:
    """Requests by outcome, every outcome present (0 when none)."""
    found = Counter(s.outcome for s in samples)
    return {outcome: found[outcome] for outcome in OUTCOMES}


class Client:
    """HTTP requests to one loopback server, keeping the session cookie it is given."""

    def __init__(self, url: str, *, timeout: float = 10.0, cookies: bool = True) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not ipaddress.ip_address(parts.hostname).is_loopback:
            raise ValueError(f"{url}: the load generator speaks plain HTTP to loopback only")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self.cookies = cookies
        self.cookie: str | None = None

    def send(self, request: Request, *, t0: float | None = None) -> Sample:
        """Send `request`; never raises for what the server (or its absence) does."""
        headers = {**request.headers, "Connection": "close"}
        if request.body is not None:
            headers["Content-Type"] = "application/json"
        if self.cookie:
            headers["Cookie"] = self.cookie
        started = time.monotonic()
        status = served_by = None
        body = b""
        received: dict[str, str] = {}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(request.method, request.path, body=request.body, headers=headers)
            response = conn.getresponse()
            body = response.read()
            status, served_by = response.status, response.getheader("X-Served-By")
            received = {name.lower(): value for name, value in response.getheaders()}
            cookie = response.getheader("Set-Cookie")
            if cookie and self.cookies:
                self.cookie = cookie.split(";", 1)[0]
            outcome = outcome_of(status)
        except TimeoutError:
            outcome = "timeout"
        except (OSError, http.client.HTTPException):
            outcome = "connection_error"
        finally:
            conn.close()
        elapsed = time.monotonic() - started
        return Sample(request.tag, request.method, request.path,
                      started - (started if t0 is None else t0), elapsed, outcome, status,
                      served_by, body[:BODY_LIMIT], received)


@dataclass
class Load:
    """Requests from `workers` threads, `rate` per second in all, within the bounds."""

    url: str
    plan: Callable[[int], Request]
    workers: int = 8
    rate: float | None = 50.0
    """Requests per second over all workers; None sends as fast as the workers can."""
    max_requests: int = 5000
    max_seconds: float = 60.0
    timeout: float = 10.0
    cookies: bool = False
    """Keep each worker's session cookie (a returning user) rather than none (new visitors)."""
    samples: list[Sample] = field(default_factory=list, init=False)
    marks: dict[str, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        Client(self.url)  # refuses anything but plain HTTP to loopback, before any thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._issued = 0
        self.t0 = 0.0

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.t0 = time.monotonic()
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """Stop issuing requests and wait for those in flight (each bounded by `timeout`)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait(self) -> None:
        """Wait until the bounds end the load."""
        for thread in self._threads:
            thread.join()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, name: str) -> float:
        self.marks[name] = self.now()
        return self.marks[name]

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.max_seconds - self.now())))

    def _next(self) -> int | None:
        with self._lock:
            if self._issued >= self.max_requests or self.now() >= self.max_seconds:
                return None
            self._issued += 1
            return self._issued - 1

    def _work(self) -> None:
        client = Client(self.url, timeout=self.timeout, cookies=self.cookies)
        while not self._stop.is_set():
            n = self._next()
            if n is None:
                return
            if self.rate:
                delay = self.t0 + n / self.rate - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            sample = client.send(self.plan(n), t0=self.t0)
            with self._lock:
                self.samples.append(sample)
