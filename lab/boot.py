"""`make boot STACK=<name|file>`: boots every droplet of a stack from the user data the program
registers, under systemd and cloud-init, and checks what a first boot must achieve.

    python -m lab.boot staging              # every droplet; boot-report.json and a table
    python -m lab.boot staging --break      # user data broken on purpose: the report must fail
    python -m lab.boot staging --droplets 1 # only the first app droplet (and no LB)

How (README, "Booting the droplets"):

- The image: `scripts/boot-image.sh`, a Debian 12 root file system built once by debootstrap
  and cached outside the repository (`/var/cache/webstack-boot`, or $WEBSTACK_BOOT_CACHE).
- The program runs under the mocks (`tools.mocks.run_program`); each droplet's `userData` is
  written byte for byte as the NoCloud seed (`/var/lib/cloud/seed/nocloud/user-data`, the
  droplet id as `instance-id`) into an overlay of the image, booted by `systemd-nspawn -b`.
- The VPC: a bridge (`BRIDGE`) holding the VPC range's first address; each container is in a
  network namespace of its own with the droplet's private address (systemd-networkd, static).
  Nothing routes past the bridge: the droplets reach the host's proxy (`lab/boot_net.py`, only
  Debian's mirrors and PyPI) and the database endpoints, which stand on the bridge at
  addresses the droplets' /etc/hosts give the user data's database host names.
- The database: the lab's PostgreSQL (`lab/pgcluster.py`) with the stack's replicas and
  pgbouncer, behind TLS forwarders (`sslmode=require`), the app role's passwords set to the
  ones the app's environment file carries (in the user data, or in the gates' stdin with a
  deploy key).
- Deploy steps the program registers (`command:remote:Command`: health gates, the nginx LB's
  upstream) run inside the droplet they target, as root, with their own script and stdin; a
  gate that delivers the environment file runs as soon as cloud-init is done.

Everything it starts is recorded in `.lab/boot/state.json`; a run first stops what a crashed
run left, and always tears down: no container, bridge, veth, mount or process is left.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from components.app_tier import health_gate_script
from components.metadata_firewall import AGENT_USER, METADATA_IP
from components.runtime import APP_UNIT, DropletLayout
from components.settings import settings_for_stack_file
from lab import pgcluster
from lab.boot_net import Servers
from lab.process import running
from lab.stack import LABS_DIR, ROOT, stack_file
from tools.mocks import run_program

BRIDGE = "wsboot0"
BOOT_LOCK = "/tmp/webstack-boot.lock"
BRIDGE_MAC = "02:77:73:62:6f:01"
"""Locally administered (02:...), fixed."""
STATE_DIR = LABS_DIR / "boot"
REPORT = ROOT / "boot-report.json"
PROXY_PORT = 3128
BOOT_TIMEOUT = 600
"""Seconds a droplet gets from its boot to cloud-init done and a healthy answer."""
STEP_TIMEOUT = 120
SECURITY_LIMIT = 2.5
"""Highest `systemd-analyze security` exposure accepted for the app's units."""
RESTART_SLACK = 3.0
"""Seconds beyond a unit's RestartSec for systemd to have started gunicorn again."""
NSPAWN_REBOOT = 133
"""systemd-nspawn's exit status when the container asked for a reboot."""
BROKEN_PACKAGE = "webstack-no-such-package"
BROKEN_EXEC = "/opt/webstack/venv/bin/no-such-gunicorn"
HOST_CAS = Path("/usr/local/share/ca-certificates")
HEALTHY_AFTER_CLOUD_INIT = 90
"""Seconds the app gets after cloud-init is done to answer /healthz (the migrate unit retries
every 15 s)."""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Droplet:
    name: str
    role: str  # "app" or "lb"
    droplet_id: str
    private_ip: str
    public_ip: str
    user_data: str
    env: str
    """The app's environment file: from the user data, or the gate's stdin (a deploy key)."""
    machine: str
    dir: Path
    started: float = 0.0
    proc: subprocess.Popen | None = None
    leader: int | None = None
    checks: list[dict] = field(default_factory=list)
    healthy_seconds: float | None = None
    steps_run: bool = False

    @property
    def root(self) -> Path:
        return self.dir / "root"


def sh(*cmd: str, timeout: float = STEP_TIMEOUT, check: bool = True,
       stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


# --------------------------------------------------------------------------- the stack


def break_user_data(text: str) -> str:
    """The user data with a package that does not exist and the app unit's ExecStart pointing
    at a missing program (a drop-in beside the unit, as an operator's override would be; the
    rendered unit itself is left as it is): what the boot must catch."""
    document = yaml.safe_load(text)
    document["packages"].append(BROKEN_PACKAGE)
    document["write_files"].append({
        "path": f"{DropletLayout().unit(APP_UNIT)}.d/broken.conf",
        "permissions": "0644",
        "content": f"[Service]\nExecStart=\nExecStart={BROKEN_EXEC} --bind 127.0.0.1:8000\n",
    })
    return "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1000)


def registered(stack: str) -> tuple[object, str, list[dict]]:
    """The program's run under the mocks, the VPC range and its droplets (app first)."""
    path = stack_file(stack)
    run = run_program(path)
    vpc = run.one("index/vpc:Vpc").outputs["ipRange"]
    droplets = []
    stdin = {r.inputs["connection"]["host"]: r.inputs.get("stdin", "")
             for r in run.of_type("command:remote:Command") if "-gate-" in r.name}
    for resource in run.of_type("index/droplet:Droplet"):
        out = resource.outputs
        user_data = resource.inputs["userData"]
        role = "app" if "webstack-app.service" in user_data else "lb"
        droplet_id = out["dropletUrn"].rsplit(":", 1)[1]
        droplets.append({"name": resource.name, "role": role, "id": droplet_id,
                         "private_ip": out["ipv4AddressPrivate"], "public_ip": out["ipv4Address"],
                         "image": resource.inputs["image"], "user_data": user_data,
                         "env": (env_in_user_data(user_data) or stdin.get(out["ipv4Address"], ""))
                         if role == "app" else ""})
    droplets.sort(key=lambda d: (d["role"] != "app", d["name"]))
    return run, vpc, droplets


def env_in_user_data(user_data: str) -> str | None:
    """The app's environment file as the user data writes it, or None (delivered over SSH)."""
    document = yaml.safe_load(user_data)
    return next((f["content"] for f in document["write_files"]
                 if f["path"] == DropletLayout().env_file), None)


def database_endpoints(env: str) -> dict[str, tuple[str, int, str, str, str]]:
    """The database URLs of an app droplet's env file:
    name -> (host, port, user, password, database)."""
    found = {}
    for key in ("DATABASE_URL", "DATABASE_MIGRATION_URL", "DATABASE_REPLICA_URLS"):
        match = re.search(rf'^{key}="([^"]*)"', env, re.M)
        for i, url in enumerate(u for u in (match.group(1) if match else "").split(",") if u):
            parts = urllib.parse.urlsplit(url)
            found[f"{key}{i or ''}"] = (parts.hostname, parts.port, parts.username,
                                        urllib.parse.unquote(parts.password or ""),
                                        parts.path.lstrip("/"))
    return found


# --------------------------------------------------------------------------- the boot


class Boot:
    def __init__(self, stack: str, *, broken: bool = False, limit: int | None = None,
                 state_dir: Path = STATE_DIR) -> None:
        self.stack = stack
        self.broken = broken
        self.state_dir = state_dir
        self.run, self.vpc_range, found = registered(stack)
        settings = settings_for_stack_file(stack_file(stack))
        self.fqdn, self.pool_size = settings.fqdn, settings.database.pool.size
        self.health_check = settings.frontend.health_check
        if limit is not None:
            found = [d for d in found if d["role"] == "app"][:limit]
        self.vpc = ipaddress.ip_network(self.vpc_range)
        self.host_ip = str(self.vpc.network_address + 1)
        self.images = {d["name"]: d["image"] for d in found}
        self.droplets = [
            Droplet(name=d["name"], role=d["role"], droplet_id=d["id"],
                    private_ip=d["private_ip"], public_ip=d["public_ip"],
                    user_data=break_user_data(d["user_data"]) if broken and d["role"] == "app"
                    else d["user_data"], env=d["env"],
                    machine=f"ws{d['role']}{i}", dir=state_dir / d["name"])
            for i, d in enumerate(found)]
        self.servers: Servers | None = None
        self.cluster = None
        self.db_dir: Path | None = None

    # -- state, for the next run to clean up after a crash --------------------------------

    def _save_state(self) -> None:
        state = {
            "pids": [p for d in self.droplets for p in (d.proc and d.proc.pid, d.leader) if p],
            "mounts": [str(d.root) for d in self.droplets],
            "db_dir": str(self.db_dir) if self.db_dir else None,
        }
        (self.state_dir / "state.json").write_text(json.dumps(state))

    @staticmethod
    def clean(state_dir: Path = STATE_DIR) -> None:
        """Stops whatever a previous run recorded and left, and removes the bridge."""
        path = state_dir / "state.json"
        state = json.loads(path.read_text()) if path.exists() else {}
        for pid in state.get("pids", []):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        for mount in state.get("mounts", []):
            for _ in range(3):
                if sh("mountpoint", "-q", mount, check=False).returncode != 0:
                    break
                sh("umount", "-l", mount, check=False)
        if state.get("db_dir") and Path(state["db_dir"]).exists():
            pgcluster.PgCluster(state["db_dir"], stop_at_exit=False).stop_all()
            shutil.rmtree(state["db_dir"], ignore_errors=True)
        if sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            sh("ip", "link", "del", BRIDGE)
        shutil.rmtree(state_dir, ignore_errors=True)

    # -- the host side --------------------------------------------------------------------

    def _network(self) -> dict[str, str]:
        """The bridge with the host's and the database endpoints' addresses; returns the
        database host names -> their address."""
        prefix = self.vpc.prefixlen
        # A fixed MAC: a bridge otherwise takes its ports' lowest, so the host's address
        # changes MAC whenever a droplet joins, and droplets already up lose the host (proxy,
        # database) until their ARP entry expires.
        sh("ip", "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_ip}/{prefix}", "dev", BRIDGE)
        hosts: dict[str, str] = {}
        taken = {d.private_ip for d in self.droplets} | {self.host_ip}
        candidates = (str(a) for a in reversed(list(self.vpc.hosts())) if str(a) not in taken)
        for droplet in self.droplets:
            if droplet.role != "app":
                continue
            for host, *_ in database_endpoints(droplet.env).values():
                if host not in hosts:
                    hosts[host] = next(candidates)
                    sh("ip", "addr", "add", f"{hosts[host]}/32", "dev", BRIDGE)
        sh("ip", "addr", "add", f"{METADATA_IP}/32", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        return hosts

    def _database(self, hosts: dict[str, str]) -> None:
        """The lab's PostgreSQL behind TLS forwarders at the user data's endpoints."""
        app = next((d for d in self.droplets if d.role == "app"), None)
        if app is None:
            return
        endpoints = database_endpoints(app.env)
        replicas = sorted(k for k in endpoints if k.startswith("DATABASE_REPLICA_URLS"))
        user, database = endpoints["DATABASE_MIGRATION_URL"][2], endpoints["DATABASE_URL"][4]
        # PostgreSQL runs as `postgres`: its directory must be one that user can traverse,
        # which a clone in a private directory (mktemp -d) is not.
        self.db_dir = Path(tempfile.mkdtemp(prefix="webstack-boot-db-"))
        self._save_state()
        self.cluster = pgcluster.PgCluster(self.db_dir, replicas=len(replicas), database=database,
                                           user=user, stop_at_exit=False,
                                           pool_size=self.pool_size)
        self.cluster.start()
        # The user data's passwords: the role's (direct connections) and the pool's.
        role_password = endpoints["DATABASE_MIGRATION_URL"][3]
        pool_password = endpoints["DATABASE_URL"][3]
        self.cluster.set_passwords(role_password, pool_password)
        ports = self.cluster.ports
        cert = self._certificate()
        targets = {"DATABASE_URL": ports["pool"], "DATABASE_MIGRATION_URL": ports["primary"]}
        for i, key in enumerate(replicas):
            targets[key] = ports["replicas"][i]
        for key, (host, port, *_) in endpoints.items():
            self.servers.postgres_tls(hosts[host], port, ("127.0.0.1", targets[key]), cert)

    def _certificate(self) -> tuple[str, str]:
        cert, key = self.state_dir / "db.crt", self.state_dir / "db.key"
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
           "-subj", "/CN=webstack-boot-db", "-keyout", str(key), "-out", str(cert))
        return str(cert), str(key)

    # -- a droplet --------------------------------------------------------------------------

    def _prepare(self, droplet: Droplet, image: Path, hosts: dict[str, str]) -> None:
        for sub in ("upper", "work", "root"):
            (droplet.dir / sub).mkdir(parents=True)
        sh("mount", "-t", "overlay", "overlay", "-o",
           f"lowerdir={image},upperdir={droplet.dir / 'upper'},workdir={droplet.dir / 'work'}",
           str(droplet.root))
        root = droplet.root
        seed = root / "var/lib/cloud/seed/nocloud"
        seed.mkdir(parents=True)
        (seed / "user-data").write_text(droplet.user_data)
        (seed / "meta-data").write_text(
            f"instance-id: {droplet.droplet_id}\nlocal-hostname: {droplet.name}\n")
        (root / "etc/systemd/network/10-vpc.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={droplet.private_ip}/"
            f"{self.vpc.prefixlen}\nLinkLocalAddressing=no\n")
        with (root / "etc/hosts").open("a") as f:
            f.writelines(f"{ip} {host}\n" for host, ip in hosts.items())
        proxy = f"http://{self.host_ip}:{PROXY_PORT}"
        (root / "etc/apt/apt.conf.d/90webstack-boot-proxy").write_text(
            f'Acquire::http::Proxy "{proxy}";\nAcquire::https::Proxy "{proxy}";\n')
        # pip uses its own CA bundle unless told: the system's, where the host's are added.
        (root / "etc/pip.conf").write_text(
            f"[global]\nproxy = {proxy}\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        # A network that inspects TLS (as this machine's egress does, like many corporate
        # networks) signs with its own CA: the droplet trusts what the host trusts locally.
        local_cas = sorted(HOST_CAS.glob("*.crt"))
        if local_cas:
            for ca in local_cas:
                shutil.copy(ca, root / "usr/local/share/ca-certificates" / ca.name)
            sh("chroot", str(root), "update-ca-certificates")

    def _launch(self, droplet: Droplet) -> None:
        log = (droplet.dir / "nspawn.log").open("a")
        droplet.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--boot", "--directory", str(droplet.root),
             "--machine", droplet.machine, "--register=no", "--keep-unit",
             "--network-bridge", BRIDGE,
             "--resolv-conf=off", "--timezone=off", "--link-journal=no", "--console=read-only"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        droplet.leader = None
        deadline = time.monotonic() + 30
        while droplet.leader is None:
            droplet.leader = _container_init(droplet.proc.pid)
            if droplet.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{droplet.name}: systemd-nspawn did not start "
                                   f"(see {droplet.dir / 'nspawn.log'})")
            time.sleep(0.05)
        self._save_state()

    def inside(self, droplet: Droplet, script: str, *, user: str | None = None,
               timeout: float = STEP_TIMEOUT, stdin: str | None = None,
               ) -> subprocess.CompletedProcess:
        """`sh -c script` in the container's namespaces, as root or as `user`."""
        ids: list[str] = []
        if user:
            uid = self.inside(droplet, f"id -u {user}").stdout.strip()
            gid = self.inside(droplet, f"id -g {user}").stdout.strip()
            ids = ["-S", uid, "-G", gid]
        cmd = ["nsenter", "-t", str(droplet.leader), "-m", "-u", "-i", "-n", "-p", *ids,
               "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "sh", "-c", script]
        try:
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f} s")

    def check(self, droplet: Droplet, step: str, ok: bool | None, detail: str) -> bool:
        """Records a check; ok None is informational (never fails the report)."""
        droplet.checks.append({"step": step, "ok": ok, "detail": detail})
        mark = {True: "ok", False: "FAIL", None: "info"}[ok]
        print(f"  {droplet.name}: {step}: {mark} ({detail})", flush=True)
        return bool(ok)

    def _http(self, address: str, path: str, *, method: str = "GET", body: dict | None = None,
              host: str | None = None, tls: bool = False) -> tuple[int | None, str]:
        import http.client
        import ssl
        if tls:
            conn = http.client.HTTPSConnection(address, 443, timeout=5,
                                               context=ssl._create_unverified_context())
        else:
            conn = http.client.HTTPConnection(address, 80, timeout=5)
        headers = {"Connection": "close", **({"Host": host} if host else {})}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=headers)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as error:
            return None, str(error)
        finally:
            conn.close()

    def _wait_boot(self, droplet: Droplet) -> bool:
        """cloud-init done (status and errors), then /healthz 200 over the bridge."""
        waited = self.inside(droplet, f"timeout {BOOT_TIMEOUT} cloud-init status --wait "
                             ">/dev/null; cloud-init status --long", timeout=BOOT_TIMEOUT + 10)
        result = self.inside(droplet, "cat /run/cloud-init/result.json").stdout
        errors = json.loads(result)["v1"]["errors"] if result else ["no result.json"]
        status = re.search(r"^status: (\S+)", waited.stdout, re.M)
        status = status.group(1) if status else "unknown"
        ok = self.check(droplet, "cloud-init", status == "done" and not errors,
                        f"status {status}" + (f"; errors: {'; '.join(errors)}" if errors else ""))
        if ok and droplet.role == "app" and env_in_user_data(droplet.user_data) is None:
            self._commands(droplet)  # the gate delivers the environment file, then checks
        if not self._wait_http(droplet.private_ip, HEALTHY_AFTER_CLOUD_INIT if ok else 20):
            return self.check(droplet, "healthz", False, "no 200 from /healthz") and ok
        droplet.healthy_seconds = round(time.monotonic() - droplet.started, 1)
        self.check(droplet, "healthz", True,
                   f"200 through the droplet's nginx {droplet.healthy_seconds} s after boot")
        return ok

    # -- checks -----------------------------------------------------------------------------

    def _units(self, droplet: Droplet) -> None:
        document = yaml.safe_load(droplet.user_data)
        units = [Path(f["path"]).name for f in document.get("write_files", [])
                 if f["path"].startswith("/etc/systemd/system/")
                 and f["path"].endswith((".service", ".timer"))]
        # Units started by a deploy step that may not have run yet (certbot: DNS) are enabled.
        for unit in ["nginx.service", *units]:
            state = self.inside(droplet, f"systemctl is-active {unit}").stdout.strip()
            enabled = self.inside(droplet, f"systemctl is-enabled {unit}").stdout.strip()
            if unit == "webstack-certbot.service":
                result = self.inside(droplet, f"systemctl show -p Result --value {unit}")
                self.check(droplet, f"unit {unit}", None,
                           f"{state}, result {result.stdout.strip()}: needs DNS and Let's "
                           "Encrypt, which a boot here cannot reach; the self-signed "
                           "certificate serves meanwhile")
                continue
            detail = f"{state}, {enabled}"
            if state != "active":
                journal = self.inside(droplet, f"journalctl -u {unit} -n 2 -o cat --no-pager")
                detail += ": " + " / ".join(journal.stdout.strip().splitlines())
            self.check(droplet, f"unit {unit}", state == "active", detail)

    def _app_checks(self, droplet: Droplet) -> None:
        user = self.inside(droplet, "ps -o user= -p $(systemctl show -p MainPID --value "
                           "webstack-app.service)").stdout.strip()
        self.check(droplet, "app user", bool(user) and user != "root", f"gunicorn runs as {user!r}")
        stat = self.inside(droplet, "stat -c '%a %U:%G' /etc/webstack/app.env").stdout.strip()
        self.check(droplet, "env file", stat == "600 root:root", stat or "missing")
        for unit in ("webstack-app.service", "webstack-migrate.service"):
            out = self.inside(droplet, f"systemd-analyze security --no-pager {unit}").stdout
            match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
            level = float(match.group(1)) if match else None
            self.check(droplet, f"exposure {unit}", level is not None and level < SECURITY_LIMIT,
                       f"{level} (limit {SECURITY_LIMIT})")
            deny = self.inside(droplet, f"systemctl show -p IPAddressDeny --value {unit}")
            self.check(droplet, f"IPAddressDeny {unit}", METADATA_IP in deny.stdout,
                       deny.stdout.strip() or "none")

    def _notes(self, droplet: Droplet, address: str, **how) -> None:
        text = f"booted {droplet.name} {time.time():.0f}"
        status, body = self._http(address, "/api/notes", method="POST", body={"text": text}, **how)
        if status != 201:
            self.check(droplet, "notes", False, f"POST /api/notes: {status} {body[:200]}")
            return
        note = json.loads(body)
        status, body = self._http(address, f"/api/notes/{note['id']}", **how)
        ok = status == 200 and json.loads(body).get("text") == text
        self.check(droplet, "notes", ok, f"note {note['id']} created and read back: {status}")

    def _commands(self, droplet: Droplet) -> None:
        """The deploy steps the program registers for this droplet (health gate, the LB's
        upstream list), run as root inside it with their stdin. The database grant is left
        out: the lab's app role owns its database. A stack without a deploy key registers no
        gate: an app droplet then runs the gate's script as the rollout would. Run once."""
        if droplet.steps_run:
            return
        droplet.steps_run = True
        steps = [(r.name, r.inputs["create"], r.inputs.get("stdin"))
                 for r in self.run.of_type("command:remote:Command")
                 if r.inputs["connection"]["host"] == droplet.public_ip
                 and "grant" not in r.name]
        if droplet.role == "app" and not any("gate" in name for name, *_ in steps):
            steps.append(("health gate (script)", health_gate_script(self.health_check), None))
        for name, script, stdin in steps:
            done = self.inside(droplet, script, stdin=stdin, timeout=300)
            self.check(droplet, f"deploy step {name}", done.returncode == 0,
                       f"exit {done.returncode}: {(done.stdout + done.stderr).strip()[-200:]}")

    def _sigkill(self, droplet: Droplet) -> None:
        unit = "webstack-app.service"
        show = f"systemctl show -p MainPID -p ActiveState -p RestartUSec {unit}"
        before = dict(line.split("=", 1) for line in self.inside(droplet, show).stdout.split())
        delay = _seconds(before["RestartUSec"])
        self.inside(droplet, f"systemctl kill -s KILL --kill-whom=main {unit}")
        killed = time.monotonic()
        back = None
        while time.monotonic() - killed < delay + 30:
            now = dict(line.split("=", 1) for line in self.inside(droplet, show).stdout.split())
            if now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"]):
                back = time.monotonic() - killed
                break
            time.sleep(0.2)
        healthy = self._wait_http(droplet.private_ip, 30)
        self.check(droplet, "gunicorn SIGKILL", back is not None and back <= delay + RESTART_SLACK
                   and healthy, f"restarted after {back and round(back, 1)} s (RestartSec "
                   f"{delay:g} s), healthy again: {healthy}")

    def _wait_http(self, address: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._http(address, "/healthz")[0] != 200:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
        return True

    def _reboot(self, droplet: Droplet) -> None:
        """Reboots the container: healthy again, per-instance modules not run again."""
        sems = "ls -l --time-style=+%s /var/lib/cloud/instance/sem/"
        before = self.inside(droplet, sems).stdout
        self.inside(droplet, "systemctl reboot")
        try:
            code = droplet.proc.wait(STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        if code != NSPAWN_REBOOT:
            self.check(droplet, "reboot", False, f"systemd-nspawn exited {code}, not a reboot")
            return
        droplet.started = time.monotonic()
        self._launch(droplet)
        status = self.inside(droplet, "timeout 300 cloud-init status --wait >/dev/null; "
                             "cloud-init status", timeout=320).stdout.strip()
        healthy = self._wait_http(droplet.private_ip, 120)
        seconds = round(time.monotonic() - droplet.started, 1)
        after = self.inside(droplet, sems).stdout
        self.check(droplet, "reboot", healthy and before == after and "done" in status,
                   f"healthy again after {seconds} s: {healthy}; per-instance steps "
                   f"{'not re-run' if before == after else 're-run'}; cloud-init {status}")

    def _metadata(self, droplet: Droplet, when: str = "") -> None:
        """The metadata address from inside the droplet: a stand-in server on the bridge at
        169.254.169.254 (off the droplet, as DigitalOcean's is), routed from the droplet. The
        droplet's firewall (cloud-init's bootcmd) admits root and DigitalOcean's agent user,
        and refuses everyone else: the app's user, nginx's."""
        sh("nsenter", "-t", str(droplet.leader), "-n", "ip", "route", "replace",
           f"{METADATA_IP}/32", "dev", "host0")
        curl = (f"curl -s -o /dev/null -m 3 -w '%{{http_code}}' "
                f"http://{METADATA_IP}/metadata/v1/hostname")
        for user in (None, AGENT_USER):
            got = self.inside(droplet, curl, user=user).stdout.strip()
            self.check(droplet, f"metadata for {user or 'root'}{when}", got == "200",
                       f"{user or 'root'} gets {got}")
        for user in ([DropletLayout().user] if droplet.role == "app" else []) + ["www-data"]:
            got = self.inside(droplet, curl, user=user).stdout.strip()
            self.check(droplet, f"metadata for {user}{when}", got == "000",
                       "refused" if got == "000" else f"{user} gets {got}")
        rules = self.inside(droplet, "nft list table inet webstack_metadata")
        rule = next((line.strip() for line in rules.stdout.splitlines() if "skuid" in line),
                    rules.stderr.strip())
        self.check(droplet, f"metadata firewall{when}", "reject" in rule, rule)

    # -- the run ------------------------------------------------------------------------------

    def start(self) -> None:
        Boot.clean(self.state_dir)
        self.state_dir.mkdir(parents=True)
        self._save_state()
        image = Path(sh("bash", str(ROOT / "scripts/boot-image.sh"), timeout=1800)
                     .stdout.strip().splitlines()[-1])
        hosts = self._network()
        self.servers = Servers()
        self.servers.proxy(self.host_ip, PROXY_PORT)
        self.servers.metadata(METADATA_IP, 80)
        self._database(hosts)
        for droplet in self.droplets:
            self._prepare(droplet, image, hosts)
            droplet.started = time.monotonic()
            self._launch(droplet)
            print(f"booting {droplet.name} ({droplet.role}, {droplet.private_ip}) as "
                  f"{droplet.machine}", flush=True)

    def verify(self) -> None:
        apps = [d for d in self.droplets if d.role == "app"]
        for droplet in apps:
            if not self._wait_boot(droplet):
                self._units(droplet)
                continue
            self._units(droplet)
            self._app_checks(droplet)
            self._notes(droplet, droplet.private_ip)
            self._commands(droplet)
        for droplet in self.droplets:
            if droplet.role == "lb":
                self._lb(droplet)
        if apps and all(c["ok"] is not False for c in apps[0].checks):
            self._sigkill(apps[0])
            self._metadata(apps[0])
            self._reboot(apps[0])
            self._metadata(apps[0], " after reboot")  # bootcmd loads it on every boot

    def _lb(self, droplet: Droplet) -> None:
        self._wait_boot(droplet)
        self._units(droplet)
        self._commands(droplet)  # the upstream list: the app droplets' addresses
        # HTTPS with the self-signed certificate the user data makes until Let's Encrypt's.
        # nginx's reload is asynchronous: wait (bounded) for the new upstream to serve.
        deadline = time.monotonic() + 30
        while (self._http(droplet.private_ip, "/api/notes", tls=bool(self.fqdn),
                          host=self.fqdn)[0] != 200 and time.monotonic() < deadline):
            time.sleep(0.5)
        self._notes(droplet, droplet.private_ip, tls=bool(self.fqdn), host=self.fqdn)
        self._metadata(droplet)

    def stop(self) -> None:
        for droplet in self.droplets:
            if droplet.proc and droplet.proc.poll() is None:
                droplet.proc.send_signal(signal.SIGTERM)  # the container powers off
        for droplet in self.droplets:
            if droplet.proc:
                try:
                    droplet.proc.wait(30)
                except subprocess.TimeoutExpired:
                    droplet.proc.kill()
                    droplet.proc.wait(10)
            if droplet.leader and running(droplet.leader):
                os.kill(droplet.leader, signal.SIGKILL)
        if self.servers:
            self.servers.stop()
        if self.cluster:
            self.cluster.stop_all()
        Boot.clean(self.state_dir)

    def report(self) -> dict:
        machine = {"uname": " ".join(platform.uname()), "cpu": _cpu_model(),
                   "cpus": os.cpu_count()}
        return {
            "stack": self.stack, "broken": self.broken,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
            "booted_image": "debian-12 (scripts/boot-image.sh)",
            "droplets": [{"name": d.name, "role": d.role, "registered_image": self.images[d.name],
                          "private_ip": d.private_ip, "boot_to_healthy_s": d.healthy_seconds,
                          "checks": d.checks} for d in self.droplets],
            "passed": all(c["ok"] is not False for d in self.droplets for c in d.checks)
            and all(d.checks for d in self.droplets),
        }


def _container_init(nspawn_pid: int) -> int | None:
    """The container's PID 1, seen from the host: a descendant of systemd-nspawn whose pid in
    its own namespace is 1."""
    todo = [nspawn_pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M).group(1).split()
        if pid != nspawn_pid and nspid[-1] == "1" and len(nspid) > 1:
            return pid
        todo += [int(c) for c in children]
    return None


def _seconds(value: str) -> float:
    """systemd's time span (`5s`, `100ms`, `1min 30s`) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(us|ms|min|s|h)", value))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(report: dict) -> None:
    print(f"\nboot of {report['stack']}{' (broken on purpose)' if report['broken'] else ''}, "
          f"{report['date']}, {report['machine']['cpu']} x{report['machine']['cpus']}")
    for d in report["droplets"]:
        failed = [c["step"] for c in d["checks"] if c["ok"] is False]
        info = [c["step"] for c in d["checks"] if c["ok"] is None]
        print(f"  {d['name']:<18} {d['role']:<4} healthy after {d['boot_to_healthy_s']} s  "
              f"{len(d['checks']) - len(failed) - len(info)} ok, {len(info)} info, "
              f"{len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    print("PASS" if report["passed"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.boot", description=__doc__.split("\n")[0])
    parser.add_argument("stack", help="a stack name (Pulumi.<stack>.yaml) or a stack file")
    parser.add_argument("--break", dest="broken", action="store_true",
                        help="boot a deliberately broken user data (the report must fail)")
    parser.add_argument("--droplets", type=int, help="boot only the first N app droplets")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("make boot needs root (systemd-nspawn, a bridge, mounts)")
    # One boot at a time on a machine: the bridge and the machine names are global.
    lock = open(BOOT_LOCK, "w")  # noqa: SIM115 (held until the process exits)
    fcntl.flock(lock, fcntl.LOCK_EX)
    boot = Boot(args.stack, broken=args.broken, limit=args.droplets)
    try:
        boot.start()
        boot.verify()
    finally:
        boot.stop()
    report = boot.report()
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
