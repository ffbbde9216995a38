"""make bench: against a small lab it measures every target without an error, gives every ratio
and both cost figures as positive numbers, writes the report and leaves nothing running; the
keepalive-off edit takes out upstream keepalive and nothing else; wrk's output is read right.
No figure is compared with another: the machine is too noisy for timed assertions."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components.runtime import GUNICORN_KEEPALIVE, render_nginx_site
from components.settings import settings_for_stack_file
from lab import bench, spread
from lab.process import descendants
from tests.runtime_helpers import nginx_command, nginx_conf
from tools.mocks import ROOT


def test_bench_measures_every_layer_and_writes_the_report(tmp_path, capsys):
    # A private directory (pytest's tmp_path), like a clone in /root: PostgreSQL, run as
    # `postgres` under root, keeps its files where it can reach them.
    state = tmp_path / "bench-state"
    report_path = tmp_path / "bench-report.json"
    try:
        status = bench.main(["staging", "--duration", "1", "--repeats", "1", "--warmup", "0",
                    "--connections", "2", "--report", str(report_path), "--dir", str(state),
                    "--net", "127.0.5", "--models", "1x2"])
        assert status == 0
        left = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
        assert left.returncode == 1, f"still running: {left.stdout}"
        assert not state.exists(), "the state directory (logs) was not removed"
    finally:
        bench.stop_lab(state)
        shutil.rmtree(state, ignore_errors=True)

    report = json.loads(report_path.read_text())
    measured = report["measurements"]
    models = ("gunicorn_1x2", "nginx_1x2")  # --models 1x2: a worker model and nginx in front
    assert set(measured) == {f"{p}/{t}" for p in bench.PATHS
                             for t in (*bench.APP_TARGETS, *models)} | {"static"}
    for name, m in measured.items():
        assert m["rps"] > 0 and m["p50_ms"] > 0 and m["p99_ms"] > 0, name
        assert m["errors"] == 0, f"{name}: {m['errors']} failed requests"
    assert set(report["ratios"]) == {f"{p}.{r}" for p in bench.PATHS for r in bench.RATIOS} | {
        "gunicorn.notes_vs_healthz"}
    split = report["machine"]["nproc"] >= 2  # the droplets' core is nobody else's
    # With the droplets on a core of their own, their CPU per request is counted.
    assert all(v > 0 if split else (v is None) == (name == "cpu")
               for r in report["ratios"].values() for name, v in r.items())
    assert all((m["cpu_us"] > 0) if split else m["cpu_us"] is None for m in measured.values())
    steal = report["steal"]  # the hypervisor's share of the droplets' core, per run
    assert (0 <= steal["median"] <= steal["max"] <= 1 and steal["max_in"] in measured
            if split else steal is None)
    # Counted by the servers: reads on staging's primary through pgbouncer, writes too.
    trips = report["round_trips"]
    assert trips["read_served_by"] == "primary" and trips["read"] >= 1 and trips["write"] >= 1
    assert report["original_design"]["gunicorn"] == "--workers 3 --threads 2"
    chart = report_path.with_suffix(".png")
    assert chart.read_bytes().startswith(b"\x89PNG"), "no chart next to the report"
    for path in bench.PATHS:
        figures = report["cost"][path]
        assert figures["lab_usd_per_100_rps"] > 0 and figures["estimated_usd_per_100_rps"] > 0
        assert figures["busy_usd_per_100_rps"] > 0 if split else "busy_droplet_rps" not in figures
    assert report["stack_shape"]["droplets"] == 2 and report["machine"]["nproc"] >= 1
    assert len(os.sched_getaffinity(0)) == report["machine"]["nproc"], "cores not given back"
    cores = report["cores"]
    assert cores["layout"] == "split"
    if split:
        assert cores["droplets"] and not set(cores["droplets"]) & set(cores["outside"])
    out = capsys.readouterr().out
    assert "cost: 2 x s-1vcpu-1gb = 12.00 USD/month" in out
    assert "notes.webstack_vs_original" in out and "database round trips per request" in out


def test_a_worker_model_is_workers_x_threads_and_anything_else_is_refused(capsys):
    assert bench.parse_model("2x4") == (2, 4)
    for bad in ("2", "0x4", "2x33", "x4", "2x", "2x4x1", "two x4", "-1x4"):
        with pytest.raises(ValueError, match="WORKERSxTHREADS, each 1-32"):
            bench.parse_model(bad)
    with pytest.raises(SystemExit):
        bench.main(["staging", "--models", "2x4", "3"])
    assert "--models: '3': a worker model is WORKERSxTHREADS" in capsys.readouterr().err


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to split")
def test_pinning_takes_every_thread_of_a_process_tree_and_nothing_else():
    core = min(os.sched_getaffinity(0))
    script = f"sleep 30 & {sys.executable} -c 'import threading, time; " \
             "threading.Thread(target=time.sleep, args=(30,)).start()' & wait"
    shell = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(tree := descendants(shell.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # python's thread
        bench._pin(tree, [core])
        later = subprocess.Popen(["sleep", "30"])  # not pinned: this process is not in it
        threads = [int(t.name) for pid in tree for t in Path(f"/proc/{pid}/task").iterdir()]
        assert len(threads) >= 4  # sh, sleep, python and its thread
        assert all(os.sched_getaffinity(t) == {core} for t in threads)
        assert os.sched_getaffinity(later.pid) != {core}
        later.kill()
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()


def test_a_run_s_cpu_per_request_counts_the_busy_time_of_the_cores_given():
    core = min(os.sched_getaffinity(0))
    spin = (f"import os, time; os.sched_setaffinity(0, {{{core}}})\n"
            "end = time.process_time() + 0.5\nwhile time.process_time() < end: pass")

    def load(url, duration, connections):  # 100 "requests" that cost 0.5 s of `core`
        subprocess.run([sys.executable, "-c", spin], check=True)
        return bench.Run(rps=1.0, p50_ms=1.0, p99_ms=1.0, requests=100, errors=0)

    run = bench.counting_cpu(load, [core])("http://127.0.0.1:1/", 1, 1)
    # At least most of what was spent there (anything else on that core only adds); the
    # kernel counts busy time by the clock tick, a sample every 10 ms or so.
    assert run.cpu_us >= 0.4 * 1_000_000 / 100
    assert run.requests == 100 and bench.Run(1.0, 1.0, 1.0, 1, 0).cpu_us is None


def test_a_run_s_steal_is_the_hypervisor_s_share_of_the_cores_time(monkeypatch):
    # Over the run: 300 ticks of the two cores' time, 150 busy, 60 stolen, 90 idle.
    ticks = iter([bench.Ticks(busy=1000, steal=40, total=5000),
                  bench.Ticks(busy=1150, steal=100, total=5300)])
    monkeypatch.setattr(bench, "core_ticks", lambda cores: next(ticks))

    def load(url, duration, connections):
        return bench.Run(rps=50.0, p50_ms=1.0, p99_ms=1.0, requests=150, errors=0)

    run = bench.counting_cpu(load, [0, 1])("http://127.0.0.1:1/", 3, 1)
    assert run.steal == pytest.approx(0.2)
    assert run.cpu_us == pytest.approx(150 / bench.CLOCK_TICKS * 1_000_000 / 150)
    runs = {"a": [run, dataclasses.replace(run, steal=0.05)],
            "b": [dataclasses.replace(run, steal=0.01)]}
    assert bench.steal_of(runs) == {"median": pytest.approx(0.05), "max": pytest.approx(0.2),
                                    "max_in": "a"}
    assert bench.steal_of({"a": [dataclasses.replace(run, steal=None)]}) is None
    monkeypatch.undo()
    now = bench.core_ticks([min(os.sched_getaffinity(0))])  # this machine's /proc/stat
    assert 0 <= now.steal <= now.total and 0 < now.busy <= now.total


def test_the_original_design_s_site_is_least_conn_without_upstream_keepalive(tmp_path):
    site = bench.render_original_site(listen="127.0.0.1:8084", upstream="127.0.0.1:8002")
    upstream = site[site.index("upstream original_app {"):site.index("}")]
    assert upstream.split("\n")[1:] == ["    least_conn;", "    server 127.0.0.1:8002;", ""]
    assert "proxy_http_version" not in site and "keepalive" not in site  # HTTP/1.0, closed
    for name, value in bench.ORIGINAL_TIMEOUTS.items():
        assert f"proxy_{name}_timeout {value};" in site
    conf = nginx_conf(tmp_path, site)
    checked = subprocess.run(nginx_command(conf, "-t", "-q"), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_keepalive_off_takes_out_upstream_keepalive_only():
    settings = settings_for_stack_file(ROOT / "Pulumi.prod.yaml")
    site, off = (render_nginx_site(settings, listen="127.0.0.1:8080", upstream="127.0.0.1:8000",
                                   static_dir="/srv/static", metrics_allow=["127.0.0.0/8"],
                                   upstream_keepalive=keepalive) for keepalive in (True, False))
    removed = [line.strip() for line in site.splitlines() if line not in off.splitlines()]
    threads = settings.app.workers * settings.app.gunicorn_threads
    assert removed == [f"keepalive {threads};",
                       f"# Below gunicorn's keepalive ({GUNICORN_KEEPALIVE}s): nginx never reuses"
                       " a connection that",
                       "# gunicorn is closing, which would fail a POST (nginx does not retry"
                       " those).",
                       "keepalive_timeout 4s;", 'proxy_set_header Connection "";']
    assert "keepalive_timeout 75s;" in off  # the clients' keepalive stays
    assert not set(off.splitlines()) - set(site.splitlines()), "nothing added"


WRK_OUTPUT = """\
Running 3s test @ http://127.0.4.11:8000/healthz
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    81.29ms  179.76ms 766.10ms   86.84%
    Req/Sec     2.45k     0.91k    3.88k    66.67%
  Latency Distribution
     50%  585.00us
     75%   12.79ms
     90%  380.93ms
     99%    1.20s
  5292 requests in 3.02s, 826.51KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   1754.25
Transfer/sec:    273.98KB
""".replace("s\n", "s \n")  # wrk pads one-letter units with a space


def test_wrk_output_is_read_with_its_units_and_errors():
    run = bench.parse_wrk(WRK_OUTPUT)
    assert run == bench.Run(rps=1754.25, p50_ms=pytest.approx(0.585), p99_ms=1200.0,
                            requests=5292, errors=7)
    with pytest.raises(ValueError, match="Requests/sec"):
        bench.parse_wrk(WRK_OUTPUT.replace("Requests/sec", "Requests"))


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        status = 200 if self.path == "/ok" else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_python_fallback_counts_rate_latency_and_errors():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        good = bench.run_python(f"{url}/ok", 1, 2)
        assert good.rps > 0 and 0 < good.p50_ms <= good.p99_ms and good.errors == 0
        with pytest.raises(RuntimeError, match="no successful request"):
            bench.run_python(f"{url}/fail", 1, 2)
    finally:
        server.shutdown()
        server.server_close()


def test_spread_counts_the_cpu_of_each_worker_not_the_master(tmp_path):
    master = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(ticks := spread.worker_ticks(master.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(ticks) == 2 and master.pid not in ticks
        assert all(t >= 0 for t in ticks.values())
    finally:
        os.killpg(master.pid, signal.SIGKILL)
        master.wait()
    with pytest.raises(SystemExit) as exited:
        spread.main([str(tmp_path / "none.pid"), "http://127.0.0.1:1/"])
    assert exited.value.code == 2


def test_a_ratio_divides_the_runs_of_one_round_and_takes_the_median():
    def run(rps, cpu=None):
        return bench.Run(rps=rps, p50_ms=1000 / rps, p99_ms=3000 / rps, requests=1, errors=0,
                         cpu_us=cpu)

    # The machine ran at 1, 1/2 and 3/2 of its speed in the three rounds; notes made 0.6 of
    # healthz's rps in two of them.
    speeds = (1.0, 0.5, 1.5)
    runs = {name: [run(base * s) for s in speeds] for name, base in (
        ("healthz/gunicorn", 1000), ("notes/gunicorn", 600))}
    runs["notes/gunicorn"][2] = run(600 * 1.5 * 1.1)  # one round's pair 10% apart
    for key in bench.PATHS:
        for top, bottom in bench.RATIOS.values():
            for t in (top, bottom):
                name = "static" if t == "static" else f"{key}/{t}"
                runs.setdefault(name, [run(700 * s, cpu=500 / s) for s in speeds])
    ratio = bench.ratios(runs)["gunicorn.notes_vs_healthz"]
    assert ratio["rps"] == pytest.approx(0.6) and ratio["p50"] == pytest.approx(1 / 0.6)
    assert (ratio["rps_min"], ratio["rps_max"]) == (pytest.approx(0.6), pytest.approx(0.66))
    assert ratio["cpu"] is None  # not counted (a `shared` layout)
    assert bench.ratios(runs)["notes.webstack_vs_original"]["cpu"] == pytest.approx(1)


def test_a_round_runs_a_target_s_paths_and_the_pairs_of_the_main_ratios_side_by_side():
    names = [f"{p}/{t}" for p in bench.PATHS for t in bench.APP_TARGETS] + ["static"]
    names += ["healthz/gunicorn_1x4", "notes/gunicorn_1x4"]
    order = bench.run_order(names)
    assert sorted(order) == sorted(names)
    at = {name: i for i, name in enumerate(order)}
    assert at["notes/gunicorn"] == at["healthz/gunicorn"] + 1
    for path in bench.PATHS:
        assert at[f"{path}/original_nginx"] == at[f"{path}/nginx_nocache"] + 1
    assert order[-2:] == ["healthz/gunicorn_1x4", "notes/gunicorn_1x4"]
