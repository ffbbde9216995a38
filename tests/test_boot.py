"""`make boot` (lab/boot.py, lab/boot_net.py): the pure parts here; the boot itself runs for real
with WEBSTACK_BOOT_TESTS=1 (root, systemd-nspawn; `.ci/run` sets it after `make boot`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import yaml

from lab import boot_net
from lab.boot import (
    BROKEN_EXEC,
    BROKEN_PACKAGE,
    ROOT,
    _seconds,
    break_user_data,
    database_endpoints,
    registered,
)


@pytest.fixture(scope="module")
def prod():
    return registered("prod")


def test_every_droplet_is_booted_from_the_user_data_the_program_registers(prod):
    run, vpc, droplets = prod
    registered_data = {r.name: r.inputs["userData"] for r in run.of_type("index/droplet:Droplet")}
    assert {d["name"]: d["user_data"] for d in droplets} == registered_data
    assert [d["role"] for d in droplets] == ["app", "app", "app"]
    assert vpc == "10.20.0.0/20"


def test_the_nginx_frontend_stack_boots_its_lb_droplet_too():
    _, _, droplets = registered(str(ROOT / "tests/stacks/Pulumi.prod-nginx.yaml"))
    assert [d["role"] for d in droplets] == ["app", "app", "app", "lb"]


def test_the_database_endpoints_are_the_env_files_urls(prod):
    _, _, droplets = prod
    endpoints = database_endpoints(droplets[0]["env"])
    assert sorted(endpoints) == ["DATABASE_MIGRATION_URL", "DATABASE_REPLICA_URLS",
                                 "DATABASE_URL"]
    host, port, user, password, database = endpoints["DATABASE_URL"]
    assert (host.startswith("private-prod-db-pool"), port, user, database) == (
        True, 25061, "app", "app")
    assert password


def test_the_broken_variant_has_a_missing_package_and_a_bad_exec_start(prod):
    _, _, droplets = prod
    broken = yaml.safe_load(break_user_data(droplets[0]["user_data"]))
    assert BROKEN_PACKAGE in broken["packages"]
    drop_in = next(f["content"] for f in broken["write_files"]
                   if f["path"].endswith("webstack-app.service.d/broken.conf"))
    assert f"ExecStart=\nExecStart={BROKEN_EXEC} " in drop_in
    original = yaml.safe_load(droplets[0]["user_data"])["write_files"]
    assert all(f in broken["write_files"] for f in original)


@pytest.mark.parametrize("span, seconds", [("5s", 5), ("100ms", 0.1), ("1min 30s", 90)])
def test_systemd_time_spans(span, seconds):
    assert _seconds(span) == pytest.approx(seconds)


@pytest.mark.parametrize("host, ok", [("deb.debian.org", True), ("PyPI.org.", True),
                                      ("example.com", False), ("10.20.0.1", False)])
def test_the_proxy_forwards_to_the_registries_only(host, ok):
    assert boot_net.allowed(host) is ok


def test_the_proxy_refuses_other_hosts_without_connecting():
    async def ask() -> bytes:
        server = await asyncio.start_server(boot_net._proxy_client, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        server.close()
        return answer

    loop = asyncio.new_event_loop()  # not asyncio.run: it unsets the loop the mocks use
    try:
        assert loop.run_until_complete(ask()).startswith(b"HTTP/1.1 403")
    finally:
        loop.close()


BOOT = os.environ.get("WEBSTACK_BOOT_TESTS") == "1"


@pytest.mark.skipif(not BOOT, reason="boots a container: WEBSTACK_BOOT_TESTS=1 (root, .ci/run)")
def test_a_broken_user_data_fails_the_boot_naming_the_steps(tmp_path):
    report_path = tmp_path / "boot-report.json"
    done = subprocess.run(
        [sys.executable, "-m", "lab.boot", "staging", "--break", "--droplets", "1",
         "--report", str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(report_path.read_text())
    failed = {c["step"]: c["detail"] for c in report["droplets"][0]["checks"] if c["ok"] is False}
    assert not report["passed"]
    assert BROKEN_PACKAGE in failed["cloud-init"], failed
    assert "webstack-app.service" in " ".join(failed), failed
