"""The app droplet's user data: one pure function from settings and resolved values.

`render_app_cloud_config` returns the `#cloud-config` document every app droplet boots with:
the metadata firewall first (`metadata_firewall`, bootcmd), nginx and a Python venv, an
unprivileged service user, the files of `runtime.droplet_files` (the `app/` package, bundled so
the droplet runs exactly the reviewed commit, the hardened systemd units, the nginx site and,
without a deploy key, the environment file with the database URLs and the secret key; the lab
writes the same list), then migrations (once, under an advisory lock) and the services. With a
deploy key the environment file, the only file with secrets, is not in the user data: the
services are enabled, and started by the step that delivers it over SSH
(`runtime.install_env_script`).
Built as data and dumped with `yaml.safe_dump`, so identical inputs give byte-identical output
and droplets are replaced only when something changed.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
from pathlib import Path

import yaml

from components.metadata_firewall import metadata_bootcmd
from components.runtime import (
    APP_UNIT,
    MIGRATE_UNIT,
    NGINX_PACKAGES,
    AppSecrets,
    DropletFile,
    DropletLayout,
    droplet_files,
)
from components.settings import Settings

APP_DIR = Path(__file__).resolve().parent.parent / "app"
USER_DATA_LIMIT = 64 * 1024
"""DigitalOcean refuses user data over 64 KiB."""


def within_user_data_limit(text: str, what: str, hint: str = "") -> str:
    """`text`, the user data of `what`; ValueError when it is over `USER_DATA_LIMIT`."""
    size = len(text.encode())
    if size > USER_DATA_LIMIT:
        raise ValueError(f"{what} user data is {size} bytes, over DigitalOcean's"
                         f" {USER_DATA_LIMIT} limit" + (f"; {hint}" if hint else ""))
    return text

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


def _write_file(file: DropletFile) -> dict[str, object]:
    """A `write_files` entry (owner root:root, cloud-init's default, left implicit)."""
    entry: dict[str, object] = {"path": file.path}
    if isinstance(file.content, bytes):
        entry["encoding"] = "b64"
    entry["permissions"] = f"{file.mode:04o}"
    entry["content"] = (base64.b64encode(file.content).decode()
                        if isinstance(file.content, bytes) else file.content)
    if file.owner != "root:root":
        entry["owner"] = file.owner
    return {**entry, "defer": True}


def render_app_cloud_config(
    settings: Settings,
    *,
    secrets: AppSecrets | None,
    vpc_cidr: str,
    db_ca: str,
    bundle: bytes | None = None,
    layout: DropletLayout | None = None,
) -> str:
    """The user data of an app droplet; `secrets` None leaves the environment file out (it is
    delivered over SSH). Raises ValueError if it exceeds DigitalOcean's limit."""
    bundle = app_bundle() if bundle is None else bundle
    layout = layout or DropletLayout()
    files = droplet_files(settings, secrets=secrets, vpc_cidr=vpc_cidr, db_ca=db_ca,
                          layout=layout, bundle=bundle)
    # Migrations first, without blocking boot: the unit retries until they succeed. Without
    # the environment file the services cannot start: enabled only, until it arrives.
    services = [["systemctl", "enable", "--now", "--no-block", MIGRATE_UNIT],
                ["systemctl", "enable", "--now", APP_UNIT]] if secrets is not None else [
        ["systemctl", "enable", MIGRATE_UNIT, APP_UNIT]]
    document = {
        "bootcmd": [metadata_bootcmd()],
        "package_update": True,
        "packages": [*NGINX_PACKAGES, "python3-venv", "prometheus-nginx-exporter"],
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
        "write_files": [_write_file(f) for f in files],
        "runcmd": [
            ["mkdir", "-p", layout.app_dir],
            ["tar", "-xzf", layout.bundle, "-C", layout.app_dir,
             "--no-same-owner"],
            ["python3", "-m", "venv", layout.venv],
            [f"{layout.venv}/bin/pip", "install", "--no-cache-dir",
             "--disable-pip-version-check", "-r", f"{layout.app_dir}/app/requirements.txt"],
            ["systemctl", "daemon-reload"],
            *services,
            # The micro-cache's directory (app.microcache), nginx's alone.
            ["install", "-d", "-o", "www-data", "-g", "www-data", "-m", "0700",
             layout.cache_dir],
            ["rm", "-f", "/etc/nginx/sites-enabled/default"],
            ["ln", "-sf", layout.nginx_site, "/etc/nginx/sites-enabled/webstack"],
            ["sh", "-c", "nginx -t && systemctl reload nginx"],
            # The package started it before its arguments were written.
            ["systemctl", "restart", "prometheus-nginx-exporter"],
        ],
    }
    text = "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1000)
    return within_user_data_limit(text, "app droplet",
                                  "shrink app/ (it is bundled into the user data)")
