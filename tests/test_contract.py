"""The API contract (components/contract.yaml): every resource the program can register, held
against what DigitalOcean's API and the providers accept, in the plan, the tests and settings."""

from __future__ import annotations

import copy
import datetime
from functools import cache
from pathlib import Path

import pytest
import yaml

from components import contract, settings
from components.contract import ContractError, check, input_paths, violations
from tools import plan
from tools.mocks import ROOT, Run, mock_call, run_program

UPTIME_ALERT = "digitalocean:index/uptimeAlert:UptimeAlert"
LB = "digitalocean:index/loadBalancer:LoadBalancer"
FIREWALL = "digitalocean:index/firewall:Firewall"
POOL = "digitalocean:index/databaseConnectionPool:DatabaseConnectionPool"
CLUSTER = "digitalocean:index/databaseCluster:DatabaseCluster"

SSL_ALERT = {"checkId": "c-1", "type": "ssl_expiry", "threshold": 14, "comparison": "less_than",
             "period": "1h", "notifications": [{"emails": ["ops@example.com"]}]}
LB_INPUTS = {
    "region": "nyc3", "sizeUnit": 1, "dropletTag": "webstack-x-app",
    "forwardingRules": [{"entryPort": 80, "entryProtocol": "http", "targetPort": 80,
                         "targetProtocol": "http"}],
    "healthcheck": {"protocol": "http", "port": 80, "path": "/healthz",
                    "checkIntervalSeconds": 10, "responseTimeoutSeconds": 5,
                    "unhealthyThreshold": 3, "healthyThreshold": 5},
}
FW_INPUTS = {"tags": ["webstack-x-app"], "inboundRules": [
    {"protocol": "tcp", "portRange": "22", "sourceAddresses": ["203.0.113.10/32"]}]}
POOL_INPUTS = {"clusterId": "c-1", "name": "app", "mode": "transaction", "size": 10,
               "dbName": "app", "user": "app"}
AUTOSCALE = "digitalocean:index/dropletAutoscale:DropletAutoscale"
POOL_TEMPLATE = {"size": "s-1vcpu-1gb", "region": "nyc3", "image": "ubuntu-24-04-x64",
                 "sshKeys": ["deploy"], "tags": ["webstack-x-app"], "withDropletAgent": True,
                 "userData": "#cloud-config\n"}
AUTOSCALE_INPUTS = {"config": {"minInstances": 2, "maxInstances": 6, "targetCpuUtilization": 0.6,
                               "cooldownMinutes": 10}, "dropletTemplate": POOL_TEMPLATE}
CLUSTER_INPUTS = {"engine": "pg", "version": "15", "size": "db-s-1vcpu-2gb", "region": "nyc3",
                  "nodeCount": 2}


def changed(inputs: dict, path: str, value) -> dict:
    """`inputs` with `path` (dotted, `[0]` for an item) set to `value`; None deletes it."""
    out = copy.deepcopy(inputs)
    node, *keys = [out, *path.replace("[", ".").replace("]", "").split(".")]
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return out


BAD = [
    # (kind, type, good inputs, change, input named, words of the rule)
    ("required (the API's, the provider leaves it optional)", UPTIME_ALERT, SSL_ALERT,
     ("period", None), "period", "'required'"),
    ("enum", UPTIME_ALERT, SSL_ALERT, ("period", "4m"), "period", "one of 2m, 3m, 5m"),
    ("range", LB, LB_INPUTS, ("healthcheck.checkIntervalSeconds", 301),
     "healthcheck.checkIntervalSeconds", "range 3..300"),
    ("range, the API stricter than the provider", LB, LB_INPUTS, ("sizeUnit", 150), "sizeUnit",
     "range 1..100"),
    ("length, the API stricter than the provider", POOL, POOL_INPUTS, ("name", "p" * 61), "name",
     "length 3..60"),
    ("pattern", FIREWALL, FW_INPUTS, ("tags[0]", "Bad Tag!"), "tags[0]", "pattern"),
    ("type", POOL, POOL_INPUTS, ("size", "10"), "size", "type integer"),
    ("list size", LB, LB_INPUTS, ("forwardingRules", []), "forwardingRules", "items 1.."),
    ("cross-field: uptime alert type needs its threshold", UPTIME_ALERT, SSL_ALERT,
     ("threshold", None), "threshold", "where type in ['latency', 'ssl_expiry']: required"),
    ("cross-field: ssl_expiry compares less_than", UPTIME_ALERT, SSL_ALERT,
     ("comparison", "greater_than"), "comparison", "where type in ['ssl_expiry']"),
    ("cross-field: firewall tcp rule needs ports", FIREWALL, FW_INPUTS,
     ("inboundRules[0].portRange", None), "inboundRules[0].portRange", "where protocol in"),
    ("cross-field: tcp health check takes no path", LB, LB_INPUTS,
     ("healthcheck.protocol", "tcp"), "healthcheck.path", "must be absent"),
    ("cross-field: PostgreSQL version", CLUSTER, CLUSTER_INPUTS, ("version", "14"), "version",
     "one of 15, 16, 17"),
    ("cross-field: standbys need a 2 GiB plan", CLUSTER, CLUSTER_INPUTS,
     ("size", "db-s-1vcpu-1gb"), "size", "where engine in ['pg'] and nodeCount in [2, 3]"),
    ("an input no rule covers", POOL, POOL_INPUTS, ("shard", "x"), "shard",
     "no contract rule covers this input"),
    # The Droplet Autoscale pool: the API's ranges, stricter than the provider's.
    ("pool target below the API's 0.05 (the provider takes 0-1)", AUTOSCALE, AUTOSCALE_INPUTS,
     ("config.targetCpuUtilization", 0.01), "config.targetCpuUtilization", "range 0.05..1"),
    ("pool minInstances over the API's 500", AUTOSCALE, AUTOSCALE_INPUTS,
     ("config.minInstances", 501), "config.minInstances", "range 1..500"),
    ("pool maxInstances over the API's 1000", AUTOSCALE, AUTOSCALE_INPUTS,
     ("config.maxInstances", 1001), "config.maxInstances", "range 1..1000"),
    ("pool cooldown outside the API's 5-20", AUTOSCALE, AUTOSCALE_INPUTS,
     ("config.cooldownMinutes", 4), "config.cooldownMinutes", "range 5..20"),
    ("cross-field: a dynamic pool needs both bounds", AUTOSCALE, AUTOSCALE_INPUTS,
     ("config.maxInstances", None), "config.maxInstances",
     "where targetNumberInstances in [None]: required"),
    ("pool region the API's template enum lacks", AUTOSCALE, AUTOSCALE_INPUTS,
     ("dropletTemplate.region", "atl1"), "dropletTemplate.region", "one of nyc1"),
    ("pool user data over 64 KiB", AUTOSCALE, AUTOSCALE_INPUTS,
     ("dropletTemplate.userData", "#" * 65537), "dropletTemplate.userData", "length 1..65536"),
    ("pool public_networking, which the provider never sends", AUTOSCALE, AUTOSCALE_INPUTS,
     ("dropletTemplate.publicNetworking", False), "dropletTemplate.publicNetworking",
     "must be absent"),
]


@pytest.mark.parametrize("kind,type_,good,change,key,rule", BAD, ids=[b[0] for b in BAD])
def test_each_kind_of_rule_stops_with_one_line(kind, type_, good, change, key, rule):
    assert violations(type_, "x-res", good) == [], "the good inputs must pass"

    class Res:
        type, name, inputs = type_, "x-res", changed(good, *change)

    with pytest.raises(ContractError) as caught:
        check([Res])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"API contract: x-res ({type_}) input {key} = ")
    assert rule in message
    source = message.rsplit("[", 1)[1]
    assert "@" in source or source == "components/contract.yaml]", "names the source"


def test_an_unknown_resource_type_is_an_error_naming_it():
    class Res:
        type, name, inputs = "digitalocean:index/spacesBucket:SpacesBucket", "b", {}

    with pytest.raises(ContractError, match="SpacesBucket.*has no contract entry"):
        check([Res])


def test_secret_values_are_never_printed():
    class Res:
        type, name, inputs = POOL, "x-res", changed(POOL_INPUTS, "name", "s3cr3t-" * 10)
        secret_inputs = frozenset({"name"})

    with pytest.raises(ContractError) as caught:
        check([Res])
    assert "s3cr3t" not in str(caught.value) and "[secret]" in str(caught.value)


def test_auto_names_are_held_against_the_name_rules():
    """Pulumi names a Droplet `<logical name>-xxxxxxx`: an underscore breaks the hostname rule."""
    found = violations("digitalocean:index/droplet:Droplet", "bad_name",
                       {"image": "debian-12-x64", "size": "s-1vcpu-1gb"})
    assert [(v.input, v.rule.split()[0]) for v in found] == [("name", "pattern")]


# --------------------------------------------------------------------------- the program


STACK_FILES = sorted([*ROOT.glob("Pulumi.*.yaml"), *(ROOT / "tests/stacks").glob("Pulumi.*.yaml")])
VARIANTS = {
    # name: (base stack file, config changes): every switch that changes what is registered.
    "managed-no-domain": ("staging", {}),
    "managed-domain-apex": ("staging", {"webstack:domain": "example.com",
                                        "webstack:hostname": "@"}),
    "nginx-no-domain": ("staging", {"webstack:frontend": {"mode": "nginx"}}),
    "nginx-domain-spares": ("prod", {"webstack:frontend": {"mode": "nginx",
                                                           "nginxDropletCount": 3}}),
    # Production needs the deploy key: a staging stack with a domain goes without one.
    "nginx-one-droplet-no-key": ("staging", {"webstack:frontend": {"mode": "nginx"},
                                             "webstack:domain": "example.com"}),
    "slack-on-staging": ("staging", {"webstack:alerts": {
        "emails": ["ops@example.com"], "slackChannel": "#ops",
        "slackUrl": {"secure": "v1:offline-placeholder"}}}),
    "slack-off-prod": ("prod", {"webstack:alerts": {"emails": ["ops@example.com"]}}),
    "uptime-check-off": ("prod", {"webstack:alerts": {"emails": ["ops@example.com"],
                                                      "uptimeCheck": False}}),
    "replicas-and-backups": ("prod", {"webstack:app": {"dropletCount": 2, "backups": "daily"},
                                      "webstack:database": {
                                          "size": "db-s-2vcpu-4gb", "nodeCount": 3,
                                          "replicas": [{"size": "db-s-2vcpu-4gb"},
                                                       {"size": "db-s-4vcpu-8gb"}]},
                                      "webstack:budget": {"monthlyUsd": 400}}),
    "weekly-backups-vpc-range": ("staging", {"webstack:app": {"backups": "weekly"},
                                             "webstack:vpcIpRange": "10.77.0.0/20"}),
    "longest-database-name": ("staging", {"webstack:database": {"name": "d" * 60}}),
    # A pool scaling on memory only, in staging (prod-autoscale is a stack file, on CPU).
    "autoscale-memory": ("staging", {"webstack:app": {"scaling": {
        "mode": "autoscale", "minInstances": 1, "maxInstances": 3, "targetMemoryPercent": 75,
        "cooldownMinutes": 5}}}),
    # The restore's backupRestore and its look-ups (database.restoreFrom).
    "restored": ("prod", {"webstack:database": {
        "size": "db-s-1vcpu-2gb", "nodeCount": 2, "replicas": [{}], "restores": 1,
        "restoreFrom": {"cluster": "prod-db-cluster-a1b2c3d", "at": (
            datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=6)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")}}}),
}


def variant_file(name: str, tmp: Path) -> Path:
    base, changes = VARIANTS[name]
    data = yaml.safe_load((ROOT / f"Pulumi.{base}.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            data["config"].pop(key, None)
        else:
            data["config"][key] = value
    path = tmp / f"Pulumi.{name.replace('-', '')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@cache
def _run(path: Path) -> Run:
    return run_program(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    tmp = tmp_path_factory.mktemp("variants")
    out = {p.name: _run(p) for p in STACK_FILES}
    out.update({name: _run(variant_file(name, tmp)) for name in VARIANTS})
    return out


def test_every_stack_file_and_variant_passes_the_contract(runs):
    for name, run in runs.items():
        for r in run.resources:
            assert violations(r.type, r.name, r.inputs) == [], name


def test_variants_register_what_they_say(runs):
    """So that the variants above really exercise each switch."""
    assert runs["nginx-domain-spares"].of_type("ReservedIpAssignment")
    assert len([d for d in runs["nginx-domain-spares"].of_type("Droplet")
                if "-lb-" in d.name]) == 3
    assert runs["nginx-domain-spares"].of_type("DnsRecord")
    assert not runs["nginx-no-domain"].of_type("DnsRecord")
    assert runs["managed-domain-apex"].one("DnsRecord").inputs["name"] == "@"
    assert not runs["uptime-check-off"].of_type("UptimeCheck")
    assert all("slacks" in a.inputs["alerts"]
               for a in runs["slack-on-staging"].of_type("MonitorAlert"))
    assert not any("slacks" in a.inputs["alerts"]
                   for a in runs["slack-off-prod"].of_type("MonitorAlert"))
    assert len(runs["replicas-and-backups"].of_type("DatabaseReplica")) == 2
    assert all(d.inputs["backupPolicy"] == {"plan": "daily"}
               for d in runs["replicas-and-backups"].of_type("Droplet"))
    assert runs["weekly-backups-vpc-range"].one("Vpc").inputs["ipRange"] == "10.77.0.0/20"
    assert not runs["nginx-one-droplet-no-key"].of_type("remote:Command")
    assert runs["nginx-one-droplet-no-key"].of_type("DnsRecord")
    pool = runs["autoscale-memory"].one("dropletAutoscale:DropletAutoscale").inputs["config"]
    assert pool["targetMemoryUtilization"] == 0.75 and "targetCpuUtilization" not in pool
    assert runs["Pulumi.prod-autoscale.yaml"].one("DropletAutoscale")
    restored = runs["restored"].one("databaseCluster:DatabaseCluster")
    assert restored.inputs["backupRestore"]["databaseName"] == "prod-db-cluster-a1b2c3d"


def test_invokes_are_held_to_the_contract():
    with pytest.raises(ContractError, match=r"getDatabaseUser.*clusterId"):
        mock_call("digitalocean:index/getDatabaseUser:getDatabaseUser", {"name": "app"})
    with pytest.raises(ContractError, match="resource type has no contract entry"):
        mock_call("digitalocean:index/getDroplet:getDroplet", {"name": "x"})


def test_every_registered_type_and_input_is_covered_by_a_rule(runs):
    """Coverage: a type the contract does not list, or an input the program sets that no rule
    covers (a type rule at least), fails here, naming them."""
    types = contract.contract()["types"]
    missing: set[str] = set()
    for run in runs.values():
        for r in run.resources:
            if r.type not in types:
                missing.add(r.type)
                continue
            entry = types[r.type]
            covered = set() if entry.get("component") else set(entry["inputs"])
            missing |= {f"{r.type} {p}" for p in input_paths(r.inputs) - covered}
            if not entry.get("component"):
                missing |= {f"{r.type} {p} (no type rule)" for p in input_paths(r.inputs)
                            if "type" not in entry["inputs"][p]}
    assert not missing, sorted(missing)


def test_every_rule_cites_a_source_with_its_commit_or_version():
    data = contract.contract()
    assert data["read_for"]["pulumi-digitalocean"] == "4.84.1"
    pins = (ROOT / "requirements.txt").read_text()
    assert "pulumi-digitalocean==4.84.1" in pins
    for type_, entry in data["types"].items():
        rules = [*entry.get("inputs", {}).values(), *entry.get("when", [])]
        for rule in rules or [entry]:
            keys = rule["source"] if isinstance(rule["source"], list) else [rule["source"]]
            for key in keys:
                assert key in data["sources"], (type_, key)


def test_a_violation_stops_the_plan_before_the_resource_table(monkeypatch, capsys):
    """The plan holds every resource against the contract; here the contract is tightened so
    that staging's droplet size breaks it."""
    tightened = copy.deepcopy(contract.contract())
    droplet = tightened["types"]["digitalocean:index/droplet:Droplet"]["inputs"]
    droplet["size"] = {**droplet["size"], "enum": ["s-2vcpu-4gb"]}
    monkeypatch.setattr(contract, "contract", lambda: tightened)
    assert plan.main(["staging"]) == 2
    out, err = capsys.readouterr()
    assert out == "", "nothing of the plan is printed"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: API contract: staging-app-0 ")
    assert "input size = 's-1vcpu-1gb'" in lines[0] and "one of s-2vcpu-4gb" in lines[0]
    assert "resource_droplet.go" in lines[0]


# --------------------------------------------------------------------------- settings


def test_settings_offer_only_what_the_contract_allows():
    regions = contract.rules(CLUSTER, "region")["enum"]
    assert set(settings.catalog()["regions"]) <= set(regions)
    one_node = contract.when_enum(CLUSTER, "size", engine="pg", nodeCount=1)
    assert set(settings.catalog()["database_sizes"]) <= set(one_node)
    assert settings.PG_VERSIONS == ("15", "16", "17")
    assert "14" not in settings.PG_VERSIONS
    assert set(settings.ALERT_WINDOWS) <= set(contract.rules(UPTIME_ALERT, "period")["enum"])


def test_settings_refuse_what_the_contract_would_reject():
    """A contract-breaking value is refused by settings, naming the key, before any resource:
    the program never reaches the contract with it."""
    from tests.factories import make_settings

    for key, value, words in [
        ("database", {"version": "14"}, "webstack:database.version: '14'"),
        ("database", {"name": "n" * 61}, "webstack:database.name"),
        ("frontend", {"sizeUnit": 150}, "webstack:frontend.sizeUnit: 150"),
        ("database", {"size": "db-s-1vcpu-1gb", "nodeCount": 2}, "webstack:database.nodeCount"),
    ]:
        with pytest.raises(settings.ConfigError, match=words):
            make_settings(**{key: value})
