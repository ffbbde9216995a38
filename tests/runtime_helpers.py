"""Run the droplets' rendered files for real: nginx and gunicorn on loopback, in a temp dir,
and cloud-init's own schema check on their user data."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lab.process import NGINX, nginx_main_conf

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
GUNICORN_CONF = ROOT / "app" / "gunicorn.conf.py"


def cloud_init_schema(text: str, directory: Path) -> subprocess.CompletedProcess:
    """`cloud-init schema --config-file` on `text` (Debian's cloud-init, installed by
    scripts/install-system-deps.sh); exit code 0 means a valid cloud-config."""
    cloud_init = shutil.which("cloud-init")
    assert cloud_init, "cloud-init is installed by scripts/install-system-deps.sh"
    path = directory / "user-data.yaml"
    path.write_text(text)
    return subprocess.run([cloud_init, "schema", "--config-file", str(path)],
                          capture_output=True, text=True, timeout=120)


def nginx_conf(tmp: Path, site: str) -> Path:
    """The lab's nginx.conf (`nginx_main_conf`) including `site` inside `http {}`, every path
    under `tmp`."""
    (tmp / "temp").mkdir(parents=True, exist_ok=True)
    (tmp / "site.conf").write_text(site)
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_main_conf(tmp, tmp / "site.conf"))
    return conf


def nginx_command(conf: Path, *args: str) -> list[str]:
    return [NGINX, "-p", str(conf.parent), "-c", str(conf), "-e", "stderr", *args]


def env_file_values(path: Path) -> dict[str, str]:
    """The variables the environment file at `path` sets, as a POSIX shell reads them.

    An independent reader for the file's syntax, which systemd's EnvironmentFile shares.
    """
    names = re.findall(r"^([A-Z][A-Z0-9_]*)=", path.read_text(), re.MULTILINE)
    script = 'set -a; . "$1"; shift; for n; do printf "%s=%s\\0" "$n" "${!n}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "-", str(path), *names],
        check=True, capture_output=True, text=True, env={},
    ).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if item)


@contextmanager
def running(cmd: list[str], *, port: int, log: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Start `cmd`, wait until it accepts connections on 127.0.0.1:`port`, always stop it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} is not listening:\n{log.read_text()}") from None
                time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(port: int, path: str, *, method: str = "GET", headers: Mapping[str, str] | None = None,
            body: bytes | None = None, source: str = "127.0.0.1") -> Response:
    """One HTTP request to 127.0.0.1:`port`, sent from the loopback address `source`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


class _Sink(BaseHTTPRequestHandler):
    """An app stand-in: answers a POST 200 once it has the whole body, and records its size."""

    protocol_version = "HTTP/1.1"
    received: list[int]

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.received.append(len(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextmanager
def body_sink() -> Iterator[tuple[int, list[int]]]:
    """An HTTP server on loopback behind the nginx under test: (its port, the sizes of the
    bodies it received, in order)."""
    received: list[int] = []
    handler = type("Sink", (_Sink,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port, received
    finally:
        server.shutdown()
        server.server_close()


SLOW_BODY_TIMEOUT = 3
NGINX_CLOCK_SLACK = 0.05
"""How early nginx's deadline may look from the client: nginx times with its cached
millisecond clock (read once per event-loop turn), so a 3 s deadline was seen cut at 2.9986 s
and 2.9988 s over HTTPS."""
"""frontend.bodyTimeoutSeconds in the slow-body tests (test_runtime_files, test_lb_nginx)."""


def trickle(sock: socket.socket, size: int, *, host: str = "localhost") -> tuple[str, float]:
    """POST a `size`-byte body over the connected `sock` at 1 byte a second. Returns how it
    ended, "cut" (nginx closed or reset the connection, or answered 408) or the status line
    nginx answered with, and after how many seconds."""
    sock.settimeout(1)
    # Timed from before the headers: nginx's deadline cannot start earlier, so the cut is never
    # seen before it (timed after them, nginx's millisecond timers were seen 1.4 ms "early").
    started = time.monotonic()
    sock.sendall(f"POST /api/notes HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\n"
                 f"Content-Length: {size}\r\n\r\n".encode())
    for _ in range(size):
        try:
            sock.sendall(b"x")
            answer = sock.recv(4096)  # waits 1 s: the pace of the bytes
        except TimeoutError:
            continue  # nothing yet: nginx is still reading
        except OSError:
            answer = b""  # reset
        break
    else:
        sock.settimeout(10)
        answer = sock.recv(4096)
    line = answer.split(b"\r\n", 1)[0].decode()
    cut = not answer or line.startswith("HTTP/1.1 408")
    return ("cut" if cut else line), time.monotonic() - started
