"""Health-gated rolling replacement of the app droplets (AppTier with a deploy key).

Under the mocks: a new app bundle changes every droplet's user data (so each is replaced), each
droplet gets a gate triggered by it, and droplet i+1 waits for gate i. The gate's script is then
run for real with stand-ins for cloud-init, curl and sleep.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pulumi
import pytest

from components.app_tier import AppTier, health_gate_script
from components.cloud_config import render_app_cloud_config
from components.frontend import WebSource
from components.runtime import APP_UNIT, MIGRATE_UNIT, DropletLayout
from components.stack import app_tier_args
from tests.factories import make_settings, settings_for
from tools.mocks import Run, run_function

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nmock\n-----END OPENSSH PRIVATE KEY-----\n"
ADMIN = ["203.0.113.7/32"]
GATE = "command:remote:Command"


def run_tier(settings, user_data: str = "#cloud-config\n", **args) -> Run:
    def program():
        tier = AppTier("app", app_tier_args(
            settings, vpc_id="vpc-1", ssh_keys=["deploy"],
            web_source=WebSource(load_balancer_uids=["lb-uid-1"]),
            user_data=pulumi.Output.secret(user_data), **args))
        pulumi.export("droplet_ids", tier.droplet_ids)

    return run_function(program, stack=settings.stack)


def user_data(settings, bundle: bytes) -> str:
    return render_app_cloud_config(settings, secrets=None, vpc_cidr="10.20.0.0/20", bundle=bundle)


def by_index(resources) -> list:
    return sorted(resources, key=lambda r: int(r.name.rsplit("-", 1)[1]))


def test_a_new_app_bundle_changes_the_user_data_of_every_droplet():
    settings = settings_for("prod", adminCidrs=ADMIN)
    runs = [run_tier(settings, user_data(settings, bundle), ssh_private_key=KEY)
            for bundle in (b"bundle v1", b"bundle v2")]
    old, new = (by_index(run.of_type("index/droplet:Droplet")) for run in runs)
    assert len(old) == len(new) == settings.app.droplet_count == 3
    for before, after in zip(old, new, strict=True):
        assert before.inputs["userData"] != after.inputs["userData"]
        # userData forces replacement; nothing else about the droplet changes.
        assert {k: v for k, v in before.inputs.items() if k != "userData"} == {
            k: v for k, v in after.inputs.items() if k != "userData"}
        assert not after.delete_before_replace, "replacements are created before deletes"


def test_one_gate_per_droplet_and_each_droplet_waits_for_the_previous_gate():
    settings = settings_for("prod", adminCidrs=ADMIN)
    run = run_tier(settings, ssh_private_key=KEY)
    droplets = by_index(run.of_type("index/droplet:Droplet"))
    gates = by_index(run.of_type(GATE))
    assert [g.name for g in gates] == ["app-gate-0", "app-gate-1", "app-gate-2"]
    gate_urns = {g.urn for g in gates}
    firewall = run.one("index/firewall:Firewall")
    ids = run.outputs["droplet_ids"]
    for i, (droplet, gate) in enumerate(zip(droplets, gates, strict=True)):
        assert gate.inputs["triggers"] == [ids[i]], "re-runs when its droplet is replaced"
        assert droplet.urn in gate.depends_on and firewall.urn in gate.depends_on
        assert gate.parent == run.one("AppTier").urn
        waits_for = gate_urns & set(droplet.depends_on)
        assert waits_for == ({gates[i - 1].urn} if i else set()), droplet.name
        assert firewall.urn in droplet.depends_on
    assert not run.warnings


def test_the_gate_logs_in_with_the_secret_key_and_waits_for_cloud_init_and_healthz():
    settings = make_settings(adminCidrs=ADMIN)
    run = run_tier(settings, ssh_private_key=KEY)
    gate, droplet = run.one(GATE), run.one("index/droplet:Droplet")
    assert "connection" in gate.secret_inputs, "the SSH private key stays secret"
    for resource in run.resources:  # and appears nowhere else
        assert not [k for k, v in resource.inputs.items()
                    if "PRIVATE KEY" in str(v) and k not in resource.secret_inputs], resource.name
    connection = gate.inputs["connection"]
    assert (connection["host"], connection["user"], connection["privateKey"]) == (
        droplet.outputs["ipv4Address"], "root", KEY)
    script = gate.inputs["create"]
    assert script == health_gate_script(settings.frontend.health_check)
    assert "cloud-init status --wait" in script and "http://127.0.0.1/healthz" in script


def test_with_the_environment_file_each_gate_delivers_it_as_a_secret_stdin():
    settings = make_settings(adminCidrs=ADMIN)
    run = run_tier(settings, ssh_private_key=KEY, app_env=pulumi.Output.secret('K="v"\n'))
    gate = run.one(GATE)
    assert gate.inputs["stdin"] == 'K="v"\n' and "stdin" in gate.secret_inputs
    assert gate.inputs["create"] == health_gate_script(settings.frontend.health_check,
                                                       install_env=DropletLayout())
    with pytest.raises(Exception, match="app_env is delivered by the gates over SSH"):
        run_tier(settings, app_env="K=v\n")


@pytest.mark.parametrize("args, reason", [({}, "no sshPrivateKey"),
                                          ({"ssh_private_key": KEY}, "adminCidrs is empty")])
def test_without_a_key_or_admin_cidrs_there_are_no_gates_and_one_warning(args, reason):
    run = run_tier(dataclasses.replace(settings_for("prod"), admin_cidrs=()), **args)
    assert not run.of_type(GATE)
    assert len(run.warnings) == 1 and "not health-gated" in run.warnings[0], run.warnings
    assert reason in run.warnings[0]
    for droplet in run.of_type("index/droplet:Droplet"):
        assert droplet.depends_on == (run.one("index/firewall:Firewall").urn,)


# --------------------------------------------------------------------------- the gate, run


@pytest.fixture
def gate(tmp_path: Path):
    """Runs the gate script with stand-ins: `cloud-init` exits $CLOUD_INIT_EXIT, `curl` answers
    the HTTP codes in $CODES one per call (logging its arguments), `sleep` returns at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "cloud-init": 'echo "status: $*" >&2; exit "${CLOUD_INIT_EXIT:-0}"',
        "curl": f'echo "$*" >> {tmp_path}/curl.log\n'
                f'n=$(wc -l < {tmp_path}/curl.log)\n'
                'code=$(echo $CODES | cut -d" " -f"$n"); printf %s "${code:-000}"\n'
                '[ "${code:-000}" -lt 400 ] 2>/dev/null',
        "sleep": "exit 0",
        "systemctl": f'echo "$*" >> {tmp_path}/systemctl.log; exit "${{SYSTEMCTL_EXIT:-0}}"',
    }
    for name, body in stubs.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    hc = make_settings(frontend={"healthCheck": {"intervalSeconds": 10,
                                                 "healthyThreshold": 3}}).frontend.health_check

    def run(codes: str, cloud_init_exit: int = 0, *, install_env: DropletLayout | None = None,
            stdin: str | None = None, systemctl_exit: int = 0) -> tuple[int, int]:
        log = tmp_path / "curl.log"
        log.write_text("")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CODES": codes,
               "CLOUD_INIT_EXIT": str(cloud_init_exit), "SYSTEMCTL_EXIT": str(systemctl_exit)}
        done = subprocess.run(["sh", "-c", health_gate_script(hc, install_env=install_env)],
                              env=env, input=stdin, capture_output=True, text=True, timeout=30)
        calls = log.read_text().splitlines()
        assert all("http://127.0.0.1/healthz" in call for call in calls)
        return done.returncode, len(calls)

    return run


def test_gate_passes_after_threshold_answers_in_a_row(gate):
    assert gate("000 502 200 200 200") == (0, 5)


def test_gate_fails_when_cloud_init_failed_without_asking_the_app(gate):
    assert gate("200 200 200", cloud_init_exit=1) == (1, 0)


def test_gate_passes_cloud_init_done_with_recoverable_errors(gate):
    assert gate("200 200 200", cloud_init_exit=2) == (0, 3)


def test_a_gate_with_the_environment_file_installs_it_restarts_and_then_checks(gate, tmp_path):
    """With a deploy key the gate's stdin is the environment file: written in one move, mode
    0600, then the migrations (not waited for) and the app restarted, then the usual checks. A
    second run with a new file (a rotation) replaces it."""
    layout = DropletLayout(env_file=str(tmp_path / "etc/webstack/app.env"))
    env_file = Path(layout.env_file)
    assert gate("200 200 200", install_env=layout, stdin='SECRET_KEY="one"\n') == (0, 3)
    assert env_file.read_text() == 'SECRET_KEY="one"\n'
    assert env_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        f"restart --no-block {MIGRATE_UNIT}", f"restart {APP_UNIT}"]
    assert gate("200 200 200", install_env=layout, stdin='SECRET_KEY="two"\n') == (0, 3)
    assert env_file.read_text() == 'SECRET_KEY="two"\n'
    assert not list(env_file.parent.glob("*.new"))
    # An app that does not restart fails the gate before any check.
    assert gate("200 200 200", install_env=layout, stdin="", systemctl_exit=1) == (1, 0)


def test_gate_fails_within_its_bound_when_health_flaps_or_redirects(gate):
    # 120 s grace + 3 x 10 s: 15 checks, never 3 good answers in a row.
    assert gate(" ".join(["200", "200", "503"] * 10)) == (1, 15)
    assert gate(" ".join(["301"] * 20)) == (1, 15), "the LB counts only 2xx"
