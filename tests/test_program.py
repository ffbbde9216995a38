"""The whole program under the mocks, for both real stack files (and an nginx-mode variant)."""

from __future__ import annotations

import ipaddress
from functools import cache
from pathlib import Path

import pytest
import yaml

from components.cloud_config import USER_DATA_LIMIT
from components.settings import database_size, pool_connection_budget, settings_for_stack_file
from tests.runtime_helpers import cloud_init_schema
from tools.mocks import ROOT, Run, run_program

WORLD = {"0.0.0.0/0", "::/0"}


@cache
def program(stack: str) -> Run:
    return run_program(ROOT / f"Pulumi.{stack}.yaml")


def stack_settings(stack: str):
    return settings_for_stack_file(ROOT / f"Pulumi.{stack}.yaml")


STACKS = ["staging", "prod"]


@pytest.mark.parametrize("stack", STACKS)
def test_every_droplet_has_keys_monitoring_and_vpc(stack):
    run = program(stack)
    vpc = run.one("index/vpc:Vpc")
    droplets = run.of_type("index/droplet:Droplet")
    assert len(droplets) == stack_settings(stack).app.droplet_count
    for d in droplets:
        assert d.inputs["sshKeys"], d.name
        assert d.inputs["monitoring"] is True, d.name
        assert d.inputs["vpcUuid"] == vpc.outputs.get("id", f"{vpc.name}-id")
        # Secret where it holds the credentials: without a deploy key (staging) only.
        holds_credentials = stack_settings(stack).ssh_private_key is None
        assert ("userData" in d.secret_inputs) is holds_credentials, d.name


PROD_STACKS = {"managed": ROOT / "Pulumi.prod.yaml",
               "nginx": ROOT / "tests/stacks/Pulumi.prod-nginx.yaml"}


def secret_values(run: Run) -> set[str]:
    """Every secret the program computed for the app: the database users' and the pool's
    passwords, the URIs that carry them, and the generated SECRET_KEY (RandomPassword)."""
    found = set()
    for resource in run.resources:
        for name, value in resource.outputs.items():
            if name == "password" or (name == "result" and "RandomPassword" in resource.type):
                found.add(value)
            if name in ("uri", "privateUri") and ":mock-" in value:
                found.add(value)
    return found


@pytest.mark.parametrize("mode", PROD_STACKS)
def test_no_prod_droplet_user_data_holds_a_password_a_uri_with_one_or_the_secret_key(mode):
    """Acceptance 1 of issue 13: with the deploy key, the app's secrets go over SSH (the gates'
    stdin), and no droplet's user data (app or nginx LB) carries any of them."""
    run = run_program(PROD_STACKS[mode])
    assert settings_for_stack_file(PROD_STACKS[mode]).frontend.mode == mode
    droplets = run.of_type("index/droplet:Droplet")
    assert len(droplets) == (4 if mode == "nginx" else 3)
    secrets = secret_values(run)
    secret_key = run.one("randomPassword:RandomPassword").outputs["result"]
    assert secret_key in secrets and any("mock-pool-password" in v for v in secrets)
    for droplet in droplets:
        text = droplet.inputs["userData"]
        assert not [v for v in secrets if v in text], droplet.name
        assert "mock-" not in text and "DATABASE_URL" not in text and "SECRET_KEY" not in text
    gates = [c for c in run.of_type("remote:Command") if "-gate-" in c.name]
    assert len(gates) == 3
    for gate in gates:  # where they go instead: one secret stdin per app droplet
        assert "stdin" in gate.secret_inputs
        assert f'SECRET_KEY="{secret_key}"' in gate.inputs["stdin"]
        assert "mock-pool-password" in gate.inputs["stdin"]


def test_nor_does_the_prometheus_droplet_s_user_data_hold_the_webhook_or_smtp_password(
        tmp_path: Path):
    """Prod with `monitoring.prometheus`, an SMTP relay and the Slack webhook: Alertmanager's
    configuration goes over SSH too (the secret stdin of `prod-prometheus-alertmanager`), and no
    droplet's user data carries the webhook, the SMTP password or the app's secrets."""
    data = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    data["config"]["webstack:monitoring"] = {"prometheus": True, "smtp": {
        "smarthost": "smtp.example.com:587", "from": "alerts@example.com", "username": "apikey",
        "password": {"secure": "v1:offline-placeholder"}}}
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = settings_for_stack_file(path)
    alerting = {str(settings.alerts.slack_url), str(settings.monitoring.smtp.password)}
    run = run_program(path)
    droplets = run.of_type("index/droplet:Droplet")
    assert "prod-prometheus-droplet" in {d.name for d in droplets}
    for droplet in droplets:
        assert not [v for v in alerting | secret_values(run)
                    if v in droplet.inputs["userData"]], droplet.name
    [delivery] = [c for c in run.of_type("remote:Command")
                  if c.name == "prod-prometheus-alertmanager"]
    assert "stdin" in delivery.secret_inputs
    assert all(v in delivery.inputs["stdin"] for v in alerting)


def test_staging_without_a_deploy_key_is_the_documented_exception():
    """No deploy key, no SSH: the environment file with the secrets is in the user data (README,
    "What the user data holds"), which is then a secret input."""
    run = program("staging")
    assert stack_settings("staging").ssh_private_key is None
    secret_key = run.one("randomPassword:RandomPassword").outputs["result"]
    for droplet in run.of_type("index/droplet:Droplet"):
        assert f'SECRET_KEY="{secret_key}"' in droplet.inputs["userData"]
        assert "mock-pool-password" in droplet.inputs["userData"]
        assert "userData" in droplet.secret_inputs
    assert not [c for c in run.of_type("remote:Command") if "-gate-" in c.name]


def test_rotating_a_secret_updates_the_prod_droplets_in_place(monkeypatch):
    """A new password or SECRET_KEY changes the gates' stdin only: same user data (no droplet
    replaced), and pulumi-command runs each gate's create again, which installs the new file
    and restarts the app, one droplet after the other."""
    import tools.mocks as mocks

    before = run_program(ROOT / "Pulumi.prod.yaml")
    original = mocks.mock_outputs

    def rotated(typ, name, inputs):
        outputs = original(typ, name, inputs)
        if typ == "random:index/randomPassword:RandomPassword":
            outputs = {**outputs, "result": outputs["result"] + "-rotated"}
        return {k: v.replace("mock-pool-password", "mock-pool-password-2")
                if isinstance(v, str) else v for k, v in outputs.items()}

    monkeypatch.setattr(mocks, "mock_outputs", rotated)
    after = run_program(ROOT / "Pulumi.prod.yaml")
    for old, new in zip(before.of_type("index/droplet:Droplet"),
                        after.of_type("index/droplet:Droplet"), strict=True):
        assert old.inputs == new.inputs, "nothing that replaces a droplet changes"
    old_gates = {c.name: c for c in before.of_type("remote:Command") if "-gate-" in c.name}
    for gate in (c for c in after.of_type("remote:Command") if "-gate-" in c.name):
        previous = old_gates[gate.name]
        assert gate.inputs["stdin"] != previous.inputs["stdin"]
        assert "mock-pool-password-2" in gate.inputs["stdin"]
        assert gate.inputs["create"] == previous.inputs["create"]
        assert gate.inputs["triggers"] == previous.inputs["triggers"], "updated, not replaced"


@pytest.mark.parametrize("stack", STACKS)
def test_firewalls_never_open_to_the_world_and_port_80_only_from_lb(stack):
    run = program(stack)
    lb = run.one("index/loadBalancer:LoadBalancer")
    settings = stack_settings(stack)
    for fw in run.of_type("index/firewall:Firewall"):
        for rule in fw.inputs.get("inboundRules", []):
            assert not WORLD & set(rule.get("sourceAddresses", [])), (fw.name, rule)
            if rule.get("portRange") == "80":
                assert rule.get("sourceLoadBalancerUids") == [f"{lb.name}-id"], rule
                assert not rule.get("sourceAddresses")
            if rule.get("portRange") == "22":
                assert rule["sourceAddresses"] == list(settings.admin_cidrs)


@pytest.mark.parametrize("stack", STACKS)
def test_load_balancer_checks_healthz_within_digitalocean_ranges(stack):
    lb = program(stack).one("index/loadBalancer:LoadBalancer").inputs
    hc = lb["healthcheck"]
    assert (hc["protocol"], hc["port"], hc["path"]) == ("http", 80, "/healthz")
    assert 3 <= hc["checkIntervalSeconds"] <= 300 and 3 <= hc["responseTimeoutSeconds"] <= 300
    assert 2 <= hc["unhealthyThreshold"] <= 10 and 2 <= hc["healthyThreshold"] <= 10
    assert lb["vpcUuid"]
    if stack == "prod":
        assert lb["redirectHttpToHttps"] is True
        assert lb["disableLetsEncryptDnsRecords"] is True
        https = [r for r in lb["forwardingRules"] if r["entryProtocol"] == "https"]
        assert https and all(r["certificateName"] for r in https)


@pytest.mark.parametrize("stack", STACKS)
def test_database_private_firewalled_by_tag_pool_in_budget(stack):
    run, settings = program(stack), stack_settings(stack)
    cluster = run.one("index/databaseCluster:DatabaseCluster")
    assert cluster.inputs["privateNetworkUuid"]
    replicas = run.of_type("index/databaseReplica:DatabaseReplica")
    firewalls = run.of_type("index/databaseFirewall:DatabaseFirewall")
    assert len(firewalls) == 1 + len(replicas)
    for fw in firewalls:
        assert fw.inputs["rules"] and all(
            (r["type"], r["value"]) == ("tag", settings.app_tag) for r in fw.inputs["rules"])
    targets = {fw.inputs["clusterId"] for fw in firewalls}
    assert {r.outputs["uuid"] for r in replicas} <= targets
    pool = run.one("index/databaseConnectionPool:DatabaseConnectionPool")
    assert pool.inputs["mode"] == "transaction"
    assert pool.inputs["size"] <= pool_connection_budget(database_size(cluster.inputs["size"]))


def test_prod_is_redundant_and_protected():
    run = program("prod")
    cluster = run.one("index/databaseCluster:DatabaseCluster")
    assert cluster.inputs["nodeCount"] >= 2 and cluster.protect
    assert len(run.of_type("index/databaseReplica:DatabaseReplica")) >= 1
    assert len(run.of_type("index/droplet:Droplet")) >= 3
    staging = program("staging").one("index/databaseCluster:DatabaseCluster")
    assert staging.inputs["nodeCount"] == 1 and not staging.protect


@pytest.mark.parametrize("stack", STACKS)
def test_every_alert_is_scoped(stack):
    alerts = program(stack).of_type("index/monitorAlert:MonitorAlert")
    assert alerts
    for alert in alerts:
        assert alert.inputs.get("entities") or alert.inputs.get("tags"), alert.name


@pytest.mark.parametrize("stack", STACKS)
def test_outputs_complete_and_secrets_secret(stack):
    run = program(stack)
    for name in ("url", "frontend_ip", "app_droplet_ids", "app_private_ips", "vpc_id",
                 "db_cluster_id", "db_host", "db_pool_uri", "db_replica_uris",
                 "alert_policy_ids", "uptime_check_id", "monthly_cost_usd", "cost_breakdown"):
        assert name in run.outputs, name
    assert {"db_pool_uri", "db_replica_uris"} <= run.secret_outputs
    public = {k: v for k, v in run.outputs.items() if k not in run.secret_outputs}
    assert "password" not in yaml.safe_dump(public)
    assert len(run.outputs["app_droplet_ids"]) == stack_settings(stack).app.droplet_count
    for ip in run.outputs["app_private_ips"]:
        assert ipaddress.ip_address(ip).is_private


def test_prod_url_is_https_and_staging_warns_plain_http():
    assert program("prod").outputs["url"] == "https://www.example.com"
    staging = program("staging")
    assert staging.outputs["url"].startswith("http://")
    assert any("HTTP" in w for w in staging.warnings)


def user_data(stack: str) -> str:
    return program(stack).of_type("index/droplet:Droplet")[0].inputs["userData"]


@pytest.mark.parametrize("stack", STACKS)
def test_cloud_config_valid_small_and_reproducible(stack, tmp_path):
    text = user_data(stack)
    assert text.startswith("#cloud-config\n")
    assert len(text.encode()) < USER_DATA_LIMIT
    again = run_program(ROOT / f"Pulumi.{stack}.yaml")
    assert again.of_type("index/droplet:Droplet")[0].inputs["userData"] == text
    assert all(d.inputs["userData"] == text for d in program(stack).of_type("Droplet"))
    result = cloud_init_schema(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout
    # The same check refuses a broken document, so the pass above means something.
    broken = cloud_init_schema(text.replace("package_update: true", "package_update: 7"),
                               tmp_path)
    assert broken.returncode != 0 and "package_update" in broken.stdout + broken.stderr


def test_nginx_mode_program(tmp_path: Path):
    data = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())
    data["config"]["webstack:frontend"] = {"mode": "nginx"}
    path = tmp_path / "Pulumi.nginxmode.yaml"
    path.write_text(yaml.safe_dump(data))
    run = run_program(path)
    assert not run.of_type("index/loadBalancer:LoadBalancer")
    assert run.of_type("index/reservedIp:ReservedIp")
    app_tag = "webstack-nginxmode-app"
    app_fw = [fw for fw in run.of_type("index/firewall:Firewall") if fw.inputs["tags"] == [app_tag]]
    assert len(app_fw) == 1
    web = [r for r in app_fw[0].inputs["inboundRules"] if r["portRange"] == "80"]
    assert web and all(r["sourceTags"] == ["webstack-nginxmode-lb"] for r in web)
    assert not any(WORLD & set(r.get("sourceAddresses", [])) for r in app_fw[0].inputs[
        "inboundRules"])


def test_nginx_mode_project_holds_the_reserved_ip_as_the_projects_api_stores_it(tmp_path: Path):
    """The Projects API lists reserved IPs as do:floatingip:IP; the provider's own URN for them
    (godo ReservedIP.URN(), do:reservedip:IP, which the mocks return like the provider) would
    give a diff on every later `pulumi up` and a 412 when it tries to move the assigned IP."""
    data = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    data["config"]["webstack:frontend"] = {"mode": "nginx", "nginxDropletCount": 2}
    path = tmp_path / "Pulumi.prodnginx.yaml"
    path.write_text(yaml.safe_dump(data))
    run = run_program(path)
    reserved = run.one("index/reservedIp:ReservedIp").outputs
    assert reserved["reservedIpUrn"] == f"do:reservedip:{reserved['ipAddress']}"
    resources = run.one("index/project:Project").inputs["resources"]
    assert f"do:floatingip:{reserved['ipAddress']}" in resources
    assert not [urn for urn in resources if urn.startswith("do:reservedip:")]
    lb_droplets = [d for d in run.of_type("index/droplet:Droplet") if "-web-lb-" in d.name]
    assert len(lb_droplets) == 2
    assert {d.outputs["dropletUrn"] for d in lb_droplets} <= set(resources)


def test_the_grant_steps_are_exported_only_for_the_manual_grant_and_secret():
    staging, prod = program("staging"), program("prod")  # staging has no deploy key
    assert "db_grants" in staging.secret_outputs
    assert "db_grants" not in prod.outputs
    grants = next(c for c in prod.of_type("remote:Command") if c.name == "prod-db-grants")
    assert "stdin" in grants.secret_inputs and "doadmin" not in grants.inputs["create"]
    assert "GRANT USAGE, CREATE ON SCHEMA public" in grants.inputs["stdin"]


def test_prod_rollouts_are_health_gated_one_droplet_at_a_time():
    run = program("prod")
    droplets = sorted(run.of_type("index/droplet:Droplet"), key=lambda d: d.name)
    gates = sorted((c for c in run.of_type("remote:Command") if "-gate-" in c.name),
                   key=lambda c: c.name)
    assert len(gates) == len(droplets) == 3
    for previous_gate, droplet in zip(gates, droplets[1:], strict=False):
        assert previous_gate.urn in droplet.depends_on
    assert not any("-gate-" in c.name for c in program("staging").of_type("remote:Command"))


def test_a_restore_switches_the_app_droplets_in_place_one_gate_at_a_time(tmp_path: Path):
    """The same droplets and user data; the gates' stdin holds the restored cluster's URIs, so
    each gate installs them and restarts its app, one droplet after the other: the gates are
    the switch (docs/runbook.md)."""
    data = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    data["config"]["webstack:database"].update(
        {"restores": 1, "restoreFrom": {"cluster": "prod-db-cluster-a1b2c3d"}})
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(data))
    restored = run_program(path)
    before = {d.name: d for d in program("prod").of_type("index/droplet:Droplet")}
    after = {d.name: d for d in restored.of_type("index/droplet:Droplet")}
    assert after.keys() == before.keys()
    for name, droplet in after.items():
        assert droplet.inputs["userData"] == before[name].inputs["userData"], name
    gates = [c for c in restored.of_type("remote:Command") if "-gate-" in c.name]
    assert len(gates) == len(after)
    assert all("prod-db-r1-pool" in gate.inputs["stdin"] for gate in gates)


def ssh_sources(run: Run) -> dict[str, list[str]]:
    """Every firewall's SSH rule sources, by firewall name."""
    return {fw.name: rule["sourceAddresses"] for fw in run.of_type("index/firewall:Firewall")
            for rule in fw.inputs.get("inboundRules", []) if rule.get("portRange") == "22"}


@pytest.mark.parametrize("mode", PROD_STACKS)
def test_the_deploying_runner_is_admitted_to_ssh_only_when_given(mode, monkeypatch):
    """WEBSTACK_EXTRA_ADMIN_CIDR (the deploy workflow's runner): added to the SSH rule of the
    app and nginx LB firewalls for that `pulumi up`, absent from the next without it."""
    monkeypatch.delenv("WEBSTACK_EXTRA_ADMIN_CIDR", raising=False)
    without = ssh_sources(run_program(PROD_STACKS[mode]))
    assert set(without) == ({"prod-nginx-app-fw", "prod-nginx-web-lb-fw"} if mode == "nginx"
                            else {"prod-app-fw"})
    assert all(sources == ["203.0.113.10/32"] for sources in without.values()), without
    monkeypatch.setenv("WEBSTACK_EXTRA_ADMIN_CIDR", "198.51.100.7/32")
    given = ssh_sources(run_program(PROD_STACKS[mode]))
    assert given == {name: ["203.0.113.10/32", "198.51.100.7/32"] for name in without}
    monkeypatch.setenv("WEBSTACK_EXTRA_ADMIN_CIDR", "198.51.100.0/24")
    with pytest.raises(Exception, match=r"WEBSTACK_EXTRA_ADMIN_CIDR: .*single host"):
        run_program(PROD_STACKS[mode])
