"""Throughput and latency of a stack's data plane, layer by layer, in one run on loopback.

    python -m lab.bench prod [--duration 3] [--repeats 3] [--connections 16]   # make bench

A lab of its own is started (state in `.lab/bench`, addresses 127.0.4.x, so `make lab` and
`make chaos` can keep running), some notes are seeded, every target below is measured and the
lab is always stopped. Each target gets `repeats` runs of `duration` seconds with `wrk`
(`connections` open connections, keep-alive); the rounds are interleaved, so the machine's
noise falls on every target alike, and the median of the runs is reported. Every ratio is
paired by round: the median of a's run / b's run of the same round; a round runs the pairs
of the acceptance side by side (`run_order`). The report goes to `bench-report.json`, a
table to stdout.

Targets, for `/healthz` (the app without the database) and `GET /api/notes` (a read of the
seeded notes, 20 rows):

    gunicorn             droplet 1's gunicorn, directly (gthread: the stack's threads)
    gunicorn_sync        a second gunicorn beside it, with the environment `render_app_env`
                         gives the stack with gunicornThreads 1 (GUNICORN_THREADS=1: sync)
    original_gunicorn    the original design's gunicorn beside it: the same app and
                         environment, `gunicorn --workers 3 --threads 2` (no config file)
    nginx                droplet 1's nginx site as rendered (upstream keepalive on; the
                         micro-cache where `app.microcache` has it: anonymous, as wrk is)
    nginx_nocache        droplet 1's files on another port, `app.microcache` off
    nginx_keepalive_off  the same, with `render_nginx_site`'s upstream keepalive switched off
    original_nginx       the original design's nginx (`lab/original-site.conf.j2`: least_conn,
                         no upstream keepalive, its proxy timeouts) in front of
                         original_gunicorn
    frontend             the stack's frontend (HAProxy for the DigitalOcean LB, or the nginx
                         LB) in front of all the droplets

and `static`: droplet 1's files on a third port, its static directory holding a 1 KiB
file (no upstream at all): the ceiling nginx itself sets on this machine.

Before the load, the database round trips of a read and of a write are counted as
tests/test_app_roundtrips.py counts them (the replica's statement log, pgbouncer's SHOW
STATS). With `--db-delay MS` every connection from the app to the database crosses a
`lab.proxy.DelayProxy` adding MS milliseconds per round trip (half each way), as a network
between droplets and a managed database would: the bench the worker model is chosen by.
`--models 1x4 2x8` adds, per worker model (gunicorn workers x gthread threads), a gunicorn
beside droplet 1's with the environment the stack gets with those gunicornWorkers and
gunicornThreads (`gunicorn_1x4`, ...) and droplet 1's nginx without the micro-cache in front
of it (`nginx_1x4`, ...): the bench the worker model is chosen by. A PNG chart (rps and p99
per target) is written next to the report.

Where the processes run (`--cores`, `place`): by default (`split`) droplet 1's nginx and
gunicorn, and every other droplet and variant, share the first core, while PostgreSQL,
pgbouncer, the frontend, the delay proxies and wrk run on the others: a one-vCPU droplet
(prod's s-1vcpu-1gb) whose database, load balancer and clients are other machines, as on
DigitalOcean, so the database's CPU is not counted against the app's. `shared` lets every
process use every core (the layout of the runs before 2026-12-01). With `split`, each run
also reports `cpu_us`: how long the droplets' core was busy per request (/proc/stat), the
droplet's CPU cost of a request. rps x `cpu_us` near one second a second means the target was
bounded by the droplet's CPU; well below, by waiting (docs/benchmarks.md). And `steal`: the
share of that core's time the hypervisor gave to another guest (this machine is a VM), which
slows a run without anything of ours changing.

The extra servers live in `droplet-1-<variant>/` under the state directory, so `stop_lab`
(and `make lab-down`) stops them with the lab.

Cost per 100 requests per second: every droplet of the lab runs on this one machine, so the
frontend's figure is what N droplets squeezed onto these cores deliver, not what N real
droplets would. Two figures are reported: the lab's own (droplet price x count / (frontend rps
/ 100)) and an estimate with per-droplet capacity = droplet 1's rps through its nginx x the
droplet size's vCPUs / the cores the droplets ran on; with `split`, a third: per-droplet
capacity = the vCPUs' microseconds a second / droplet 1's `cpu_us` through its nginx, what a
droplet serves with its vCPU always busy. Only the app droplets are priced (not the LB or the
database).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from app.db import LAG_SAMPLER_QUERIES
from components.render import template_environment
from components.settings import MicrocacheSettings, Settings
from lab.load import Client, Load, Request
from lab.process import (
    START_TIMEOUT,
    descendants,
    http_status,
    lab_pid,
    terminate_on_signal,
    wait_until,
)
from lab.stack import LABS_DIR, ROOT, Droplet, Lab, stack_file, stop_lab

DURATION = 3
"""Seconds per run (wrk takes whole seconds)."""
REPEATS = 3
CONNECTIONS = 16
WARMUP = 1
"""Seconds of unrecorded load per target before the first round (imports, pools)."""
SEED_NOTES = 20
NET = "127.0.4"
STATE_DIR = LABS_DIR / "bench"
REPORT = ROOT / "bench-report.json"
SYNC_PORT = 8001
ORIGINAL_GUNICORN_PORT = 8002
KEEPALIVE_OFF_PORT = 8081
STATIC_PORT = 8082
NOCACHE_PORT = 8083
ORIGINAL_NGINX_PORT = 8084
ORIGINAL_GUNICORN = ("--workers", "3", "--threads", "2")
"""The original design's gunicorn command line (and no config file: gunicorn's defaults)."""
ORIGINAL_TIMEOUTS = {"connect": "60s", "send": "60s", "read": "60s"}
"""The original design's proxy timeouts (nginx's defaults, written out)."""
MODEL_PORT = 8100
"""`--models`: the i-th model's gunicorn at MODEL_PORT + i, its nginx at MODEL_PORT + 100 + i."""
MAX_MODELS = 8
ROUND_TRIP_REQUESTS = 20
"""Requests counted per kind, after as many again that warm every worker's pools up (a new
connection's set-up queries are not the request's)."""
STATIC_FILE = "bench.txt"
WRK = shutil.which("wrk")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WRK_TIMEOUT = 5
PATHS = {"healthz": "/healthz", "notes": "/api/notes"}
APP_TARGETS = ("gunicorn", "gunicorn_sync", "original_gunicorn", "nginx", "nginx_nocache",
               "nginx_keepalive_off", "original_nginx", "frontend")
ORIGINAL_TARGETS = ("original_gunicorn", "original_nginx")
RUN_GROUPS = (("gunicorn",), ("original_gunicorn",), ("gunicorn_sync",), ("nginx",),
              ("nginx_nocache", "original_nginx"), ("nginx_keepalive_off",), ("frontend",),
              ("static",))
"""The order of a round (`run_order`): group by group, and in a group path by path, each
path's targets side by side; the worker models' targets come last."""
RATIOS = {
    "webstack_vs_original": ("nginx_nocache", "original_nginx"),
    "gunicorn_vs_original": ("gunicorn", "original_gunicorn"),
    "microcache_vs_original": ("nginx", "original_nginx"),
    "nginx_vs_gunicorn": ("nginx_nocache", "gunicorn"),
    "frontend_vs_gunicorn": ("frontend", "gunicorn"),
    "frontend_vs_nginx": ("frontend", "nginx"),
    "keepalive_on_vs_off": ("nginx_nocache", "nginx_keepalive_off"),
    "gthread_vs_sync": ("gunicorn", "gunicorn_sync"),
    "nginx_vs_static": ("nginx_nocache", "static"),
}
"""Per path: `<path>.<name>` = numerator / denominator, of rps, p50 and p99 each; and
`gunicorn.notes_vs_healthz`: a note list against a health check, straight to gunicorn."""


@dataclass(frozen=True)
class Run:
    """One run against one URL."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    """Responses other than 2xx/3xx, and connect/read/write errors and timeouts."""
    cpu_us: float | None = None
    """Microseconds of the droplets' cores busy per request over the run (`split` only:
    there nothing else runs on them), whether or not the core was saturated."""
    steal: float | None = None
    """The share of the droplets' cores' time the hypervisor gave to another guest over the
    run (`split` only): a run with much of it measured a slower machine."""


# --------------------------------------------------------------------------- load generators

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> Run:
    """The figures of `wrk --latency` output."""

    def number(pattern: str) -> re.Match[str]:
        found = re.search(pattern, output, re.MULTILINE)
        if not found:
            raise ValueError(f"wrk output without {pattern!r}:\n{output}")
        return found

    def percentile(p: int) -> float:
        value, unit = number(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m|h)\s*$").groups()
        return float(value) * _UNITS_MS[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(map(int, sockets.groups())) if sockets else 0
    return Run(rps=float(number(r"^Requests/sec:\s+([\d.]+)").group(1)),
               p50_ms=percentile(50), p99_ms=percentile(99),
               requests=int(number(r"^\s+(\d+) requests in").group(1)), errors=errors)


def run_wrk(url: str, duration: int, connections: int) -> Run:
    cmd = [WRK, "--latency", "-t1", f"-c{connections}", f"-d{duration}s",
           f"--timeout={WRK_TIMEOUT}s", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    if result.returncode != 0:
        raise RuntimeError(f"wrk {url} failed:\n{result.stdout}{result.stderr}")
    run = parse_wrk(result.stdout)
    if run.requests == 0:
        raise RuntimeError(f"{url}: not one request completed in {duration} s (a stall)")
    return run


def run_python(url: str, duration: int, connections: int) -> Run:
    """The fallback without wrk: lab.load's closed loop, one connection per request (so its
    figures are lower than wrk's and not comparable with them)."""
    parts = urlsplit(url)
    with Load(f"http://{parts.netloc}", lambda n: Request("GET", parts.path),
              workers=connections, rate=None, max_requests=10**7, max_seconds=duration,
              timeout=WRK_TIMEOUT) as load:
        load.wait()
        elapsed = load.now()
    ok = sorted(s.elapsed for s in load.samples if s.ok)
    if not ok:
        raise RuntimeError(f"{url}: no successful request")
    return Run(rps=len(ok) / elapsed, p50_ms=_quantile(ok, 0.50) * 1000,
               p99_ms=_quantile(ok, 0.99) * 1000, requests=len(load.samples),
               errors=len(load.samples) - len(ok))


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Ticks(NamedTuple):
    """Clock ticks of some cores since boot (/proc/stat)."""

    busy: int
    """user, nice, system, irq and softirq; not idle, iowait or steal."""
    steal: int
    """The hypervisor ran another guest's work while ours waited (a VM's vCPU)."""
    total: int
    """Every state, steal included: the cores' wall time."""


def core_ticks(cores: Iterable[int]) -> Ticks:
    """`cores`' clock ticks since boot, by what they did (/proc/stat)."""
    wanted = {f"cpu{core}" for core in cores}
    busy = steal = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name in wanted:
            user, nice, system, idle, iowait, irq, softirq, stolen = map(int, fields[:8])
            working = user + nice + system + irq + softirq
            busy, steal = busy + working, steal + stolen
            total += working + idle + iowait + stolen
    return Ticks(busy, steal, total)


def counting_cpu(load: Callable[[str, int, int], Run], cores: list[int]):
    """`load`, with each run's `cpu_us` (the busy time of `cores` over it per request) and
    `steal` (the share of their time the hypervisor took)."""
    def counted(url: str, duration: int, connections: int) -> Run:
        before = core_ticks(cores)
        run = load(url, duration, connections)
        after = core_ticks(cores)
        used_us = (after.busy - before.busy) / CLOCK_TICKS * 1_000_000
        steal = (after.steal - before.steal) / max(after.total - before.total, 1)
        return dataclasses.replace(run, cpu_us=used_us / run.requests, steal=steal)
    return counted


TOOLS = {"wrk": run_wrk, "python": run_python}


# --------------------------------------------------------------------------- the variants


def render_original_site(*, listen: str, upstream: str) -> str:
    return template_environment(Path(__file__).parent).get_template(
        "original-site.conf.j2").render(
        listen=listen, upstream=upstream, timeouts=ORIGINAL_TIMEOUTS)


def parse_model(text: str) -> tuple[int, int]:
    """`WxT` (`2x4`): gunicorn workers and gthread threads, each from 1 to 32."""
    workers, sep, threads = text.partition("x")
    if not (sep and workers.isdigit() and threads.isdigit()
            and 1 <= int(workers) <= 32 and 1 <= int(threads) <= 32):
        raise ValueError(f"{text!r}: a worker model is WORKERSxTHREADS, each 1-32 (e.g. 2x4)")
    return int(workers), int(threads)


def start_variants(lab: Lab, models: Sequence[tuple[int, int]] = ()) -> dict[str, str]:
    """Beside droplet 1: a sync gunicorn, nginx without the micro-cache, without upstream
    keepalive too, with a static file, and the original design's gunicorn and nginx; their
    base URLs by target name. Each is droplet 1 written again (`Lab.write_droplet`) with
    another port, static directory, setting or renderer switch; the original's nginx site is
    its own template. `models`: per (workers, threads), a gunicorn more, `gunicorn_<W>x<T>`,
    with the environment the stack gets with those gunicornWorkers and gunicornThreads, and
    the site without the micro-cache in front of it, `nginx_<W>x<T>` (the worker model's
    comparison)."""
    droplet = lab.droplets[0]

    def variant(name: str, **changes) -> Droplet:
        directory = lab.state_dir / f"{droplet.name}-{name}"  # droplet-*: stop_lab stops it
        directory.mkdir()
        return dataclasses.replace(droplet, dir=directory, **changes)

    def app_settings(**changes) -> Settings:
        return dataclasses.replace(lab.settings,
                                   app=dataclasses.replace(lab.settings.app, **changes))

    no_cache = app_settings(microcache=MicrocacheSettings(seconds=0, paths=()))
    sync = variant("sync", gunicorn_port=SYNC_PORT)
    lab.write_droplet(sync, settings=app_settings(gunicorn_threads=1))
    original = variant("original", gunicorn_port=ORIGINAL_GUNICORN_PORT,
                       site_port=ORIGINAL_NGINX_PORT)
    lab.write_droplet(original, settings=no_cache)
    (original.dir / "site.conf").write_text(  # in place of the rendered site
        render_original_site(listen=original.site, upstream=original.bind))
    modelled = {f"{w}x{t}": variant(f"{w}x{t}", gunicorn_port=MODEL_PORT + i,
                                   site_port=MODEL_PORT + 100 + i)
                for i, (w, t) in enumerate(models)}
    for (w, t), server in zip(models, modelled.values(), strict=True):
        lab.write_droplet(server, settings=app_settings(
            microcache=no_cache.app.microcache, gunicorn_workers=w, gunicorn_threads=t))
        lab.start_gunicorn(server)
    lab.start_gunicorn(sync)
    lab.start_gunicorn(original, args=(*ORIGINAL_GUNICORN, "--bind", original.bind))
    for server in (sync, original, *modelled.values()):
        # Its pid file comes before its workers answer: measure only a server that serves.
        wait_until(lambda s=server: http_status(s.bind) == 200, START_TIMEOUT,
                   f"{server.dir.name} gunicorn /healthz")

    static_dir = lab.state_dir / "static"
    static_dir.mkdir()
    (static_dir / STATIC_FILE).write_text("webstack bench\n" * 68)  # ~1 KiB
    nocache = variant("nocache", site_port=NOCACHE_PORT)
    lab.write_droplet(nocache, settings=no_cache)
    keepalive_off = variant("keepalive-off", site_port=KEEPALIVE_OFF_PORT)
    lab.write_droplet(keepalive_off, settings=no_cache, upstream_keepalive=False)
    static = variant("static", site_port=STATIC_PORT, static_dir=str(static_dir))
    lab.write_droplet(static)
    for nginx in (nocache, keepalive_off, static, original, *modelled.values()):
        lab.start_nginx(nginx)
    return {
        "gunicorn": f"http://{droplet.bind}",
        "gunicorn_sync": f"http://{sync.bind}",
        "original_gunicorn": f"http://{original.bind}",
        "nginx": f"http://{droplet.site}",
        "nginx_nocache": f"http://{nocache.site}",
        "nginx_keepalive_off": f"http://{keepalive_off.site}",
        "original_nginx": f"http://{original.site}",
        "frontend": lab.url,
        "static": f"http://{static.site}",
        **{f"gunicorn_{name}": f"http://{server.bind}" for name, server in modelled.items()},
        **{f"nginx_{name}": f"http://{server.site}" for name, server in modelled.items()},
    }


def place(lab: Lab, layout: str) -> dict[str, list[int]]:
    """Pin every process of the started lab to cores, by `layout`:

    - `split` (2 cores or more): the droplets' nginx and gunicorn (every variant too) on the
      first core; PostgreSQL, pgbouncer, the frontend, this process (the delay proxies) and
      wrk on the others. A droplet of one vCPU, prod's s-1vcpu-1gb, whose database, load
      balancer and clients run on machines of their own, as on DigitalOcean: the database's
      CPU is not counted against the app.
    - `shared`: everything on every core, the database's work competing with the app's.

    Processes forked later (a recycled gunicorn worker, a database backend) inherit their
    parent's cores. The cores of each side, by name."""
    cores = sorted(os.sched_getaffinity(0))
    if layout == "shared" or len(cores) < 2:
        return {"droplets": cores, "outside": cores}
    sides = {"droplets": cores[:1], "outside": cores[1:]}
    droplets = set(descendants(*(server for directory in lab.state_dir.glob("droplet-*")
                                 for name in ("nginx.pid", "gunicorn.pid")
                                 if (server := lab_pid(directory / name, lab.state_dir)))))
    _pin(lab.pids() - droplets, sides["outside"])
    _pin([os.getpid()], sides["outside"])  # wrk, started later, inherits them
    _pin(droplets, sides["droplets"])
    return sides


def _pin(pids: Iterable[int], cores: list[int]) -> None:
    """Every thread of `pids` on `cores` (affinity is per thread; new ones inherit it)."""
    for pid in pids:
        with suppress(FileNotFoundError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task.name), cores)


def seed_notes(url: str, count: int = SEED_NOTES) -> None:
    client = Client(url)
    for n in range(count):
        body = json.dumps({"text": f"bench note {n}"}).encode()
        sample = client.send(Request("POST", "/api/notes", body))
        if sample.status != 201:
            raise RuntimeError(f"seeding notes: {sample.outcome} {sample.status} {sample.body}")


def round_trips(lab: Lab, requests: int = ROUND_TRIP_REQUESTS) -> dict[str, object]:
    """Database round trips per list read and per note creation through droplet 1's
    gunicorn, counted by the servers (as tests/test_app_roundtrips.py does): a read by the
    statement log of the server that answered it (pgbouncer's SHOW STATS for the primary),
    a write by pgbouncer's SHOW STATS. New visitors each time (no session cookie)."""
    url = f"http://{lab.droplets[0].bind}"

    def read() -> str:
        sample = Client(url, cookies=False).send(Request("GET", "/api/notes"))
        if sample.status != 200:
            raise RuntimeError(f"round trips: a read got {sample.outcome} {sample.status}")
        return sample.served_by

    def write() -> None:
        body = json.dumps({"text": "round trip"}).encode()
        sample = Client(url, cookies=False).send(Request("POST", "/api/notes", body))
        if sample.status != 201:
            raise RuntimeError(f"round trips: a write got {sample.outcome} {sample.status}")

    def per_request(send, count) -> float:
        for _ in range(requests):
            send()
        before = count()
        for _ in range(requests):
            send()
        return (count() - before) / requests

    served_by = read()
    found: dict[str, object] = {"requests": requests, "read_served_by": served_by}
    if served_by == "primary":
        found["read"] = per_request(read, lab.pg.pgbouncer_queries)
        found["read_counted_by"] = "pgbouncer SHOW STATS"
    else:
        log = lab.pg.statement_log(served_by, ignore=LAG_SAMPLER_QUERIES).start()
        try:
            found["read"] = per_request(read, lambda: len(log.messages()))
        finally:
            log.stop()
        found["read_counted_by"] = f"{served_by}'s statement log"
    found["write"] = per_request(write, lab.pg.pgbouncer_queries)
    found["write_counted_by"] = "pgbouncer SHOW STATS"
    return found


# --------------------------------------------------------------------------- measuring


def targets(bases: dict[str, str], health_path: str) -> dict[str, str]:
    """Every measurement's URL by its name (`<path>/<target>`)."""
    paths = {**PATHS, "healthz": health_path}
    found = {f"{key}/{t}": base + path for key, path in paths.items()
             for t, base in bases.items() if t != "static"}
    found["static"] = f"{bases['static']}/static/{STATIC_FILE}"
    return found


def measure(urls: dict[str, str], *, tool: str = "wrk", duration: int = DURATION,
            repeats: int = REPEATS, connections: int = CONNECTIONS,
            warmup: int = WARMUP, cpu_of: list[int] | None = None) -> dict[str, list[Run]]:
    """`repeats` rounds over every URL; odd rounds go backwards, so a drift of the machine
    over the run weighs on every target alike. With `cpu_of`, each run also counts those
    cores' busy time per request."""
    load = counting_cpu(TOOLS[tool], cpu_of) if cpu_of else TOOLS[tool]
    if warmup:
        for url in urls.values():
            load(url, warmup, connections)
    runs: dict[str, list[Run]] = {name: [] for name in urls}
    for round_ in range(repeats):
        order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
        for name in order:
            runs[name].append(load(urls[name], duration, connections))
    return runs


def median_of(runs: list[Run]) -> dict[str, float]:
    """Each figure's median over the runs (taken separately)."""
    cpu = [r.cpu_us for r in runs if r.cpu_us is not None]
    return {"rps": statistics.median(r.rps for r in runs),
            "rps_min": min(r.rps for r in runs), "rps_max": max(r.rps for r in runs),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "cpu_us": statistics.median(cpu) if cpu else None,
            "errors": sum(r.errors for r in runs)}


def steal_of(runs: dict[str, list[Run]]) -> dict[str, float | str] | None:
    """How much of the droplets' core the hypervisor took: the median share over every run,
    and the most in one run and whose it was; None without `split`."""
    stolen = [(run.steal, name) for name in runs for run in runs[name] if run.steal is not None]
    if not stolen:
        return None
    most, whose = max(stolen)
    return {"median": statistics.median(share for share, _ in stolen), "max": most,
            "max_in": whose}


def ratios(runs: dict[str, list[Run]]) -> dict[str, dict[str, float | None]]:
    """Each ratio a / b, paired by round: a's run divided by b's run of the same round, and
    the median over the rounds (with the rounds' lowest and highest rps ratio). A change of
    the machine's speed between rounds moves both runs of a pair and cancels; within a round
    it can still fall between them, least where they run side by side (`run_order`)."""
    def ratio(a: list[Run], b: list[Run]) -> dict[str, float | None]:
        pairs = list(zip(a, b, strict=True))
        rps = [x.rps / y.rps for x, y in pairs]
        cpu = [x.cpu_us / y.cpu_us for x, y in pairs if x.cpu_us and y.cpu_us]
        return {"rps": statistics.median(rps), "rps_min": min(rps), "rps_max": max(rps),
                "p50": statistics.median(x.p50_ms / y.p50_ms for x, y in pairs),
                "p99": statistics.median(x.p99_ms / y.p99_ms for x, y in pairs),
                "cpu": statistics.median(cpu) if cpu else None}

    found = {}
    for key in PATHS:
        for name, (top, bottom) in RATIOS.items():
            found[f"{key}.{name}"] = ratio(
                runs["static" if top == "static" else f"{key}/{top}"],
                runs["static" if bottom == "static" else f"{key}/{bottom}"])
    found["gunicorn.notes_vs_healthz"] = ratio(runs["notes/gunicorn"], runs["healthz/gunicorn"])
    return found


def run_order(names: Iterable[str]) -> list[str]:
    """The order of a round: the runs a ratio of the acceptance divides are next to each
    other, seconds apart: a target's note list right after its health check (straight to
    gunicorn), the original design's nginx right after webstack's without the micro-cache,
    path by path (`RUN_GROUPS`). The machine's speed moves within seconds too, so the
    rounds of even these pairs can disagree (docs/benchmarks.md)."""
    groups = {t: (g, i) for g, group in enumerate(RUN_GROUPS) for i, t in enumerate(group)}
    paths = {key: i for i, key in enumerate(PATHS)}

    def key(name: str) -> tuple:
        path, _, target = name.rpartition("/")
        if target not in groups:  # a worker model's: each target's paths together
            return (len(RUN_GROUPS), 0, target, paths.get(path, 0))
        group, place = groups[target]
        return (group, paths.get(path, 0), "", place)

    return sorted(names, key=key)


def cost(lab: Lab, medians: dict[str, dict[str, float]], cores: int) -> dict[str, object]:
    """USD per month per 100 requests per second, from the app droplets' price alone;
    `cores`: how many the droplets ran on."""
    size, count = lab.settings.app.size, lab.settings.app.running_droplets
    monthly = float(size.monthly_usd) * count
    found: dict[str, object] = {
        "droplet_size": size.slug, "droplet_vcpus": size.vcpus, "droplets": count,
        "droplets_monthly_usd": monthly, "lab_cores": cores,
        "assumption": (f"per-droplet capacity = droplet 1's rps through its nginx (no "
                       f"micro-cache) x {size.vcpus} vCPU / the {cores} lab core(s) the "
                       "droplets ran on; the lab runs all droplets on those cores, so the "
                       "frontend's rps is not N real droplets' rps"),
    }
    for key in PATHS:
        frontend = medians[f"{key}/frontend"]["rps"]
        droplet = medians[f"{key}/nginx_nocache"]
        per_droplet = droplet["rps"] * size.vcpus / cores
        found[key] = {
            "lab_frontend_rps": frontend,
            "lab_usd_per_100_rps": monthly / (frontend / 100),
            "estimated_droplet_rps": per_droplet,
            "estimated_stack_rps": per_droplet * count,
            "estimated_usd_per_100_rps": monthly / (per_droplet * count / 100),
        }
        if droplet["cpu_us"]:
            busy_droplet = size.vcpus * 1_000_000 / droplet["cpu_us"]
            found[key] |= {"busy_droplet_rps": busy_droplet,
                           "busy_usd_per_100_rps": monthly / (busy_droplet * count / 100)}
    return found


def worker_recycles(lab: Lab) -> dict[str, int]:
    """Workers gunicorn replaced after `max_requests` (app/gunicorn.conf.py), per droplet 1's
    gunicorns: at bench rates a recycle comes every second or two, and a worker booting the
    app takes CPU from the others, which shows in p99."""
    return {log.parent.name: log.read_text(errors="replace").count("Autorestarting worker")
            for log in sorted(lab.state_dir.glob(f"{lab.droplets[0].name}*/gunicorn.log"))}


def machine() -> dict[str, object]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model.group(1) if model else "?",
            "kernel": platform.release(), "python": platform.python_version(),
            "wrk": _wrk_version()}


def _wrk_version() -> str | None:
    if not WRK:
        return None
    result = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=10)
    return (result.stdout + result.stderr).split("[")[0].strip() or None


def run_bench(lab: Lab, *, tool: str = "wrk", duration: int = DURATION, repeats: int = REPEATS,
              connections: int = CONNECTIONS, warmup: int = WARMUP,
              db_delay_ms: float = 0, models: Sequence[tuple[int, int]] = (),
              layout: str = "split") -> dict[str, object]:
    """Measure a started lab, its processes placed by `layout` (`place`); the report as a
    dict."""
    started, load_at_start, host = time.monotonic(), os.getloadavg()[0], machine()
    for proxy in lab.proxies.values():
        proxy.delay = db_delay_ms / 2000  # each way
    seed_notes(lab.url)
    urls = targets(start_variants(lab, models), lab.settings.frontend.health_check.path)
    own = sorted(os.sched_getaffinity(0))
    cores = place(lab, layout)
    try:
        trips = round_trips(lab)
        split = set(cores["droplets"]).isdisjoint(cores["outside"])
        runs = measure({name: urls[name] for name in run_order(urls)}, tool=tool,
                       duration=duration, repeats=repeats, connections=connections,
                       warmup=warmup, cpu_of=cores["droplets"] if split else None)
    finally:
        _pin([os.getpid()], own)  # a caller (pytest) goes on with every core
    medians = {name: {**median_of(runs[name]), "url": url,
                      "runs": [dataclasses.asdict(r) for r in runs[name]]}
               for name, url in urls.items()}
    app = lab.settings.app
    return {
        "stack": lab.settings.stack,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": host,
        "stack_shape": {"droplets": app.running_droplets, "droplet_size": app.droplet_size,
                        "gunicorn_workers": app.workers, "gunicorn_threads": app.gunicorn_threads,
                        "frontend": lab.mode, "microcache": dataclasses.asdict(app.microcache)},
        "original_design": {"gunicorn": " ".join(ORIGINAL_GUNICORN),
                            "nginx": "least_conn, no upstream keepalive",
                            "proxy_timeouts": ORIGINAL_TIMEOUTS},
        "db_delay_ms": db_delay_ms,
        "cores": {"layout": layout, **cores},
        "round_trips": trips,
        "load": {"tool": tool, "duration_s": duration, "repeats": repeats,
                 "connections": connections, "warmup_s": warmup,
                 "statistic": "median of the runs, per figure; a ratio: the median of the "
                              "rounds' ratios (a's run / b's run of the same round)"},
        "measurements": medians,
        "ratios": ratios(runs),
        "steal": steal_of(runs),
        "cost": cost(lab, medians, len(cores["droplets"])),
        "gunicorn_worker_recycles": worker_recycles(lab),
        "load_average": {"start": load_at_start, "end": os.getloadavg()[0]},
        "seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- output


def table(report: dict) -> str:
    lines = [f"webstack bench, stack {report['stack']}, {report['date']}, "
             f"{report['machine']['nproc']} cores ({report['machine']['cpu']}), "
             f"{report['load']['tool']}: {report['load']['connections']} connections, "
             f"{report['load']['repeats']} x {report['load']['duration_s']} s per target",
             f"cores: {_cores(report['cores'])}",
             f"load average (1 min) {report['load_average']['start']:.2f} at the start, "
             f"{report['load_average']['end']:.2f} at the end",
             "", f"{'measurement':<28} {'rps':>7} {'(min-max)':>13} {'p50 ms':>8} {'p99 ms':>8} "
             f"{'cpu us':>7} {'errors':>6}"]
    for name, m in report["measurements"].items():
        spread = f"({m['rps_min']:.0f}-{m['rps_max']:.0f})"
        lines.append(f"{name:<28} {m['rps']:>7.0f} {spread:>13} {m['p50_ms']:>8.2f} "
                     f"{m['p99_ms']:>8.2f} {_figure(m['cpu_us'], '.0f'):>7} {m['errors']:>6}")
    if any(m["cpu_us"] for m in report["measurements"].values()):
        lines.append("cpu us: microseconds the droplets' core was busy per request")
    if steal := report.get("steal"):
        lines.append(f"hypervisor steal on the droplets' core: {steal['median']:.1%} of a run "
                     f"(median), at most {steal['max']:.1%} ({steal['max_in']})")
    trips = report["round_trips"]
    lines += ["", f"database round trips per request: read {trips['read']:g} "
              f"({trips['read_counted_by']}), write {trips['write']:g} "
              f"({trips['write_counted_by']}), {trips['requests']} of each"]
    if report["db_delay_ms"]:
        lines.append(f"database behind a delay of {report['db_delay_ms']:g} ms per round trip")
    lines += ["", f"{'ratio (a / b)':<34} {'rps':>6} {'(rounds)':>11} {'p50':>6} {'p99':>6} "
              f"{'cpu':>6}"]
    for name, r in report["ratios"].items():
        rounds = f"({r['rps_min']:.2f}-{r['rps_max']:.2f})"
        lines.append(f"{name:<34} {r['rps']:>6.2f} {rounds:>11} {r['p50']:>6.2f} "
                     f"{r['p99']:>6.2f} {_figure(r['cpu'], '.2f'):>6}")
    lines.append("ratio: the median over the rounds of a's run / b's run of the same round; "
                 "(rounds): the lowest and highest rps ratio")
    c = report["cost"]
    lines += ["", f"cost: {c['droplets']} x {c['droplet_size']} = "
              f"{c['droplets_monthly_usd']:.2f} USD/month (app droplets only)"]
    for key in PATHS:
        k = c[key]
        lines.append(f"  {key}: lab {k['lab_frontend_rps']:.0f} rps through the frontend -> "
                     f"{k['lab_usd_per_100_rps']:.2f} USD per 100 rps; estimate "
                     f"{k['estimated_stack_rps']:.0f} rps -> "
                     f"{k['estimated_usd_per_100_rps']:.2f} USD per 100 rps")
        if "busy_droplet_rps" in k:
            lines.append(f"  {key}: {k['busy_droplet_rps']:.0f} rps a droplet with its vCPU "
                         f"always busy -> {k['busy_usd_per_100_rps']:.2f} USD per 100 rps")
    lines.append(f"  estimate: {c['assumption']}")
    recycles = ", ".join(f"{k} {v}" for k, v in report["gunicorn_worker_recycles"].items())
    lines.append(f"gunicorn workers recycled (max_requests): {recycles}")
    lines.append(f"took {report['seconds']:.0f} s")
    return "\n".join(lines)


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cores(cores: dict) -> str:
    if cores["layout"] == "shared":
        return f"shared: every process on cores {cores['droplets']}"
    return (f"split: the droplets' nginx and gunicorn on {cores['droplets']}, the database, "
            f"the frontend and wrk on {cores['outside']}")


def chart(report: dict, path: Path) -> Path:
    """rps and p99 of every target, per path, the original design's beside webstack's."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    from matplotlib import pyplot

    names = [name.removeprefix("healthz/") for name in report["measurements"]
             if name.startswith("healthz/")]
    names = [t for t in names if t not in ORIGINAL_TARGETS] + list(ORIGINAL_TARGETS)
    colors = ["#8c8c8c" if t in ORIGINAL_TARGETS else "#1f77b4" for t in names]
    figure, axes = pyplot.subplots(2, len(PATHS), figsize=(11, 7), layout="constrained")
    for column, key in enumerate(PATHS):
        measured = [report["measurements"][f"{key}/{t}"] for t in names]
        for row, (figure_name, unit) in enumerate((("rps", "requests/s"), ("p99_ms", "p99 ms"))):
            axis = axes[row][column]
            bars = axis.barh(names, [m[figure_name] for m in measured], color=colors)
            axis.bar_label(bars, fmt="%.0f" if figure_name == "rps" else "%.1f", fontsize=8)
            axis.margins(x=0.15)
            axis.locator_params(axis="x", nbins=4)  # 20,000-wide axes: labels apart
            axis.invert_yaxis()
            axis.set_xlabel(unit)
            axis.set_title(f"{PATHS[key]}: {unit}")
            axis.grid(axis="x", alpha=0.3)
    delay = f", database +{report['db_delay_ms']:g} ms" if report["db_delay_ms"] else ""
    figure.suptitle(f"webstack (blue) and the original design (grey), stack "
                    f"{report['stack']}, {report['date']}, {report['machine']['nproc']} cores "
                    f"({report['cores']['layout']}){delay}")
    figure.savefig(path, dpi=80)
    pyplot.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", help="a stack name (Pulumi.<stack>.yaml) or a stack file")
    parser.add_argument("--duration", type=int, default=DURATION, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per target")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="seconds per target, 0: none")
    parser.add_argument("--tool", choices=TOOLS, default="wrk" if WRK else "python")
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--dir", type=Path, default=STATE_DIR, help="state directory")
    parser.add_argument("--net", default=NET, help="first three octets of the addresses")
    parser.add_argument("--keep-state", action="store_true",
                        help="keep the state directory (logs) after the run")
    parser.add_argument("--db-delay", type=float, default=0, metavar="MS",
                        help="milliseconds added to every database round trip (a proxy)")
    parser.add_argument("--cores", choices=("split", "shared"), default="split",
                        help="split: the droplets on one core, the database, frontend and "
                             "wrk on the others (default); shared: all on every core")
    parser.add_argument("--models", nargs="*", default=[], metavar="WxT",
                        help="per worker model (gunicorn workers x threads, e.g. 2x4), a "
                             "gunicorn more and nginx in front: gunicorn_WxT, nginx_WxT")
    args = parser.parse_args(argv)
    if not (1 <= args.duration <= 30 and 1 <= args.repeats <= 9
            and 1 <= args.connections <= 256 and 0 <= args.warmup <= 10
            and 0 <= args.db_delay <= 100 and len(args.models) <= MAX_MODELS):
        parser.error("bounds: duration 1-30 s, repeats 1-9, connections 1-256, warmup 0-10 s,"
                     f" db-delay 0-100 ms, at most {MAX_MODELS} models")
    try:
        models = list(dict.fromkeys(map(parse_model, args.models)))
    except ValueError as exc:
        parser.error(f"--models: {exc}")

    terminate_on_signal()
    stop_lab(args.dir)  # a previous run that was killed
    lab = Lab(stack_file(args.stack), state_dir=args.dir, net=args.net,
              db_proxies=args.db_delay > 0)
    try:
        lab.start()
        report = run_bench(lab, tool=args.tool, duration=args.duration, repeats=args.repeats,
                           connections=args.connections, warmup=args.warmup,
                           db_delay_ms=args.db_delay, models=models,
                           layout=args.cores)
    finally:
        lab.stop()
    if not args.keep_state:
        shutil.rmtree(args.dir, ignore_errors=True)  # access logs of every request
    report["command"] = "python -m lab.bench " + " ".join(argv or sys.argv[1:])
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    picture = chart(report, args.report.with_suffix(".png"))
    print(table(report))
    print(f"report: {args.report}, chart: {picture}")
    return 1 if any(m["errors"] for m in report["measurements"].values()) else 0




if __name__ == "__main__":
    sys.exit(main())
