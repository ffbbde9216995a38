"""LoadBalancedFrontend under the mocks: HTTPS by name, DNS, health checks, and nginx mode."""

from __future__ import annotations

import dataclasses

import pulumi
import pytest

from components import stack
from components.frontend import LoadBalancedFrontend
from components.lb_nginx import UPSTREAM_PATH
from components.settings import ConfigError
from components.stack import frontend_args
from tests.factories import make_settings, settings_for
from tools.mocks import Run, run_function

WORLD = {"0.0.0.0/0", "::/0"}
KEY = "3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa"
APP_IPS = ["10.20.0.5", "10.20.0.6"]


def run_frontend(settings, **args) -> Run:
    def program():
        fe = LoadBalancedFrontend("web", frontend_args(
            settings, vpc_id="vpc-1", ssh_keys=[KEY], **args))
        pulumi.export("ip", fe.ip)
        pulumi.export("url", fe.url)
        pulumi.export("lb_droplet_ids", fe.lb_droplet_ids)
        pulumi.export("resource_urns", fe.resource_urns)
        # Exported even when None: stack outputs outlive one run under the mocks.
        for key in ("lb_id", "certificate_name", "upstream_conf"):
            pulumi.export(key, getattr(fe, key))

    return run_function(program, stack=settings.stack)


def nginx_settings(**overrides):
    return settings_for("prod", frontend={"mode": "nginx", "nginxDropletCount": 2},
                        adminCidrs=["203.0.113.7/32"], **overrides)


# --------------------------------------------------------------------------- managed


def test_managed_https_certificate_by_name_redirect_and_dns():
    settings = settings_for("prod")
    run = run_frontend(settings)
    cert = run.one("index/certificate:Certificate")
    assert cert.inputs["type"] == "lets_encrypt"
    assert cert.inputs["domains"] == ["www.example.com"]
    assert "name" not in cert.inputs, "auto-named, so a replacement can coexist"
    lb = run.one("index/loadBalancer:LoadBalancer").inputs
    rules = {r["entryPort"]: r for r in lb["forwardingRules"]}
    assert rules[443] == {"entryPort": 443, "entryProtocol": "https", "targetPort": 80,
                          "targetProtocol": "http", "certificateName": cert.outputs["name"]}
    assert "certificateId" not in rules[443]
    assert (rules[80]["entryProtocol"], rules[80]["targetPort"]) == ("http", 80)
    assert lb["redirectHttpToHttps"] is True
    assert lb["disableLetsEncryptDnsRecords"] is True
    assert lb["enableBackendKeepalive"] is True
    assert (lb["vpcUuid"], lb["region"], lb["dropletTag"], lb["sizeUnit"]) == (
        "vpc-1", settings.region, settings.app_tag, settings.frontend.size_unit)
    dns = run.one("index/dnsRecord:DnsRecord").inputs
    assert (dns["type"], dns["domain"], dns["name"]) == ("A", "example.com", "www")
    assert dns["value"] == run.outputs["ip"] == run.one("LoadBalancer").outputs["ip"]
    assert run.outputs["url"] == "https://www.example.com"
    assert run.outputs["certificate_name"] == cert.outputs["name"]
    assert run.outputs["lb_id"] == "web-lb-id" and run.outputs["lb_droplet_ids"] == []
    assert run.outputs["resource_urns"] == [run.one("LoadBalancer").outputs["loadBalancerUrn"]]
    assert not run.warnings


def test_apex_hostname_gets_an_at_record():
    run = run_frontend(settings_for("prod", hostname="@"))
    assert run.one("index/dnsRecord:DnsRecord").inputs["name"] == "@"
    assert run.outputs["url"] == "https://example.com"


@pytest.mark.parametrize("health", [{}, {"intervalSeconds": 30, "timeoutSeconds": 10,
                                         "unhealthyThreshold": 2, "healthyThreshold": 10}])
def test_health_check_is_http_healthz_within_digitalocean_ranges(health):
    settings = settings_for("prod", frontend={"healthCheck": health})
    hc = run_frontend(settings).one("index/loadBalancer:LoadBalancer").inputs["healthcheck"]
    assert (hc["protocol"], hc["port"], hc["path"]) == ("http", 80, "/healthz")
    assert 3 <= hc["checkIntervalSeconds"] <= 300 and 3 <= hc["responseTimeoutSeconds"] <= 300
    assert 2 <= hc["unhealthyThreshold"] <= 10 and 2 <= hc["healthyThreshold"] <= 10
    expected = settings.frontend.health_check
    assert (hc["checkIntervalSeconds"], hc["responseTimeoutSeconds"], hc["unhealthyThreshold"],
            hc["healthyThreshold"]) == (expected.interval_seconds, expected.timeout_seconds,
                                        expected.unhealthy_threshold, expected.healthy_threshold)


def test_no_domain_is_plain_http_on_the_lb_ip_with_a_warning():
    run = run_frontend(make_settings())
    assert not run.of_type("index/certificate:Certificate")
    assert not run.of_type("index/dnsRecord:DnsRecord")
    lb = run.one("index/loadBalancer:LoadBalancer").inputs
    assert [(r["entryPort"], r["entryProtocol"]) for r in lb["forwardingRules"]] == [(80, "http")]
    assert lb["redirectHttpToHttps"] is False
    assert run.outputs["url"] == f"http://{run.outputs['ip']}"
    assert run.outputs["certificate_name"] is None
    assert any("plain HTTP" in w for w in run.warnings), run.warnings


# --------------------------------------------------------------------------- nginx


def test_nginx_lb_droplets_reserved_ip_on_the_first_and_dns():
    settings = nginx_settings()
    run = run_frontend(settings, app_private_ips=APP_IPS, ssh_private_key="KEY")
    assert not run.of_type("index/loadBalancer:LoadBalancer")
    droplets = run.of_type("index/droplet:Droplet")
    assert len(droplets) == 2
    for d in droplets:
        assert d.inputs["tags"] == [settings.lb_tag] and d.inputs["sshKeys"] == [KEY]
        assert d.inputs["monitoring"] is True and d.inputs["vpcUuid"] == "vpc-1"
        assert d.inputs["size"] == settings.frontend.nginx_droplet_size
        assert d.inputs["image"] == settings.app.image and "name" not in d.inputs
    ip = run.one("index/reservedIp:ReservedIp")
    assignment = run.one("index/reservedIpAssignment:ReservedIpAssignment").inputs
    assert assignment["ipAddress"] == ip.outputs["ipAddress"] == run.outputs["ip"]
    assert assignment["dropletId"] == int(run.outputs["lb_droplet_ids"][0])
    assert "dropletId" not in ip.inputs, "ReservedIp.droplet_id and an assignment conflict"
    dns = run.one("index/dnsRecord:DnsRecord").inputs
    assert (dns["type"], dns["name"], dns["value"]) == ("A", "www", ip.outputs["ipAddress"])
    assert run.outputs["url"] == "https://www.example.com"
    assert len(set(run.outputs["lb_droplet_ids"])) == 2
    assert run.outputs["lb_id"] is None and run.outputs["certificate_name"] is None
    assert len(run.outputs["resource_urns"]) == 3  # two droplets and the reserved IP


def test_nginx_lb_firewall_is_the_public_entry_ssh_from_admins_only():
    settings = nginx_settings()
    fw = run_frontend(settings, app_private_ips=APP_IPS).one("index/firewall:Firewall").inputs
    assert fw["tags"] == [settings.lb_tag]
    by_port = {r["portRange"]: r for r in fw["inboundRules"]}
    assert set(by_port) == {"80", "443", "22"}
    assert set(by_port["80"]["sourceAddresses"]) == set(by_port["443"]["sourceAddresses"]) == WORLD
    assert by_port["22"]["sourceAddresses"] == ["203.0.113.7/32"]


def user_data_and_upstream(ips: list[str]) -> tuple[list[str], list[str]]:
    run = run_frontend(nginx_settings(), app_private_ips=ips, ssh_private_key="KEY")
    return ([d.inputs["userData"] for d in run.of_type("index/droplet:Droplet")],
            [c.inputs["stdin"] for c in run.of_type("command:remote:Command")])


def test_app_rollout_changes_the_upstream_file_not_the_lb_droplets():
    user_data_1, upstream_1 = user_data_and_upstream(APP_IPS)
    user_data_2, upstream_2 = user_data_and_upstream(["10.20.1.7", "10.20.1.8", "10.20.1.9"])
    assert user_data_1 == user_data_2, "user data forces replacement of the LB droplets"
    assert not any(ip in user_data_1[0] for ip in APP_IPS)
    assert upstream_1 != upstream_2 and len(upstream_1) == 2
    assert all("server 10.20.1.9:80 " in text for text in upstream_2)


def test_upstream_balances_retries_and_keeps_connections_alive():
    run = run_frontend(nginx_settings(), app_private_ips=APP_IPS, ssh_private_key="KEY")
    commands = sorted(run.of_type("command:remote:Command"), key=lambda r: r.name)
    droplets = sorted(run.of_type("index/droplet:Droplet"), key=lambda r: r.name)
    assert [c.name for c in commands] == ["web-upstream-0", "web-upstream-1"]
    assert [d.name for d in droplets] == ["web-lb-0", "web-lb-1"]
    upstream = run.outputs["upstream_conf"]
    assert "least_conn;" in upstream and "keepalive 32;" in upstream
    for ip in APP_IPS:
        assert f"server {ip}:80 max_fails=3 fail_timeout=10s;" in upstream
    site = droplets[0].inputs["userData"]
    assert "proxy_next_upstream error timeout http_502 http_503 http_504;" in site
    assert "proxy_next_upstream_tries 2;" in site and 'proxy_set_header Connection "";' in site
    ids = run.outputs["lb_droplet_ids"]
    for cmd, droplet, droplet_id in zip(commands, droplets, ids, strict=True):
        assert cmd.inputs["stdin"] == upstream
        assert UPSTREAM_PATH in cmd.inputs["create"] and "nginx -t" in cmd.inputs["create"]
        assert cmd.inputs["triggers"] == [droplet_id]
        assert "connection" in cmd.secret_inputs, "the SSH private key stays secret"
        connection = cmd.inputs["connection"]
        assert (connection["host"], connection["user"], connection["privateKey"]) == (
            droplet.outputs["ipv4Address"], "root", "KEY")


def test_without_ssh_key_the_upstream_is_only_an_output():
    run = run_frontend(nginx_settings(), app_private_ips=APP_IPS)
    assert not run.of_type("command:remote:Command")
    assert "server 10.20.0.5:80" in run.outputs["upstream_conf"]


def test_single_prod_lb_droplet_is_called_a_single_point_of_failure():
    settings = settings_for("prod", frontend={"mode": "nginx"})
    run = run_frontend(settings, app_private_ips=APP_IPS)
    assert any("single point of failure" in w for w in run.warnings), run.warnings
    assert not run_frontend(nginx_settings(), app_private_ips=APP_IPS).warnings


def test_nginx_without_a_domain_is_plain_http_on_the_reserved_ip():
    run = run_frontend(make_settings(frontend={"mode": "nginx"}), app_private_ips=APP_IPS)
    assert not run.of_type("index/dnsRecord:DnsRecord")
    assert run.outputs["url"] == f"http://{run.outputs['ip']}"
    assert "certbot" not in run.one("index/droplet:Droplet").inputs["userData"]
    assert any("plain HTTP" in w for w in run.warnings)


def test_invalid_nginx_combinations_are_refused():
    """A deploy key with no adminCidrs cannot deliver the upstream list: refused before any
    resource is registered."""
    settings = dataclasses.replace(make_settings(frontend={"mode": "nginx"}), ssh_private_key="K")
    run = Run()
    with pytest.raises(ConfigError, match="adminCidrs"):
        run_function(lambda: stack.build(settings), stack=settings.stack, run=run)
    assert not run.resources
