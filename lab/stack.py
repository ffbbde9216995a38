"""A stack's data plane on loopback, from the same rendered files as the droplets.

    lab = Lab(stack_file("prod"))     # Pulumi.prod.yaml: its own settings
    lab.start()                       # PostgreSQL, migrations, droplets, frontend
    lab.url                           # http://127.0.0.10:8080
    stop_lab(lab.state_dir)           # everything the lab started, found from its state dir

On loopback (`net` 127.0.0 by default):

    127.0.0.10:8080       the frontend: HAProxy emulating the DigitalOcean load balancer
                          (managed mode, `lab/haproxy.cfg.j2`) or nginx with the config of
                          `components/lb_nginx.py` (nginx mode)
    127.0.0.1i:8080       droplet i (i = 1, 2, ...): nginx with the droplet's site
    127.0.0.1i:8000       droplet i: gunicorn with `app/gunicorn.conf.py`, the droplet's
                          environment file and its systemd unit's Environment=
    127.0.0.1:<free>      PostgreSQL primary, streaming replicas (the stack's count) and
                          pgbouncer in front of the primary (`lab/pgcluster.py`)

PostgreSQL's files live in a directory of their own under the system's temp dir, linked from
`state_dir/pg`: run as root, the servers run as `postgres`, which must reach them wherever the
clone is (a home directory or a `mktemp -d` one is private). `stop_lab` keeps their logs in
`state_dir/pg-logs` and removes that directory.

With `db_proxies` (the chaos scenarios) the droplets reach the database through a
`lab.proxy.DelayProxy` per endpoint, living in the process that started the lab, and the
cluster has at least one standby (a node in recovery to point the write endpoint at).

The droplet's files are the list a droplet's user data writes (`components/runtime.py`'s
`droplet_files`, which `components/cloud_config.py` turns into cloud-init's write_files), with
the lab's `DropletLayout`. What differs from the droplets, and only that: addresses and ports
(8080 rather than 80, so no root is needed; loopback stands for the VPC), paths (under
`state_dir`, `.lab/` in the repo by default), plain HTTP at the frontend (the lab checks
availability; TLS is checked by `tests/test_lb_nginx.py`), and processes started here rather
than by systemd (the unit's ExecStart, ExecReload and Environment= are mirrored). When run as
root, nginx workers run as root too: everything listens on loopback only, and the lab's files
stay readable.

Each server runs detached in its own process group, so the lab outlives the command that
started it; `stop_lab` (make lab-down) stops them all from the pid files under `state_dir`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from components.frontend import HTTP_IDLE_TIMEOUT
from components.lb_nginx import render_lb_nginx_conf
from components.render import template_environment
from components.runtime import (
    GUNICORN_GRACEFUL_TIMEOUT,
    RUNTIME_DIRECTORY,
    UNIT_ENVIRONMENT,
    UNIT_UNSET_ENVIRONMENT,
    AppSecrets,
    DropletLayout,
    droplet_files,
)
from components.settings import Settings, find_stack_file, settings_for_stack_file
from lab import pgcluster
from lab.monitor import stop_monitor
from lab.process import (
    NGINX,
    START_TIMEOUT,
    descendants,
    group_members,
    http_status,
    lab_pid,
    log_tail,
    nginx_main_conf,
    raise_if_exited,
    read_pid,
    run_checked,
    running,
    signal_group,
    start_nginx,
    terminate,
    wait_gone,
    wait_until,
)
from lab.proxy import DelayProxy, plain

ROOT = Path(__file__).resolve().parent.parent
LABS_DIR = ROOT / ".lab"
"""Every lab's state lives in a directory below this one (gitignored)."""
STATE_FILE = "state.json"
FRONTEND_PORT = 8080
SITE_PORT = 8080
GUNICORN_PORT = 8000
NGINX_EXPORTER_PORT = 9113
"""Each droplet's prometheus-nginx-exporter, behind its nginx's /nginx-metrics."""
FRONTEND_HOST = 10
FIRST_DROPLET_HOST = 11
GUNICORN = Path(sys.executable).parent / "gunicorn"
GUNICORN_CONF = ROOT / "app" / "gunicorn.conf.py"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LAB_VPC = "127.0.0.0/8"
"""The lab's "VPC": where the frontend connects to the droplets from."""


def stack_file(stack: str) -> Path:
    """`Pulumi.<stack>.yaml` in the repo, or a path to a stack file; exits naming the known
    stacks when there is none (the lab's commands take it from the command line)."""
    try:
        return find_stack_file(stack)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None


# --------------------------------------------------------------------------- rendering

_templates = template_environment(Path(__file__).parent)


def render_haproxy_cfg(settings: Settings, *, listen: str, servers: Iterable[tuple[str, str]],
                       socket_path: str, pidfile: str) -> str:
    """HAProxy standing in for the DigitalOcean LB, with the stack's health check."""
    hc = settings.frontend.health_check
    return _templates.get_template("haproxy.cfg.j2").render(
        listen=listen, servers=list(servers), socket=socket_path, pidfile=pidfile,
        path=hc.path, interval=hc.interval_seconds, check_timeout=hc.timeout_seconds,
        fall=hc.unhealthy_threshold, rise=hc.healthy_threshold, idle_timeout=HTTP_IDLE_TIMEOUT,
        server_options=haproxy_server_options(settings),
    )


def haproxy_server_options(settings: Settings) -> str:
    """Every droplet's health check in HAProxy: the config's `default-server`, and the options
    of a droplet added at run time (a dynamic server does not inherit `default-server`)."""
    hc = settings.frontend.health_check
    return (f"check inter {hc.interval_seconds}s fall {hc.unhealthy_threshold}"
            f" rise {hc.healthy_threshold}")


def unit_environment(run: Path) -> dict[str, str]:
    """What systemd adds to the EnvironmentFile when it starts the app unit: its Environment=
    variables (`UNIT_ENVIRONMENT`), with `run` standing in for /run (%t), where its
    RuntimeDirectory= is made afresh, empty, as systemd does at every start."""
    shutil.rmtree(run / RUNTIME_DIRECTORY, ignore_errors=True)
    (run / RUNTIME_DIRECTORY).mkdir(parents=True, mode=0o700)
    return {name: value.replace("%t", str(run), 1) for name, value in UNIT_ENVIRONMENT.items()}


# --------------------------------------------------------------------------- the lab


@dataclass(frozen=True)
class Droplet:
    """One app "droplet": its own loopback address, nginx site and gunicorn."""

    index: int
    address: str
    dir: Path
    site_port: int = SITE_PORT
    gunicorn_port: int = GUNICORN_PORT
    static_dir: str = ""
    """Served at /static/; empty: the layout's default (under `dir`)."""

    @property
    def name(self) -> str:
        return f"droplet-{self.index}"

    @property
    def site(self) -> str:
        """Where the frontend sends traffic (the droplet's port 80 on DigitalOcean)."""
        return f"{self.address}:{self.site_port}"

    @property
    def bind(self) -> str:
        return f"{self.address}:{self.gunicorn_port}"

    @property
    def layout(self) -> DropletLayout:
        """The droplet's layout with the lab's addresses and every path under `dir`."""
        return DropletLayout(root=str(self.dir), env_file=str(self.dir / "app.env"),
                             db_ca_file=str(self.dir / "db-ca.pem"),
                             gunicorn_bind=self.bind, nginx_listen=self.site,
                             nginx_site=str(self.dir / "site.conf"), units_dir=str(self.dir),
                             static_dir=self.static_dir, cache_dir=str(self.dir / "cache"),
                             nginx_exporter=f"{self.address}:{NGINX_EXPORTER_PORT}",
                             exporter_defaults=str(self.dir / "nginx-exporter.args"))

    @property
    def gunicorn_pid(self) -> int | None:
        return read_pid(self.dir / "gunicorn.pid")

    @property
    def nginx_pid(self) -> int | None:
        return read_pid(self.dir / "nginx.pid")


class Lab:
    """A stack's droplets, database and frontend on loopback, state under `state_dir`."""

    def __init__(self, stack_path: Path, *, state_dir: Path = LABS_DIR / "lab",
                 net: str = "127.0.0", db_proxies: bool = False):
        self.stack_path = Path(stack_path).resolve()
        self.settings = settings_for_stack_file(self.stack_path)
        self.state_dir = Path(state_dir).resolve()
        self.net = net
        self.frontend = f"{net}.{FRONTEND_HOST}:{FRONTEND_PORT}"
        self.droplets = [
            Droplet(i, f"{net}.{FIRST_DROPLET_HOST + i - 1}", self.state_dir / f"droplet-{i}")
            for i in range(1, self.settings.app.running_droplets + 1)
        ]
        self.lb_dir = self.state_dir / "lb"
        replicas = len(self.settings.database.replicas)
        self.standbys = max(replicas, 1) if db_proxies else replicas
        """Streaming replicas in the cluster: the stack's, or one unused by the app."""
        self.db_proxies = db_proxies
        self.proxies: dict[str, DelayProxy] = {}
        """With db_proxies: "pool", "replica-0"... as the droplets reach them."""
        self.pg = self._pg_cluster()
        self.upstreams = [d.site for d in self.droplets]
        """nginx mode: the droplets the LB currently sends to."""
        self.secrets: AppSecrets | None = None
        """The app's environment file's secrets (database URLs, secret key), once the database
        has started."""
        self.db_ca = ""
        """The database's CA certificate (PEM), written to every droplet."""

    def _pg_cluster(self):
        """The cluster in `state_dir/pg` (a link to its directory once the lab has started)."""
        return pgcluster.PgCluster(
            self.state_dir / "pg", replicas=self.standbys,
            database=self.settings.database.name, user=self.settings.database.name,
            pool_size=self.settings.database.pool.size, stop_at_exit=False,
        )

    @property
    def mode(self) -> str:
        return self.settings.frontend.mode

    @property
    def url(self) -> str:
        return f"http://{self.frontend}"

    # ------------------------------------------------------------------ start and stop

    def start(self) -> None:
        """Start everything, or stop what was started and raise."""
        if (self.state_dir / STATE_FILE).exists():
            raise RuntimeError(f"a lab is already running in {self.state_dir}: stop it first "
                               "(make lab-down)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for stale in (*self.state_dir.glob("droplet-*"), self.lb_dir, self.state_dir / "pg-logs"):
            shutil.rmtree(stale, ignore_errors=True)  # a fresh lab, whatever ran here before
        _remove_pg_dir(self.state_dir)
        (self.state_dir / "pg").symlink_to(tempfile.mkdtemp(prefix="webstack-lab-pg-"))
        self.pg = self._pg_cluster()
        self._save_state()
        try:
            urls = self.pg.start()
            urls = dataclasses.replace(
                urls, replicas=urls.replicas[:len(self.settings.database.replicas)])
            if self.db_proxies:
                urls = self._start_proxies(urls)
            self.secrets = AppSecrets(
                database_url=urls.pool, replica_urls=urls.replicas, migration_url=urls.primary,
                secret_key=secrets.token_urlsafe(32))
            # Written as on a droplet; the lab's URLs name the cluster's own copy.
            self.db_ca = self.pg.ca_file.read_text()
            for droplet in self.droplets:
                self.write_droplet(droplet)
            self._migrate(self.droplets[0])
            for droplet in self.droplets:
                self.start_gunicorn(droplet)
            for droplet in self.droplets:
                self.start_nginx(droplet)
            for droplet in self.droplets:
                self.wait_droplet_healthy(droplet)
            self._start_frontend()
            self.wait_frontend_ready()
        except BaseException:
            stop_lab(self.state_dir)
            raise

    def stop(self) -> None:
        stop_lab(self.state_dir)
        for proxy in self.proxies.values():
            proxy.stop()

    def _start_proxies(self, urls):
        """A DelayProxy in front of the pool and each replica the app uses; `urls` through them
        (migrations still go straight to the primary), without TLS so that a proxy can lose
        COMMIT replies (`plain`)."""
        def through(name: str, url: str) -> str:
            parsed = make_url(url)
            self.proxies[name] = DelayProxy((parsed.host, parsed.port)).start()
            return plain(url, self.proxies[name].port)

        return dataclasses.replace(
            urls, pool=through("pool", urls.pool),
            replicas=tuple(through(f"replica-{i}", url) for i, url in enumerate(urls.replicas)))

    def _save_state(self) -> None:
        state = {"stack": self.settings.stack, "stack_file": str(self.stack_path),
                 "mode": self.mode, "net": self.net, "url": self.url,
                 "droplets": [d.name for d in self.droplets]}
        (self.state_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def write_droplet(self, droplet: Droplet, *, settings: Settings | None = None,
                      upstream_keepalive: bool = True) -> None:
        """The droplet's files: the list cloud-init writes on a droplet (`droplet_files`), at
        the lab's addresses and paths (`Droplet.layout`), loopback as the VPC, no app bundle
        (the lab runs the repo's app/), and nginx's main config (Debian's, on a droplet)."""
        layout = droplet.layout
        for file in droplet_files(settings or self.settings, secrets=self.secrets,
                                  db_ca=self.db_ca,
                                  vpc_cidr=LAB_VPC, layout=layout,
                                  upstream_keepalive=upstream_keepalive):
            path = Path(file.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=file.mode)
            path.chmod(file.mode)
            path.write_text(file.content)
        Path(layout.cache_dir).mkdir(mode=0o700, exist_ok=True)  # the user data's `install -d`
        (droplet.dir / "nginx.conf").write_text(
            nginx_main_conf(droplet.dir, Path(layout.nginx_site)))

    def _migrate(self, droplet: Droplet) -> None:
        """`python -m app.migrate` once, with a droplet's environment, as cloud-init runs it."""
        result = subprocess.run(
            ["bash", "-c", 'set -a; . "$0"; set +a; exec "$@"', str(droplet.dir / "app.env"),
             sys.executable, "-m", "app.migrate"],
            cwd=ROOT, env=_base_env(), capture_output=True, text=True, timeout=120,
        )
        (self.state_dir / "migrate.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"migrations failed:\n{result.stdout}{result.stderr}")

    # ------------------------------------------------------------------ droplets

    def start_gunicorn(self, droplet: Droplet, args: Sequence[str] = ()) -> None:
        """ExecStart of the unit: gunicorn with the EnvironmentFile less the unit's
        UnsetEnvironment=, plus its Environment=, its RuntimeDirectory emptied first. `args`
        replace `--config app/gunicorn.conf.py` (the bench's original design runs gunicorn
        with its own command line)."""
        env = {**_base_env(), **unit_environment(droplet.dir / "run")}
        (droplet.dir / "gunicorn.pid").unlink(missing_ok=True)
        with (droplet.dir / "gunicorn.log").open("ab") as log:
            proc = subprocess.Popen(
                ["bash", "-c", f'set -a; . "$0"; set +a; unset {" ".join(UNIT_UNSET_ENVIRONMENT)}; '
                 'exec "$@"', str(droplet.dir / "app.env"),
                 str(GUNICORN), *(args or ("--config", str(GUNICORN_CONF))),
                 "--pid", str(droplet.dir / "gunicorn.pid"), "app.wsgi:app"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        name = f"{droplet.name}: gunicorn"
        wait_until(lambda: droplet.gunicorn_pid == proc.pid
                   or raise_if_exited(proc, name, droplet.dir / "gunicorn.log"),
                   START_TIMEOUT, f"{name}'s pid file")

    def start_nginx(self, droplet: Droplet) -> None:
        start_nginx(droplet.dir)

    def wait_droplet_healthy(self, droplet: Droplet, timeout: float = START_TIMEOUT) -> None:
        try:
            wait_until(lambda: http_status(droplet.site) == 200, timeout,
                       f"{droplet.name} /healthz")
        except TimeoutError:
            raise RuntimeError(f"{droplet.name} is not healthy:\n"
                               f"{log_tail(droplet.dir / 'gunicorn.log')}\n"
                               f"{log_tail(droplet.dir / 'error.log')}") from None

    def stop_droplet(self, droplet: Droplet) -> None:
        """A graceful stop: gunicorn drains its workers (TERM), nginx finishes its requests
        (QUIT), as `systemctl stop` does."""
        terminate(droplet.nginx_pid, signal.SIGQUIT, timeout=GUNICORN_GRACEFUL_TIMEOUT + 5)
        terminate(droplet.gunicorn_pid, signal.SIGTERM, timeout=GUNICORN_GRACEFUL_TIMEOUT + 5)

    def kill_droplet(self, droplet: Droplet) -> None:
        """kill -9 of gunicorn and nginx, workers included: the droplet dies mid-request."""
        pids = [pid for pid in (droplet.gunicorn_pid, droplet.nginx_pid) if pid]
        members = [m for pid in pids for m in group_members(pid)]
        for pid in pids:
            signal_group(pid, signal.SIGKILL)
        if not wait_gone(members, 10):
            raise RuntimeError(f"{droplet.name}: processes survived SIGKILL")
        for name in ("gunicorn.pid", "nginx.pid"):
            (droplet.dir / name).unlink(missing_ok=True)

    def restart_droplet(self, droplet: Droplet) -> None:
        """Start gunicorn and nginx again and wait until the droplet answers /healthz."""
        self.start_gunicorn(droplet)
        self.start_nginx(droplet)
        self.wait_droplet_healthy(droplet)

    def roll(self, droplet: Droplet, *, rewrite: bool = False) -> float:
        """One droplet's turn in a rolling change: out of the frontend (HAProxy drain until
        its sessions end / nginx upstream without it), stopped, with `rewrite` its files
        written again from `secrets` (the environment file of its replacement), started,
        healthy, back in the frontend. Returns the seconds it took."""
        started = time.monotonic()
        self.drain(droplet)
        self.stop_droplet(droplet)
        if rewrite:
            self.write_droplet(droplet)
        self.restart_droplet(droplet)
        if self.mode == "managed":
            self.set_server_state(droplet, "ready")
            self.wait_frontend_ready([droplet])
        else:
            self.set_upstreams([d.site for d in self.droplets])
        return time.monotonic() - started

    def droplet_alive(self, droplet: Droplet) -> bool:
        return running(droplet.gunicorn_pid) and running(droplet.nginx_pid)

    def reload_gunicorn(self, droplet: Droplet) -> None:
        """ExecReload of the unit: HUP to gunicorn's master (new workers, old ones drained)."""
        os.kill(droplet.gunicorn_pid, signal.SIGHUP)

    def gunicorn_workers(self, droplet: Droplet) -> set[int]:
        master = droplet.gunicorn_pid
        return {pid for pid in group_members(master) if pid != master} if master else set()

    def add_droplet(self) -> Droplet:
        """Scale out as a pool member joins: a new droplet with the same files (the template's
        user data), its migrations run as its cloud-init does, started and answering
        /healthz, then given to the frontend, which sends to it once its own health check
        passes (HAProxy: `rise` checks; nginx: in the upstreams). Returns it; see
        `wait_frontend_ready` for the moment it serves."""
        index = max(d.index for d in self.droplets) + 1
        droplet = Droplet(index, f"{self.net}.{FIRST_DROPLET_HOST + index - 1}",
                          self.state_dir / f"droplet-{index}")
        shutil.rmtree(droplet.dir, ignore_errors=True)
        self.write_droplet(droplet)
        self._migrate(droplet)
        self.restart_droplet(droplet)  # its first start: gunicorn, nginx, /healthz answered
        self.droplets.append(droplet)
        self._save_state()
        if self.mode == "managed":
            server = f"droplets/{droplet.name}"
            for command in (f"add server {server} {droplet.site} "
                            f"{haproxy_server_options(self.settings)}",
                            f"enable health {server}", f"enable server {server}"):
                answer = self.haproxy(command).strip()
                if answer and "New server registered" not in answer:
                    raise RuntimeError(f"haproxy: {command}: {answer}")
        else:
            self.set_upstreams([*self.upstreams, droplet.site])
        return droplet

    def drain(self, droplet: Droplet) -> None:
        """The frontend stops sending new requests to `droplet` and those it holds finish:
        HAProxy `drain` until it holds none; nginx: the upstreams without it, reloaded once the
        old workers finished their requests."""
        if self.mode == "managed":
            self.set_server_state(droplet, "drain")
            wait_until(lambda: int(self.backend_servers()[droplet.name]["scur"]) == 0,
                       GUNICORN_GRACEFUL_TIMEOUT, f"{droplet.name} drained")
        else:
            self.set_upstreams([site for site in self.upstreams if site != droplet.site])

    def remove_droplet(self, droplet: Droplet) -> None:
        """Scale in, drained first: the frontend stops sending new requests to `droplet`
        (HAProxy drain until it holds no request, then maintenance and removal; nginx: the
        upstreams without it, reloaded once the old workers finished), then a graceful stop."""
        self.drain(droplet)
        if self.mode == "managed":
            server = f"droplets/{droplet.name}"
            self.set_server_state(droplet, "maint")
            self.haproxy(f"shutdown sessions server {server}")
            answer = self.haproxy(f"del server {server}").strip()
            if "Server deleted" not in answer:
                raise RuntimeError(f"haproxy: del server {server}: {answer}")
        self.stop_droplet(droplet)
        self.droplets.remove(droplet)
        self._save_state()

    # ------------------------------------------------------------------ frontend

    def _start_frontend(self) -> None:
        self.lb_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "managed":
            cfg = self.lb_dir / "haproxy.cfg"
            cfg.write_text(render_haproxy_cfg(
                self.settings, listen=self.frontend,
                servers=[(d.name, d.site) for d in self.droplets],
                socket_path=str(self.lb_dir / "haproxy.sock"),
                pidfile=str(self.lb_dir / "haproxy.pid"),
            ))
            run_checked([HAPROXY, "-c", "-q", "-f", cfg])
            run_checked([HAPROXY, "-f", cfg])
        else:
            self._write_lb_conf()
            (self.lb_dir / "nginx.conf").write_text(
                nginx_main_conf(self.lb_dir, self.lb_dir / "lb.conf"))
            start_nginx(self.lb_dir)

    def _write_lb_conf(self) -> None:
        conf = render_lb_nginx_conf(
            self.settings, upstreams=self.upstreams, server_name="_",
            listen_http=self.frontend, listen_https=None, certificate=None, static_dir=None,
            rate_exempt=[LAB_VPC],
        )
        (self.lb_dir / "lb.conf").write_text(conf)

    def set_upstreams(self, upstreams: list[str]) -> None:
        """nginx mode: send to `upstreams` only (re-rendered, `nginx -t`, reload); returns once
        the old workers have finished their requests and exited."""
        self.upstreams = list(upstreams)
        self._write_lb_conf()
        self.reload_lb()

    def reload_lb(self) -> None:
        """nginx mode: `nginx -t` and reload the LB's configuration as it is on disk; returns
        once the old workers have finished their requests and exited."""
        conf = self.lb_dir / "nginx.conf"
        run_checked([NGINX, "-t", "-q", "-p", self.lb_dir, "-c", conf,
                     "-e", self.lb_dir / "error.log"])
        master = read_pid(self.lb_dir / "nginx.pid")
        old = {pid for pid in group_members(master) if pid != master}
        os.kill(master, signal.SIGHUP)
        if not wait_gone(old, GUNICORN_GRACEFUL_TIMEOUT + 15):
            raise TimeoutError("the LB's old nginx workers did not finish")

    def haproxy(self, command: str) -> str:
        """One command to HAProxy's runtime API; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.lb_dir / "haproxy.sock"))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def backend_servers(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of each droplet: status (UP, DOWN, DRAIN, "UP 1/2"...), scur..."""
        text = self.haproxy("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == "droplets" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def set_server_state(self, droplet: Droplet, state: str) -> None:
        """HAProxy: `ready`, `drain` or `maint` for one droplet."""
        answer = self.haproxy(f"set server droplets/{droplet.name} state {state}").strip()
        if answer:
            raise RuntimeError(f"haproxy: {answer}")

    def frontend_ready(self, droplet: Droplet) -> bool:
        """Does the frontend send new requests to `droplet`?"""
        if self.mode == "managed":
            return self.backend_servers()[droplet.name]["status"] == "UP"
        return droplet.site in self.upstreams

    def wait_frontend_ready(self, droplets: list[Droplet] | None = None,
                            timeout: float | None = None) -> float:
        """Wait until the frontend sends to every droplet (HAProxy: rise checks passed)."""
        hc = self.settings.frontend.health_check
        timeout = timeout or (hc.healthy_threshold + 2) * hc.interval_seconds + START_TIMEOUT
        droplets = self.droplets if droplets is None else droplets
        return wait_until(lambda: http_status(self.frontend) is not None
                          and all(self.frontend_ready(d) for d in droplets),
                          timeout, "the frontend's view of the droplets", interval=0.2)

    # ------------------------------------------------------------------ inspection

    def pids(self) -> set[int]:
        """Every live process of the lab: its servers and every process forked from them
        (PostgreSQL's children each lead a process group of their own, so a server's group
        would miss them)."""
        return set(descendants(*_pidfile_pids(self.state_dir)))


def _base_env() -> dict[str, str]:
    """What systemd gives a service before its EnvironmentFile: no developer's variables."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def _pidfile_pids(state_dir: Path) -> list[int]:
    """Servers recorded under `state_dir`: frontend, droplets, then the database (whose
    command lines name the directory `state_dir/pg` leads to)."""
    files = [*state_dir.glob("lb/*.pid"), *state_dir.glob("droplet-*/*.pid")]
    pids = [lab_pid(f, state_dir) for f in files]
    pg = (state_dir / "pg").resolve()
    pg_files = [*pg.glob("pgbouncer/pgbouncer.pid"), *pg.glob("*/postmaster.pid")]
    return [pid for pid in (*pids, *(lab_pid(f, pg) for f in pg_files)) if pid]


def _remove_pg_dir(state_dir: Path) -> None:
    """Keep the database's logs in `state_dir/pg-logs`; remove its directory and the link."""
    link = state_dir / "pg"
    if not link.is_symlink():
        shutil.rmtree(link, ignore_errors=True)  # a lab of an older version
        return
    target = link.resolve()
    if (target / "logs").is_dir():
        shutil.copytree(target / "logs", state_dir / "pg-logs", dirs_exist_ok=True)
        if (target / "pgbouncer" / "pgbouncer.log").exists():
            shutil.copy(target / "pgbouncer" / "pgbouncer.log", state_dir / "pg-logs")
    shutil.rmtree(target, ignore_errors=True)
    link.unlink()


def stop_lab(state_dir: Path) -> None:
    """Stop every process of the lab in `state_dir`: frontend, droplets, then the database
    (pgcluster's own stop), and kill whatever is left. Safe to call more than once."""
    state_dir = Path(state_dir).resolve()
    stop_monitor(state_dir)
    for pidfile in sorted(state_dir.glob("lb/*.pid")):
        terminate(lab_pid(pidfile, state_dir), signal.SIGTERM)
    for droplet_dir in sorted(state_dir.glob("droplet-*")):
        terminate(lab_pid(droplet_dir / "nginx.pid", state_dir), signal.SIGTERM)
        terminate(lab_pid(droplet_dir / "gunicorn.pid", state_dir), signal.SIGTERM,
                  timeout=GUNICORN_GRACEFUL_TIMEOUT + 5)
    if (state_dir / "pg" / "cluster.json").exists():
        try:
            pgcluster.PgCluster(state_dir / "pg", replicas=0, stop_at_exit=False).stop_all()
        except RuntimeError as exc:
            print(f"lab: pg_ctl stop failed, killing the servers: {exc}", file=sys.stderr)
    for pid in _pidfile_pids(state_dir):
        terminate(pid, signal.SIGKILL)
    _remove_pg_dir(state_dir)
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def lab_dirs() -> list[Path]:
    """State directories of labs that may be running (make lab's and make chaos's)."""
    return sorted(p.parent for p in LABS_DIR.glob(f"*/{STATE_FILE}"))
