"""What runs on every app droplet: the nginx site, the gunicorn service and its environment.

Pure functions of settings and of plain values resolved from other resources (database URLs,
the secret key): the droplet's cloud-config installs their output at the paths of
`DropletLayout`, and the lab and the tests render the same files with loopback addresses and
temp directories. Same inputs, byte-identical output.

The timeouts form one chain, each layer giving up before the one in front of it, so a slow
request is cut by gunicorn and reported by nginx rather than dropped halfway:

    gunicorn timeout = graceful_timeout (30 s) < nginx proxy_read_timeout (45 s)
        < DigitalOcean load balancer idle timeout (60 s) < nginx client keepalive (75 s)
    gunicorn graceful_timeout (30 s) < systemd TimeoutStopSec (45 s)
    nginx upstream keepalive_timeout (4 s) < gunicorn keepalive (5 s)
    a request's database waits: pool 2 s + connect 2 s + statement 3 s < gunicorn timeout
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from components.metadata_firewall import METADATA_IP
from components.render import render_template
from components.settings import REPLICA_LAG_SAMPLE_SECONDS, Settings

GUNICORN_TIMEOUT = 30
"""Seconds a worker may stay silent before gunicorn kills and replaces it."""
GUNICORN_GRACEFUL_TIMEOUT = 30
"""Seconds in-flight requests get to finish on stop or reload (HUP)."""
GUNICORN_KEEPALIVE = 5
"""Seconds gunicorn keeps an idle connection from nginx open."""
DB_POOL_TIMEOUT = 2
"""Seconds a request waits for a free pooled connection before failing fast."""
DB_CONNECT_TIMEOUT = 2
"""Seconds to open a database connection (the app's default)."""
DB_STATEMENT_TIMEOUT_MS = 3000
"""Server-side limit per statement."""
DB_REPLICA_RETRY_SECONDS = 5
"""How long reads skip a replica that failed."""
PROXY_TIMEOUT = max(GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT) + 15
"""nginx's proxy_read/send_timeout: longer than gunicorn takes to give up or to drain."""
STOP_TIMEOUT = GUNICORN_GRACEFUL_TIMEOUT + 15
"""systemd's TimeoutStopSec: gunicorn drains its workers before systemd sends SIGKILL."""

NGINX_PACKAGES = ["nginx", "libnginx-mod-http-lua"]
"""What the rendered nginx configs need (Debian): the Lua module bounds a request body's time
(`frontend.bodyTimeoutSeconds`, cloud-init/nginx-body-deadline.conf.j2)."""
NGINX_MODULES = ("/usr/lib/nginx/modules/ndk_http_module.so",
                 "/usr/lib/nginx/modules/ngx_http_lua_module.so")
"""Their modules, loaded in this order; Debian's nginx.conf loads them from modules-enabled/,
the lab's and the tests' nginx.conf by path (lab/process.py)."""
MICROCACHE_DIR = "/var/cache/nginx/webstack"
APP_PORT = 80
"""The app droplets' nginx site port: what the load balancer, the nginx LB droplets and
Prometheus reach, and the only web port the app firewall opens."""
SESSION_COOKIE = "session"
"""The app's session cookie (Flask's default name): its holder bypasses the micro-cache."""

SECURITY_HEADERS = (
    ("X-Content-Type-Options", '"nosniff"'),
    ("X-Frame-Options", '"DENY"'),
    ("Referrer-Policy", '"no-referrer"'),
    # An API's responses are data, never a page that loads, embeds or submits anything.
    ("Content-Security-Policy",
     "\"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'\""),
    # Empty (so not sent) unless the load balancer says the request came over HTTPS.
    ("Strict-Transport-Security", "$webstack_hsts"),
)
"""Headers nginx adds to every response (`always`: errors too), as nginx-quoted values."""


@dataclass(frozen=True, kw_only=True)
class DropletLayout:
    """Where things live on an app droplet and where its servers listen. Defaults are the
    droplet's; the lab, the bench and the tests move the directories and addresses."""

    root: str = "/opt/webstack"
    """Holds the app (`app_dir`) and its virtualenv (`venv`)."""
    user: str = "webstack"
    """The unprivileged system user gunicorn runs as."""
    env_file: str = "/etc/webstack/app.env"
    """The service's EnvironmentFile (`render_app_env`): secrets, root-owned, mode 0600; in the
    user data, or over SSH after boot with a deploy key (`install_env_script`)."""
    db_ca_file: str = "/etc/webstack/db-ca.pem"
    """The database cluster's CA certificate (not secret): the URIs' `sslrootcert`."""
    gunicorn_bind: str = "127.0.0.1:8000"
    """Where gunicorn listens and nginx proxies to: loopback only."""
    nginx_listen: str = str(APP_PORT)
    """The nginx site's listen address (`80`, `127.0.0.11:8080`)."""
    nginx_site: str = "/etc/nginx/sites-available/webstack"
    units_dir: str = "/etc/systemd/system"
    static_dir: str = ""
    """Flask's static folder, served by nginx at /static/; empty: `app_dir`/app/static."""
    nginx_exporter: str = "127.0.0.1:9113"
    """Where prometheus-nginx-exporter listens (nginx serves it as NGINX_METRICS_PATH)."""
    exporter_defaults: str = "/etc/default/prometheus-nginx-exporter"
    """The exporter's arguments (Debian's and Ubuntu's package read ARGS from it)."""
    cache_dir: str = MICROCACHE_DIR
    """nginx's micro-cache (`app.microcache`); made by the user data, owned by nginx."""

    def __post_init__(self):
        if not self.static_dir:
            object.__setattr__(self, "static_dir", f"{self.app_dir}/app/static")

    @property
    def app_dir(self) -> str:
        """Gunicorn's working directory: holds the `app` package."""
        return f"{self.root}/app"

    @property
    def bundle(self) -> str:
        """The `app/` package as shipped (`app_bundle`), unpacked into `app_dir` at boot."""
        return f"{self.root}/app.tar.gz"

    @property
    def venv(self) -> str:
        return f"{self.root}/venv"

    @property
    def gunicorn_conf(self) -> str:
        return f"{self.app_dir}/app/gunicorn.conf.py"

    def unit(self, name: str) -> str:
        return f"{self.units_dir}/{name}"


NGINX_STATUS_PATH = "/nginx_status"
"""nginx's stub status (connections, requests), for the exporter on loopback only."""
NGINX_METRICS_PATH = "/nginx-metrics"
"""The stub status as Prometheus metrics: what Prometheus scrapes, from the VPC only."""


def nginx_exporter_args(layout: DropletLayout) -> list[str]:
    """prometheus-nginx-exporter's arguments: it reads the droplet nginx's stub status and
    listens on loopback, behind nginx's NGINX_METRICS_PATH. Double dashes: both the stdlib
    flags of 0.11 (Debian 12) and the kingpin flags of 1.x accept them."""
    listen = layout.nginx_listen if ":" in layout.nginx_listen else \
        f"127.0.0.1:{layout.nginx_listen}"
    return [f"--nginx.scrape-uri=http://{listen}{NGINX_STATUS_PATH}",
            f"--web.listen-address={layout.nginx_exporter}"]


@dataclass(frozen=True)
class DropletFile:
    """One file an app droplet gets: cloud-init writes it, the lab writes it under its dirs."""

    path: str
    mode: int
    content: str | bytes
    owner: str = "root:root"


def render_nginx_site(
    settings: Settings,
    *,
    listen: str = "80",
    upstream: str = "127.0.0.1:8000",
    static_dir: str,
    metrics_allow: Sequence[str],
    trusted_proxies: Sequence[str] = (),
    upstream_keepalive: bool = True,
    nginx_exporter: str = DropletLayout.nginx_exporter,
    cache_dir: str = MICROCACHE_DIR,
) -> str:
    """The nginx site (a `server` and its `upstream`, included inside `http {}`).

    `listen` is an nginx listen address (`80`, `127.0.0.1:8080`), `upstream` gunicorn's
    (`127.0.0.1:8000`). `metrics_allow` lists the addresses or CIDRs that may read /metrics
    directly (the VPC, loopback); everyone else gets 403. `trusted_proxies` lists the load
    balancer's addresses (the VPC): the client address in their X-Forwarded-For becomes
    nginx's, and the app gets that one address (it trusts one hop). Both are exempt from
    `frontend.rateLimit`. `nginx_exporter` is prometheus-nginx-exporter's address, served to
    the same sources as /metrics at NGINX_METRICS_PATH. `upstream_keepalive`
    False makes nginx open a connection to gunicorn per request (the bench's comparison).
    `cache_dir` holds the micro-cache when `app.microcache` is on.
    """
    for source in [*metrics_allow, *trusted_proxies]:
        ipaddress.ip_network(source)  # ValueError names the bad address
    for name, path in (("static_dir", static_dir), ("cache_dir", cache_dir)):
        if not path.startswith("/"):
            raise ValueError(f"{name} {path!r} must be an absolute path")
    cache = settings.app.microcache
    return render_template(
        "nginx-site.conf.j2",
        listen=listen,
        upstream=upstream,
        upstream_keepalive=upstream_keepalive,
        keepalive_connections=settings.app.workers * settings.app.gunicorn_threads,
        upstream_keepalive_timeout=GUNICORN_KEEPALIVE - 1,
        gunicorn_keepalive=GUNICORN_KEEPALIVE,
        gunicorn_timeout=GUNICORN_TIMEOUT,
        proxy_timeout=PROXY_TIMEOUT,
        max_body_mb=settings.app.max_body_mb,
        health_path=settings.frontend.health_check.path,
        metrics_allow=list(metrics_allow),
        trusted_proxies=list(trusted_proxies),
        static_dir=static_dir.rstrip("/"),
        security_headers=SECURITY_HEADERS,
        site_names=[settings.fqdn] if settings.fqdn else [],
        rate_limit=settings.frontend.rate_limit,
        body_timeout=settings.frontend.body_timeout_seconds,
        rate_exempt=list(dict.fromkeys([*trusted_proxies, *metrics_allow])),
        nginx_status_path=NGINX_STATUS_PATH,
        nginx_metrics_path=NGINX_METRICS_PATH,
        nginx_exporter=nginx_exporter,
        microcache=cache.seconds and {"seconds": cache.seconds, "paths": cache.paths,
                                      "dir": cache_dir.rstrip("/")},
        session_cookie=SESSION_COOKIE,
    )


APP_UNIT = "webstack-app.service"
MIGRATE_UNIT = "webstack-migrate.service"
RUNTIME_DIRECTORY = "webstack"
"""The app unit's RuntimeDirectory= (under /run, `%t`), emptied by systemd at every start."""
UNIT_ENVIRONMENT = {"GUNICORN_WORKER_TMP_DIR": f"%t/{RUNTIME_DIRECTORY}",
                    "PROMETHEUS_MULTIPROC_DIR": f"%t/{RUNTIME_DIRECTORY}"}
"""The app unit's Environment=, added to its EnvironmentFile by systemd."""
UNIT_UNSET_ENVIRONMENT = ("DATABASE_MIGRATION_URL",)
"""The app unit's UnsetEnvironment=: in the EnvironmentFile for the migration unit only."""


def render_migrate_unit(layout: DropletLayout) -> str:
    """The one-shot unit running `python -m app.migrate` before the app, retried until it
    succeeds, in the app unit's sandbox."""
    return render_template(
        f"{MIGRATE_UNIT}.j2", app_unit=APP_UNIT, user=layout.user, app_dir=layout.app_dir,
        env_file=layout.env_file, venv=layout.venv, metadata_ip=METADATA_IP)


def render_app_unit(settings: Settings, layout: DropletLayout) -> str:
    """The systemd unit running gunicorn from `layout`, sandboxed (exposure below 2.5)."""
    return render_template(
        "webstack-app.service.j2",
        stack=settings.stack,
        user=layout.user,
        app_dir=layout.app_dir,
        env_file=layout.env_file,
        venv=layout.venv,
        gunicorn_conf=layout.gunicorn_conf,
        graceful_timeout=GUNICORN_GRACEFUL_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
        runtime_directory=RUNTIME_DIRECTORY,
        environment=UNIT_ENVIRONMENT,
        metadata_ip=METADATA_IP,
        unset_environment=UNIT_UNSET_ENVIRONMENT,
    )


@dataclass(frozen=True, kw_only=True)
class AppSecrets:
    """The secret values of the app's environment file, resolved from other resources.

    The one way a secret reaches an app droplet: `render_app_env` writes every field into the
    environment file, which travels either in the user data (a stack without a deploy key) or
    over SSH after boot (`components/app_tier.py`), never both. A new secret the app needs is a
    field here, so it takes the same path without further work.
    """

    database_url: str
    """The pool's URI, with the app user's password."""
    replica_urls: Sequence[str]
    """The read replicas' URIs, with the password."""
    migration_url: str | None
    """The primary's URI for `app.migrate`; None: migrations use `database_url`."""
    secret_key: str
    """Flask's SECRET_KEY, the same on every droplet."""


def render_app_env(settings: Settings, secrets: AppSecrets, *, bind: str) -> str:
    """The service's EnvironmentFile: every variable gunicorn and the app read.

    Values are double-quoted with `\\ " $ `` ` escaped: the subset of syntax systemd's
    EnvironmentFile and a POSIX shell (`set -a; . app.env`) read the same way.
    """
    for i, url in enumerate(secrets.replica_urls):
        if "," in url:
            raise ValueError(f"replica_urls[{i}] contains a comma, the list's separator")
    values = {
        "database_url": secrets.database_url,
        "replica_urls": ",".join(secrets.replica_urls),
        "secret_key": secrets.secret_key,
        "bind": bind,
    }
    return render_template(
        "webstack-app.env.j2",
        **{name: _quote(name, value) for name, value in values.items()},
        migration_url=secrets.migration_url and _quote("migration_url", secrets.migration_url),
        workers=settings.app.workers,
        threads=settings.app.gunicorn_threads,
        gunicorn_threads=gunicorn_threads(settings.app.gunicorn_threads),
        timeout=GUNICORN_TIMEOUT,
        graceful_timeout=GUNICORN_GRACEFUL_TIMEOUT,
        keepalive=GUNICORN_KEEPALIVE,
        db_pool_timeout=DB_POOL_TIMEOUT,
        db_connect_timeout=DB_CONNECT_TIMEOUT,
        db_statement_timeout_ms=DB_STATEMENT_TIMEOUT_MS,
        db_replica_retry_seconds=DB_REPLICA_RETRY_SECONDS,
        db_replica_max_lag_seconds=settings.database.max_replica_lag_seconds,
        db_replica_lag_sample_seconds=REPLICA_LAG_SAMPLE_SECONDS,
        max_body_mb=settings.app.max_body_mb,
    )


def droplet_files(
    settings: Settings,
    *,
    secrets: AppSecrets | None,
    vpc_cidr: str,
    db_ca: str,
    layout: DropletLayout,
    bundle: bytes | None = None,
    upstream_keepalive: bool = True,
) -> list[DropletFile]:
    """Every file an app droplet gets, at `layout`'s paths: the app bundle (when given; the
    lab runs the repo's app/ in place), the environment file (with `secrets`; None: it is
    delivered over SSH after boot, `install_env_script`), the database's CA certificate
    `db_ca` (PEM), both units and the nginx site. `vpc_cidr` is where the load balancer and
    Prometheus connect from."""
    site = render_nginx_site(
        settings, listen=layout.nginx_listen, upstream=layout.gunicorn_bind,
        static_dir=layout.static_dir, metrics_allow=[vpc_cidr, "127.0.0.1"],
        trusted_proxies=[vpc_cidr], upstream_keepalive=upstream_keepalive,
        nginx_exporter=layout.nginx_exporter, cache_dir=layout.cache_dir)
    exporter = f'ARGS="{" ".join(nginx_exporter_args(layout))}"\n'
    files = [DropletFile(layout.bundle, 0o644, bundle)] if bundle is not None else []
    if secrets is not None:
        files.append(DropletFile(layout.env_file, 0o600,
                                 render_app_env(settings, secrets, bind=layout.gunicorn_bind)))
    return files + [
        DropletFile(layout.db_ca_file, 0o644, db_ca),
        DropletFile(layout.unit(APP_UNIT), 0o644, render_app_unit(settings, layout)),
        DropletFile(layout.unit(MIGRATE_UNIT), 0o644, render_migrate_unit(layout)),
        DropletFile(layout.nginx_site, 0o644, site),
        DropletFile(layout.exporter_defaults, 0o644, exporter),
    ]


def install_env_script(layout: DropletLayout) -> str:
    """Shell lines run as root on an app droplet, the environment file on stdin (a stack with a
    deploy key, where it is not in the user data): replace `layout.env_file` in one move (root,
    0600), then restart the migrations (without waiting: they retry until the database grants
    exist) and the app, which reads the file only when it starts. Run again with a new file,
    they rotate the secrets in place."""
    env = shlex.quote(layout.env_file)
    return f"""umask 077
mkdir -p "$(dirname {env})" && cat > {env}.new && mv -f {env}.new {env} || exit 1
systemctl restart --no-block {MIGRATE_UNIT} || exit 1
systemctl restart {APP_UNIT} || exit 1
"""


def gunicorn_threads(threads: int) -> int:
    """gunicorn's threads per worker for `threads` request threads: one more, which database
    work never takes (DB_CONCURRENCY_LIMIT, app/db.py), so /healthz is answered while the
    database is stuck. 1 stays 1: sync workers, no spare thread (the bench's comparison)."""
    return threads + 1 if threads > 1 else 1


_ESCAPES = str.maketrans({c: "\\" + c for c in '\\"$`'})


def _quote(name: str, value: str) -> str:
    """`value` double-quoted for an environment file; never echoes it (it may be a secret)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{name} contains a control character; an environment file cannot hold it")
    return '"' + value.translate(_ESCAPES) + '"'
