"""The nginx load-balancer renderers, checked with the real tools: nginx -t, a live nginx on
loopback in front of two backends (one dead), and cloud-init schema."""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from components.lb_nginx import (
    CLIENT_TIMEOUT,
    LB_SECURITY_HEADERS,
    SITE_PATH,
    TLS_CERT,
    TLS_KEY,
    UPSTREAM_PATH,
    render_lb_cloud_config,
    render_lb_nginx_conf,
    render_lb_upstream,
)
from lab.process import free_port
from tests.factories import make_settings, settings_for
from tests.runtime_helpers import (
    NGINX_CLOCK_SLACK,
    SLOW_BODY_TIMEOUT,
    body_sink,
    cloud_init_schema,
    nginx_command,
    nginx_conf,
    trickle,
)


def nginx_t(tmp: Path, body: str) -> None:
    conf = nginx_conf(tmp, body)
    result = subprocess.run(nginx_command(conf, "-t"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr + body


def self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


# --------------------------------------------------------------------------- nginx -t


def test_plain_http_config_passes_nginx_t(tmp_path):
    conf = render_lb_nginx_conf(make_settings(), upstreams=["10.20.0.5:80", "10.20.0.6:80"],
                                server_name="_", static_dir=str(tmp_path / "static"))
    assert "return 301" not in conf and "ssl_certificate" not in conf
    assert "proxy_set_header X-Forwarded-Proto http;" in conf
    nginx_t(tmp_path, conf)


def test_tls_config_passes_nginx_t(tmp_path):
    conf = render_lb_nginx_conf(settings_for("prod"), upstreams=["10.20.0.5:80"],
                                server_name="www.example.com", certificate=self_signed(tmp_path))
    assert "return 301 https://$host$request_uri;" in conf
    assert "proxy_set_header X-Forwarded-Proto https;" in conf
    nginx_t(tmp_path, conf)


def droplet_files(user_data: str) -> dict[str, str]:
    return {f["path"]: f["content"] for f in yaml.safe_load(user_data)["write_files"]}


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_droplet_config_with_placeholder_upstream_passes_nginx_t(stack, tmp_path):
    """What the droplet really runs before its upstream list arrives, and after."""
    files = droplet_files(render_lb_cloud_config(settings_for(stack)))
    site = files[SITE_PATH]
    if stack == "prod":
        cert, key = self_signed(tmp_path)
        site = site.replace(TLS_CERT, cert).replace(TLS_KEY, key)
    nginx_t(tmp_path, site + files[UPSTREAM_PATH])
    nginx_t(tmp_path, site + render_lb_upstream(["10.20.0.5:80", "10.20.0.6:80"]))


def test_rendering_is_byte_identical_and_validated():
    settings = settings_for("prod")
    args = dict(upstreams=["10.20.0.5:80"], server_name="www.example.com",
                certificate=("/etc/c.pem", "/etc/k.pem"))
    assert render_lb_nginx_conf(settings, **args) == render_lb_nginx_conf(settings, **args)
    assert render_lb_cloud_config(settings) == render_lb_cloud_config(settings)
    for bad in (["10.0.0.1:80; include /etc/passwd"], ["10.0.0.1"], ["10.0.0.1:80 backup"]):
        with pytest.raises(ValueError, match="upstream"):
            render_lb_upstream(bad)
    with pytest.raises(ValueError, match="listen_https"):
        render_lb_nginx_conf(settings, **{**args, "listen_https": None})


def test_upstream_balances_and_placeholder_answers_503():
    upstream = render_lb_upstream(["10.20.0.5:80", "10.20.0.6:80"])
    assert "least_conn;" in upstream and "keepalive 32;" in upstream
    assert upstream.count("max_fails=3 fail_timeout=10s;") == 2
    placeholder = render_lb_upstream([])
    assert "return 503" in placeholder and "10.20." not in placeholder


# --------------------------------------------------------------------------- live


class Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the request's path and headers as JSON (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = json.dumps({"path": self.path, "headers": dict(self.headers)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def running_nginx(tmp: Path, body: str, port: int):
    conf = nginx_conf(tmp, body)
    proc = subprocess.Popen(nginx_command(conf, "-g", "daemon off;"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_live_lb_redirects_proxies_with_forwarded_headers_and_skips_a_dead_droplet(tmp_path):
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    dead = free_port()  # nothing listens here: a droplet that is down
    http_port, https_port = free_port(), free_port()
    conf = render_lb_nginx_conf(
        settings_for("prod"),
        upstreams=[f"127.0.0.1:{dead}", f"127.0.0.1:{backend.server_address[1]}"],
        server_name="localhost", listen_http=f"127.0.0.1:{http_port}",
        listen_https=f"127.0.0.1:{https_port}", certificate=self_signed(tmp_path))
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    try:
        with running_nginx(tmp_path, conf, http_port):
            plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
            plain.request("GET", "/items?x=1", headers={"Host": "localhost"})
            response = plain.getresponse()
            assert response.status == 301
            assert response.getheader("Location") == f"https://localhost:{https_port}/items?x=1"
            response.read()
            plain.request("GET", "/healthz", headers={"Host": "localhost"})
            response = plain.getresponse()
            assert (response.status, response.read()) == (200, b"ok\n")

            for _ in range(4):  # least_conn will pick the dead one too: it must be retried
                conn = http.client.HTTPSConnection("127.0.0.1", https_port, timeout=10,
                                                   context=tls)
                conn.request("GET", "/items", headers={
                    "Host": "localhost", "X-Forwarded-For": "6.6.6.6",
                    "X-Forwarded-Proto": "http"})
                response = conn.getresponse()
                assert response.status == 200
                seen = json.loads(response.read())
                conn.close()
                assert seen["path"] == "/items"
                headers = {k.lower(): v for k, v in seen["headers"].items()}
                assert headers["x-forwarded-proto"] == "https"
                assert headers["x-forwarded-for"] == "127.0.0.1", "client's claim replaced"
                assert headers["x-real-ip"] == "127.0.0.1"
                assert headers["host"] == "localhost"
                assert "connection" not in headers or headers["connection"] != "close"
    finally:
        backend.shutdown()
        backend.server_close()


@pytest.mark.parametrize("server_name", ["localhost", "_"])
def test_live_lb_answers_a_foreign_host_itself(tmp_path, server_name):
    """Issue 13: the redirect echoed any Host (`https://evil.example:.../`). Now a foreign Host
    gets the LB's own 421 on both ports; the site's name and an IP address (a domain-less
    staging's reserved IP) still pass, and the TLS LB's own /healthz answers any Host."""
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    http_port, https_port = free_port(), free_port()
    tls_args = {} if server_name == "_" else {
        "listen_https": f"127.0.0.1:{https_port}", "certificate": self_signed(tmp_path)}
    conf = render_lb_nginx_conf(
        settings_for("prod" if tls_args else "staging"),
        upstreams=[f"127.0.0.1:{backend.server_address[1]}"], server_name=server_name,
        listen_http=f"127.0.0.1:{http_port}", **tls_args)
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    ports = [(http_port, None)] + ([(https_port, tls)] if tls_args else [])
    try:
        with running_nginx(tmp_path, conf, http_port):
            for port, context in ports:
                for host, status in [("evil.example", 421), ("127.0.0.1", None),
                                     (server_name, None)]:
                    if host == "_":
                        continue
                    conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                                        context=context) if context
                            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
                    conn.request("GET", "/items", headers={"Host": host})
                    response = conn.getresponse()
                    response.read()
                    conn.close()
                    expected = status or (301 if tls_args and context is None else 200)
                    assert response.status == expected, (port, host)
                    assert "evil" not in (response.getheader("Location") or "")
            if tls_args:  # the LB's own liveness on :80 (plain HTTP proxies /healthz)
                conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
                conn.request("GET", "/healthz", headers={"Host": "evil.example"})
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b"ok\n")
    finally:
        backend.shutdown()
        backend.server_close()


def s_client(port: int, *args: str) -> subprocess.CompletedProcess:
    """`openssl s_client` to 127.0.0.1:`port` (the client at security level 0, so only the
    server can refuse an old protocol or cipher); returncode 0 means a handshake."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                           "-servername", "localhost", *args],
                          input=b"", capture_output=True, timeout=30)


def test_live_lb_edge_tls_profile_server_tokens_headers_and_slow_clients(tmp_path):
    """Issue 13: TLS 1.2 accepted AES128-SHA, `Server:` named nginx's version, the LB's own
    301/502 had no security headers, and a slow client was never cut off."""
    http_port, https_port = free_port(), free_port()
    conf = render_lb_nginx_conf(
        settings_for("prod"), upstreams=[f"127.0.0.1:{free_port()}"],  # nobody listens: 502
        server_name="localhost", listen_http=f"127.0.0.1:{http_port}",
        listen_https=f"127.0.0.1:{https_port}", certificate=self_signed(tmp_path))
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    with running_nginx(tmp_path, conf, http_port):
        old = "-cipher", "ALL@SECLEVEL=0"
        assert s_client(https_port, "-tls1_1", *old).returncode != 0
        assert s_client(https_port, "-tls1_2", "-cipher", "AES128-SHA@SECLEVEL=0").returncode != 0
        assert s_client(https_port, "-tls1_2", "-cipher",
                        "ECDHE-RSA-AES128-SHA@SECLEVEL=0").returncode != 0
        good = s_client(https_port, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256")
        assert good.returncode == 0, good.stderr
        assert s_client(https_port, "-tls1_3").returncode == 0

        for port, context, status in [(http_port, None, 301), (https_port, tls, 502)]:
            conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=context)
                    if context else http.client.HTTPConnection("127.0.0.1", port, timeout=20))
            conn.request("GET", "/items", headers={"Host": "localhost"})
            response = conn.getresponse()
            response.read()
            conn.close()
            assert response.status == status
            assert response.getheader("Server") == "nginx", "no version"
            for name, _ in LB_SECURITY_HEADERS:
                assert response.getheader(name), (status, name)
            assert bool(response.getheader("Strict-Transport-Security")) is (status == 502)

        # A request header at 1 byte a second: cut off once the header timeout has passed.
        timeout = int(CLIENT_TIMEOUT.removesuffix("s"))
        with socket.create_connection(("127.0.0.1", http_port), timeout=1) as sock:
            started, cut = time.monotonic(), False
            for byte in b"GET /items HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40:
                try:
                    sock.sendall(bytes([byte]))
                    answer = sock.recv(4096)  # waits 1 s: the pace of the bytes
                except TimeoutError:
                    continue  # nothing yet: nginx is still waiting
                except OSError:
                    answer = b""  # reset
                cut = answer == b"" or answer.startswith(b"HTTP/1.1 408")
                break
            cut_after = time.monotonic() - started
        assert cut, "nginx answered something else"
        assert cut_after < timeout + 5, "still open after the header timeout"


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_live_lb_cuts_a_body_sent_at_one_byte_a_second_at_the_body_timeout(tmp_path, tls):
    """Issue 13: a 1-byte-a-second body stayed open indefinitely (client_body_timeout is per
    read). The LB's Lua deadline cuts it, over HTTPS too, before it reaches a droplet; a body
    sent at once passes."""
    settings = make_settings(frontend={"bodyTimeoutSeconds": SLOW_BODY_TIMEOUT})
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with body_sink() as (upstream, received):
        http_port, https_port = free_port(), free_port()
        port = https_port if tls else http_port
        conf = render_lb_nginx_conf(
            settings, upstreams=[f"127.0.0.1:{upstream}"], server_name="localhost",
            listen_http=f"127.0.0.1:{http_port}", listen_https=f"127.0.0.1:{https_port}",
            certificate=self_signed(tmp_path) if tls else None)
        with running_nginx(tmp_path, conf, http_port):
            conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
                    if tls else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
            conn.request("POST", "/api/notes", body=b"x" * 40,
                         headers={"Host": "localhost", "Content-Type": "text/plain"})
            sent = conn.getresponse().status
            conn.close()
            with socket.create_connection(("127.0.0.1", port)) as raw:
                sock = context.wrap_socket(raw, server_hostname="localhost") if tls else raw
                ended, after = trickle(sock, 40)
    assert sent == 200
    assert ended == "cut", (ended, after)
    assert SLOW_BODY_TIMEOUT - NGINX_CLOCK_SLACK <= after < SLOW_BODY_TIMEOUT + 3, after
    assert received == [40], "only the body sent at once reached a droplet"


def test_live_lb_rate_limit_answers_429_and_exempts_its_sources(tmp_path):
    """1 request a second with a burst of 2: of 8 quick requests from 127.0.0.1 some get 429;
    an exempt source (the VPC's stand-in, 127.0.0.2) never does."""
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    http_port = free_port()
    conf = render_lb_nginx_conf(
        make_settings(frontend={"rateLimit": {"requestsPerSecond": 1, "burst": 2}}),
        upstreams=[f"127.0.0.1:{backend.server_address[1]}"], server_name="_",
        listen_http=f"127.0.0.1:{http_port}", rate_exempt=["127.0.0.2"])

    def statuses(source: str) -> list[int]:
        found = []
        for _ in range(8):
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10,
                                              source_address=(source, 0))
            conn.request("GET", "/items")
            response = conn.getresponse()
            response.read()
            conn.close()
            found.append(response.status)
        return found

    try:
        with running_nginx(tmp_path, conf, http_port):
            limited = statuses("127.0.0.1")
            assert limited[0] == 200 and set(limited) == {200, 429}, limited
            assert set(statuses("127.0.0.2")) == {200}
    finally:
        backend.shutdown()
        backend.server_close()


def test_live_placeholder_says_why_it_cannot_serve_yet(tmp_path):
    http_port = free_port()
    site = render_lb_nginx_conf(settings_for("staging"), upstreams=None, server_name="_",
                                listen_http=f"127.0.0.1:{http_port}")
    with running_nginx(tmp_path, site + render_lb_upstream([], placeholder_port=free_port()),
                       http_port):
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 503
        assert b"no app droplets configured yet" in response.read()


# --------------------------------------------------------------------------- cloud-config


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_cloud_config_is_valid_and_never_holds_app_ips(stack, tmp_path):
    settings = settings_for(stack, frontend={"mode": "nginx"})
    text = render_lb_cloud_config(settings)
    assert text.startswith("#cloud-config\n")
    result = cloud_init_schema(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    data = yaml.safe_load(text)
    assert "nginx" in data["packages"]
    assert ("certbot" in data["packages"]) == (settings.fqdn is not None)
    files = droplet_files(text)
    assert "server 127.0.0.1:8081;" in files[UPSTREAM_PATH], "placeholder, not app IPs"
    assert all(f["defer"] for f in data["write_files"]), "written after nginx is installed"
    if settings.fqdn:
        service = files["/etc/systemd/system/webstack-certbot.service"]
        assert f"-d {settings.fqdn}" in service and "--webroot" in service
        assert "reserved_ip/ipv4/active" in service
