"""The files every app droplet runs: checked by the real tools, then run for real on loopback.

Static checks: `nginx -t`, `gunicorn --check-config`, `systemd-analyze verify` and
`systemd-analyze security`. Live: the rendered nginx site in front of real gunicorn serving
the app (its /healthz needs no database, so DATABASE_URL points at a closed port), and in front
of an echo server that shows what reaches the app.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

import app.config as app_config
import app.migrate as app_migrate
from components.cloud_config import render_app_cloud_config
from components.metadata_firewall import METADATA_IP
from components.runtime import (
    APP_UNIT,
    MIGRATE_UNIT,
    SECURITY_HEADERS,
    AppSecrets,
    DropletLayout,
    droplet_files,
    render_app_env,
    render_app_unit,
    render_migrate_unit,
    render_nginx_site,
)
from components.settings import Settings
from lab.process import free_port
from lab.stack import unit_environment
from tests.factories import make_settings
from tests.runtime_helpers import (
    GUNICORN,
    GUNICORN_CONF,
    NGINX_CLOCK_SLACK,
    ROOT,
    SLOW_BODY_TIMEOUT,
    body_sink,
    env_file_values,
    nginx_command,
    nginx_conf,
    request,
    running,
    trickle,
)

UNREACHABLE_DB = "postgresql://u:p@127.0.0.1:1/x"
MAX_EXPOSURE = 2.5
HEADER_NAMES = [name for name, _ in SECURITY_HEADERS]
HTTPS = {"X-Forwarded-Proto": "https"}


def droplet_site(settings: Settings) -> str:
    """The site exactly as an app droplet gets it."""
    layout = DropletLayout()
    return render_nginx_site(
        settings, listen="80", upstream=layout.gunicorn_bind, static_dir=layout.static_dir,
        metrics_allow=["10.10.0.0/20", "127.0.0.1"],
    )


def env_file(tmp: Path, settings: Settings, *, bind: str, **values: object) -> Path:
    """The rendered environment file, written to `tmp`, with harmless defaults for the app."""
    values = {"database_url": UNREACHABLE_DB, "replica_urls": [], "secret_key": "test-secret",
              "migration_url": None, **values}
    path = tmp / "app.env"
    path.write_text(render_app_env(settings, AppSecrets(**values), bind=bind))
    return path


def gunicorn_config(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(GUNICORN), "-c", str(GUNICORN_CONF), *flags, "app.wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )


def seconds(text: str, directive: str) -> int:
    """The value in seconds of `directive 45s` / `Directive=45s` in a rendered file."""
    return int(re.search(rf"^\s*{directive}[ =](\d+)s;?$", text, re.MULTILINE)[1])


def tool_layout(tmp: Path) -> DropletLayout:
    """A layout under `tmp` whose venv has a real gunicorn and python, for systemd-analyze."""
    layout = DropletLayout(root=str(tmp))
    Path(layout.venv, "bin").mkdir(parents=True)
    Path(layout.venv, "bin", "gunicorn").symlink_to(GUNICORN)
    Path(layout.venv, "bin", "python").symlink_to(sys.executable)
    return layout


def units(tmp: Path) -> list[Path]:
    """Both services of an app droplet, rendered into `tmp` with a `tool_layout`."""
    layout = tool_layout(tmp)
    rendered = {APP_UNIT: render_app_unit(make_settings(), layout),
                MIGRATE_UNIT: render_migrate_unit(layout)}
    for name, text in rendered.items():
        (tmp / name).write_text(text)
    return [tmp / name for name in rendered]


# --------------------------------------------------------------------------- static checks


def test_cloud_config_writes_the_droplet_file_list_and_the_lab_moves_only_its_layout():
    """One list of files: cloud-init writes `droplet_files` as they are; the lab's layout
    changes paths and addresses only, never what a file says otherwise."""
    values = {"secrets": AppSecrets(database_url=UNREACHABLE_DB, replica_urls=[],
                                    migration_url=None, secret_key="test-secret"),
              "vpc_cidr": "10.10.0.0/20", "db_ca": "a PEM"}
    settings, bundle = make_settings(), b"app bundle"
    files = droplet_files(settings, **values, layout=DropletLayout(), bundle=bundle)
    written = yaml.safe_load(render_app_cloud_config(settings, **values, bundle=bundle))
    assert [(f["path"], f["permissions"], f.get("owner", "root:root"),
             base64.b64decode(f["content"]) if f.get("encoding") == "b64" else f["content"])
            for f in written["write_files"]] == [
        (f.path, f"{f.mode:04o}", f.owner, f.content) for f in files]
    lab = DropletLayout(root="/lab/d1", env_file="/lab/d1/app.env", units_dir="/lab/d1",
                        gunicorn_bind="127.0.0.11:8000", nginx_listen="127.0.0.11:8080",
                        nginx_site="/lab/d1/site.conf", nginx_exporter="127.0.0.11:9113",
                        exporter_defaults="/lab/d1/nginx-exporter.args",
                        db_ca_file="/lab/d1/db-ca.pem")
    moved = droplet_files(settings, **values, layout=lab)
    assert [f.path for f in moved] == ["/lab/d1/app.env", "/lab/d1/db-ca.pem",
                                       f"/lab/d1/{APP_UNIT}", f"/lab/d1/{MIGRATE_UNIT}",
                                       "/lab/d1/site.conf", "/lab/d1/nginx-exporter.args"]
    assert [f.mode for f in moved] == [f.mode for f in files[1:]]
    assert "    listen 127.0.0.11:8080 default_server;\n" in moved[-2].content
    assert "proxy_pass http://127.0.0.11:9113/metrics;" in moved[-2].content
    assert moved[-1].content == ('ARGS="--nginx.scrape-uri=http://127.0.0.11:8080/nginx_status'
                                 ' --web.listen-address=127.0.0.11:9113"\n')
    assert files[-1].content == ('ARGS="--nginx.scrape-uri=http://127.0.0.1:80/nginx_status'
                                 ' --web.listen-address=127.0.0.1:9113"\n')


def test_without_secrets_the_user_data_has_no_environment_file_and_starts_no_service():
    """A stack with a deploy key: the gates deliver the environment file and start the services
    (components/app_tier.py); cloud-init only enables them, so a reboot starts them again."""
    secrets = AppSecrets(database_url=UNREACHABLE_DB, replica_urls=[], migration_url=None,
                         secret_key="test-secret")
    with_env, without = (yaml.safe_load(render_app_cloud_config(
        make_settings(), secrets=s, vpc_cidr="10.10.0.0/20", db_ca="a PEM",
        bundle=b"app bundle"))
        for s in (secrets, None))
    env = DropletLayout().env_file
    assert [f["path"] for f in with_env["write_files"] if f["path"] != env] == [
        f["path"] for f in without["write_files"]]
    assert env in [f["path"] for f in with_env["write_files"]]
    assert "test-secret" not in yaml.safe_dump(without)
    enables = [c for c in without["runcmd"] if c[:2] == ["systemctl", "enable"]]
    assert enables == [["systemctl", "enable", MIGRATE_UNIT, APP_UNIT]]
    assert [c for c in with_env["runcmd"] if c[:2] == ["systemctl", "enable"]] == [
        ["systemctl", "enable", "--now", "--no-block", MIGRATE_UNIT],
        ["systemctl", "enable", "--now", APP_UNIT]]


def test_rendering_is_byte_identical_and_follows_settings(tmp_path):
    settings = make_settings(app={"maxBodyMb": 7, "gunicornWorkers": 5, "gunicornThreads": 4})
    assert droplet_site(settings) == droplet_site(settings)
    assert render_app_unit(settings, DropletLayout()) == render_app_unit(settings, DropletLayout())
    one, two = (env_file(tmp_path, settings, bind="127.0.0.1:8000").read_text() for _ in range(2))
    assert one == two

    assert "client_max_body_size 7m;" in droplet_site(settings)
    env = env_file_values(tmp_path / "app.env")
    assert (env["GUNICORN_WORKERS"], env["GUNICORN_THREADS"]) == ("5", "5")
    assert env["DB_CONCURRENCY_LIMIT"] == env["DB_POOL_SIZE"] == "4"


def test_droplet_site_passes_nginx_t(tmp_path):
    conf = nginx_conf(tmp_path, droplet_site(make_settings()))
    result = subprocess.run(nginx_command(conf, "-t"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_gunicorn_runs_with_the_rendered_environment(tmp_path):
    settings = make_settings(app={"gunicornWorkers": 5, "gunicornThreads": 4})
    env = env_file_values(env_file(tmp_path, settings, bind="127.0.0.1:8123"))

    checked = gunicorn_config(env, "--check-config")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    printed = gunicorn_config(env, "--print-config")
    assert printed.returncode == 0, printed.stderr
    config = dict(re.findall(r"^(\w+)\s+= (.*)$", printed.stdout, re.MULTILINE))
    assert config["bind"] == "['127.0.0.1:8123']"
    assert (config["workers"], config["threads"], config["worker_class"]) == ("5", "5", "gthread")
    assert int(config["max_requests"]) > 0 and int(config["max_requests_jitter"]) > 0
    assert (config["accesslog"], config["errorlog"]) == ("None", "-")  # nginx logs requests
    assert config["forwarded_allow_ips"] == "['127.0.0.1', '::1']"
    assert config["preload_app"] == "False"

    # Each layer gives up before the one in front of it (see components/runtime.py).
    site, unit = droplet_site(settings), render_app_unit(settings, DropletLayout())
    timeout, graceful = int(config["timeout"]), int(config["graceful_timeout"])
    assert (timeout, graceful) == (30, 30)
    assert seconds(site, "proxy_read_timeout") > max(timeout, graceful)
    assert seconds(unit, "TimeoutStopSec") > graceful
    upstream = re.search(r"upstream webstack_app \{[^}]*\}", site)[0]
    assert seconds(upstream, "keepalive_timeout") < int(config["keepalive"])


def test_gunicorn_defaults_match_the_rendered_environment(tmp_path):
    """Run by hand without the env file, gunicorn behaves as on a droplet (bar the sizing)."""
    rendered = env_file_values(env_file(tmp_path, make_settings(), bind="127.0.0.1:8000"))
    app_env = {"DATABASE_URL": UNREACHABLE_DB, "SECRET_KEY": "test-secret"}
    printed = gunicorn_config(app_env, "--print-config")
    assert printed.returncode == 0, printed.stderr
    config = dict(re.findall(r"^(\w+)\s+= (.*)$", printed.stdout, re.MULTILINE))
    for name in ("timeout", "graceful_timeout", "keepalive"):
        assert config[name] == rendered[f"GUNICORN_{name.upper()}"], name
    assert config["bind"] == f"['{rendered['GUNICORN_BIND']}']"


@pytest.mark.parametrize("bind", ["0.0.0.0:8000", "10.10.0.5:8000", "[::]:8000", ":8000"])
def test_gunicorn_refuses_to_listen_beyond_loopback(bind):
    result = gunicorn_config({"GUNICORN_BIND": bind}, "--check-config")
    assert result.returncode != 0
    assert "loopback" in result.stdout + result.stderr


def test_units_pass_systemd_analyze_verify(tmp_path):
    for unit in units(tmp_path):
        result = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert unit.name not in result.stdout + result.stderr  # no warning about our unit


def test_both_units_deny_the_metadata_address_as_systemd_reads_them(tmp_path):
    """IPAddressDeny= in the [Service] section of both units, with a value systemd parses: the
    verify above passes silently, and warns for an address it cannot parse. (`systemd-analyze
    security` rates allow lists only, IPAddressDeny=any: a single denied address shows there as
    "does not define an IP address allow list", the same as none; docs/boot.md.)"""
    for unit in units(tmp_path):
        service = unit.read_text().split("[Service]")[1].split("[Install]")[0]
        assert f"\nIPAddressDeny={METADATA_IP}\n" in service, unit.name
        broken = tmp_path / f"broken-{unit.name}"
        broken.write_text(unit.read_text().replace(f"={METADATA_IP}", f"={METADATA_IP}4"))
        result = subprocess.run(["systemd-analyze", "verify", str(broken)],
                                capture_output=True, text=True)
        assert "Address prefix is invalid" in result.stderr, result.stderr


def test_units_sandbox_exposure_is_at_most_2_5(tmp_path):
    for unit in units(tmp_path):
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                                capture_output=True, text=True)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert found, result.stdout + result.stderr
        assert float(found[1]) <= MAX_EXPOSURE, result.stdout


def test_env_file_sets_every_variable_the_app_documents(tmp_path):
    documented = set(re.findall(r"``([A-Z][A-Z0-9_]+)``", app_config.__doc__ + app_migrate.__doc__))
    env = env_file_values(env_file(tmp_path, make_settings(), bind="127.0.0.1:8000",
                                   migration_url="postgresql://m:p@primary:25060/app"))
    assert "DB_POOL_SIZE" in documented
    assert documented <= set(env)


def test_env_file_keeps_awkward_values_intact(tmp_path):
    secret = "a\"b'c$d`e\\f #g ${HOME} \\$"
    replicas = ["postgresql://r:p%40ss@host-1:25060/app?sslmode=require",
                "postgresql://r:p@host-2:25060/app"]
    path = env_file(tmp_path, make_settings(), bind="127.0.0.1:8000", secret_key=secret,
                    replica_urls=replicas, migration_url="postgresql://m:x$y@host:25060/app")
    env = env_file_values(path)
    assert env["SECRET_KEY"] == secret
    assert env["DATABASE_REPLICA_URLS"] == ",".join(replicas)
    assert env["DATABASE_MIGRATION_URL"] == "postgresql://m:x$y@host:25060/app"


def test_env_file_refuses_control_characters_without_echoing_them(tmp_path):
    with pytest.raises(ValueError, match="secret_key") as raised:
        env_file(tmp_path, make_settings(), bind="127.0.0.1:8000", secret_key="top\nsecret")
    assert "top" not in str(raised.value)


def test_site_refuses_bad_arguments():
    settings = make_settings()
    with pytest.raises(ValueError, match="not-a-cidr"):
        render_nginx_site(settings, static_dir="/srv/static", metrics_allow=["not-a-cidr"])
    with pytest.raises(ValueError, match="absolute"):
        render_nginx_site(settings, static_dir="static", metrics_allow=[])


# --------------------------------------------------------------------------- live: app stack


@dataclass(frozen=True)
class Web:
    port: int
    settings: Settings
    gunicorn: subprocess.Popen
    gunicorn_log: Path


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> Iterator[Web]:
    """nginx (rendered site) -> gunicorn (app/gunicorn.conf.py) -> the app.

    gunicorn gets the environment systemd would give it: the rendered file plus the unit's own
    variables (its runtime directory for heartbeats and multi-process metrics).

    /metrics is allowed from 127.0.0.2 only, so requests from 127.0.0.1 show the refusal.
    """
    tmp = tmp_path_factory.mktemp("web")
    # No rate limit to speak of: the tests here send bursts from 127.0.0.1 (see test_rate_limit).
    settings = make_settings(frontend={"rateLimit": {"requestsPerSecond": 10000, "burst": 10000}})
    app_port, web_port = free_port(), free_port()
    bind = f"127.0.0.1:{app_port}"
    env = {
        **env_file_values(env_file(tmp, settings, bind=bind)),
        **unit_environment(tmp / "run"),
    }
    static = tmp / "static"
    static.mkdir()
    (static / "site.css").write_text("body { color: black; }\n")
    site = render_nginx_site(settings, listen=f"127.0.0.1:{web_port}", upstream=bind,
                             static_dir=str(static), metrics_allow=["127.0.0.2"])
    conf = nginx_conf(tmp / "nginx", site)
    # An access log the droplets do not keep (nginx logs requests there): the witness of
    # what reached the app.
    gunicorn = [str(GUNICORN), "-c", str(GUNICORN_CONF), "--access-logfile", "-",
                "app.wsgi:app"]
    with running(gunicorn, port=app_port, env=env, cwd=ROOT, log=tmp / "gunicorn.log") as proc, \
            running(nginx_command(conf, "-g", "daemon off;"), port=web_port,
                    log=tmp / "nginx.log"):
        yield Web(web_port, settings, proc, tmp / "gunicorn.log")


@pytest.mark.parametrize("host", ["203.0.113.7", "www.example.com", "anything.invalid"])
def test_healthz_is_200_for_any_host_without_forwarded_proto(web, host):
    resp = request(web.port, web.settings.frontend.health_check.path, headers={"Host": host})
    assert resp.status == 200, resp.body
    assert "Location" not in resp.headers


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.evil.example", "Evil.Example.:80"])
def test_a_foreign_host_gets_nginx_421_and_never_reaches_the_app(web, host):
    """Issue 13: `POST /api/notes` with `Host: evil.example` returned 201 and a Location naming
    it. Only an IP address (staging has no domain) or the site's name reaches the app."""
    for method, path in [("POST", "/api/notes?foreign"), ("GET", "/static/site.css")]:
        resp = request(web.port, path, method=method, body=b'{"body": "x"}',
                       headers={"Host": host, "Content-Type": "application/json"})
        assert resp.status == 421, resp.body
        assert json.loads(resp.body) == {"error": "misdirected request: unknown host"}
        assert "Location" not in resp.headers
        assert "evil" not in str(resp.headers).lower()
    assert "foreign" not in web.gunicorn_log.read_text()  # the app never saw it
    by_address = request(web.port, "/no-such-endpoint", headers={"Host": "10.20.0.5"})
    assert by_address.status == 404  # the app's: an address reaches it


def test_hsts_only_when_the_load_balancer_saw_https(web):
    assert "Strict-Transport-Security" not in request(web.port, "/healthz").headers
    assert "Strict-Transport-Security" not in request(
        web.port, "/healthz", headers={"X-Forwarded-Proto": "http"}).headers
    https = request(web.port, "/healthz", headers=HTTPS)
    assert https.headers["Strict-Transport-Security"].startswith("max-age=")


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/healthz", None, 200),
    ("GET", "/static/site.css", None, 200),        # nginx, with its own add_header
    ("GET", "/no-such-endpoint", None, 404),       # the app's 404
    ("GET", "/static/no-such-file.css", None, 404),  # nginx's 404
    ("POST", "/api/notes", b"x" * (2 * 1024 * 1024), 413),
])
def test_security_headers_on_every_response(web, method, path, body, status):
    resp = request(web.port, path, method=method, body=body, headers=HTTPS)
    assert resp.status == status, resp.body
    for name in HEADER_NAMES:
        assert len(resp.headers.get_all(name) or []) == 1, (name, resp.headers)
    assert "nginx/" not in resp.headers["Server"]  # server_tokens off


def test_static_files_come_from_nginx_with_caching(web):
    resp = request(web.port, "/static/site.css")
    assert resp.body == b"body { color: black; }\n"
    assert resp.headers["Content-Type"] == "text/css"
    assert "max-age=" in resp.headers["Cache-Control"]


def test_body_over_the_limit_is_refused_by_nginx(web):
    limit = web.settings.app.max_body_mb * 1024 * 1024
    resp = request(web.port, "/api/notes?oversized", method="POST", body=b"x" * (limit + 1),
                   headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert resp.headers["Content-Type"] == "application/json"
    assert "too large" in json.loads(resp.body)["error"]
    assert "oversized" not in web.gunicorn_log.read_text()  # the app never saw it


def test_body_at_the_limit_is_not_refused_by_the_app_for_its_size(web):
    """app.maxBodyMb is the app's limit too (MAX_BODY_MB in the env file): a body nginx lets
    through reaches the app, which refuses it for what it holds (400), never its size (413)."""
    limit = web.settings.app.max_body_mb * 1024 * 1024
    resp = request(web.port, "/api/notes", method="POST", body=b"x" * limit,
                   headers={"Content-Type": "application/json"})
    assert resp.status == 400, resp.body


def test_metrics_only_for_allowed_addresses(web):
    refused = request(web.port, "/metrics", source="127.0.0.1")
    assert refused.status == 403
    assert json.loads(refused.body) == {"error": "forbidden"}
    allowed = request(web.port, "/metrics", source="127.0.0.2")
    assert allowed.status == 200, allowed.body
    relayed = request(web.port, "/metrics", source="127.0.0.2",
                      headers={"X-Forwarded-For": "198.51.100.7"})
    assert relayed.status == 403  # through the load balancer, from the internet


def test_nginx_status_and_its_metrics_only_for_allowed_addresses(web):
    """The stub status (for the exporter) and /nginx-metrics (for Prometheus) follow /metrics:
    the VPC's addresses only, never relayed by the load balancer."""
    for path in ("/nginx_status", "/nginx-metrics"):
        assert request(web.port, path, source="127.0.0.1").status == 403, path
        relayed = request(web.port, path, source="127.0.0.2",
                          headers={"X-Forwarded-For": "198.51.100.7"})
        assert relayed.status == 403 or path == "/nginx_status", path
    status = request(web.port, "/nginx_status", source="127.0.0.2")
    assert status.status == 200 and b"Active connections:" in status.body, status.body
    # Allowed through to the exporter's address (none runs here: nginx's own 502).
    assert request(web.port, "/nginx-metrics", source="127.0.0.2").status == 502


def test_reload_drops_no_request(web):
    """`systemctl reload` (HUP) replaces every worker while requests keep flowing."""
    outcomes: list[object] = []
    stop = threading.Event()
    booted = web.gunicorn_log.read_text().count("Booting worker")

    def client(method: str, path: str, body: bytes | None) -> None:
        while not stop.is_set():
            try:
                outcomes.append(request(web.port, path, method=method, body=body,
                                        headers={"Content-Type": "application/json"}).status)
            except OSError as exc:
                outcomes.append(exc)

    clients = [threading.Thread(target=client, args=args) for args in 2 * [
        ("GET", "/healthz", None), ("POST", "/api/notes", b"{}"),  # the app's 400, no database
    ]]
    for thread in clients:
        thread.start()
    try:
        for _ in range(5):
            time.sleep(0.5)
            web.gunicorn.send_signal(signal.SIGHUP)
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    log = web.gunicorn_log.read_text()
    assert log.count("Booting worker") >= booted + web.settings.app.workers, log  # replaced
    assert len(outcomes) > 100 and set(outcomes) <= {200, 400}, set(outcomes)


# ------------------------------------------------------------------------ live: what the app sees


class _Echo(BaseHTTPRequestHandler):
    """Answers with the request line's version and headers, as the app would see them."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = json.dumps({"version": self.request_version, "headers": dict(self.headers)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module", params=[(), ("127.0.0.0/8",)], ids=["direct", "behind-lb"])
def echo(request, tmp_path_factory) -> Iterator[tuple[int, tuple[str, ...]]]:
    """nginx (rendered site) -> an echo server; yields nginx's port and its trusted proxies.

    "behind-lb" trusts loopback as the droplet trusts the VPC: the load balancer's address."""
    tmp = tmp_path_factory.mktemp("echo")
    trusted = request.param
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = free_port()
        # A stack with a domain: its site is www.example.com.
        site = render_nginx_site(make_settings(domain="example.com"), listen=f"127.0.0.1:{port}",
                                 upstream=f"127.0.0.1:{server.server_port}",
                                 static_dir=str(tmp), metrics_allow=[], trusted_proxies=trusted)
        conf = nginx_conf(tmp, site)
        with running(nginx_command(conf, "-g", "daemon off;"), port=port, log=tmp / "nginx.log"):
            yield port, trusted
    finally:
        server.shutdown()
        server.server_close()


def seen(port: int, **headers: str) -> dict:
    """What the app behind nginx receives for a request with `headers`."""
    resp = request(port, "/anything", headers={k.replace("_", "-"): v for k, v in headers.items()})
    assert resp.status == 200
    return json.loads(resp.body)


@pytest.mark.parametrize(("sent", "forwarded"), [
    ({"X_Forwarded_Proto": "https"}, "https"),  # the load balancer's word is kept
    ({"X_Forwarded_Proto": "http"}, "http"),
    ({}, "http"),                              # direct request: nginx's own scheme
    ({"X_Forwarded_Proto": "gopher"}, "http"),  # nonsense is not passed on
])
def test_forwarded_proto_is_passed_through(echo, sent, forwarded):
    assert seen(echo[0], **sent)["headers"]["X-Forwarded-Proto"] == forwarded


def test_app_sees_one_client_address_and_keepalive_connection(echo):
    port, trusted = echo
    # A client's own claim, then the address the load balancer saw, as DigitalOcean appends it.
    got = seen(port, Host="www.example.com", X_Forwarded_For="10.9.9.9, 198.51.100.7")
    headers = got["headers"]
    assert headers["Host"] == headers["X-Forwarded-Host"] == "www.example.com"
    client = "198.51.100.7" if trusted else "127.0.0.1"  # only a trusted LB is believed
    assert headers["X-Forwarded-For"] == headers["X-Real-IP"] == client
    assert got["version"] == "HTTP/1.1" and "Connection" not in headers  # reusable upstream


def test_rate_limit_answers_429_per_client_and_exempts_the_vpc_and_health_checks(tmp_path):
    """Issue 13: no per-client limit anywhere. 1 request a second with a burst of 2: of 8 quick
    requests from one address some get 429; the exempt address (the VPC's stand-in) and
    /healthz never do."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = free_port()
    settings = make_settings(frontend={"rateLimit": {"requestsPerSecond": 1, "burst": 2}})
    site = render_nginx_site(settings, listen=f"127.0.0.1:{port}",
                             upstream=f"127.0.0.1:{server.server_port}", static_dir=str(tmp_path),
                             metrics_allow=[], trusted_proxies=["127.0.0.2"])
    try:
        with running(nginx_command(nginx_conf(tmp_path, site), "-g", "daemon off;"), port=port,
                     log=tmp_path / "nginx.log"):
            limited = [request(port, "/anything") for _ in range(8)]
            assert limited[0].status == 200
            assert {r.status for r in limited} == {200, 429}, [r.status for r in limited]
            refused = next(r for r in limited if r.status == 429)
            assert json.loads(refused.body) == {"error": "too many requests"}
            exempt = [request(port, "/anything", source="127.0.0.2").status for _ in range(8)]
            checks = [request(port, "/healthz").status for _ in range(8)]
            assert set(exempt) == set(checks) == {200}
    finally:
        server.shutdown()
        server.server_close()


def test_a_body_sent_at_one_byte_a_second_is_cut_at_the_body_timeout(tmp_path):
    """Issue 13: a body sent at 1 byte a second stayed open indefinitely: client_body_timeout
    bounds only the pause between two reads (nginx 1.22 took 30 bytes over 29 s with it at
    3 s). The site's Lua deadline cuts it, the body never reaching the app; a body sent at
    once passes."""
    settings = make_settings(frontend={"bodyTimeoutSeconds": SLOW_BODY_TIMEOUT})
    with body_sink() as (upstream, received):
        port = free_port()
        site = render_nginx_site(settings, listen=f"127.0.0.1:{port}",
                                 upstream=f"127.0.0.1:{upstream}", static_dir=str(tmp_path),
                                 metrics_allow=[])
        with running(nginx_command(nginx_conf(tmp_path, site), "-g", "daemon off;"), port=port,
                     log=tmp_path / "nginx.log"):
            sent = request(port, "/api/notes", method="POST", body=b"x" * 40,
                           headers={"Content-Type": "text/plain"})
            with socket.create_connection(("127.0.0.1", port)) as sock:
                ended, after = trickle(sock, 40, host="127.0.0.1")
    assert sent.status == 200
    assert ended == "cut", (ended, after)
    assert SLOW_BODY_TIMEOUT - NGINX_CLOCK_SLACK <= after < SLOW_BODY_TIMEOUT + 3, after
    assert received == [40], "only the body sent at once reached the app"


def test_upstream_down_gives_json_502(tmp_path):
    port = free_port()
    site = render_nginx_site(make_settings(), listen=f"127.0.0.1:{port}",
                             upstream=f"127.0.0.1:{free_port()}", static_dir=str(tmp_path),
                             metrics_allow=[])
    conf = nginx_conf(tmp_path, site)
    with running(nginx_command(conf, "-g", "daemon off;"), port=port, log=tmp_path / "nginx.log"):
        resp = request(port, "/api/notes", headers=HTTPS)
    assert resp.status == 502
    assert json.loads(resp.body) == {"error": "bad gateway"}
    assert all(name in resp.headers for name in HEADER_NAMES)
