"""The Prometheus droplet's files, checked by the real tools (Debian's promtool and amtool,
installed by scripts/install-system-deps.sh): the configuration and the rules as cloud-init
writes them, Alertmanager's routes (and their delivery over SSH with a deploy key), and
`promtool test rules` over every alert rule."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pulumi
import pytest
import yaml

from components import cost
from components.prometheus import (
    ALERTMANAGER_PATH,
    CONFIG_PATH,
    INSTALL_ALERTMANAGER,
    RULES_PATH,
    TARGETS_PATH,
    PrometheusServer,
    alert_rules,
    render_alertmanager_config,
    render_prometheus_cloud_config,
    render_rules,
    render_targets,
)
from components.settings import droplet_size
from components.stack import prometheus_args
from tests.factories import DEPLOY_KEY, SLACK_URL, settings_for
from tests.runtime_helpers import cloud_init_schema
from tools.mocks import Resource, Run, run_function, run_program

ROOT = Path(__file__).resolve().parent.parent

RULE_TESTS = Path(__file__).with_name("prometheus") / "rules_test.yml"
SMTP = {"smarthost": "smtp.example.com:587", "from": "alerts@example.com",
        "username": "apikey", "password": "smtp-secret-password"}


def _settings(**monitoring):
    return settings_for("prod", monitoring={"prometheus": True, **monitoring})


def _tool(*args: str) -> subprocess.CompletedProcess:
    assert shutil.which(args[0]), f"{args[0]} is installed by scripts/install-system-deps.sh"
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _written(user_data: str) -> dict[str, str]:
    document = yaml.safe_load(user_data)
    return {entry["path"]: entry["content"] for entry in document["write_files"]}


@pytest.mark.parametrize("over_ssh", [True, False], ids=["placeholder", "secrets"])
def test_what_cloud_init_writes_passes_promtool_and_amtool(tmp_path, over_ssh):
    """At the droplet's own paths: /etc/prometheus is this test's, in a mount namespace. With a
    deploy key Alertmanager starts from a placeholder that sends nothing and holds no secret
    (the real file comes over SSH); without one, from the real file."""
    settings = _settings(smtp=SMTP)
    user_data = render_prometheus_cloud_config(settings, over_ssh=over_ssh)
    schema = cloud_init_schema(user_data, tmp_path)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    etc = tmp_path / "etc-prometheus"
    etc.mkdir()
    files = _written(user_data)
    for path in (CONFIG_PATH, RULES_PATH, TARGETS_PATH, ALERTMANAGER_PATH):
        assert path.startswith("/etc/prometheus/")
        (etc / Path(path).name).write_text(files[path])
    checks = (f"promtool check config {CONFIG_PATH} && promtool check rules {RULES_PATH}"
              f" && amtool check-config {ALERTMANAGER_PATH}")
    checked = _tool("unshare", "-m", "sh", "-ec",
                    f"mount --bind {etc} /etc/prometheus && {checks}")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout
    assert f"SUCCESS: {len(alert_rules(settings.alerts))} rules found" in checked.stdout
    assert " - 1 receivers" in checked.stdout
    assert json.loads(files[TARGETS_PATH]) == [{"targets": []}]  # until the deploy writes it
    assert (files[ALERTMANAGER_PATH] == render_alertmanager_config(settings)) is not over_ssh
    assert (SLACK_URL in user_data and SMTP["password"] in user_data) is not over_ssh


def test_alertmanager_sends_every_alert_to_the_emails_and_slack():
    config = yaml.safe_load(render_alertmanager_config(_settings(smtp=SMTP)))
    [receiver] = config["receivers"]
    assert config["route"]["receiver"] == receiver["name"]
    assert [e["to"] for e in receiver["email_configs"]] == ["ops@example.com"]
    assert receiver["slack_configs"][0]["api_url"] == SLACK_URL
    assert receiver["slack_configs"][0]["channel"] == "#ops"
    assert config["global"]["smtp_auth_password"] == SMTP["password"]
    slack_only = yaml.safe_load(render_alertmanager_config(_settings()))
    assert "email_configs" not in slack_only["receivers"][0] and "global" not in slack_only


def test_the_targets_file_lists_each_app_droplet_s_nginx():
    assert json.loads(render_targets(["10.20.0.5", "10.20.0.6"])) == [
        {"targets": ["10.20.0.5:80", "10.20.0.6:80"]}]


def _test_rules(tmp_path: Path, rules: str) -> subprocess.CompletedProcess:
    (tmp_path / "webstack-rules.yml").write_text(rules)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return _tool("promtool", "test", "rules", str(tmp_path / RULE_TESTS.name))


def test_promtool_unit_tests_cover_every_alert_and_pass(tmp_path):
    """Each alert has a case with series that fire it and series (or a time) that must not."""
    alerts = _settings().alerts
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert tested == {rule.name for rule in alert_rules(alerts)}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        expected = [bool(case["exp_alerts"]) for case in test["alert_rule_test"]]
        assert True in expected and False in expected, test["name"]
    result = _test_rules(tmp_path, render_rules(alerts))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_alerts_that_fire_too_soon(tmp_path):
    result = _test_rules(tmp_path, render_rules(_settings().alerts, hold="0s"))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_rendering_is_byte_identical():
    settings = _settings(smtp=SMTP)
    for over_ssh in (True, False):
        assert render_prometheus_cloud_config(settings, over_ssh=over_ssh) == \
            render_prometheus_cloud_config(settings, over_ssh=over_ssh)


# --------------------------------------------------------------------------- Alertmanager's secrets


def _prometheus(settings) -> Run:
    """The PrometheusServer of `settings` under the mocks; exports its droplet's id."""
    def program():
        server = PrometheusServer("prom", prometheus_args(
            settings, vpc_id="vpc-1", ssh_keys=["deploy"], app_private_ips=["10.20.0.5"],
            ssh_private_key=pulumi.Output.secret(DEPLOY_KEY)
            if settings.ssh_private_key else None))
        pulumi.export("droplet_id", server.droplet_id)

    return run_function(program, stack=settings.stack)


def _delivery(run: Run) -> Resource:
    [command] = [c for c in run.of_type("Command") if c.name == "prom-alertmanager"]
    return command


def test_a_new_webhook_or_smtp_password_is_delivered_in_place_not_in_the_user_data():
    """With a deploy key the user data is the same byte for byte (no replacement, Prometheus
    keeps its history); only the secret stdin of `prom-alertmanager` changes, which runs it
    again on the same droplet (same triggers). Without one, the user data changes."""
    rotated = dict(SMTP, password="smtp-rotated-password")
    old, new = _settings(smtp=SMTP), settings_for(
        "prod", monitoring={"prometheus": True, "smtp": rotated},
        alerts={"slackUrl": SLACK_URL.replace("not-a-real-hook", "rotated-hook")})
    assert render_prometheus_cloud_config(old, over_ssh=True) == \
        render_prometheus_cloud_config(new, over_ssh=True)
    assert render_alertmanager_config(old) != render_alertmanager_config(new)
    before, after = _prometheus(old), _prometheus(new)
    droplet = after.one("index/droplet:Droplet")
    assert droplet.inputs == before.one("index/droplet:Droplet").inputs, \
        "nothing that replaces the droplet changes"
    assert "userData" not in droplet.secret_inputs, "it holds no secret"
    assert sorted(c.name for c in after.of_type("Command")) == ["prom-alertmanager",
                                                                 "prom-targets"]
    delivery, previous = _delivery(after), _delivery(before)
    assert "stdin" in delivery.secret_inputs
    assert delivery.inputs["stdin"] == render_alertmanager_config(new)
    assert "rotated-hook" in delivery.inputs["stdin"] and "smtp-rotated-password" in \
        delivery.inputs["stdin"]
    assert delivery.inputs["stdin"] != previous.inputs["stdin"]
    assert delivery.inputs["create"] == previous.inputs["create"] == INSTALL_ALERTMANAGER
    assert delivery.inputs["triggers"] == previous.inputs["triggers"] == [
        after.outputs["droplet_id"]]
    staging = [_prometheus(dataclasses.replace(s, ssh_private_key=None)) for s in (old, new)]
    user_data = [run.one("index/droplet:Droplet").inputs["userData"] for run in staging]
    assert user_data[0] != user_data[1]
    assert "userData" in staging[0].one("index/droplet:Droplet").secret_inputs
    assert not staging[0].of_type("Command")
    with pytest.raises(Exception, match="alertmanager_config is delivered over SSH"):
        _prometheus(dataclasses.replace(old, admin_cidrs=()))


def _install(etc: Path, bin_dir: Path, config: str) -> subprocess.CompletedProcess:
    """INSTALL_ALERTMANAGER as root with `config` on stdin, /etc/prometheus being `etc` (a
    mount namespace), cloud-init and systemctl stand-ins, the real amtool, chown and mktemp."""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        ["unshare", "-m", "sh", "-ec", 'mount --bind "$1" /etc/prometheus && exec sh -c "$2"',
         "sh", str(etc), INSTALL_ALERTMANAGER],
        input=config, env=env, capture_output=True, text=True, timeout=120)


def test_the_delivered_alertmanager_file_is_checked_installed_root_prometheus_0640_and_reloaded(
        tmp_path):
    assert shutil.which("amtool") and shutil.which("unshare")
    etc, bin_dir = tmp_path / "etc-prometheus", tmp_path / "bin"
    etc.mkdir(), bin_dir.mkdir()
    log = tmp_path / "systemctl.log"
    for name, body in {"cloud-init": "exit 0", "systemctl": f'echo "$*" >> {log}'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    settings = _settings(smtp=SMTP)
    installed = etc / Path(ALERTMANAGER_PATH).name
    placeholder = _written(render_prometheus_cloud_config(settings, over_ssh=True))[
        ALERTMANAGER_PATH]
    installed.write_text(placeholder)
    config = render_alertmanager_config(settings)
    done = _install(etc, bin_dir, config)
    assert done.returncode == 0, done.stderr
    assert installed.read_text() == config
    assert installed.stat().st_mode & 0o777 == 0o640
    assert (installed.stat().st_uid, installed.stat().st_gid) == (0, grp.getgrnam(
        "prometheus").gr_gid)
    assert log.read_text().splitlines() == ["reload-or-restart prometheus-alertmanager"]
    # A file amtool refuses is not installed: the running one stays, nothing is reloaded.
    refused = _install(etc, bin_dir, config.replace("receiver: webstack", "receiver: nobody"))
    assert refused.returncode == 1
    assert "refused by amtool check-config" in refused.stderr
    assert SMTP["password"] not in refused.stdout + refused.stderr
    assert installed.read_text() == config
    assert log.read_text().splitlines() == ["reload-or-restart prometheus-alertmanager"]
    assert sorted(p.name for p in etc.iterdir()) == [installed.name], "no file left behind"


# --------------------------------------------------------------------------- in the program


def _prod_with_prometheus(tmp_path: Path, **monitoring) -> Path:
    data = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    data["config"]["webstack:monitoring"] = {"prometheus": True, **monitoring}
    path = tmp_path / "Pulumi.prodprom.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_plan_shows_the_droplet_its_firewall_and_its_cost(tmp_path):
    path = _prod_with_prometheus(tmp_path, prometheusSize="s-1vcpu-2gb")
    shown = subprocess.run([sys.executable, "-m", "tools.plan", str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    price = droplet_size("s-1vcpu-2gb").monthly_usd
    base = cost.price_run(run_program(ROOT / "Pulumi.prod.yaml")).total
    assert "prodprom-prometheus-droplet" in shown.stdout
    assert "prodprom-prometheus-fw" in shown.stdout
    assert re.search(rf"prodprom-prometheus-droplet .*{price}", shown.stdout), shown.stdout
    assert shown.stdout.rstrip().splitlines()[-3].split()[-1] == f"{base + price:.2f}"


def test_prometheus_is_reachable_from_admin_cidrs_only_and_scrapes_over_the_vpc(tmp_path):
    run = run_program(_prod_with_prometheus(tmp_path))
    settings = settings_for("prod")
    [droplet] = [d for d in run.of_type("Droplet") if d.name.endswith("-prometheus-droplet")]
    assert droplet.inputs["tags"] == ["webstack-prodprom-prometheus"]
    assert "userData" not in droplet.secret_inputs, "with the deploy key it holds no secret"
    [firewall] = [f for f in run.of_type("Firewall") if f.name.endswith("-prometheus-fw")]
    admin = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())["config"][
        "webstack:adminCidrs"]
    assert [(r["portRange"], r["sourceAddresses"]) for r in firewall.inputs["inboundRules"]] == [
        ("9090", admin), ("9093", admin), ("22", admin)]
    [app_fw] = [f for f in run.of_type("Firewall") if f.name.endswith("-app-fw")]
    assert {"protocol": "tcp", "portRange": "80", "sourceTags": [droplet.inputs["tags"][0]]} in \
        app_fw.inputs["inboundRules"]
    [delivery] = [c for c in run.of_type("Command") if c.name.endswith("-prometheus-targets")]
    ips = run.outputs["app_private_ips"]
    assert json.loads(delivery.inputs["stdin"]) == [{"targets": [f"{ip}:80" for ip in ips]}]
    assert json.loads(run.outputs["prometheus_targets"]) == json.loads(delivery.inputs["stdin"])
    assert run.outputs["prometheus_ip"] == droplet.outputs["ipv4Address"]
    for secret in (settings.alerts.slack_url, "offline/plan/placeholder"):
        assert not any(secret in json.dumps(v) for v in run.outputs.values())


def test_without_monitoring_prometheus_there_is_none():
    run = run_program(ROOT / "Pulumi.prod.yaml")
    assert not [d for d in run.of_type("Droplet") if "prometheus" in d.name]
    assert not any("prometheus" in key for key in run.outputs)
