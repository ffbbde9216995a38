"""The architecture picture: drawn from the registered resources of the real program."""

from __future__ import annotations

from pathlib import Path

import yaml

from tools.diagram import draw, graph
from tools.mocks import Run, run_program

REFERENCE = Path(__file__).parent / "stacks" / "Pulumi.reference.yaml"
DRAWN = ("Vpc", "LoadBalancer", "ReservedIp", "Droplet", "DatabaseCluster", "DatabaseReplica",
         "DatabaseConnectionPool", "MonitorAlert", "UptimeCheck", "UptimeAlert")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def nginx_with_standby(tmp_path: Path) -> Run:
    """The reference stack on nginx LB droplets (one warm spare) and a 2 GiB database with a
    standby and a replica."""
    data = yaml.safe_load(REFERENCE.read_text())
    config = data["config"]
    config["webstack:frontend"] = {"mode": "nginx", "nginxDropletCount": 2}
    config["webstack:database"] = {
        "size": "db-s-1vcpu-2gb", "nodeCount": 2, "replicas": [{"size": "db-s-1vcpu-2gb"}]}
    path = tmp_path / "Pulumi.nginx.yaml"
    path.write_text(yaml.safe_dump(data))
    return run_program(path)


def drawn_names(run: Run) -> list[str]:
    return [r.name for r in run.resources
            if r.type.startswith("digitalocean:") and r.type.rpartition(":")[2] in DRAWN]


def test_draw_writes_a_png(tmp_path):
    path = draw(run_program(REFERENCE), tmp_path / "docs" / "reference.png", "webstack reference")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert path.stat().st_size > 10_000


def test_managed_frontend_names_every_component():
    run = run_program(REFERENCE)
    source = graph(run, "webstack reference").source
    for name in drawn_names(run):
        assert name in source
    assert "Load balancer" in source and "nginx LB droplet" not in source
    assert "standby" not in source  # nodeCount 1: a primary only
    assert source.count('label="app droplet') == 3


def test_nginx_frontend_draws_lb_droplets_the_reserved_ip_and_standbys(tmp_path):
    run = nginx_with_standby(tmp_path)
    source = graph(run, "webstack nginx").source
    for name in drawn_names(run):
        assert name in source
    assert source.count('label="nginx LB droplet') == 2
    assert "warm spare" in source and "Reserved IP" in source
    assert source.count('label="app droplet') == 3  # LB droplets are not app servers
    assert source.count('label="DB standby') == 1  # nodeCount 2: primary + 1 standby
    assert "subgraph cluster_vpc" in source


def test_the_prometheus_droplet_is_drawn_scraping_the_app_tier(tmp_path):
    data = yaml.safe_load(REFERENCE.read_text())
    data["config"]["webstack:monitoring"] = {"prometheus": True}
    data["config"]["webstack:alerts"] = {
        **data["config"]["webstack:alerts"], "slackChannel": "#ops",
        "slackUrl": {"secure": "v1:offline"}}
    path = tmp_path / "Pulumi.prom.yaml"
    path.write_text(yaml.safe_dump(data))
    source = graph(run_program(path), "webstack prom").source
    assert source.count('label="app droplet') == 3  # Prometheus is not an app server
    assert source.count('label="Prometheus + Alertmanager') == 1
    assert "scrapes /metrics" in source
