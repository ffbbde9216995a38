"""Process control for the lab, the bench and the tests: servers started detached in their
own process group, found again from pid files, stopped gracefully and then for good.

Nothing here knows about stacks or droplets: `lab/stack.py` builds the lab on top of it.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from components.runtime import NGINX_MODULES

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
START_TIMEOUT = 30.0


def nginx_main_conf(directory: Path, include: Path) -> str:
    """The top of an nginx config whose every path is under `directory`; `include` holds the
    rendered site (http context), as Debian's nginx.conf includes sites-enabled/."""
    user = "user root root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {directory}/temp/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    modules = "".join(f"load_module {module};\n" for module in NGINX_MODULES)
    return f"""\
{modules}{user}worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log;
events {{ worker_connections 1024; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log {directory}/access.log;
{temp}
    include {include};
}}
"""


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def running(pid: int | None) -> bool:
    """True while `pid` is a live process (reaping it first if it is our exited child)."""
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (a server and its workers)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def cpu_ticks(pid: int) -> int | None:
    """CPU time `pid` has used (user + system), in clock ticks; None once it is gone."""
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12]) if fields else None


def descendants(*pids: int) -> list[int]:
    """`pids` and every live process forked from them, at any depth (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, queue = [], list(pids)
    while queue:
        found.append(queue.pop())
        queue.extend(children.get(found[-1], ()))
    return found


def signal_group(pid: int | None, sig: int) -> None:
    """Send `sig` to `pid`'s process group when it leads one, else to `pid` alone."""
    if not running(pid):
        return
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pids = list(pids)
    while any(running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(pid: int | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """`sig` to the server `pid`; SIGKILL its whole group if anything is left after `timeout`."""
    if not pid:
        return
    members = group_members(pid) or ([pid] if running(pid) else [])
    if running(pid):
        os.kill(pid, sig)
    if not wait_gone(members, timeout):
        signal_group(pid, signal.SIGKILL)
        for member in members:
            signal_group(member, signal.SIGKILL)
        wait_gone(members, 5)


def http_status(address: str, path: str = "/healthz", timeout: float = 2.0) -> int | None:
    """The status of GET `path` at `address` (host:port), or None when nothing answers."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval=0.1) -> float:
    """Poll `check` until true; return the seconds it took, or raise naming `what`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - started


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path.name}: no log)"


def raise_if_exited(proc: subprocess.Popen, name: str, log: Path) -> None:
    """RuntimeError with its exit status and the tail of `log` once `proc`, a server this
    process started, has exited; nothing while it runs."""
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{log_tail(log)}")


def run_checked(cmd: list) -> None:
    """Run `cmd` to completion; RuntimeError with its output if it fails."""
    result = subprocess.run([str(c) for c in cmd], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed:\n{result.stdout}{result.stderr}")


def start_nginx(directory: Path) -> None:
    """nginx with `directory/nginx.conf`, daemonized (its own session), after `nginx -t`."""
    conf, log = directory / "nginx.conf", directory / "error.log"
    (directory / "temp").mkdir(exist_ok=True)
    run_checked([NGINX, "-t", "-q", "-p", directory, "-c", conf, "-e", log])
    run_checked([NGINX, "-p", directory, "-c", conf, "-e", log])
    wait_until(lambda: running(read_pid(directory / "nginx.pid")), START_TIMEOUT,
               f"nginx in {directory.name}")


EXEC_WINDOW = 0.5
"""Seconds `lab_pid` waits for a live process's command line to appear."""


def lab_pid(pidfile: Path, state_dir: Path) -> int | None:
    """The pid in `pidfile` if that process is alive and is the lab's: every lab server has
    its state directory on its command line (a pid file may outlive its process, and the
    pid be reused by another)."""
    pid = read_pid(pidfile)
    if not running(pid):
        return None
    deadline = time.monotonic() + EXEC_WINDOW
    try:
        # Empty for a moment after a start: `Popen` returns once the kernel has begun the
        # new program, which sets the program's arguments a little later.
        while not (cmdline := Path(f"/proc/{pid}/cmdline").read_bytes()):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)
    except (FileNotFoundError, ProcessLookupError):
        return None
    cmdline = cmdline.replace(b"\0", b" ")
    return pid if str(Path(state_dir).resolve()).encode() in cmdline else None


def free_port() -> int:
    """A TCP port nobody listens on right now, on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate_on_signal() -> None:
    """SIGTERM/SIGHUP end the run like Ctrl-C does, so `finally` blocks stop what was started."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)
