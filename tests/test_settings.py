"""Bad config is refused before anything is created, with a message naming key, value and rule."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.settings import (
    KEYS,
    AlertSettings,
    AppSettings,
    BudgetSettings,
    ConfigError,
    DatabaseSettings,
    FrontendSettings,
    HealthCheckSettings,
    MaintenanceSettings,
    MicrocacheSettings,
    PoolSettings,
    load_settings,
    pool_connection_budget,
    stack_config,
)
from tests.factories import DEPLOY_KEY
from tools.mocks import ROOT, Run, run_program

STAGING = {"sshKeys": ["deploy"], "alerts": {"emails": ["ops@example.com"]}}
PROD = {**STAGING, "domain": "example.com", "database": {
    "size": "db-s-1vcpu-2gb", "nodeCount": 2, "replicas": [{"size": "db-s-1vcpu-2gb"}]},
    "sshPrivateKey": DEPLOY_KEY, "adminCidrs": ["203.0.113.10/32"]}
AUTOSCALE = {"app.scaling.mode": "autoscale", "app.scaling.targetCpuPercent": 60,
             "sshPrivateKey": None}
"""A pool's members are beyond SSH: no deploy key, in production too."""


def load(base: dict, stack: str = "staging", deploy_cidr: str | None = None, **changes) -> object:
    """Settings from `base` with dotted-path changes, e.g. **{"app.dropletCount": 0}; a value
    None removes the key. `sshPrivateKey` is a secret, as `pulumi config set --secret` sets it."""
    raw = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        if value is None:
            del node[leaf]
    return load_settings(raw, stack=stack, deploy_cidr=deploy_cidr,
                         secret_keys=frozenset({"sshPrivateKey"} & set(raw)))


def test_defaults_are_valid_and_prod_is_ha():
    staging, prod = load(STAGING), load(PROD, "prod")
    assert not staging.production and staging.fqdn is None
    assert prod.production and prod.fqdn == "www.example.com"
    assert prod.app.droplet_count >= 3 and prod.database.node_count == 2
    assert prod.database.protect and not staging.database.protect
    assert prod.budget.enforce and not staging.budget.enforce


BAD = [
    # (stack, base, change, key named in the message, words of the rule)
    ("staging", STAGING, {"region": "mars1"}, "webstack:region", "one of: nyc1"),
    ("staging", STAGING, {"app.dropletSize": "s-64vcpu"}, "app.dropletSize", "s-1vcpu-1gb"),
    ("staging", STAGING, {"database.size": "db-huge"}, "database.size", "db-s-1vcpu-1gb"),
    ("staging", STAGING, {"app.dropletCount": 0}, "app.dropletCount", "from 1 to 50"),
    ("prod", PROD, {"app.dropletCount": 1}, "app.dropletCount", "from 2 to 50"),
    ("staging", STAGING, {"frontend.healthCheck.intervalSeconds": 2},
     "frontend.healthCheck.intervalSeconds", "from 3 to 300"),
    ("staging", STAGING, {"frontend.healthCheck.timeoutSeconds": 301},
     "frontend.healthCheck.timeoutSeconds", "from 3 to 300"),
    ("staging", STAGING, {"frontend.healthCheck.unhealthyThreshold": 1},
     "frontend.healthCheck.unhealthyThreshold", "from 2 to 10"),
    ("staging", STAGING, {"frontend.healthCheck.healthyThreshold": 11},
     "frontend.healthCheck.healthyThreshold", "from 2 to 10"),
    # Not a key: the app answers checks on /healthz only, and the policy pack requires it.
    ("staging", STAGING, {"frontend.healthCheck.path": "/status"},
     "frontend.healthCheck.path", "unknown key"),
    ("staging", STAGING, {"adminCidrs": ["0.0.0.0/0"]}, "adminCidrs[0]", "whole internet"),
    ("staging", STAGING, {"adminCidrs": ["10.0.0.0/8", "::/0"]}, "adminCidrs[1]",
     "whole internet"),
    ("staging", STAGING, {"adminCidrs": ["300.1.1.1/32"]}, "adminCidrs[0]", "CIDR"),
    # Two halves of the world are the world: the sum per family is capped.
    ("staging", STAGING, {"adminCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}, "webstack:adminCidrs",
     "/16's worth (65536)"),
    ("staging", STAGING, {"adminCidrs": ["::/1", "8000::/1"]}, "webstack:adminCidrs",
     "/48's worth"),
    ("staging", STAGING, {"adminCidrs": ["10.0.0.0/17", "10.0.128.0/17", "10.1.0.0/32"]},
     "webstack:adminCidrs", "cover 65537 IPv4 addresses"),
    ("staging", STAGING, {"sshKeys": []}, "sshKeys", "at least one SSH key"),
    ("staging", STAGING, {"database.nodeCount": 2}, "database.nodeCount", "at least 2 GiB"),
    ("prod", PROD, {"database.replicas": [{"size": "db-s-1vcpu-1gb"}]},
     "database.replicas[0].size", "same size as the primary"),
    ("staging", STAGING, {"database.pool.size": 23}, "database.pool.size", "from 1 to 22"),
    ("staging", STAGING, {"alerts.window": "2m"}, "alerts.window", "5m, 10m, 30m, 1h"),
    ("staging", STAGING, {"alerts.emails": ["not-an-email"]}, "alerts.emails[0]",
     "email address"),
    ("staging", STAGING, {"frontend.mode": "haproxy"}, "frontend.mode", "managed, nginx"),
    ("prod", PROD, {"domain": None}, "webstack:domain", "production needs a domain"),
    ("prod", PROD, {"database.replicas": []}, "database.replicas", "at least one read replica"),
    ("staging", STAGING, {"app.dropletCout": 3}, "app.dropletCout", "unknown key"),
    ("prod", PROD, {"app.dropletCount": 4, "app.gunicornThreads": 16},
     "database.replicas[0].size", "allows 47 connections, but the app opens up to 64"),
    # The connection pool shares database.name, and the API allows pool names of 3-60.
    ("staging", STAGING, {"database.name": "a" * 61}, "database.name", "3 to 60 characters"),
    # DigitalOcean no longer creates PostgreSQL 14 clusters (end of life 2026-11-12).
    ("staging", STAGING, {"database.version": "14"}, "database.version",
     "must be one of: 15, 16, 17"),
    # Not in the API's PostgreSQL options any more.
    ("staging", STAGING, {"database.size": "db-s-8vcpu-32gb"}, "database.size",
     "db-s-6vcpu-16gb"),
    # The provider takes 1-200; the API 1-100.
    ("staging", STAGING, {"frontend.sizeUnit": 101}, "frontend.sizeUnit", "from 1 to 100"),
    ("staging", STAGING, {"alerts.slackUrl": "https://hooks.slack.com/x",
                          "alerts.slackChannel": "#ops"}, "alerts.slackUrl", "--secret"),
    # The lag bound is sampled every 2 s: a bound under a few samples would flap.
    ("staging", STAGING, {"database.maxReplicaLagSeconds": 2},
     "database.maxReplicaLagSeconds", "from 5 to 3600"),
    ("staging", STAGING, {"monitoring.prometheusSize": "s-64vcpu"}, "monitoring.prometheusSize",
     "s-1vcpu-1gb"),
    # Alertmanager without a way to reach anyone (no Slack, no SMTP relay for the emails).
    ("staging", STAGING, {"monitoring.prometheus": True}, "monitoring.prometheus",
     "monitoring.smtp"),
    ("staging", STAGING, {"monitoring.smtp.smarthost": "smtp.example.com:587"},
     "monitoring.smtp.", "together"),
    # app.scaling: the API's ranges (components/contract.yaml), which the provider does not check.
    ("staging", STAGING, {"app.scaling.mode": "elastic"}, "app.scaling.mode", "fixed, autoscale"),
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.minInstances": 4,
                          "app.scaling.maxInstances": 3},
     "app.scaling.maxInstances: 3", "at least minInstances (4)"),
    ("prod", PROD, {**AUTOSCALE, "app.scaling.minInstances": 1}, "app.scaling.minInstances: 1",
     "from 2 to 500"),
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.minInstances": 501},
     "app.scaling.minInstances", "from 1 to 500"),
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.maxInstances": 1001},
     "app.scaling.maxInstances", "from 1 to 1000"),
    # The API's minimum target is 0.05: 1-4 % pass the provider and the 1-100, not the API.
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.targetCpuPercent": 3},
     "app.scaling.targetCpuPercent: 3", "refuses a target below 0.05"),
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.targetCpuPercent": 0},
     "app.scaling.targetCpuPercent: 0", "from 5 to 100"),
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.targetMemoryPercent": 101},
     "app.scaling.targetMemoryPercent: 101", "from 5 to 100"),
    ("staging", STAGING, {"app.scaling.mode": "autoscale"}, "app.scaling.targetCpuPercent",
     "and/or targetMemoryPercent"),
    ("staging", STAGING, {**AUTOSCALE, "app.scaling.cooldownMinutes": 4},
     "app.scaling.cooldownMinutes", "from 5 to 20"),
    ("staging", STAGING, {**AUTOSCALE, "frontend.mode": "nginx"}, "app.scaling.mode",
     "upstreams are the app droplets' private addresses"),
    ("staging", STAGING, {**AUTOSCALE, "app.dropletCount": 3}, "app.dropletCount",
     "minInstances and maxInstances instead"),
    ("staging", STAGING, {**AUTOSCALE, "app.backups": "daily"}, "app.backups",
     "template has no backups"),
    ("staging", STAGING, {**AUTOSCALE, "region": "atl1"}, "webstack:region",
     "autoscale pools are offered in"),
    # Replica connections are counted at the pool's most droplets.
    ("prod", PROD, {**AUTOSCALE, "app.scaling.maxInstances": 6, "app.gunicornThreads": 8},
     "database.replicas[0].size", "(maxInstances 6 x 1 worker x 8 threads)"),
]


@pytest.mark.parametrize("stack,base,change,key,rule", BAD, ids=[str(b[2]) for b in BAD])
def test_bad_config_names_key_value_and_rule(stack, base, change, key, rule):
    with pytest.raises(ConfigError) as caught:
        load(base, stack, **change)
    message = str(caught.value)
    assert key in message and rule in message
    assert "\n" not in message


def test_the_micro_cache_covers_its_path_prefixes_whatever_the_query():
    cache = MicrocacheSettings(seconds=1, paths=("/api/notes",))
    assert cache.covers("/api/notes?limit=5") and cache.covers("/api/notes/7")
    assert not cache.covers("/healthz?x=/api/notes")
    assert not MicrocacheSettings(seconds=0, paths=("/api/notes",)).covers("/api/notes")


def test_autoscale_refuses_a_deploy_key_pulumi_could_not_use():
    """Health gates and database grants run over SSH on known droplets; pool members are not."""
    raw = {**copy.deepcopy(STAGING), "adminCidrs": ["203.0.113.10/32"],
           "sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE"
                            " KEY-----\n",
           "app": {"scaling": {"mode": "autoscale", "targetCpuPercent": 60}}}
    with pytest.raises(ConfigError) as caught:
        load_settings(raw, stack="staging", secret_keys=frozenset({"sshPrivateKey"}))
    message = str(caught.value)
    assert message.startswith("webstack:sshPrivateKey: '[secret]' is not allowed")
    assert "no deploy step can reach them over SSH" in message and "PRIVATE KEY" not in message


def test_autoscale_settings_take_the_api_defaults_and_the_pool_bounds():
    app = load(STAGING, **AUTOSCALE).app
    assert app.autoscale and app.scaling.cooldown_minutes == 10  # the API's default
    assert (app.running_droplets, app.most_droplets) == (1, 2)  # max defaults to 2 x min
    assert load(PROD, "prod", **AUTOSCALE).app.scaling.min_instances == 2
    fixed = load(STAGING).app
    assert not fixed.autoscale and fixed.running_droplets == fixed.most_droplets == 1


def test_production_without_a_deploy_key_is_refused_in_one_line_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        load(PROD, "prod", sshPrivateKey=None)
    message = str(caught.value)
    assert message.startswith("webstack:sshPrivateKey: None is not allowed; production needs a"
                              " deploy key") and "\n" not in message
    assert load(STAGING).ssh_private_key is None, "staging may go without one"


def test_the_deploy_cidr_is_one_host_added_to_the_ssh_sources_only_when_given():
    prod = load(PROD, "prod")
    assert (prod.deploy_cidr, prod.ssh_sources) == (None, ("203.0.113.10/32",))
    deploying = load(PROD, "prod", deploy_cidr=" 198.51.100.7 ")
    assert deploying.ssh_sources == ("203.0.113.10/32", "198.51.100.7/32")
    assert load(PROD, "prod", deploy_cidr="2001:db8::7/128").deploy_cidr == "2001:db8::7/128"


@pytest.mark.parametrize("value, rule", [("198.51.100.0/24", "single host"),
                                         ("2001:db8::/64", "single host"),
                                         ("0.0.0.0/0", "whole internet"),
                                         ("runner", "must be a CIDR")])
def test_a_deploy_cidr_wider_than_one_host_is_refused_naming_the_variable(value, rule):
    with pytest.raises(ConfigError) as caught:
        load(PROD, "prod", deploy_cidr=value)
    message = str(caught.value)
    assert message.startswith("WEBSTACK_EXTRA_ADMIN_CIDR: ") and rule in message, message


def test_database_name_of_sixty_characters_is_the_longest_the_pool_takes():
    assert load(STAGING, **{"database.name": "a" * 60}).database.name == "a" * 60


def test_pool_budget_follows_plan_memory():
    from components.settings import database_size

    assert pool_connection_budget(database_size("db-s-1vcpu-1gb")) == 22
    assert pool_connection_budget(database_size("db-s-2vcpu-4gb")) == 97


def bad_stack_file(tmp_path: Path, change: dict) -> Path:
    data = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())
    data["config"].update(change)
    path = tmp_path / "Pulumi.bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_program_refuses_bad_config_before_any_resource(tmp_path):
    run = Run()
    with pytest.raises(Exception, match=r"webstack:app.dropletCount: 0"):
        run_program(bad_stack_file(tmp_path, {"webstack:app": {"dropletCount": 0}}), run=run)
    assert run.resources == []


def test_plan_cli_prints_one_line_error_without_traceback(tmp_path):
    path = bad_stack_file(tmp_path, {"webstack:region": "mars1"})
    result = subprocess.run([sys.executable, "-m", "tools.plan", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: webstack:region: 'mars1' is not allowed; must be one of: "
        + "nyc1, nyc3, sfo2, sfo3, ams3, sgp1, lon1, fra1, tor1, blr1, syd1, atl1"]
    assert "Traceback" not in result.stdout + result.stderr


def test_program_refuses_an_unknown_top_level_key(tmp_path):
    run = Run()
    with pytest.raises(Exception, match=r"webstack:regoin: 'nyc3' is not allowed; unknown key"):
        run_program(bad_stack_file(tmp_path, {"webstack:regoin": "nyc3"}), run=run)
    assert run.resources == []


def snake(key: str) -> str:
    """The settings attribute path of a config key: app.dropletCount -> app.droplet_count."""
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), key)


def is_set(raw: dict, key: str) -> bool:
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.get(part, {})
    return leaf in raw


@pytest.mark.parametrize("stack,base", [("staging", STAGING), ("prod", PROD)])
def test_unset_keys_take_their_declared_default(stack, base):
    """Every key the config leaves unset reads as its declaration's default for the stack's
    environment (the declarations are the only defaults: dataclasses carry none)."""
    settings = load(base, stack)
    checked = []
    for name, key in KEYS.items():
        default = key.default_for(settings.production)
        if default is None or is_set(base, name):
            continue
        value = settings
        for part in snake(name).split("."):
            value = getattr(value, part)
        assert value == default, name
        checked.append(name)
    assert "app.dropletCount" in checked and "budget.enforce" in checked


def test_no_section_dataclass_has_a_default_of_its_own():
    for cls in (AppSettings, FrontendSettings, HealthCheckSettings, DatabaseSettings,
                PoolSettings, MaintenanceSettings, AlertSettings, BudgetSettings):
        for f in dataclasses.fields(cls):
            if f.init:
                assert f.default is dataclasses.MISSING, (cls.__name__, f.name)
                assert f.default_factory is dataclasses.MISSING, (cls.__name__, f.name)


def _utc(**delta) -> str:
    return (datetime.datetime.now(datetime.UTC) + datetime.timedelta(**delta)).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("change,key,rule", [
    ({"database.restores": 1, "database.restoreFrom.cluster": "prod-db-cluster-a1b2c3d",
      "database.restoreFrom.at": _utc(days=-8)}, "database.restoreFrom.at", "last 7 days"),
    ({"database.restores": 1, "database.restoreFrom.cluster": "prod-db-cluster-a1b2c3d",
      "database.restoreFrom.at": _utc(hours=1)}, "database.restoreFrom.at", "not in the future"),
    ({"database.restores": 1, "database.restoreFrom.cluster": "prod-db-cluster-a1b2c3d",
      "database.restoreFrom.at": "2026-11-30 08:15"}, "database.restoreFrom.at", "ISO 8601 UTC"),
    ({"database.restores": 1, "database.restoreFrom.cluster": "prod-db-cluster-a1b2c3d",
      "database.restoreFrom.at": "2026-11-30T08:15:00+01:00"}, "database.restoreFrom.at", "UTC"),
    ({"database.restores": 1, "database.restoreFrom.at": _utc(hours=-1)},
     "database.restoreFrom.cluster", "source cluster's name"),
    ({"database.restores": 1, "database.restoreFrom.cluster": "Prod_DB"},
     "database.restoreFrom.cluster", "lowercase letters, digits and hyphens"),
    ({"database.restoreFrom.cluster": "prod-db-cluster-a1b2c3d"}, "database.restores",
     "at least 1 with restoreFrom"),
])
def test_restore_from_is_checked_naming_the_key(change, key, rule):
    with pytest.raises(ConfigError) as caught:
        load(STAGING, **change)
    assert f"webstack:{key}:" in str(caught.value) and rule in str(caught.value)


def test_restore_from_reads_a_utc_time_within_retention():
    at = _utc(days=-6, hours=-23)
    db = load(STAGING, **{"database.restores": 2, "database.restoreFrom.cluster": "x-db-r1-cluster",
                          "database.restoreFrom.at": at}).database
    assert db.restores == 2 and db.restore_from.cluster == "x-db-r1-cluster"
    assert db.restore_from.at.strftime("%Y-%m-%dT%H:%M:%SZ") == at
    assert load(STAGING).database.restore_from is None


def test_an_unquoted_yaml_time_reaches_the_reader_as_iso_text(tmp_path):
    path = tmp_path / "Pulumi.s.yaml"
    path.write_text("config:\n  webstack:database:\n    restoreFrom:\n"
                    "      at: 2026-11-30T08:15:00Z\n")
    config, _ = stack_config(path)
    assert '"at": "2026-11-30T08:15:00+00:00"' in config["webstack:database"]


def test_the_smtp_password_must_be_a_secret_and_stays_masked():
    smtp = {"smarthost": "smtp.example.com:587", "from": "alerts@example.com",
            "username": "apikey", "password": "hunter2"}
    with pytest.raises(ConfigError, match="monitoring.smtp.password.*--secret"):
        load(STAGING, **{"monitoring.smtp": smtp})
    settings = load_settings({**STAGING, "monitoring": {"prometheus": True, "smtp": smtp}},
                             stack="staging", secret_keys=frozenset({"monitoring"}))
    assert settings.monitoring.prometheus and settings.monitoring.smtp.password == "hunter2"
    assert "hunter2" not in repr(settings)


def test_gunicorn_workers_are_one_per_core_unless_set():
    """`app.gunicornWorkers: 0`: a Python process per core; a second one on one vCPU only
    competes for it (docs/benchmarks.md, "The worker model"). Sync workers serve one
    request each: 2 x cores + 1 of them."""
    assert load(PROD, "prod", **{"app.dropletSize": "s-1vcpu-1gb"}).app.workers == 1
    assert load(PROD, "prod", **{"app.dropletSize": "s-2vcpu-4gb"}).app.workers == 2
    assert load(PROD, "prod", **{"app.gunicornThreads": 1}).app.workers == 3
    assert load(PROD, "prod", **{"app.gunicornWorkers": 2}).app.workers == 2
