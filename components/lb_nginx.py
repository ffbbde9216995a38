"""Pure renderers for the nginx load-balancer droplets (frontend mode `nginx`).

- `render_lb_nginx_conf`: the LB's nginx config from `cloud-init/nginx-lb.conf.j2`: the public
  server blocks (TLS by certbot, :80 redirect, proxy) and, when `upstreams` is given, the
  upstream block too (one file, as the local lab uses it).
- `render_lb_upstream`: the upstream block alone. On a droplet it is its own file,
  `UPSTREAM_PATH`, delivered after creation (see `components/frontend.py`), so that the
  droplet's user data never contains app IPs: user data forces replacement, and a new LB
  droplet on every app rollout would drop traffic.
- `render_lb_cloud_config`: the LB droplet's user data (`#cloud-config`, built as data and
  dumped with `yaml.safe_dump`): the metadata firewall first (`metadata_firewall`), nginx
  (+ certbot, a retrying first-certificate timer and its TLS hook, from
  `cloud-init/webstack-certbot.*.j2` and `webstack-tls-link.j2`, when the stack has a
  domain), the site config and a placeholder upstream that answers 503.

Functions of settings and plain values only, no Pulumi types: same input, same bytes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import yaml

from components.cloud_config import within_user_data_limit
from components.metadata_firewall import METADATA_IP, metadata_bootcmd
from components.render import render_template
from components.runtime import NGINX_PACKAGES, SECURITY_HEADERS
from components.settings import Settings

UPSTREAM_NAME = "webstack_app"
SITE_PATH = "/etc/nginx/conf.d/webstack-lb.conf"
UPSTREAM_PATH = "/etc/nginx/conf.d/webstack-upstream.conf"
ACME_WEBROOT = "/var/www/letsencrypt"
TLS_CERT = "/etc/nginx/tls/webstack.crt"
"""A symlink: to a self-signed placeholder at first boot, then to Let's Encrypt's fullchain."""
TLS_KEY = "/etc/nginx/tls/webstack.key"
PLACEHOLDER_PORT = 8081

# Passive health and retries (see the template for what each one does).
MAX_FAILS = 3
FAIL_TIMEOUT = "10s"
CONNECT_TIMEOUT = "2s"
READ_TIMEOUT = "35s"
NEXT_UPSTREAM_TRIES = 2
NEXT_UPSTREAM_TIMEOUT = "10s"
RATE_EXEMPT = ("127.0.0.1", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
"""Not counted by the LB's rate limit: loopback and the private ranges, where the VPC is (its
range may be DigitalOcean's choice, unknown when this config is rendered); no client on the
internet reaches the LB's public address from a private one."""
CLIENT_TIMEOUT = "10s"
"""client_header_timeout, client_body_timeout and send_timeout: a client that sends or reads
nothing for this long is cut off (a whole request header must arrive within it)."""
TLS_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384", "DHE-RSA-CHACHA20-POLY1305",
))
"""Mozilla's "intermediate" TLS 1.2 cipher list (ssl-config.mozilla.org, guidelines 5.7):
forward secrecy and AEAD only, so no CBC suite such as AES128-SHA. TLS 1.3's suites are
OpenSSL's defaults, all of them fine."""
LB_SECURITY_HEADERS = tuple(h for h in SECURITY_HEADERS if h[0] != "Strict-Transport-Security")
"""The droplet site's headers, on the LB's own responses too (its redirect, 502, 504); HSTS is
added by the TLS server alone."""

_SERVER = re.compile(r"^(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
_LISTEN = re.compile(r"^((\[[0-9A-Fa-f:]+\]|[0-9.]+|localhost):)?[0-9]{1,5}$")
_PATH = re.compile(r"^/[A-Za-z0-9._/-]*$")


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(f"{what}: {value!r} is not allowed in the nginx config")
    return value


def _render(*, upstreams: Sequence[str] | None, site: bool, **site_context) -> str:
    if upstreams is not None:
        upstreams = [_check(u, _SERVER, "upstream (host:port)") for u in upstreams]
    return render_template(
        "nginx-lb.conf.j2",
        upstreams=upstreams, site=site, upstream_name=UPSTREAM_NAME,
        max_fails=MAX_FAILS, fail_timeout=FAIL_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
        next_upstream_tries=NEXT_UPSTREAM_TRIES, next_upstream_timeout=NEXT_UPSTREAM_TIMEOUT,
        client_timeout=CLIENT_TIMEOUT, tls_ciphers=TLS_CIPHERS,
        security_headers=LB_SECURITY_HEADERS, **site_context,
    )


def render_lb_upstream(upstreams: Sequence[str], *,
                       placeholder_port: int = PLACEHOLDER_PORT) -> str:
    """The upstream block for `UPSTREAM_PATH`: app servers as "host:port", least_conn,
    passive health (max_fails/fail_timeout) and keepalive. An empty list renders a placeholder
    upstream answering 503 from a local server on `placeholder_port`, so nginx starts (and says
    why it cannot serve) before the real list arrives."""
    return _render(upstreams=list(upstreams), site=False, placeholder_port=int(placeholder_port))


def render_lb_nginx_conf(
    settings: Settings,
    *,
    upstreams: Sequence[str] | None,
    server_name: str,
    listen_http: str = "80",
    listen_https: str | None = "443",
    certificate: tuple[str, str] | None = None,
    static_dir: str | None = None,
    rate_exempt: Sequence[str] = ("127.0.0.1",),
) -> str:
    """The load balancer's nginx config (http context, for `conf.d/`).

    upstreams: app servers as "host:port"; None leaves the upstream block out (it is then
      expected in `UPSTREAM_PATH`, as on the droplets).
    server_name: the site's fqdn, or "_" for any name.
    listen_http / listen_https: nginx `listen` addresses ("80", "127.0.0.1:8443").
    certificate: (certificate, key) paths. With it, :80 serves only ACME challenges and the LB's
      own /healthz and redirects the rest to HTTPS on `listen_https`; without it, plain HTTP.
    static_dir: a directory served at /static/ by the LB; None proxies /static/ to the app.
    rate_exempt: addresses or CIDRs `frontend.rateLimit` does not count (the VPC, loopback).
    """
    _check(listen_http, _LISTEN, "listen_http")
    if certificate is not None:
        if listen_https is None:
            raise ValueError("certificate given but listen_https is None: nowhere to serve TLS")
        _check(listen_https, _LISTEN, "listen_https")
        for path in certificate:
            _check(path, _PATH, "certificate path")
    if static_dir is not None:
        _check(static_dir.rstrip("/"), _PATH, "static_dir")
    for source in rate_exempt:
        ipaddress.ip_network(source)  # ValueError names the bad address
    if not re.fullmatch(r"_|[a-z0-9.-]+", server_name):
        raise ValueError(f"server_name: {server_name!r} must be a DNS name or _")
    https_port = (listen_https or "443").rsplit(":", 1)[-1]
    return _render(
        upstreams=upstreams, site=True, max_body_mb=settings.app.max_body_mb,
        server_name=server_name, listen_http=listen_http, listen_https=listen_https,
        certificate=certificate, https_port_suffix="" if https_port == "443" else f":{https_port}",
        static_dir=static_dir.rstrip("/") if static_dir else None, acme_webroot=ACME_WEBROOT,
        rate_limit=settings.frontend.rate_limit, rate_exempt=list(rate_exempt),
        body_timeout=settings.frontend.body_timeout_seconds,
    )


# --------------------------------------------------------------------------- cloud-config

TLS_HOOK = "/usr/local/sbin/webstack-tls-link"
CERTBOT_UNIT = "webstack-certbot"
METADATA = f"http://{METADATA_IP}/metadata/v1"
"""Read by the certbot unit's ExecCondition, as root (the metadata firewall admits root)."""


class _Dumper(yaml.SafeDumper):
    """yaml.safe_dump, with multi-line strings (file contents) as readable `|` blocks."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def render_lb_cloud_config(settings: Settings) -> str:
    """User data for an nginx LB droplet. Depends on settings only, never on app IPs."""
    fqdn = settings.fqdn
    site = render_lb_nginx_conf(
        settings, upstreams=None, server_name=fqdn or "_",
        certificate=(TLS_CERT, TLS_KEY) if fqdn else None,
        rate_exempt=RATE_EXEMPT,
    )
    files = [
        {"path": SITE_PATH, "content": site},
        {"path": UPSTREAM_PATH, "content": render_lb_upstream(())},
    ]
    # Debian's default site also claims port 80; nginx is restarted once ours is in place.
    runcmd = ["rm -f /etc/nginx/sites-enabled/default"]
    packages = [*NGINX_PACKAGES, "curl"]
    if fqdn:
        packages.append("certbot")
        values = {"fqdn": fqdn, "cert": TLS_CERT, "key": TLS_KEY, "webroot": ACME_WEBROOT,
                  "email": settings.alerts.emails[0], "metadata": METADATA, "hook": TLS_HOOK}
        files += [
            {"path": TLS_HOOK, "permissions": "0755",
             "content": render_template("webstack-tls-link.j2", **values)},
            {"path": f"/etc/systemd/system/{CERTBOT_UNIT}.service",
             "content": render_template(f"{CERTBOT_UNIT}.service.j2", **values)},
            {"path": f"/etc/systemd/system/{CERTBOT_UNIT}.timer",
             "content": render_template(f"{CERTBOT_UNIT}.timer.j2")},
        ]
        # nginx needs a certificate to start: a self-signed one until Let's Encrypt's arrives.
        runcmd += [
            f"mkdir -p {ACME_WEBROOT} /etc/nginx/tls",
            "openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=" + fqdn
            + " -keyout /etc/nginx/tls/selfsigned.key -out /etc/nginx/tls/selfsigned.crt",
            "chmod 600 /etc/nginx/tls/selfsigned.key",
            f"ln -sfn /etc/nginx/tls/selfsigned.crt {TLS_CERT}",
            f"ln -sfn /etc/nginx/tls/selfsigned.key {TLS_KEY}",
        ]
    runcmd += ["systemctl enable nginx", "nginx -t && systemctl restart nginx"]
    if fqdn:
        runcmd += ["systemctl daemon-reload", f"systemctl enable --now {CERTBOT_UNIT}.timer",
                   f"systemctl start --no-block {CERTBOT_UNIT}.service"]
    config = {
        "bootcmd": [metadata_bootcmd()],
        "package_update": True,
        "packages": packages,
        # Deferred: written after the packages are installed, so nginx's first start (by the
        # package) uses Debian's defaults and ours are checked with `nginx -t` in runcmd.
        "write_files": [{"permissions": "0644", **f, "defer": True} for f in files],
        "runcmd": runcmd,
    }
    text = "#cloud-config\n" + yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=1000)
    return within_user_data_limit(text, "LB droplet")
