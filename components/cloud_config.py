"""The app droplet's user data: one pure function from settings and resolved values.

`render_app_cloud_config` returns the `#cloud-config` document every app droplet boots with:
nginx and a Python venv, an unprivileged service user, the `app/` package (bundled, so the
droplet runs exactly the reviewed commit), the gunicorn config, the hardened systemd unit, the
nginx site and the environment file with the database URLs; then migrations (once, under an
advisory lock) and the services. Built as data and dumped with `yaml.safe_dump`, so identical
inputs give byte-identical output and droplets are replaced only when something changed.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from components.runtime import (
    APP_UNIT,
    MIGRATE_UNIT,
    DropletLayout,
    render_app_env,
    render_app_unit,
    render_migrate_unit,
    render_nginx_site,
)
from components.settings import Settings

APP_DIR = Path(__file__).resolve().parent.parent / "app"
USER_DATA_LIMIT = 64 * 1024
"""DigitalOcean refuses user data over 64 KiB."""

_SKIP = {"__pycache__", ".pytest_cache"}


def app_bundle(app_dir: Path = APP_DIR) -> bytes:
    """The `app/` package as a reproducible tar.gz: sorted, no timestamps, no owners."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(
        fileobj=gz, mode="w", format=tarfile.PAX_FORMAT
    ) as tar:
        for path in sorted(app_dir.rglob("*")):
            rel = path.relative_to(app_dir.parent)
            if _SKIP & set(rel.parts) or path.suffix == ".pyc" or not path.is_file():
                continue
            info = tarfile.TarInfo(str(rel))
            data = path.read_bytes()
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def render_app_cloud_config(
    settings: Settings,
    *,
    database_url: str,
    replica_urls: Sequence[str],
    migration_url: str,
    secret_key: str,
    vpc_cidr: str,
    bundle: bytes | None = None,
    layout: DropletLayout | None = None,
) -> str:
    """The user data of an app droplet. Raises ValueError if it exceeds DigitalOcean's limit."""
    bundle = app_bundle() if bundle is None else bundle
    layout = layout or DropletLayout()
    site = render_nginx_site(
        settings,
        listen="80",
        upstream=layout.gunicorn_bind,
        static_dir=layout.static_dir,
        metrics_allow=[vpc_cidr, "127.0.0.1"],
        trusted_proxies=[vpc_cidr],
    )
    env = render_app_env(
        settings,
        database_url=database_url,
        replica_urls=replica_urls,
        secret_key=secret_key,
        migration_url=migration_url,
        bind=layout.gunicorn_bind,
    )
    unit_name, migrate_unit = APP_UNIT, MIGRATE_UNIT
    document = {
        "package_update": True,
        "packages": ["nginx", "python3-venv"],
        "users": [
            "default",
            # Home /nonexistent (Debian's for system users): libpq looks for a client
            # certificate under $HOME/.postgresql with sslmode=require, and /home/<user> under
            # the unit's ProtectHome=yes answers EACCES, which fails the connection (found by
            # `make boot`); a missing home is "no certificate".
            {"name": layout.user, "system": True, "shell": "/usr/sbin/nologin",
             "homedir": "/nonexistent", "no_create_home": True, "lock_passwd": True},
        ],
        # Deferred to the final stage: after packages and users exist.
        "write_files": [
            {"path": f"{layout.root}/app.tar.gz", "encoding": "b64", "permissions": "0644",
             "content": base64.b64encode(bundle).decode(), "defer": True},
            {"path": layout.env_file, "permissions": "0600", "content": env, "defer": True},
            {"path": f"/etc/systemd/system/{unit_name}", "permissions": "0644",
             "content": render_app_unit(settings, layout), "defer": True},
            {"path": f"/etc/systemd/system/{migrate_unit}", "permissions": "0644",
             "content": render_migrate_unit(layout), "defer": True},
            {"path": "/etc/nginx/sites-available/webstack", "permissions": "0644",
             "content": site, "defer": True},
        ],
        "runcmd": [
            ["mkdir", "-p", layout.app_dir],
            ["tar", "-xzf", f"{layout.root}/app.tar.gz", "-C", layout.app_dir,
             "--no-same-owner"],
            ["python3", "-m", "venv", layout.venv],
            [f"{layout.venv}/bin/pip", "install", "--no-cache-dir",
             "--disable-pip-version-check", "-r", f"{layout.app_dir}/app/requirements.txt"],
            ["systemctl", "daemon-reload"],
            # Migrations first, without blocking boot: the unit retries until they succeed.
            ["systemctl", "enable", "--now", "--no-block", migrate_unit],
            ["systemctl", "enable", "--now", unit_name],
            ["rm", "-f", "/etc/nginx/sites-enabled/default"],
            ["ln", "-sf", "/etc/nginx/sites-available/webstack",
             "/etc/nginx/sites-enabled/webstack"],
            ["sh", "-c", "nginx -t && systemctl reload nginx"],
        ],
    }
    text = "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1000)
    size = len(text.encode())
    if size > USER_DATA_LIMIT:
        raise ValueError(
            f"app droplet user data is {size} bytes, over DigitalOcean's {USER_DATA_LIMIT} limit;"
            " shrink app/ (it is bundled into the user data)"
        )
    return text
