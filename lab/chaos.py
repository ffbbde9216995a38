"""Failure scenarios under a bounded load, each judged by a written criterion.

    python -m lab chaos prod [--only 1,3] [--report lab-report.json]

A lab of its own is started (state in `.lab/chaos`, addresses 127.0.1.x, so a `make lab`
can keep running), every scenario runs against it, and it is always stopped. The report
(`lab-report.json`) lists per scenario the requests by outcome, the criterion and pass/fail;
a table goes to stdout. Exit status 1 when a criterion fails.

1 kill-droplet      kill -9 a droplet's gunicorn and nginx under GET load. nginx frontend: no
                    failed request (retried on another droplet). Managed (DigitalOcean LB, no
                    retries): failures only until the health check removes the droplet
                    (unhealthy_threshold x interval + timeout after the kill), none after.
2 rolling-restart   every droplet in turn: out of the frontend (HAProxy drain / nginx upstream
                    without it), wait for its requests to finish, restart gunicorn and nginx,
                    healthy, back in. No failed request.
3 gunicorn-hup      five rounds of graceful reloads (HUP) of every droplet's gunicorn, one
                    droplet at a time, under mixed load. No failed request.
4 replica-down      stop a replica under read load: reads keep succeeding elsewhere (the
                    primary), and come back to the replica after it restarts (X-Served-By).
5 primary-restart   stop and restart the primary under mixed load: /healthz 200 throughout,
                    failed writes are fast 503s, writes recover without touching the app, and
                    every acknowledged write is in the database afterwards.
6 read-your-writes  replicas replay 1.5 s late: a client reads its own write 100 times out of
                    100, while a reader without its session misses some (the lag is real).
7 pool-limit        mostly writes from 3 x pool-size concurrent clients: the primary never
                    holds more app connections than the pool size, each replica no more than
                    its plan allows, and every request ends in a bounded time (no hang).
8 db-brownout       every packet between the droplets and the database 2 s late, under mixed
                    load: no droplet leaves the load balancer (/healthz fast throughout),
                    database routes fail fast (503s, half within 1 s, all within the app's
                    deadlines), every request succeeds from 5 s after the delay ends.
9 primary-read-only the write endpoint leads to a node in recovery (open connections cut),
                    then back (open connections left where they are): no 500, no
                    acknowledged write lost, writes succeed again without restarting the app.
10 retry-after-commit 30% of the commit replies are lost on their way to the app (the note is
                    committed, the client gets an error); clients retry with their
                    Idempotency-Key: every acknowledged note exists exactly once, and no
                    key made two notes.
11 replica-lag-alert the Prometheus droplet's Prometheus and Alertmanager (`lab/monitor.py`)
                    scrape every droplet (all targets up); with replicas, replay held back past
                    `database.maxReplicaLagSeconds`: reads leave the replica, the lag endpoint
                    answers 503 through the frontend, ReplicaLagging fires and reaches
                    Alertmanager; replay released: reads return, 200, the alert resolves.
12 scale-out-in     what an autoscale pool does: under read and write load a droplet is
                    added (same files, its own migrations run, joins the frontend once its
                    health check passes), then the oldest is removed, drained first. No failed
                    request, and the new droplet serves its share (counted in its access log).

The droplets reach the database through one delay proxy per endpoint (`lab/proxy.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from components.runtime import (
    DB_CONNECT_TIMEOUT,
    DB_POOL_TIMEOUT,
    DB_REPLICA_RETRY_SECONDS,
    DB_STATEMENT_TIMEOUT_MS,
)
from components.settings import REPLICATION_PATH, database_size, pool_connection_budget
from lab.load import FAILURES, Client, Load, Request, Sample, counts
from lab.monitor import Monitor, stop_monitor
from lab.process import http_status, terminate_on_signal, wait_until
from lab.stack import LABS_DIR, ROOT, Droplet, Lab, stack_file, stop_lab

FAST_FAIL_SECONDS = DB_POOL_TIMEOUT + DB_CONNECT_TIMEOUT + DB_STATEMENT_TIMEOUT_MS / 1000 + 1
"""The longest a request may take when the database is slow or away: the app's own waits
(pool, connect, statement; see components/runtime.py) plus a second. Longer is a hang."""
RECOVERY_SECONDS = 15.0
"""Writes must succeed again this soon after the primary is back."""
REPLICA_LAG_SECONDS = 1.5
BROWNOUT_DELAY = 2.0
"""Seconds added to every packet between the droplets and the database in db-brownout."""
BROWNOUT_RECOVERY_SECONDS = 5.0
BROWNOUT_FAIL_SECONDS = 2 * FAST_FAIL_SECONDS
"""The longest a request may take in a brown-out: a read waits out a replica's deadlines, then
the primary's. Most are refused far sooner (every database slot held: a 503 at once)."""


def read(n: int) -> Request:
    return Request("GET", "/api/notes?limit=5", tag="read")


def write(n: int) -> Request:
    return Request("POST", "/api/notes", json.dumps({"text": f"chaos {n}"}).encode(), tag="write")


def read_at(key: str) -> Request:
    """`read` at a URI of its own (`&probe=key`): the droplets' micro-cache (prod) answers
    anonymous reads of one URI from memory, and such a read reaches the app."""
    request = read(0)
    return replace(request, path=f"{request.path}&probe={key}")


def mostly_writes(n: int) -> Request:
    """Three writes (the pool's work) for each read."""
    return read(n) if n % 4 == 3 else write(n)


def mixed(n: int) -> Request:
    """Half reads, a quarter writes, a quarter health checks."""
    kind = n % 4
    if kind == 0:
        return write(n)
    if kind == 3:
        return Request("GET", "/healthz", tag="health")
    return read(n)


@dataclass
class Result:
    number: int
    name: str
    criterion: str
    passed: bool | None = None
    """None: skipped (the stack lacks what the scenario needs)."""
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0

    def count(self, samples: list[Sample]) -> None:
        self.requests = len(samples)
        self.outcomes = counts(samples)
        self.failures = {kind: self.outcomes[kind] for kind in FAILURES}
        self.details["slowest_seconds"] = round(max((s.elapsed for s in samples), default=0), 2)

    def check(self, condition: bool, why: str) -> None:
        """Record a failed part of the criterion (the scenario fails if any does)."""
        if not condition:
            self.passed = False
            self.note = f"{self.note}; {why}" if self.note else why
        elif self.passed is None:
            self.passed = True

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]


def _failed(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if not s.ok]


def _reached_app(sample: Sample) -> bool:
    """The app answered this request now, not the droplet's micro-cache with an answer it
    gave before (whose X-Served-By says where that one was read)."""
    return sample.header("X-Cache-Status") in (None, "MISS", "EXPIRED", "BYPASS")


def _when(samples: list[Sample]) -> list[float]:
    return [round(s.start, 2) for s in samples][:20]


# --------------------------------------------------------------------------- scenarios


def settle(check: Callable[[], bool], timeout: float, what: str) -> None:
    """`wait_until`, but giving up is no error: the scenario's criterion judges the outcome."""
    with contextlib.suppress(TimeoutError):
        wait_until(check, timeout, what)


def kill_droplet(lab: Lab, result: Result) -> None:
    victim = lab.droplets[0]
    hc = lab.settings.frontend.health_check
    window = hc.detection_seconds if lab.mode == "managed" else 0
    with Load(lab.url, read, workers=8, rate=40, max_seconds=window + 20) as load:
        load.sleep(2)
        t_kill = load.mark("kill")
        lab.kill_droplet(victim)
        if lab.mode == "managed":
            detected = wait_until(lambda: lab.backend_servers()[victim.name]["status"]
                                  .startswith("DOWN"), window + 5, "HAProxy marks it down")
            result.details["removed_after_seconds"] = round(detected, 1)
        load.sleep(t_kill + window + 5 - load.now())
    samples = load.samples
    result.count(samples)
    failed = _failed(samples)
    early = [s for s in failed if s.end < t_kill]
    late = [s for s in failed if s.start >= t_kill + window]
    result.details.update(window_seconds=window, failures_in_window=len(failed) - len(late),
                          failures_after_window=len(late), failure_times=_when(failed),
                          kill_at=round(t_kill, 2))
    result.check(not early, f"{len(early)} failures before the kill")
    if window:
        result.check(not late, f"{len(late)} failures more than {window} s after the kill")
    else:
        result.check(not failed, f"{len(failed)} failed requests (the LB should retry them)")
    lab.restart_droplet(victim)
    result.details["back_in_frontend_after_seconds"] = round(lab.wait_frontend_ready(), 1)


def rolling_restart(lab: Lab, result: Result) -> None:
    steps = []
    with Load(lab.url, mixed, workers=8, rate=40, max_seconds=60 * len(lab.droplets)) as load:
        load.sleep(1)
        for droplet in lab.droplets:
            steps.append({droplet.name: round(lab.roll(droplet), 1)})
        load.sleep(1)
    result.count(load.samples)
    failed = _failed(load.samples)
    result.details.update(seconds_per_droplet=steps, failure_times=_when(failed))
    result.check(not failed, f"{len(failed)} failed requests")


def gunicorn_hup(lab: Lab, result: Result, rounds: int = 5) -> None:
    """Each round reloads every droplet in turn, as the README's in-place hotfix does: HUP,
    then wait until its new workers run and the old ones are gone. gunicorn stops the old
    workers as soon as it forks the new ones, which accept only once they have imported the
    app: requests wait meanwhile (`slowest_seconds`), so droplets are reloaded one by one."""
    workers = lab.settings.app.workers
    with Load(lab.url, mixed, workers=8, rate=40, max_seconds=30 * rounds) as load:
        load.sleep(1)
        for _ in range(rounds):
            for droplet in lab.droplets:
                old = lab.gunicorn_workers(droplet)
                lab.reload_gunicorn(droplet)
                wait_until(lambda d=droplet, old=old: not lab.gunicorn_workers(d) & old
                           and len(lab.gunicorn_workers(d)) == workers,
                           60, f"{droplet.name}: new workers, old ones gone")
        load.sleep(1)
    result.count(load.samples)
    failed = _failed(load.samples)
    result.details.update(reloads=rounds * len(lab.droplets), failure_times=_when(failed),
                          failed_requests=sorted({f"{s.method} {s.tag} {s.outcome} {s.status}"
                                                  for s in failed}))
    result.check(not failed, f"{len(failed)} failed requests")


def replica_down(lab: Lab, result: Result) -> None:
    if not lab.settings.database.replicas:
        result.note = "skipped: the stack has no read replica"
        return
    workers = 8

    def plan(n: int) -> Request:
        """Returning clients: a write each first, so their reads carry a session and reach
        the app past the droplets' micro-cache (`app.microcache`), where routing happens."""
        return write(n) if n < workers else read(n)

    with Load(lab.url, plan, workers=workers, rate=40, max_seconds=60, cookies=True) as load:
        load.sleep(3)
        t_stop = load.mark("stop")
        lab.pg.stop_replica(0)
        load.sleep(5)
        t_start = load.mark("start")
        lab.pg.start_replica(0)
        bound = DB_REPLICA_RETRY_SECONDS + 10
        settle(lambda: any(s.served_by == "replica-0" and s.start > t_start
                           for s in list(load.samples)), bound, "reads on the replica")
        load.sleep(2)
    samples = load.samples
    result.count(samples)
    failed = _failed(samples)
    cached = [s for s in samples if not _reached_app(s)]
    samples = [s for s in samples if _reached_app(s)]
    down = [s for s in samples if t_stop + 0.5 < s.start < t_start]
    back = [s.start - t_start for s in samples if s.start > t_start and s.served_by == "replica-0"]
    result.details.update(
        from_the_micro_cache=len(cached),
        served_before=dict(Counter(s.served_by for s in samples if s.end < t_stop)),
        served_while_down=dict(Counter(s.served_by for s in down)),
        replica_again_after_seconds=round(min(back), 1) if back else None,
        failure_times=_when(failed),
    )
    result.check(not failed, f"{len(failed)} failed reads")
    result.check(down and not any(s.served_by == "replica-0" for s in down),
                 "reads while the replica was down did not all go elsewhere")
    result.check(bool(back) and min(back) <= DB_REPLICA_RETRY_SECONDS + 10,
                 "reads did not come back to the replica after its restart")


def _outage(lab: Lab, begin: Callable[[], None], end: Callable[[], None],
            workers: int) -> tuple[list[Sample], float, float]:
    """Mixed load; `begin()` after 3 s, `end()` 6 s later, then until a write succeeds (at most
    RECOVERY_SECONDS) and 3 s more. The samples and when the outage began and ended."""
    with Load(lab.url, mixed, workers=workers, rate=30, max_seconds=60) as load:
        load.sleep(3)
        began = load.mark("begin")
        begin()
        load.sleep(6)
        ended = load.mark("end")
        end()
        settle(lambda: any(s.tag == "write" and s.ok and s.start > ended
                           for s in list(load.samples)), RECOVERY_SECONDS, "writes back")
        load.sleep(3)
    return load.samples, began, ended


def _acknowledged_missing(lab: Lab, ids: list[int]) -> list[int]:
    with psycopg.connect(lab.pg.admin_dsn(dbname=lab.settings.database.name)) as conn:
        found = {row[0] for row in conn.execute(
            "SELECT id FROM notes WHERE id = ANY(%s)", (ids,))}
    return sorted(set(ids) - found)


def primary_restart(lab: Lab, result: Result) -> None:
    samples, t_stop, t_start = _outage(lab, lambda: lab.pg.stop_primary("fast"),
                                       lab.pg.start_primary, workers=16)
    result.count(samples)
    writes = [s for s in samples if s.tag == "write"]
    health = [s for s in samples if s.tag == "health"]
    acknowledged = [s.json()["id"] for s in writes if s.status == 201]
    recovered = [s.start - t_start for s in writes if s.ok and s.start > t_start]
    late = [s for s in writes if s.start > t_start + RECOVERY_SECONDS and not s.ok]
    slow = [s for s in _failed(samples) if s.status != 503 or s.elapsed > FAST_FAIL_SECONDS]
    missing = _acknowledged_missing(lab, acknowledged)
    result.details.update(
        outage_seconds=round(t_start - t_stop, 1),
        health=counts(health),
        writes=counts(writes),
        write_503_max_seconds=round(max((s.elapsed for s in writes if s.status == 503),
                                        default=0), 2),
        writes_recovered_after_seconds=round(min(recovered), 1) if recovered else None,
        acknowledged_writes=len(acknowledged), missing_after=missing[:20],
    )
    result.check(all(s.ok for s in health), "/healthz failed during the outage")
    result.check(not slow, f"{len(slow)} failures were not a 503 within "
                           f"{FAST_FAIL_SECONDS:.0f} s")
    result.check(bool(recovered) and not late,
                 f"writes did not recover within {RECOVERY_SECONDS:.0f} s")
    result.check(bool(acknowledged) and not missing,
                 f"{len(missing)} acknowledged writes missing")


def read_your_writes(lab: Lab, result: Result, rounds: int = 100) -> None:
    if not lab.settings.database.replicas:
        result.note = "skipped: the stack has no read replica (every read is on the primary)"
        return
    replicas = range(len(lab.settings.database.replicas))
    writer, stranger = Client(lab.url), Client(lab.url, cookies=False)
    samples, own, stale = [], 0, 0
    served = Counter()
    for index in replicas:
        lab.pg.set_apply_delay(index, REPLICA_LAG_SECONDS)
    try:
        for n in range(rounds):
            created = writer.send(write(n))
            samples.append(created)
            if created.status != 201:
                continue
            note = created.json()["id"]
            mine = writer.send(Request("GET", "/api/notes?limit=20", tag="read"))
            other = stranger.send(Request("GET", "/api/notes?limit=20", tag="read"))
            samples += [mine, other]
            served[mine.served_by] += 1
            own += mine.ok and note in {row["id"] for row in mine.json()["notes"]}
            stale += other.ok and note not in {row["id"] for row in other.json()["notes"]}
    finally:
        for index in replicas:
            lab.pg.set_apply_delay(index, 0)
            lab.pg.wait_for_replay(index)
    result.count(samples)
    result.details.update(own_write_read=f"{own}/{rounds}", own_reads_served_by=dict(served),
                          lag_seconds=REPLICA_LAG_SECONDS,
                          stale_reads_without_session=f"{stale}/{rounds}")
    result.check(own == rounds, f"the writer read its own write {own} times of {rounds}")
    result.check(stale > 0, "no reader ever missed a write: the lag was not injected")
    result.check(not _failed(samples), "failed requests")


def pool_limit(lab: Lab, result: Result) -> None:
    db = lab.settings.database
    clients = 3 * db.pool.size
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def sample(node: str) -> None:
        with psycopg.connect(lab.pg.admin_dsn(node), autocommit=True) as conn:
            while not stop.wait(0.05):
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s"
                                 " AND backend_type = 'client backend'", (db.name,)).fetchone()[0]
                peaks[node] = max(peaks.get(node, 0), n)

    nodes = ["primary"] + [f"replica-{i}" for i in range(len(db.replicas))]
    samplers = [threading.Thread(target=sample, args=(node,), daemon=True) for node in nodes]
    for thread in samplers:
        thread.start()
    try:
        with Load(lab.url, mostly_writes, workers=clients, rate=None, max_requests=20_000,
                  max_seconds=8, timeout=FAST_FAIL_SECONDS + 5) as load:
            load.wait()
    finally:
        stop.set()
        for thread in samplers:
            thread.join()
    samples = load.samples
    result.count(samples)
    ok = sorted(s.elapsed for s in samples if s.ok)
    replica_limit = {f"replica-{i}": pool_connection_budget(database_size(r.size))
                     for i, r in enumerate(db.replicas)}
    result.details.update(
        clients=clients, pool_size=db.pool.size, peak_connections=peaks,
        replica_connection_limits=replica_limit,
        ok_p50_seconds=round(ok[len(ok) // 2], 3) if ok else None,
        ok_max_seconds=round(ok[-1], 3) if ok else None,
        statuses=dict(Counter(s.status for s in samples)),
    )
    result.check(peaks.get("primary", 0) <= db.pool.size,
                 f"{peaks.get('primary')} app connections on the primary > pool {db.pool.size}")
    for node, limit in replica_limit.items():
        result.check(peaks.get(node, 0) <= limit, f"{peaks.get(node)} connections on {node}")
    slow = [s for s in samples if s.elapsed > FAST_FAIL_SECONDS]
    result.check(not slow, f"{len(slow)} requests took over {FAST_FAIL_SECONDS:.0f} s")
    bad = [s for s in _failed(samples) if s.status != 503]
    result.check(not bad, f"{len(bad)} failures other than a fast 503")


def _probe_droplets(lab: Lab, stop: threading.Event, seen: list[tuple[str, float, int | None]]):
    """The load balancer's view, from outside: each droplet's /healthz every half second, with
    the health check's timeout; (droplet, seconds, status or None)."""
    timeout = lab.settings.frontend.health_check.timeout_seconds
    while not stop.wait(0.5):
        for droplet in lab.droplets:
            started = time.monotonic()
            status = http_status(droplet.site, timeout=timeout)
            seen.append((droplet.name, time.monotonic() - started, status))


def _lb_down(lab: Lab, stop: threading.Event, down: set[str]) -> None:
    """Managed frontend: droplets HAProxy marked DOWN at any moment."""
    while not stop.wait(0.2):
        down |= {name for name, row in lab.backend_servers().items()
                 if row["status"].startswith("DOWN")}


def brownout_mix(n: int) -> Request:
    """`mixed`, each read at a URI of its own: the droplets' micro-cache (prod) answers
    anonymous reads of one URI from memory, and this load is for the app's database routes."""
    request = mixed(n)
    return read_at(str(n)) if request.tag == "read" else request


def _cached_reads(lab: Lab, t0: float, stop: threading.Event, seen: list[Sample]) -> None:
    """An anonymous visitor reading the one URI `read` asks for, every quarter second (the
    micro-cache's own view: answered from memory while the database is slow)."""
    client = Client(lab.url, cookies=False, timeout=FAST_FAIL_SECONDS + 5)
    while not stop.wait(0.25):
        seen.append(client.send(read(0), t0=t0))


def db_brownout(lab: Lab, result: Result) -> None:
    probes: list[tuple[str, float, int | None]] = []
    down: set[str] = set()
    cached: list[Sample] = []
    stop = threading.Event()
    watchers = [threading.Thread(target=_probe_droplets, args=(lab, stop, probes), daemon=True)]
    if lab.mode == "managed":
        watchers.append(threading.Thread(target=_lb_down, args=(lab, stop, down), daemon=True))
    caching = lab.settings.app.microcache.covers(read(0).path)
    t0 = time.monotonic()  # the Load's clock starts a moment later: `cached` starts are early
    if caching:
        watchers.append(threading.Thread(target=_cached_reads, args=(lab, t0, stop, cached),
                                         daemon=True))
    for thread in watchers:
        thread.start()
    try:
        with Load(lab.url, brownout_mix, workers=16, rate=30, max_seconds=40,
                  timeout=FAST_FAIL_SECONDS + 5) as load:
            load.sleep(3)
            t_slow = load.mark("slow")
            for proxy in lab.proxies.values():
                proxy.delay = BROWNOUT_DELAY
            load.sleep(10)
            t_end = load.mark("end")
            for proxy in lab.proxies.values():
                proxy.delay = 0
            load.sleep(BROWNOUT_RECOVERY_SECONDS + 5)
    finally:
        stop.set()
        for proxy in lab.proxies.values():
            proxy.delay = 0
        for thread in watchers:
            thread.join()
    samples = load.samples
    result.count(samples)
    during = [s for s in samples if t_slow < s.start < t_end]
    late = [s for s in samples if s.start > t_end + BROWNOUT_RECOVERY_SECONDS]
    slow_probes = [p for p in probes if p[2] != 200]
    hc = lab.settings.frontend.health_check
    result.details.update(
        delay_seconds=BROWNOUT_DELAY, during=counts(during),
        health_during=counts(s for s in during if s.tag == "health"),
        db_route_max_seconds=round(max((s.elapsed for s in during if s.tag != "health"),
                                       default=0), 2),
        health_max_seconds=round(max((s.elapsed for s in samples if s.tag == "health"),
                                     default=0), 2),
        droplet_probes=len(probes), droplet_probe_failures=len(slow_probes),
        droplet_probe_max_seconds=round(max((p[1] for p in probes), default=0), 2),
        marked_down=sorted(down), after_recovery=counts(late),
    )
    result.check(bool(probes) and not slow_probes,
                 f"{len(slow_probes)} droplet /healthz probes failed or took over "
                 f"{hc.timeout_seconds} s")
    result.check(not down, f"the load balancer marked {sorted(down)} down")
    result.check(all(s.ok for s in samples if s.tag == "health"), "/healthz failed via the LB")
    failed = sorted(s.elapsed for s in _failed(samples))
    bad = [s for s in _failed(samples) if s.status != 503 or s.elapsed > BROWNOUT_FAIL_SECONDS]
    result.details["failure_p50_seconds"] = round(failed[len(failed) // 2], 2) if failed else None
    result.check(not bad, f"{len(bad)} failures were not a 503 within "
                          f"{BROWNOUT_FAIL_SECONDS:.0f} s")
    result.check(bool(failed) and failed[len(failed) // 2] < 1,
                 "the median failure took 1 s or more: database routes did not fail fast")
    result.check(bool(late) and all(s.ok for s in late),
                 f"requests still failed {BROWNOUT_RECOVERY_SECONDS:.0f} s after the delay ended")
    if caching:
        shift = load.t0 - t0  # `cached` on the Load's clock
        cached_during = [s for s in cached if t_slow < s.start - shift < t_end]
        result.details["cached_reads_during"] = counts(cached_during)
        result.details["cached_read_max_seconds"] = round(
            max((s.elapsed for s in cached_during), default=0), 2)
        result.check(bool(cached_during) and all(s.ok and not _reached_app(s) and s.elapsed < 1
                                                 for s in cached_during),
                     "the micro-cache did not answer every anonymous read of its URI within 1 s")


def primary_read_only(lab: Lab, result: Result) -> None:
    pool = lab.proxies["pool"]
    home = pool.target
    standby = make_url(lab.pg.urls.replicas[-1])

    def read_only() -> None:
        pool.retarget((standby.host, standby.port))
        pool.drop()

    # Back: the app's connections to the standby stay open; it must drop them itself.
    samples, t_ro, t_back = _outage(lab, read_only, lambda: pool.retarget(home), workers=8)
    result.count(samples)
    writes = [s for s in samples if s.tag == "write"]
    refused = [s for s in writes if t_ro + 1 < s.start < t_back and not s.ok]
    recovered = [s.start - t_back for s in writes if s.ok and s.start > t_back]
    late = [s for s in writes if s.start > t_back + RECOVERY_SECONDS and not s.ok]
    acknowledged = [s.json()["id"] for s in writes if s.status == 201]
    missing = _acknowledged_missing(lab, acknowledged)
    result.details.update(
        read_only_seconds=round(t_back - t_ro, 1), writes=counts(writes),
        writes_refused_while_read_only=len(refused),
        statuses=dict(Counter(s.status for s in samples)),
        writes_recovered_after_seconds=round(min(recovered), 1) if recovered else None,
        acknowledged_writes=len(acknowledged), missing_after=missing[:20],
    )
    result.check(not [s for s in samples if s.status == 500], "a request got a 500")
    result.check(all(s.status == 503 for s in _failed(samples)), "failures other than 503")
    result.check(bool(refused), "no write was refused: the endpoint never was in recovery")
    result.check(bool(recovered) and not late,
                 f"writes did not recover within {RECOVERY_SECONDS:.0f} s")
    result.check(bool(acknowledged) and not missing,
                 f"{len(missing)} acknowledged writes missing")


def retry_after_commit(lab: Lab, result: Result, clients: int = 8, seconds: float = 8) -> None:
    """Each client creates notes one after the other, retrying each (same key, same body) on
    any failure until it gets an answer, as the README's retry contract says."""
    run = uuid.uuid4().hex[:8]
    outcomes: dict[str, list[Sample]] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(number: int) -> None:
        web = Client(lab.url, cookies=False)
        n = 0
        while time.monotonic() < deadline:
            key = f"{run}-{number}-{n}"
            body = json.dumps({"text": f"retry {key}"}).encode()
            attempts = []
            for _ in range(20):
                sample = web.send(Request("POST", "/api/notes", body, tag="write",
                                          headers={"Idempotency-Key": key}))
                attempts.append(sample)
                if sample.status in (201, 422):
                    break
                time.sleep(0.2)
            with lock:
                outcomes[key] = attempts
            n += 1

    pool = lab.proxies["pool"]
    pool.lose_commits = 0.3
    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        pool.lose_commits = 0.0
    samples = [s for attempts in outcomes.values() for s in attempts]
    result.count(samples)
    acknowledged = {key: [s.json()["id"] for s in attempts if s.status == 201]
                    for key, attempts in outcomes.items()}
    with psycopg.connect(lab.pg.admin_dsn(dbname=lab.settings.database.name)) as conn:
        rows = conn.execute("SELECT text, array_agg(id) FROM notes WHERE text LIKE %s"
                            " GROUP BY text", (f"retry {run}-%",)).fetchall()
    stored = {text.removeprefix("retry "): ids for text, ids in rows}
    twice = sorted(key for key, ids in stored.items() if len(ids) > 1)
    wrong = sorted(key for key, ids in acknowledged.items()
                   if ids and (len(set(ids)) != 1 or stored.get(key) != ids[:1]))
    unanswered = sorted(key for key, ids in acknowledged.items() if not ids)
    replayed = sum(1 for attempts in outcomes.values()
                   if len(attempts) > 1 and attempts[-1].status == 201
                   and attempts[-1].header("Idempotent-Replayed") == "true")
    result.details.update(
        notes=len(outcomes), attempts=len(samples),
        statuses=dict(Counter(s.status for s in samples)),
        retried_and_replayed=replayed, never_acknowledged=unanswered[:20],
        stored_twice=twice[:20], acknowledged_but_not_stored_once=wrong[:20],
    )
    result.check(not twice, f"{len(twice)} keys made more than one note")
    result.check(not wrong, f"{len(wrong)} acknowledged notes not stored exactly once")
    result.check(not unanswered, f"{len(unanswered)} notes never acknowledged after 20 tries")
    result.check(replayed > 0, "no retry met a committed note: the fault was not injected")


LAG_ALERT_MARGIN = 30.0
"""Seconds past `database.maxReplicaLagSeconds` the lag alert may take to fire (a 2 s sample,
the lab's 1 s scrape and evaluation, its 3 s hold), and to resolve once replay is released."""


def replica_lag_alert(lab: Lab, result: Result) -> None:
    monitor = Monitor(lab)
    try:
        monitor.start()  # inside: a start that fails midway leaves no process running
        expected = 2 * len(lab.droplets) + 2  # app and nginx per droplet, itself, Alertmanager
        settle(lambda: list(monitor.targets().values()) == ["up"] * expected, 30, "targets up")
        targets = monitor.targets()
        result.details["targets"] = targets
        result.check(len(targets) == expected and set(targets.values()) == {"up"},
                     f"not every target is up: {targets}")
        if not lab.settings.database.replicas:
            result.note = "lag alert skipped: the stack has no read replica"
            return
        _lag_alert(lab, monitor, result)
    finally:
        stop_monitor(lab.state_dir)


def _served_by(reader: Client, phase: str, reads: int = 10) -> Counter:
    """Where `reads` list reads were answered, each at a URI of its own: the droplets'
    micro-cache (prod) would otherwise answer most of them with what the app said earlier, up
    to its `inactive` time before (stale while updating)."""
    samples = [reader.send(read_at(f"{phase}-{n}")) for n in range(reads)]
    return Counter(s.served_by if _reached_app(s) else "micro-cache" for s in samples)


def _lag_alert(lab: Lab, monitor: Monitor, result: Result) -> None:
    bound = lab.settings.database.max_replica_lag_seconds
    replicas = range(len(lab.settings.database.replicas))
    reader = Client(lab.url, cookies=False)  # no session: any primary read is the lag's doing

    def lag_status() -> int | None:
        return reader.send(Request("GET", REPLICATION_PATH, tag="lag")).status

    def firing() -> bool:
        return any(a["state"] == "firing" for a in monitor.alerts("ReplicaLagging"))

    before = lag_status()
    started = time.monotonic()
    for index in replicas:
        lab.pg.set_apply_delay(index, 3600)
    try:
        Client(lab.url).send(write(0))  # a commit the replicas hold back
        settle(firing, bound + LAG_ALERT_MARGIN, "ReplicaLagging firing")
        fired = time.monotonic() - started
        during = lag_status()
        served = _served_by(reader, "lagging")
        settle(lambda: bool(monitor.received("ReplicaLagging")), 10, "Alertmanager")
        received = bool(monitor.received("ReplicaLagging"))
    finally:
        for index in replicas:
            lab.pg.set_apply_delay(index, 0)
    released = time.monotonic()
    settle(lambda: not monitor.alerts("ReplicaLagging"), LAG_ALERT_MARGIN, "alert resolved")
    resolved = time.monotonic() - released
    after = lag_status()
    back = _served_by(reader, "caught-up")
    result.details.update(
        max_replica_lag_seconds=bound, lag_endpoint_before=before, fired_after_seconds=round(
            fired, 1), lag_endpoint_while_lagging=during, reads_while_lagging=dict(served),
        alertmanager_received=received, resolved_after_release_seconds=round(resolved, 1),
        lag_endpoint_after=after, reads_after=dict(back))
    result.check(before == 200, f"the lag endpoint answered {before} before the lag")
    result.check(fired <= bound + LAG_ALERT_MARGIN, "ReplicaLagging did not fire")
    result.check(during == 503, f"the lag endpoint answered {during} while lagging")
    result.check(set(served) == {"primary"}, f"reads while lagging: {dict(served)}")
    result.check(received, "Alertmanager did not receive ReplicaLagging")
    result.check(resolved <= LAG_ALERT_MARGIN, "ReplicaLagging did not resolve")
    result.check(after == 200, f"the lag endpoint answered {after} after the catch-up")
    result.check("micro-cache" not in back and back["primary"] < sum(back.values()),
                 f"reads did not return to the replicas: {dict(back)}")


def reads_and_writes(n: int) -> Request:
    """Three reads for each write, every one of them in a droplet's access log."""
    return write(n) if n % 4 == 0 else read(n)


SCALE_SHARE = 0.5
"""The new droplet must serve at least this part of its fair share (1/N of the requests made
while it is in the frontend)."""


def _access_log_lines(droplet: Droplet) -> int:
    """Requests a droplet's nginx served (health checks are not logged: the site's location)."""
    path = droplet.dir / "access.log"
    return len(path.read_text().splitlines()) if path.exists() else 0


def scale_out_in(lab: Lab, result: Result) -> None:
    """What an autoscale pool does, done to the lab: a droplet joins with the same files (its
    migrations run as a member's cloud-init runs them) and the frontend sends to it once its
    health check passes; later the oldest droplet leaves, drained first, as a scale-in."""
    with Load(lab.url, reads_and_writes, workers=8, rate=40, max_seconds=120) as load:
        load.sleep(3)
        t_add = load.mark("add")
        new = lab.add_droplet()
        joined = lab.wait_frontend_ready([new])
        t_in = load.mark("in")
        load.sleep(10)
        t_remove = load.mark("remove")
        oldest = lab.droplets[0]
        lab.remove_droplet(oldest)
        t_out = load.mark("out")
        load.sleep(5)
    samples = load.samples
    result.count(samples)
    failed = _failed(samples)
    n = len(lab.droplets)  # after the scale-in; n + 1 while both were in
    with_both = sum(1 for s in samples if t_in <= s.start < t_remove)
    after = sum(1 for s in samples if s.start >= t_remove)  # draining: no new ones to it
    fair = with_both / (n + 1) + after / n
    served = _access_log_lines(new)  # a new droplet's log starts empty
    result.details.update(
        droplet_added=new.name, joined_frontend_after_seconds=round(t_in - t_add, 1),
        healthy_checks_wait_seconds=round(joined, 1), droplet_removed=oldest.name,
        drained_and_stopped_in_seconds=round(t_out - t_remove, 1),
        requests_while_both_in=with_both, requests_from_the_drain_on=after,
        new_droplet_served=served, fair_share=round(fair), failure_times=_when(failed))
    result.check(not failed, f"{len(failed)} failed requests")
    result.check(served >= SCALE_SHARE * fair,
                 f"the new droplet served {served} requests, under half its share ({fair:.0f})")


SCENARIOS: list[tuple[str, Callable[[Lab, Result], None], str]] = [
    ("kill-droplet", kill_droplet,
     "kill -9 one droplet's gunicorn+nginx under GET load: nginx frontend 0 failed requests; "
     "managed frontend failures only within unhealthy_threshold x interval + timeout of the "
     "kill, 0 after"),
    ("rolling-restart", rolling_restart,
     "each droplet drained from the frontend, restarted, healthy, put back: 0 failed requests"),
    ("gunicorn-hup", gunicorn_hup,
     "5 rounds of graceful reloads (HUP) of each droplet's gunicorn in turn under mixed load: "
     "0 failed requests"),
    ("replica-down", replica_down,
     "replica stopped under read load: 0 failed reads, served elsewhere while down, served by "
     f"the replica again within {DB_REPLICA_RETRY_SECONDS + 10} s of its restart"),
    ("primary-restart", primary_restart,
     "primary stopped and restarted under mixed load: /healthz always 200, failures only 503s "
     f"within {FAST_FAIL_SECONDS:.0f} s, writes back within {RECOVERY_SECONDS:.0f} s, "
     "no acknowledged write missing"),
    ("read-your-writes", read_your_writes,
     f"replicas {REPLICA_LAG_SECONDS} s behind: a client reads its own write 100/100, and a "
     "reader without its session misses some (the lag is real)"),
    ("pool-limit", pool_limit,
     "3 x pool size concurrent clients: app connections on the primary <= pool size, on a "
     f"replica <= its plan's budget; every request within {FAST_FAIL_SECONDS:.0f} s, "
     "failures only 503"),
    ("db-brownout", db_brownout,
     f"every database packet {BROWNOUT_DELAY:.0f} s late for 10 s under mixed load (reads at "
     "URIs of their own, past the micro-cache): every droplet's /healthz 200 within the health "
     "check's timeout and none marked down; failures only 503s, half of them within 1 s, all "
     f"within {BROWNOUT_FAIL_SECONDS:.0f} s (a replica's deadlines, then the primary's); every "
     f"request succeeds from {BROWNOUT_RECOVERY_SECONDS:.0f} s after the delay ends; with a "
     "micro-cache, an anonymous visitor's reads of one URI all answered from it within 1 s"),
    ("primary-read-only", primary_read_only,
     "the write endpoint leads to a node in recovery for 6 s, then back: no 500, failures only "
     f"503, writes back within {RECOVERY_SECONDS:.0f} s without restarting the app, no "
     "acknowledged write missing"),
    ("retry-after-commit", retry_after_commit,
     "30% of commit replies lost, clients retry with their Idempotency-Key: every acknowledged "
     "note stored exactly once (same id on every answer), no key made two notes, some retries "
     "met a committed note"),
    ("replica-lag-alert", replica_lag_alert,
     "Prometheus scrapes every droplet (all targets up); replicas held back past "
     "database.maxReplicaLagSeconds: reads on the primary, the lag endpoint 503 through the "
     f"frontend, ReplicaLagging firing within the bound + {LAG_ALERT_MARGIN:.0f} s and received "
     f"by Alertmanager; replay released: resolved within {LAG_ALERT_MARGIN:.0f} s, 200, reads "
     "back on the replicas"),
    ("scale-out-in", scale_out_in,
     "a droplet added under load (same files, its migrations, joins the frontend once its "
     "health check passes), the oldest removed after 10 s (drained first, then stopped): 0 "
     f"failed requests, and the new droplet serves at least {SCALE_SHARE:.0%} of its fair "
     "share (its access log)"),
]


# --------------------------------------------------------------------------- running


def ensure_healthy(lab: Lab) -> None:
    """Bring back whatever a scenario left down, so the next one starts from a healthy lab."""
    lab.pg.start_primary()
    for index in range(lab.standbys):
        lab.pg.start_replica(index)
    for proxy in lab.proxies.values():
        proxy.delay, proxy.lose_commits = 0.0, 0.0
    for droplet in lab.droplets:
        if lab.mode == "managed" and lab.backend_servers()[droplet.name]["status"] in (
                "DRAIN", "MAINT"):
            lab.set_server_state(droplet, "ready")
        if lab.droplet_alive(droplet):
            continue
        lab.kill_droplet(droplet)
        lab.restart_droplet(droplet)
    if lab.mode == "nginx" and len(lab.upstreams) != len(lab.droplets):
        lab.set_upstreams([d.site for d in lab.droplets])
    lab.wait_frontend_ready()


def run_scenarios(lab: Lab, numbers: list[int] | None = None) -> list[Result]:
    """Run the scenarios (all, or those numbered) against a started lab."""
    client = Client(lab.url)
    for n in range(20):  # something to read
        client.send(write(n))
    results = []
    for number, (name, scenario, criterion) in enumerate(SCENARIOS, start=1):
        if numbers and number not in numbers:
            continue
        result = Result(number, name, criterion)
        print(f"chaos: {number} {name} ...", flush=True)
        started = time.monotonic()
        try:
            scenario(lab, result)
        except Exception as exc:  # a scenario that cannot finish fails, the others still run
            result.check(False, f"error: {type(exc).__name__}: {exc}")
        result.seconds = round(time.monotonic() - started, 1)
        results.append(result)
        print(f"chaos: {number} {name}: {result.verdict} in {result.seconds} s"
              + (f" ({result.note})" if result.note else ""), flush=True)
        ensure_healthy(lab)
    return results


def table(results: list[Result]) -> str:
    head = (f"{'#':>2}  {'scenario':<17} {'result':<6} {'requests':>8} {'ok':>6} {'5xx':>5} "
            f"{'conn':>5} {'t/o':>5} {'other':>5} {'secs':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        o = r.outcomes or dict.fromkeys(("ok", *FAILURES), 0)
        lines.append(f"{r.number:>2}  {r.name:<17} {r.verdict:<6} {r.requests:>8} {o['ok']:>6} "
                     f"{o['http_5xx']:>5} {o['connection_error']:>5} {o['timeout']:>5} "
                     f"{o['http_other']:>5} {r.seconds:>6}")
        lines.append(f"    criterion: {r.criterion}")
        if r.note:
            lines.append(f"    note: {r.note}")
        for key, value in r.details.items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines)


def report(lab: Lab, results: list[Result], seconds: float) -> dict:
    return {
        "stack": lab.settings.stack,
        "frontend": lab.mode,
        "droplets": len(lab.droplets),
        "replicas": len(lab.settings.database.replicas),
        "pool_size": lab.settings.database.pool.size,
        "health_check": asdict(lab.settings.frontend.health_check),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "passed": all(r.passed is not False for r in results),
        "scenarios": [{**asdict(r), "result": r.verdict} for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab chaos", description=__doc__)
    parser.add_argument("stack", help="a stack name (Pulumi.<stack>.yaml) or a stack file")
    parser.add_argument("--only", help="comma-separated scenario numbers (default: all)")
    parser.add_argument("--report", type=Path, default=ROOT / "lab-report.json")
    parser.add_argument("--dir", type=Path, default=LABS_DIR / "chaos", help="state directory")
    parser.add_argument("--net", default="127.0.1", help="first three octets of the addresses")
    args = parser.parse_args(argv)
    numbers = [int(n) for n in args.only.split(",")] if args.only else None

    terminate_on_signal()
    started = time.monotonic()
    stop_lab(args.dir)  # a previous run that was killed
    lab = Lab(stack_file(args.stack), state_dir=args.dir, net=args.net, db_proxies=True)
    try:
        print(f"chaos: starting a {lab.mode}-frontend lab of stack {lab.settings.stack}",
              flush=True)
        lab.start()
        results = run_scenarios(lab, numbers)
    finally:
        lab.stop()
    data = report(lab, results, time.monotonic() - started)
    print()
    print(table(results))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\n{'PASSED' if data['passed'] else 'FAILED'}: stack {lab.settings.stack}, "
          f"{len(results)} scenarios in {data['seconds']} s; report in {args.report}")
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
