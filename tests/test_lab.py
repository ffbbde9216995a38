"""The local HA lab: the load generator counts right, the HAProxy config is the LB's, a prod lab
starts, serves, answers 503 with every droplet down and stops without a trace, and a broken
nginx LB setting (no retries) makes the kill-a-droplet scenario fail."""

from __future__ import annotations

import http.client
import http.server
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from components.settings import settings_for_stack_file
from lab.chaos import SCENARIOS, run_scenarios
from lab.load import OUTCOMES, Load, Request
from lab.monitor import Monitor
from lab.process import group_members, http_status, lab_pid, wait_until
from lab.stack import HAPROXY, Droplet, Lab, render_haproxy_cfg, stack_file, stop_lab
from tools.mocks import ROOT

NEXT_UPSTREAM = "proxy_next_upstream error timeout http_502 http_503 http_504;"


def lab_dir() -> Path:
    """A state directory in a directory only its owner can enter, like a clone in `mktemp -d`
    or in /root: PostgreSQL (run as `postgres` under root) must still start."""
    return Path(tempfile.mkdtemp(prefix="webstack-lab-")) / "clone" / ".lab"


# --------------------------------------------------------------------------- load generator


class _Server(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/drop":
            self.connection.shutdown(socket.SHUT_RDWR)  # closed before any response
            return
        if self.path == "/slow":
            time.sleep(1.0)
        status = {"/ok": 200, "/fail": 503, "/missing": 404}.get(self.path, 200)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_counts_every_request_once_by_outcome(local_server):
    paths = ["/ok", "/fail", "/missing", "/drop", "/slow"]
    with Load(local_server, lambda n: Request("GET", paths[n % 5]), workers=5, rate=None,
              max_requests=25, max_seconds=30, timeout=0.3) as load:
        load.wait()
    by_path = {p: {s.outcome for s in load.samples if s.path == p} for p in paths}
    assert by_path == {"/ok": {"ok"}, "/fail": {"http_5xx"}, "/missing": {"http_other"},
                       "/drop": {"connection_error"}, "/slow": {"timeout"}}
    assert len(load.samples) == 25 and all(s.outcome in OUTCOMES for s in load.samples)


def test_load_is_bounded_in_time_and_refuses_other_hosts(local_server):
    started = time.monotonic()
    with Load(local_server, lambda n: Request("GET", "/ok"), workers=2, rate=20,
              max_requests=10_000, max_seconds=1.0) as load:
        load.wait()
    assert time.monotonic() - started < 3 and len(load.samples) <= 25
    with pytest.raises(ValueError, match="loopback only"):
        Load("http://203.0.113.7", lambda n: Request(), max_requests=1)


# --------------------------------------------------------------------------- HAProxy config


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_haproxy_checks_like_the_stacks_load_balancer_and_never_retries(tmp_path, stack):
    settings = settings_for_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    hc = settings.frontend.health_check
    cfg = render_haproxy_cfg(settings, listen="127.0.0.10:8080",
                             servers=[("droplet-1", "127.0.0.11:8080")],
                             socket_path=str(tmp_path / "sock"), pidfile=str(tmp_path / "pid"))
    lines = {line.strip() for line in cfg.splitlines()}
    assert f"default-server check inter {hc.interval_seconds}s fall {hc.unhealthy_threshold}" \
           f" rise {hc.healthy_threshold}" in lines
    assert f"timeout check {hc.timeout_seconds}s" in lines
    assert f"http-check send meth GET uri {hc.path}" in lines
    assert "retries 0" in lines and "option redispatch" not in lines
    (tmp_path / "haproxy.cfg").write_text(cfg)
    check = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


# --------------------------------------------------------------------------- a prod lab


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """What `make lab` / `make lab-down` run."""
    return subprocess.run([sys.executable, "-m", "lab", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_prod_lab_starts_serves_fails_closed_and_stops_without_a_trace():
    directory = lab_dir()
    try:
        up = _cli("up", "prod", "--dir", str(directory), "--net", "127.0.2")
        assert up.returncode == 0, up.stdout + up.stderr
        url = up.stdout.strip().splitlines()[-1]
        assert url == "http://127.0.2.10:8080"
        host, port = url.removeprefix("http://").split(":")

        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("POST", "/api/notes", body=b'{"text": "hello lab"}',
                     headers={"Content-Type": "application/json"})
        created = conn.getresponse()
        assert created.status == 201, created.read()
        created.read()
        conn.request("GET", "/api/notes")
        listed = conn.getresponse()
        assert listed.status == 200 and b"hello lab" in listed.read()
        conn.close()

        # The lab runs detached from the command that started it, under HAProxy (managed).
        lab = Lab(stack_file("prod"), state_dir=directory, net="127.0.2")
        pids = lab.pids()
        pg_dir = (directory / "pg").resolve()
        assert pg_dir != directory / "pg" and (pg_dir / "primary").is_dir()
        haproxy = int((directory / "lb" / "haproxy.pid").read_text().split()[0])
        assert haproxy in pids and len(lab.droplets) == 3
        # PostgreSQL's children (backends, checkpointer, WAL sender...) lead process groups
        # of their own; they are the lab's all the same (make bench pins them by this list).
        postmaster = int((pg_dir / "primary" / "postmaster.pid").read_text().split()[0])
        children = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                    if _parent(p) == postmaster]
        assert children and set(children) <= pids, (children, pids)
        assert all(group_members(d.gunicorn_pid) for d in lab.droplets)
        # gunicorn runs without the migrator's URI (the unit's UnsetEnvironment=), its
        # database URLs verifying the server.
        environ = Path(f"/proc/{lab.droplets[0].gunicorn_pid}/environ").read_bytes().split(b"\0")
        names = {item.split(b"=", 1)[0] for item in environ}
        assert b"DATABASE_URL" in names and b"DATABASE_MIGRATION_URL" not in names
        assert b"sslmode=verify-full" in next(i for i in environ if i.startswith(b"DATABASE_URL="))

        # Every droplet dead: the emulated LB fails closed with a 503, as DigitalOcean's does.
        for droplet in lab.droplets:
            lab.kill_droplet(droplet)
        detection = lab.settings.frontend.health_check.detection_seconds
        wait_until(lambda: http_status(lab.frontend, "/") == 503, detection + 5, "503")

        down = _cli("down", "--dir", str(directory))
        assert down.returncode == 0, down.stdout + down.stderr
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()
                    and group_members(pid)], "lab processes survived lab-down"
        for place in (directory, pg_dir):
            left = subprocess.run(["pgrep", "-f", str(place)], capture_output=True, text=True)
            assert left.returncode == 1, f"still running: {left.stdout}"
        assert not pg_dir.exists() and (directory / "pg-logs" / "primary.log").exists()
    finally:
        stop_lab(directory)
        shutil.rmtree(directory.parents[1], ignore_errors=True)


# --------------------------------------------------------------------------- the scenarios fail


@pytest.fixture
def nginx_lab() -> Iterator[Lab]:
    """A staging-shaped lab with the nginx frontend (2 droplets, no replica)."""
    directory = lab_dir()
    config = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())
    config["config"]["webstack:frontend"]["mode"] = "nginx"
    variant = directory.with_name("stack") / "Pulumi.labnginx.yaml"
    variant.parent.mkdir(parents=True)
    variant.write_text(yaml.safe_dump(config))
    lab = Lab(variant, state_dir=directory, net="127.0.3")
    try:
        lab.start()
        yield lab
    finally:
        stop_lab(directory)
        shutil.rmtree(directory.parents[1], ignore_errors=True)


def test_kill_scenario_passes_with_lb_retries_and_fails_without(nginx_lab):
    assert NEXT_UPSTREAM in (nginx_lab.lb_dir / "lb.conf").read_text()
    [good] = run_scenarios(nginx_lab, [1])
    assert good.passed, good.note
    assert good.outcomes["ok"] == good.requests > 100

    # The deliberately broken setting: the LB no longer tries another droplet.
    lb_conf = nginx_lab.lb_dir / "lb.conf"
    lb_conf.write_text(lb_conf.read_text().replace(NEXT_UPSTREAM, "proxy_next_upstream off;"))
    nginx_lab.reload_lb()
    assert "proxy_next_upstream off;" in (nginx_lab.lb_dir / "lb.conf").read_text()
    [broken] = run_scenarios(nginx_lab, [1])
    assert broken.passed is False
    assert broken.requests - broken.outcomes["ok"] > 0 and "failed requests" in broken.note


def test_scale_out_in_scenario_adds_a_droplet_that_serves_and_removes_one_drained(nginx_lab):
    before = [d.name for d in nginx_lab.droplets]
    number = [name for name, *_ in SCENARIOS].index("scale-out-in") + 1
    [result] = run_scenarios(nginx_lab, [number])
    assert result.passed, result.note
    assert result.outcomes["ok"] == result.requests > 500
    details = result.details
    assert details["droplet_removed"] == before[0] and details["droplet_added"] == "droplet-3"
    assert details["new_droplet_served"] >= details["fair_share"] / 2 > 0
    assert [d.name for d in nginx_lab.droplets] == [*before[1:], "droplet-3"]
    assert nginx_lab.upstreams == [d.site for d in nginx_lab.droplets]
    removed = Droplet(1, "", nginx_lab.state_dir / before[0])  # its pid files are what counts
    assert not nginx_lab.droplet_alive(removed), "stopped after the drain"


def _parent(proc: Path) -> int | None:
    """The parent pid of /proc/<pid>, None once it is gone."""
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_a_server_between_exec_and_its_arguments_is_still_the_lab_s(tmp_path):
    """The kernel sets a new program's arguments a moment after exec begins, and `Popen`
    returns at that beginning, so /proc/PID/cmdline of a server just started can be empty.
    `lab_pid` must not call such a server gone or foreign (the `prometheus exited:` flake of
    f36235f's CI run). A server that execs itself in a loop is in that moment often: the
    old `lab_pid` missed it in 69 and 87 of 1,000 looks."""
    (tmp_path / "loop.sh").write_text('exec sh "$0" "$1"\n')
    pidfile = tmp_path / "server.pid"
    server = subprocess.Popen(["sh", str(tmp_path / "loop.sh"), str(tmp_path)],
                              stdin=subprocess.DEVNULL)
    try:
        pidfile.write_text(f"{server.pid}\n")
        looks = [lab_pid(pidfile, tmp_path) for _ in range(1000)]
        assert looks.count(server.pid) == 1000, f"missed {1000 - looks.count(server.pid)}"
        assert lab_pid(pidfile, tmp_path / "another-lab") is None, "not this lab's"
    finally:
        server.kill()
        server.wait()
    assert lab_pid(pidfile, tmp_path) is None, "gone"


def test_the_monitor_judges_what_it_started_by_the_process_not_its_command_line(
        tmp_path, monkeypatch):
    """Liveness of the monitor's own servers comes from their process handles: an empty
    command line cannot fail its start, and a server that exits is reported with its status."""
    lab_stub = type("LabStub", (), {"state_dir": tmp_path, "net": "127.0.9"})()
    monitor = Monitor(lab_stub)
    monitor.dir.mkdir()
    monkeypatch.setattr("lab.monitor.lab_pid", lambda pidfile, state_dir: None)
    monitor._spawn("steady", ["sleep", "5"])
    try:
        assert monitor._ready() is False  # alive, and nothing listens at its address
        with pytest.raises(RuntimeError, match=r"failing exited with status 3:\n.*cannot start"):
            monitor._spawn("failing", ["sh", "-c", "echo cannot start; exit 3"])
            monitor._started["failing"].wait(5)
            monitor._ready()
    finally:
        for proc in monitor._started.values():
            proc.kill()
            proc.wait()
