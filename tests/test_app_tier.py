"""AppTier under the mocks: droplets a user can reach only through the load balancer."""

from __future__ import annotations

import ipaddress

import pulumi
import pytest

from components.app_tier import AppTier
from components.frontend import NginxDroplets, WebSource
from components.stack import app_tier_args
from tests.factories import make_settings, settings_for
from tools.mocks import Run, run_function

WORLD = {"0.0.0.0/0", "::/0"}
KEY = "3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa"


def run_tier(settings, **args) -> Run:
    args.setdefault("web_source", WebSource(load_balancer_uids=["lb-uid-1"]))

    def program():
        tier = AppTier("app", app_tier_args(
            settings, vpc_id="vpc-1", ssh_keys=[KEY],
            user_data=pulumi.Output.secret("#cloud-config\n"), **args))
        pulumi.export("droplet_ids", tier.droplet_ids)
        pulumi.export("private_ips", tier.private_ips)
        pulumi.export("droplet_urns", tier.droplet_urns)
        pulumi.export("firewall_id", tier.firewall_id)

    return run_function(program, stack=settings.stack)


def inbound(run: Run) -> list[dict]:
    return run.one("index/firewall:Firewall").inputs["inboundRules"]


@pytest.mark.parametrize("stack", ["staging", "prod"])
def test_every_droplet_is_private_monitored_keyed_and_tagged(stack):
    settings = settings_for(stack)
    run = run_tier(settings)
    droplets = run.of_type("index/droplet:Droplet")
    assert len(droplets) == settings.app.droplet_count
    for d in droplets:
        assert d.inputs["sshKeys"] == [KEY]
        assert d.inputs["monitoring"] is True
        assert d.inputs["vpcUuid"] == "vpc-1"
        assert d.inputs["tags"] == [settings.app_tag]
        assert d.inputs["ipv6"] is False
        assert (d.inputs["image"], d.inputs["size"], d.inputs["region"]) == (
            settings.app.image, settings.app.droplet_size, settings.region)
        assert "name" not in d.inputs, "auto-named, so create-before-delete works"
        assert "userData" in d.secret_inputs
        assert d.parent == run.one("AppTier").urn
    assert len(run.outputs["droplet_ids"]) == settings.app.droplet_count
    assert all(ipaddress.ip_address(ip).is_private for ip in run.outputs["private_ips"])
    assert all(urn.startswith("do:droplet:") for urn in run.outputs["droplet_urns"])


def test_firewall_selects_by_tag_and_admits_web_only_from_the_managed_lb():
    settings = make_settings(adminCidrs=["203.0.113.7/32"])
    run = run_tier(settings, web_source=WebSource(load_balancer_uids=["lb-uid-1"]))
    fw = run.one("index/firewall:Firewall")
    assert fw.inputs["tags"] == [settings.app_tag] and "dropletIds" not in fw.inputs
    rules = inbound(run)
    for rule in rules:
        assert not WORLD & set(rule.get("sourceAddresses", [])), rule
    web = [r for r in rules if r["portRange"] == "80"]
    assert web == [{"protocol": "tcp", "portRange": "80", "sourceLoadBalancerUids": ["lb-uid-1"]}]
    ssh = [r for r in rules if r["portRange"] == "22"]
    assert ssh == [{"protocol": "tcp", "portRange": "22", "sourceAddresses": ["203.0.113.7/32"]}]
    assert {r["portRange"] for r in rules} == {"80", "22"}


def test_nginx_frontend_admits_web_from_the_lb_droplets_tag_only():
    settings = make_settings(frontend={"mode": "nginx"})
    run = run_tier(settings, web_source=NginxDroplets.web_source_for(settings.lb_tag))
    web = [r for r in inbound(run) if r["portRange"] == "80"]
    assert web == [{"protocol": "tcp", "portRange": "80", "sourceTags": [settings.lb_tag]}]


def test_no_admin_cidrs_means_no_ssh_rule_at_all():
    run = run_tier(make_settings())
    assert not [r for r in inbound(run) if r.get("portRange") == "22"]
    assert all(r["portRange"] == "80" for r in inbound(run))


def test_outbound_is_open_for_packages_dns_ntp_database_and_acme():
    rules = run_tier(make_settings()).one("index/firewall:Firewall").inputs["outboundRules"]
    assert {r["protocol"] for r in rules} == {"tcp", "udp", "icmp"}
    assert all(set(r["destinationAddresses"]) == WORLD for r in rules)


def test_without_a_load_balancer_source_nothing_is_created():
    registered = []

    def program():
        registered.append(AppTier("app", app_tier_args(
            make_settings(), vpc_id="vpc-1", ssh_keys=[KEY], user_data="x")))

    with pytest.raises(TypeError, match="web_source"):
        run_function(program)
    assert not registered


@pytest.mark.parametrize("plan", ["weekly", "daily"])
def test_backups_off_by_default_and_on_with_the_chosen_plan(plan):
    for d in run_tier(make_settings()).of_type("index/droplet:Droplet"):
        assert d.inputs["backups"] is False and "backupPolicy" not in d.inputs
    for d in run_tier(make_settings(app={"backups": plan})).of_type("index/droplet:Droplet"):
        assert d.inputs["backups"] is True
        assert d.inputs["backupPolicy"] == {"plan": plan}
