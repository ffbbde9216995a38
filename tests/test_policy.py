"""The policy pack: each rule catches a bad resource, both real stacks pass, the pack serves.

The rules (`policy/rules.py`) are plain functions over a resource's type and camelCase props.
Bad resources are real `digitalocean.*` resources recorded under the mocks, so the props are
named as the engine sends them; the stacks are the real program under the mocks. The last
tests start the pack as `pulumi` does (`python policy/`) and talk to it over the analyzer
gRPC protocol, which also proves that the pack reads props and `protect` where the engine puts
them.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pulumi
import pulumi_digitalocean as do
import pytest
import yaml
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc
from pulumi_policy import (
    EnforcementLevel,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationPolicy,
)

from tools.mocks import ROOT, Resource, Run, run_function, run_program

POLICY_DIR = ROOT / "policy"
sys.path.insert(0, str(POLICY_DIR))  # the pack imports its siblings, as when pulumi runs it
rules = importlib.import_module("rules")
pack = importlib.import_module("pack")

STACK = "prod"
LB_TAG, APP_TAG = f"webstack-{STACK}-lb", f"webstack-{STACK}-app"
WORLD = ["0.0.0.0/0", "::/0"]
ADMIN = ["203.0.113.10/32"]


def record(fn: Callable[[], Any]) -> Resource:
    """The one resource `fn` registers, as the engine would see it."""
    (resource,) = run_function(fn, stack=STACK).resources
    return resource


def violations(resource: Resource) -> list[str]:
    return rules.check_resource(resource.type, resource.inputs, stack=STACK)


# --------------------------------------------------------------------------- firewalls


def firewall(tags: list[str], *rules_: tuple[str, str, list[str]], **extra: Any) -> Resource:
    return record(lambda: do.Firewall("fw", name="fw", tags=tags, inbound_rules=[
        do.FirewallInboundRuleArgs(protocol=p, port_range=ports, source_addresses=sources)
        for p, ports, sources in rules_
    ], **extra))


def test_lb_firewall_may_open_80_and_443_to_the_world_and_22_to_admins():
    fw = firewall([LB_TAG], ("tcp", "80", WORLD), ("tcp", "443", WORLD), ("tcp", "22", ADMIN))
    assert violations(fw) == []


@pytest.mark.parametrize("source", WORLD)
def test_ssh_from_the_world_is_refused_even_on_the_lb_firewall(source):
    fw = firewall([LB_TAG], ("tcp", "80", WORLD), ("tcp", "22", [source]))
    (found,) = violations(fw)
    assert "firewall-no-world-ingress" in found and "port 22" in found and source in found


@pytest.mark.parametrize("halves,family", [
    (["0.0.0.0/1", "128.0.0.0/1"], "IPv4 addresses (more than a /16's worth, 65536)"),
    (["::/1", "8000::/1"], "IPv6 addresses (more than a /48's worth"),
])
def test_ssh_from_the_world_in_pieces_is_refused(halves, family):
    fw = firewall([LB_TAG], ("tcp", "80", WORLD), ("tcp", "22", halves))
    (found,) = violations(fw)
    assert "port 22" in found and family in found and "adminCidrs" in found


def test_ssh_from_a_16_and_a_48_passes():
    assert violations(firewall([APP_TAG], ("tcp", "22", ["10.1.0.0/16", "2001:db8::/48"]))) == []


def test_policy_and_settings_cap_admin_cidrs_alike():
    from components.settings import ADMIN_MAX_PREFIX
    assert rules.MAX_SOURCE_PREFIX == ADMIN_MAX_PREFIX


@pytest.mark.parametrize("tags,rule", [
    ([APP_TAG], ("tcp", "80", WORLD)),  # the app droplets are never public
    ([LB_TAG, APP_TAG], ("tcp", "443", WORLD)),  # not only the LB droplets
    (["webstack-staging-lb"], ("tcp", "443", WORLD)),  # another stack's LB tag
    ([LB_TAG], ("tcp", "8080", WORLD)),  # not a web port
    ([LB_TAG], ("tcp", "1-65535", WORLD)),
    ([LB_TAG], ("udp", "443", WORLD)),
])
def test_world_ingress_is_refused_anywhere_but_the_lb_web_ports(tags, rule):
    assert len(violations(firewall(tags, rule))) == 1


def test_lb_firewall_that_also_targets_droplet_ids_is_not_the_public_entry():
    fw = firewall([LB_TAG], ("tcp", "443", WORLD), droplet_ids=[123])
    assert len(violations(fw)) == 1


# --------------------------------------------------------------------------- droplets


def droplet(**args: Any) -> Resource:
    return record(lambda: do.Droplet(
        "d", image="ubuntu-24-04-x64", size="s-1vcpu-1gb", region="nyc3", **args))


def test_droplet_with_keys_and_monitoring_passes():
    assert violations(droplet(ssh_keys=["1"], monitoring=True)) == []


def test_droplet_without_ssh_keys_is_refused():
    (found,) = violations(droplet(monitoring=True))
    assert "sshKeys" in found


@pytest.mark.parametrize("monitoring", [False, None])
def test_droplet_without_monitoring_is_refused(monitoring):
    (found,) = violations(droplet(ssh_keys=["1"], monitoring=monitoring))
    assert "monitoring" in found


# --------------------------------------------------------------------------- load balancers


def load_balancer(entry: str, redirect: bool | None, check: tuple[str, str | None]) -> Resource:
    protocol, path = check
    return record(lambda: do.LoadBalancer(
        "lb", region="nyc3", redirect_http_to_https=redirect,
        forwarding_rules=[do.LoadBalancerForwardingRuleArgs(
            entry_port=443 if entry == "https" else 80, entry_protocol=entry,
            target_port=80, target_protocol="http",
            certificate_name="cert" if entry == "https" else None)],
        healthcheck=do.LoadBalancerHealthcheckArgs(port=80, protocol=protocol, path=path)))


@pytest.mark.parametrize("entry,redirect", [("https", True), ("http", None)])
def test_load_balancer_checking_healthz_over_http_passes(entry, redirect):
    assert violations(load_balancer(entry, redirect, ("http", "/healthz"))) == []


@pytest.mark.parametrize("redirect", [False, None])
def test_https_load_balancer_must_redirect_http(redirect):
    (found,) = violations(load_balancer("https", redirect, ("http", "/healthz")))
    assert "redirectHttpToHttps" in found


@pytest.mark.parametrize("check", [("tcp", None), ("http", "/"), ("http", "/readyz")])
def test_load_balancer_must_check_healthz_over_http(check):
    (found,) = violations(load_balancer("http", None, check))
    assert "/healthz" in found


# --------------------------------------------------------------------------- alerts, database


def alert(**scope: Any) -> Resource:
    return record(lambda: do.MonitorAlert(
        "cpu", alerts=do.MonitorAlertAlertsArgs(emails=["ops@example.com"]),
        compare="GreaterThan", type="v1/insights/droplet/cpu", value=80, window="5m",
        description="CPU high", **scope))


@pytest.mark.parametrize("scope", [{"tags": [APP_TAG]}, {"entities": ["123"]}])
def test_scoped_alert_passes(scope):
    assert violations(alert(**scope)) == []


def test_unscoped_alert_is_refused():
    (found,) = violations(alert())
    assert "every resource in the account" in found


def database_firewall(*rules_: tuple[str, str]) -> Resource:
    return record(lambda: do.DatabaseFirewall("dbfw", cluster_id="c", rules=[
        do.DatabaseFirewallRuleArgs(type=t, value=v) for t, v in rules_]))


def test_database_firewall_of_tags_passes():
    assert violations(database_firewall(("tag", APP_TAG))) == []


@pytest.mark.parametrize("rule", [("ip_addr", "203.0.113.10"), ("droplet", "123"),
                                  ("app", "0a1b"), ("k8s", "0a1b")])
def test_database_firewall_rule_other_than_tag_is_refused(rule):
    (found,) = violations(database_firewall(("tag", APP_TAG), rule))
    assert f"{rule[0]}={rule[1]}" in found


# --------------------------------------------------------------------------- prod redundancy


def stack_resources(run: Run) -> list:
    """What AnalyzeStack gives a stack policy: outputs, and `protect` from the options."""
    return [rules.StackResource(r.type, r.outputs, r.protect) for r in run.resources]


def small_stack(protect: bool) -> Run:
    def fn():
        do.Droplet("app-0", image="ubuntu-24-04-x64", size="s-1vcpu-1gb", region="nyc3",
                   ssh_keys=["1"], monitoring=True, tags=[APP_TAG])
        do.Droplet("lb-0", image="ubuntu-24-04-x64", size="s-1vcpu-1gb", region="nyc3",
                   ssh_keys=["1"], monitoring=True, tags=[LB_TAG])
        do.DatabaseCluster("db", name="db", engine="pg", version="15", size="db-s-1vcpu-1gb",
                           region="nyc3", node_count=1,
                           opts=pulumi.ResourceOptions(protect=protect))
    return run_function(fn, stack=STACK)


def test_prod_without_redundancy_is_refused_on_every_count():
    found = rules.prod_redundancy(STACK, stack_resources(small_stack(protect=False)))
    assert len(found) == 4, found
    assert "1 app droplet" in found[0]  # the LB droplet does not count
    assert "nodeCount 1" in found[1] and "not protected" in found[2] and "replica" in found[3]


def test_protect_comes_from_the_resource_options():
    found = rules.prod_redundancy(STACK, stack_resources(small_stack(protect=True)))
    assert not any("protected" in f for f in found)


def test_prod_without_a_database_is_refused():
    assert "no database cluster" in rules.prod_redundancy("production", [])


def test_redundancy_is_not_asked_of_other_stacks():
    run = small_stack(protect=False)
    assert rules.prod_redundancy("staging", stack_resources(run)) == []


# --------------------------------------------------------------------------- the real stacks


@cache
def program(stack_file: str) -> Run:
    return run_program(Path(stack_file))


def resource_violations(run: Run, stack: str) -> list[str]:
    return [
        f"{r.name}: {v}" for r in run.resources
        for v in rules.check_resource(r.type, r.inputs, stack=stack)
    ]


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_real_stacks_pass_every_rule(stack):
    run = program(str(ROOT / f"Pulumi.{stack}.yaml"))
    types = {r.type for r in run.resources}
    assert {rules.DROPLET, rules.FIREWALL, rules.LOAD_BALANCER, rules.MONITOR_ALERT,
            rules.DATABASE_FIREWALL, rules.DATABASE_CLUSTER} <= types, "every rule is exercised"
    assert resource_violations(run, stack) == []
    assert rules.prod_redundancy(stack, stack_resources(run)) == []


def variant(tmp_path: Path, base: str, stack: str, **config: Any) -> Run:
    """The program with a stack file derived from a real one, config keys overridden."""
    data = yaml.safe_load((ROOT / f"Pulumi.{base}.yaml").read_text())
    data["config"].update({f"webstack:{k}": v for k, v in config.items()})
    path = tmp_path / f"Pulumi.{stack}.yaml"
    path.write_text(yaml.safe_dump(data))
    return run_program(path)


def test_nginx_mode_lb_firewall_is_the_one_public_entry(tmp_path):
    run = variant(tmp_path, "staging", "nginxmode", frontend={"mode": "nginx"})
    public = [
        r for r in run.of_type("index/firewall:Firewall")
        if any(set(rule.get("sourceAddresses", [])) & set(WORLD)
               for rule in r.inputs.get("inboundRules", []))
    ]
    assert [r.inputs["tags"] for r in public] == [["webstack-nginxmode-lb"]]
    assert resource_violations(run, "nginxmode") == []


def test_prod_stack_without_deletion_protection_is_refused(tmp_path):
    prod = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())["config"]["webstack:database"]
    run = variant(tmp_path, "prod", "prod-unprotected", database={**prod, "protect": False})
    (found,) = rules.prod_redundancy("prod-unprotected", stack_resources(run))
    assert "not protected" in found


# --------------------------------------------------------------------------- the pack


def test_pack_has_one_mandatory_policy_per_rule():
    names = [p.name for p in pack.POLICIES]
    assert names == [r.name for r in rules.RESOURCE_RULES] + ["prod-redundancy"]
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in pack.POLICIES)
    assert all(p.description for p in pack.POLICIES)
    assert isinstance(pack.POLICIES[-1], StackValidationPolicy)
    assert all(isinstance(p, ResourceValidationPolicy) for p in pack.POLICIES[:-1])


def test_resource_policy_reports_through_the_sdk():
    fw = firewall([APP_TAG], ("tcp", "22", WORLD))
    policy = next(p for p in pack.POLICIES if p.name == "firewall-no-world-ingress")
    reported: list[str] = []
    opts = PolicyResourceOptions(False, [], None, [], None, [], None)
    policy.validate(ResourceValidationArgs(fw.type, fw.inputs, fw.urn, fw.name, opts, None),
                    lambda message, urn=None: reported.append(message))
    assert len(reported) == 1 and "port 22" in reported[0]


@pytest.fixture(scope="module")
def analyzer():
    """The pack started as the Python language host starts it: `python <pack dir>`."""
    proc = subprocess.Popen([sys.executable, "-u", str(POLICY_DIR)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = proc.stdout.readline().strip()
        assert port.isdigit(), f"the pack did not start: {proc.stderr.read() if not port else port}"
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        yield analyzer_pb2_grpc.AnalyzerStub(channel)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def struct(props: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(props, struct_pb2.Struct())


def analyzer_resource(r: Resource) -> analyzer_pb2.AnalyzerResource:
    return analyzer_pb2.AnalyzerResource(
        type=r.type, urn=r.urn, name=r.name, properties=struct(r.outputs),
        options=analyzer_pb2.AnalyzerResourceOptions(protect=r.protect), parent=r.parent or "")


def test_pack_serves_its_policies_as_mandatory(analyzer):
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "webstack"
    assert [p.name for p in info.policies] == [p.name for p in pack.POLICIES]
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}


def test_pack_refuses_a_world_open_firewall_over_grpc(analyzer):
    fw = firewall([APP_TAG], ("tcp", "22", WORLD))
    response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(
        type=fw.type, urn=fw.urn, name=fw.name, properties=struct(fw.inputs)))
    assert [d.policyName for d in response.diagnostics] == ["firewall-no-world-ingress"]
    assert response.diagnostics[0].enforcementLevel == analyzer_pb2.MANDATORY


def test_pack_passes_the_prod_stack_and_reads_protect_from_options(analyzer):
    run = program(str(ROOT / "Pulumi.prod.yaml"))
    for r in run.resources:
        response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(
            type=r.type, urn=r.urn, name=r.name, properties=struct(r.inputs)))
        assert list(response.diagnostics) == [], r.name
    request = analyzer_pb2.AnalyzeStackRequest(
        resources=[analyzer_resource(r) for r in run.resources])
    assert list(analyzer.AnalyzeStack(request).diagnostics) == []

    unprotected = [analyzer_resource(r) for r in run.resources]
    for resource in unprotected:
        resource.options.protect = False
    response = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=unprotected))
    assert [d.policyName for d in response.diagnostics] == ["prod-redundancy"]
    assert "not protected" in response.diagnostics[0].message


def test_prod_autoscale_passes_every_rule_and_counts_the_pools_least():
    run = program(str(ROOT / "tests" / "stacks" / "Pulumi.prod-autoscale.yaml"))
    assert run.one("DropletAutoscale") and not run.of_type("index/droplet:Droplet")
    assert resource_violations(run, "prod-autoscale") == []
    # The policy SDK gives plain values; the mocks' outputs keep the template's secret envelope.
    others = [r for r in stack_resources(run) if r.type != rules.AUTOSCALE_POOL]
    inputs = run.one("DropletAutoscale").inputs
    pool = rules.StackResource(rules.AUTOSCALE_POOL, inputs)
    assert rules.prod_redundancy("prod-autoscale", [*others, pool]) == []
    one = rules.StackResource(rules.AUTOSCALE_POOL, {
        **inputs, "config": {**inputs["config"], "minInstances": 1}})
    (found,) = rules.prod_redundancy("prod-autoscale", [*others, one])
    assert found.startswith("1 app droplet(s) tagged webstack-prod-autoscale-app")


@pytest.mark.parametrize("change,words", [
    ({"sshKeys": []}, "no dropletTemplate.sshKeys"),
    ({"withDropletAgent": False}, "withDropletAgent is not true"),
])
def test_a_pool_template_without_keys_or_agent_is_refused(change, words):
    run = program(str(ROOT / "tests" / "stacks" / "Pulumi.prod-autoscale.yaml"))
    props = run.one("DropletAutoscale").inputs
    bad = {**props, "dropletTemplate": {**props["dropletTemplate"], **change}}
    (found,) = rules.check_resource(rules.AUTOSCALE_POOL, bad, stack="prod-autoscale")
    assert found.startswith("[pool-template-ssh-keys-and-agent]") and words in found
