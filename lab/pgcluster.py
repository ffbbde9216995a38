"""A throwaway PostgreSQL 15 cluster on loopback: primary, streaming replicas, pgbouncer.

Used by the tests and the local lab to run the app against the same topology it meets on
DigitalOcean: writes through a PgBouncer pool in transaction mode in front of the primary,
reads from asynchronous streaming replicas.

    cluster = PgCluster(base_dir, replicas=1)
    urls = cluster.start()    # ClusterUrls(primary=..., pool=..., replicas=(...,))
    cluster.stop_replica(0); cluster.start_replica(0)
    cluster.set_apply_delay(0, 3.0)
    cluster.stop_all()

Everything lives in ``base_dir``: data directories, logs, pgbouncer's files, the unix sockets
(so keep the path short: sockets are limited to 107 bytes) and ``cluster.json``, which records
ports and the generated password so that a later process (``stop``) can find the servers.
Servers listen on 127.0.0.1 only, on free ports picked at first start and kept afterwards.

PostgreSQL and pgbouncer refuse to run as root: when run as root, every server runs as the
``postgres`` system user (created by the Debian package) and ``base_dir`` is handed to it, so
its parent directories must be traversable by that user (``tempfile.mkdtemp()`` in /tmp is).

A cluster started in-process is stopped at interpreter exit unless ``stop_at_exit=False``
(the CLI's ``start``, whose servers must outlive it). Command line::

    python -m lab.pgcluster start DIR [--replicas N]   # prints the URLs as JSON
    python -m lab.pgcluster stop DIR
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import pwd
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg
from psycopg import sql

PG_BINDIR = Path(os.environ.get("PG_BINDIR", "/usr/lib/postgresql/15/bin"))
PGBOUNCER = os.environ.get("PGBOUNCER", "/usr/sbin/pgbouncer")
SUPERUSER = "postgres"
STATE_FILE = "cluster.json"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class ClusterUrls:
    """Connection URLs for the app's user, in the ``postgresql://`` form DigitalOcean gives."""

    primary: str
    """Direct connection to the primary (migrations, admin)."""
    pool: str
    """pgbouncer in transaction mode in front of the primary (the app's DATABASE_URL)."""
    replicas: tuple[str, ...]
    """Direct connections to each streaming replica (DATABASE_REPLICA_URLS)."""


def _free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    Ports are kept across restarts of a server. An ephemeral port could meanwhile be taken
    as the source port of an outgoing connection (even pgbouncer's own reconnection attempt
    to that very port), and the server could not listen again.
    """
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(ephemeral_low // 2, ephemeral_low), 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found on 127.0.0.1")


def _run_as() -> pwd.struct_passwd:
    """The account servers run as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() == 0:
        return pwd.getpwnam("postgres")
    return pwd.getpwuid(os.geteuid())


class PgCluster:
    """A primary, ``replicas`` streaming replicas and pgbouncer, all under ``base_dir``."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        replicas: int = 1,
        *,
        database: str = "webstack",
        user: str = "webstack",
        pool_size: int = 20,
        stop_at_exit: bool = True,
    ) -> None:
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.base_dir = Path(base_dir).resolve()
        self.replica_count = replicas
        self.database = database
        self.user = user
        self.pool_size = pool_size
        """pgbouncer's server connections (a DigitalOcean pool's `size`)."""
        self.stop_at_exit = stop_at_exit
        self._account = _run_as()
        self._state: dict | None = None

    # -- public API ------------------------------------------------------------------------

    def start(self) -> ClusterUrls:
        """Create the cluster on first use, then start every server and wait until ready."""
        if self.stop_at_exit:
            atexit.register(self.stop_all)
        if not (self.base_dir / STATE_FILE).exists():
            self._init()
        else:
            self._load_state()
            self.start_primary()
        for index in range(self.replica_count):
            if not self._data_dir(self._replica_name(index)).exists():
                self._make_replica(index)
            self.start_replica(index)
        self._start_pgbouncer()
        return self.urls

    def stop_all(self) -> None:
        """Stop pgbouncer, the replicas and the primary. Safe to call more than once."""
        atexit.unregister(self.stop_all)
        if not (self.base_dir / STATE_FILE).exists():
            return
        self._load_state()
        self._stop_pgbouncer()
        for index in range(len(self._state["ports"]["replicas"])):
            self.stop_replica(index)
        self.stop_primary()

    @property
    def urls(self) -> ClusterUrls:
        ports = self._ports
        return ClusterUrls(
            primary=self._url(ports["primary"]),
            pool=self._url(ports["pool"]),
            replicas=tuple(self._url(port) for port in ports["replicas"]),
        )

    def admin_dsn(self, node: str = "primary", dbname: str = "postgres") -> str:
        """libpq conninfo for the superuser over the node's unix socket (``replica-0``...)."""
        port = self._node_port(node)
        return f"host={self._socket_dir} port={port} user={SUPERUSER} dbname={dbname}"

    def start_primary(self) -> None:
        self._pg_ctl("primary", "start")

    def stop_primary(self, mode: str = "fast") -> None:
        """Stop the primary; ``mode`` is pg_ctl's: smart, fast or immediate (a crash)."""
        self._pg_ctl("primary", "stop", mode)

    def start_replica(self, index: int = 0) -> None:
        self._pg_ctl(self._replica_name(index), "start")

    def stop_replica(self, index: int = 0, mode: str = "fast") -> None:
        self._pg_ctl(self._replica_name(index), "stop", mode)

    def set_apply_delay(self, index: int, seconds: float) -> None:
        """Make replica ``index`` replay commits ``seconds`` late (recovery_min_apply_delay).

        The reload is asynchronous: this waits briefly so the startup process has the value.
        """
        with psycopg.connect(self.admin_dsn(self._replica_name(index)), autocommit=True) as conn:
            delay = f"{int(seconds * 1000)}ms"
            conn.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay}'")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)

    def wait_for_replay(self, index: int = 0, timeout: float = 10.0) -> None:
        """Wait until replica ``index`` has replayed everything the primary has written."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        replica = self.admin_dsn(self._replica_name(index))
        deadline = time.monotonic() + timeout
        with psycopg.connect(replica, autocommit=True) as conn:
            while True:
                done = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()[0]
                if done:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replica-{index} did not replay up to {target}")
                time.sleep(0.05)

    # -- layout and state ------------------------------------------------------------------

    @property
    def _socket_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def _ports(self) -> dict:
        if self._state is None:
            self._load_state()
        return self._state["ports"]

    @staticmethod
    def _replica_name(index: int) -> str:
        return f"replica-{index}"

    def _data_dir(self, node: str) -> Path:
        return self.base_dir / node

    def _node_port(self, node: str) -> int:
        if node == "primary":
            return self._ports["primary"]
        return self._ports["replicas"][int(node.removeprefix("replica-"))]

    def _url(self, port: int) -> str:
        password = self._state["password"]
        if port == self._ports["pool"]:
            password = self._state.get("pool_password", password)
        return f"postgresql://{self.user}:{password}@127.0.0.1:{port}/{self.database}"

    def _load_state(self) -> None:
        self._state = json.loads((self.base_dir / STATE_FILE).read_text())
        known = len(self._state["ports"]["replicas"])
        if known < self.replica_count:
            added = [_free_port() for _ in range(known, self.replica_count)]
            self._state["ports"]["replicas"] += added
            self._save_state()

    def _save_state(self) -> None:
        path = self.base_dir / STATE_FILE
        path.touch(mode=0o600)
        path.write_text(json.dumps(self._state, indent=2) + "\n")

    def _write(self, path: Path, text: str, mode: int = 0o644) -> None:
        """Write a file the server account owns."""
        path.write_text(text)
        os.chmod(path, mode)
        os.chown(path, self._account.pw_uid, self._account.pw_gid)

    # -- processes -------------------------------------------------------------------------

    def _run(self, *args: str | os.PathLike[str], check: bool = True) -> int:
        """Run a server tool as the server account; raise with its output on failure."""
        result = subprocess.run(
            [str(arg) for arg in args],
            cwd=self.base_dir,
            user=self._account.pw_uid,
            group=self._account.pw_gid,
            extra_groups=[] if os.geteuid() == 0 else None,
            env={**os.environ, "HOME": str(self.base_dir), "PGTZ": "UTC"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and result.returncode != 0:
            output = result.stdout + result.stderr
            raise RuntimeError(f"{Path(args[0]).name} failed ({result.returncode}):\n{output}")
        return result.returncode

    def _pg_ctl(self, node: str, action: str, mode: str = "fast") -> None:
        """Start or stop ``node`` with pg_ctl unless it already is in that state."""
        pg_ctl = PG_BINDIR / "pg_ctl"
        data = self._data_dir(node)
        running = self._run(pg_ctl, "status", "-D", data, check=False) == 0
        if action == "start" and not running:
            log = self.base_dir / "logs" / f"{node}.log"
            try:
                self._run(pg_ctl, "start", "-w", "-t", str(int(START_TIMEOUT)), "-D", data,
                          "-l", log)
            except RuntimeError as exc:
                tail = "".join(log.read_text().splitlines(keepends=True)[-10:])
                raise RuntimeError(f"{exc}\n{node} log:\n{tail}") from None
        elif action == "stop" and running:
            self._run(pg_ctl, "stop", "-w", "-m", mode, "-D", data)

    def _node_conf(self, port: int) -> str:
        return "\n".join([
            f"port = {port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self._socket_dir}'",
            "fsync = off",  # a throwaway cluster: speed over crash safety
            "max_connections = 200",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "",
        ])

    def _prepare(self, passwords: dict[str, str]) -> None:
        """The directories and `cluster.json`: `passwords`, new ports."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o700)
        for sub in (self.base_dir, self._socket_dir, self.base_dir / "logs",
                    self.base_dir / "pgbouncer"):
            sub.mkdir(exist_ok=True)
            os.chown(sub, self._account.pw_uid, self._account.pw_gid)
        self._state = {
            **passwords,
            "ports": {
                "primary": _free_port(),
                "pool": _free_port(),
                "replicas": [_free_port() for _ in range(self.replica_count)],
            },
        }
        self._save_state()

    def _init(self) -> None:
        """initdb the primary, create the app's role and database."""
        self._prepare({"password": secrets.token_urlsafe(18)})
        data = self._data_dir("primary")
        self._run(PG_BINDIR / "initdb", "-D", data, "-U", SUPERUSER, "-E", "UTF8",
                  "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
                  "--no-sync")
        self._write(data / "node.conf", self._node_conf(self._ports["primary"]))
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude 'node.conf'\n")
        self.start_primary()
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(
                f"CREATE ROLE {self.user} LOGIN PASSWORD '{self._state['password']}'"
            )
            conn.execute(f"CREATE DATABASE {self.database} OWNER {self.user}")

    def _make_replica(self, index: int) -> None:
        """pg_basebackup -R from the running primary, then give the copy its own port."""
        name = self._replica_name(index)
        data = self._data_dir(name)
        primary = f"host={self._socket_dir} port={self._ports['primary']} user={SUPERUSER}"
        self._run(PG_BINDIR / "pg_basebackup", "-D", data, "-R", "-X", "stream",
                  "-c", "fast", "--no-sync", "-d", primary)
        self._write(data / "node.conf", self._node_conf(self._ports["replicas"][index]))

    @property
    def ports(self) -> dict:
        """The ports: {"primary": int, "replicas": [int, ...], "pool": int}."""
        return self._ports

    def set_passwords(self, role_password: str, pool_password: str) -> None:
        """The role's password (direct connections) and the pool's (pgbouncer's clients), as
        a DigitalOcean pool has credentials of its own: pgbouncer then logs in to PostgreSQL
        as the role. Restarted, not reloaded: a reload with a changed `*` entry crashes
        pgbouncer 1.18 (`put_in_order: found existing elem`)."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(self.user), sql.Literal(role_password)))
        self._state.update(password=role_password, pool_password=pool_password)
        self._save_state()
        self._stop_pgbouncer()
        self._start_pgbouncer()

    # -- point-in-time recovery (lab/drill.py) ---------------------------------------------

    def enable_archiving(self) -> Path:
        """WAL archiving into `base_dir/wal-archive` (restarts the primary); returns the
        archive. PostgreSQL 15 docs, 26.3 Continuous Archiving and Point-in-Time Recovery."""
        archive = self.base_dir / "wal-archive"
        archive.mkdir(exist_ok=True)
        os.chown(archive, self._account.pw_uid, self._account.pw_gid)
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET archive_mode = 'on'")
            conn.execute(sql.SQL("ALTER SYSTEM SET archive_command = {}").format(
                sql.Literal(f"test ! -f {archive}/%f && cp %p {archive}/%f")))
        self.stop_primary()
        self.start_primary()
        return archive

    def base_backup(self) -> Path:
        """A base backup of the running primary into `base_dir/base-backup`."""
        dest = self.base_dir / "base-backup"
        primary = f"host={self._socket_dir} port={self._ports['primary']} user={SUPERUSER}"
        self._run(PG_BINDIR / "pg_basebackup", "-D", dest, "-X", "stream", "-c", "fast",
                  "--no-sync", "-d", primary)
        return dest

    def archive_current_wal(self) -> None:
        """Switch to a new WAL segment and wait until the finished one is archived."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            segment = conn.execute(
                "SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            deadline = time.monotonic() + START_TIMEOUT
            while (conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()[0]
                   or "") < segment:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"WAL segment {segment} was not archived")
                time.sleep(0.05)

    def passwords(self) -> dict[str, str]:
        """The role's and the pool's passwords (a restored cluster has the same ones)."""
        self._load_state()
        return {k: v for k, v in self._state.items() if k in ("password", "pool_password")}

    def restore(self, base: Path, archive: Path, target_time: str,
                passwords: dict[str, str]) -> None:
        """A new cluster's primary in `base_dir`, as a restore on DigitalOcean makes one:
        `base` replayed from `archive` up to `target_time` (recovery_target_time, then
        promote), on ports of its own, with the source's role, database and `passwords`.
        Archiving is off, and the recovery settings are removed once it is promoted (a
        replica copied from it would otherwise stop at that target and promote itself).
        `start()` then adds its replicas (copies of the restored primary) and its pool."""
        self._prepare(passwords)
        data = self._data_dir("primary")
        self._run("cp", "-a", base, data)
        self._write(data / "node.conf", self._node_conf(self._ports["primary"]))
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"restore_command = 'cp {archive}/%f %p'\n"
                       f"recovery_target_time = '{target_time}'\n"
                       "recovery_target_action = 'promote'\n"
                       "archive_mode = 'off'\n")
        self._write(data / "recovery.signal", "")
        self.start_primary()
        deadline = time.monotonic() + START_TIMEOUT
        while self.in_recovery():
            if time.monotonic() > deadline:
                raise RuntimeError("the restored primary did not leave recovery")
            time.sleep(0.1)
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            for name in ("restore_command", "recovery_target_time", "recovery_target_action"):
                conn.execute(f"ALTER SYSTEM RESET {name}")
            conn.execute("SELECT pg_reload_conf()")

    def in_recovery(self, node: str = "primary") -> bool:
        with psycopg.connect(self.admin_dsn(node), autocommit=True) as conn:
            return conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]

    def timeline(self) -> int:
        """The primary's timeline: 1 for a new cluster, one more after each promotion (the
        first 8 hex digits of its current WAL file's name)."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            name = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        return int(name[:8], 16)

    def _start_pgbouncer(self) -> None:
        home = self.base_dir / "pgbouncer"
        server = f"host=127.0.0.1 port={self._ports['primary']}"
        pool_password = self._state.get("pool_password", self._state["password"])
        if pool_password != self._state["password"]:
            server += f" user={self.user} password={self._state['password']}"
        ini = "\n".join([
            "[databases]",
            f"* = {server}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self._ports['pool']}",
            f"unix_socket_dir = {self._socket_dir}",
            "auth_type = scram-sha-256",
            f"auth_file = {home / 'userlist.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "max_client_conn = 500",
            # query_wait_timeout stays at its default (120 s), as on a managed pool: clients
            # must not rely on pgbouncer to fail fast. Retrying the server login every second
            # (default 15 s) only shortens recovery after a restart of the primary.
            "server_login_retry = 1",
            f"logfile = {home / 'pgbouncer.log'}",
            f"pidfile = {home / 'pgbouncer.pid'}",
            "",
        ])
        self._write(home / "pgbouncer.ini", ini)
        self._write(home / "userlist.txt", f'"{self.user}" "{pool_password}"\n', 0o600)
        if self._pgbouncer_pid() is None:
            self._run(PGBOUNCER, "-d", home / "pgbouncer.ini")
        self.wait_ready(self.urls.pool)

    def _pgbouncer_pid(self) -> int | None:
        """pgbouncer's pid from its pidfile, if that process is alive and is pgbouncer."""
        pidfile = self.base_dir / "pgbouncer" / "pgbouncer.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError):
            return None
        return pid if b"pgbouncer" in cmdline else None

    def _stop_pgbouncer(self) -> None:
        pid = self._pgbouncer_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)  # immediate shutdown
        deadline = time.monotonic() + START_TIMEOUT
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)

    @staticmethod
    def wait_ready(url: str) -> None:
        """Wait until a query through `url` succeeds (pgbouncer included), for START_TIMEOUT."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with psycopg.connect(url, connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="create if needed and start; print URLs as JSON")
    start.add_argument("dir")
    start.add_argument("--replicas", type=int, default=1)
    stop = sub.add_parser("stop", help="stop every server of the cluster in DIR")
    stop.add_argument("dir")
    args = parser.parse_args(argv)

    if args.command == "start":
        cluster = PgCluster(args.dir, args.replicas, stop_at_exit=False)
        urls = cluster.start()
        json.dump(asdict(urls), sys.stdout, indent=2)
        print()
    else:
        PgCluster(args.dir, replicas=0).stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
