"""gixy-ng, nginx's configuration analyzer, over every nginx configuration the program renders:
the droplet site and the nginx load balancer with and without a domain.

A finding fails the test unless JUSTIFIED names it (configuration, check) with the reason it is
right as it is; a justification nothing needs any more fails too, so the list stays true.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.lb_nginx import TLS_CERT, TLS_KEY, render_lb_nginx_conf, render_lb_upstream
from components.runtime import render_nginx_site
from tests.factories import settings_for

VPC = "10.10.0.0/16"

CONFIGS = {
    "droplet-site": lambda: render_nginx_site(
        settings_for("prod"), static_dir="/srv/webstack/static", metrics_allow=[VPC],
        trusted_proxies=[VPC]),
    "lb-with-domain": lambda: render_lb_nginx_conf(
        settings_for("prod"), upstreams=["10.10.0.5:80", "10.10.0.6:80"],
        server_name="www.example.com", certificate=(TLS_CERT, TLS_KEY)),
    "lb-without-domain": lambda: render_lb_nginx_conf(
        settings_for("staging"), upstreams=None, server_name="_") + render_lb_upstream([]),
}

JUSTIFIED = {
    ("droplet-site", "return_bypasses_allow_deny"):
        # location = /metrics: `if ($webstack_relayed) { return 403; }` runs before allow/deny,
        # and what it returns is itself the refusal (a request relayed by the load balancer);
        # every other request still meets allow/deny. Nothing is let through by it.
        "the return that bypasses allow/deny is a 403 for relayed requests",
}


def findings(name: str, tmp: Path) -> list[dict]:
    conf = tmp / f"{name}.conf"
    conf.write_text("events {}\nhttp {\n" + CONFIGS[name]() + "\n}\n")
    result = subprocess.run([sys.executable, "-m", "gixy", "-f", "json", str(conf)],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().startswith("["), result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gixy_finds_nothing_unjustified(name, tmp_path):
    found = findings(name, tmp_path)
    left = [f"{f['plugin']} (line {f['line']}): {f['summary']}" for f in found
            if (name, f["plugin"]) not in JUSTIFIED]
    assert not left, left
    needed = {(name, f["plugin"]) for f in found}
    stale = [key for key in JUSTIFIED if key[0] == name and key not in needed]
    assert not stale, f"justified but no longer found: {stale}"
