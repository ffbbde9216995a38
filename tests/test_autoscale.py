"""app.scaling.mode autoscale under the mocks: one Droplet Autoscale pool of the same droplet the
fixed mode builds, reached by tag by the LB, the firewalls and the alerts, priced as a range."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from functools import cache

import pulumi
import yaml

from components.app_tier import AppTier
from components.frontend import WebSource
from components.settings import catalog
from components.stack import app_tier_args
from tests.factories import make_settings
from tools.mocks import ROOT, Run, run_function, run_program

STACK_FILE = ROOT / "tests" / "stacks" / "Pulumi.prod-autoscale.yaml"
KEY = "3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa"
SCALING = {"mode": "autoscale", "minInstances": 2, "maxInstances": 5, "targetCpuPercent": 60,
           "targetMemoryPercent": 70, "cooldownMinutes": 15}
DROPLET_ONLY = {"monitoring", "backups", "backupPolicy", "gracefulShutdown"}
"""Droplet inputs a pool's template has no field for: monitoring is `withDropletAgent` there;
backups and graceful shutdown cannot be carried over (settings refuse app.backups with
autoscale; DigitalOcean shuts a member down and waits 60 s before destroying it)."""


def run_tier(settings) -> Run:
    def program():
        tier = AppTier("app", app_tier_args(
            settings, web_source=WebSource(load_balancer_uids=["lb-uid-1"]), vpc_id="vpc-1",
            ssh_keys=[KEY], user_data=pulumi.Output.secret("#cloud-config\n")))
        pulumi.export("droplet_ids", tier.droplet_ids)
        if tier.pool_id is not None:
            pulumi.export("pool_id", tier.pool_id)

    return run_function(program, stack=settings.stack)


@cache
def stack_run() -> Run:
    return run_program(STACK_FILE)


def test_the_pool_template_is_the_fixed_droplet_field_for_field():
    fixed = run_tier(make_settings()).of_type("index/droplet:Droplet")[0]
    pool = run_tier(make_settings(app={"scaling": SCALING})).one("DropletAutoscale")
    template = pool.inputs["dropletTemplate"]
    shared = set(fixed.inputs) - DROPLET_ONLY
    assert set(template) == shared | {"withDropletAgent"}, "no field added or lost"
    for field in shared:
        assert template[field] == fixed.inputs[field], field
    assert template["withDropletAgent"] is fixed.inputs["monitoring"] is True
    assert "dropletTemplate" in pool.secret_inputs, "the user data stays secret"


def test_the_pool_takes_the_scaling_settings_as_the_api_does():
    run = run_tier(make_settings(app={"scaling": SCALING}))
    pool = run.one("DropletAutoscale")
    assert pool.inputs["config"] == {"minInstances": 2, "maxInstances": 5,
                                     "targetCpuUtilization": 0.6,
                                     "targetMemoryUtilization": 0.7, "cooldownMinutes": 15}
    assert "name" not in pool.inputs, "auto-named: the API cannot rename a pool"
    assert not run.of_type("index/droplet:Droplet") and not run.of_type("remote:Command")
    assert run.outputs["droplet_ids"] == [] and run.outputs["pool_id"] == "app-pool-id"
    firewall = run.one("index/firewall:Firewall")
    assert firewall.urn in pool.depends_on, "no member boots before its firewall"


def test_the_lb_firewalls_and_alerts_reach_pool_members_by_their_tag():
    run = stack_run()
    tag = run.one("DropletAutoscale").inputs["dropletTemplate"]["tags"]
    assert tag == [run.outputs["app_tag"]] == ["webstack-prod-autoscale-app"]
    lb = run.one("loadBalancer:LoadBalancer").inputs
    assert lb["dropletTag"] == tag[0] and "dropletIds" not in lb
    assert run.one("index/firewall:Firewall").inputs["tags"] == tag
    for firewall in run.of_type("databaseFirewall:DatabaseFirewall"):
        assert firewall.inputs["rules"] == [{"type": "tag", "value": tag[0]}]
    app_alerts = [a for a in run.of_type("MonitorAlert") if "-alerts-app-" in a.name]
    assert len(app_alerts) == 3
    assert all(a.inputs["tags"] == tag and "entities" not in a.inputs for a in app_alerts)


def test_outputs_name_the_pool_and_the_tag_not_droplets():
    outputs = stack_run().outputs
    assert outputs["app_pool_id"] == "prod-autoscale-app-pool-id"
    assert "app_droplet_ids" not in outputs and "app_private_ips" not in outputs
    assert "db_grants" in outputs, "for the one-time grant, run by hand on a member"
    assert not stack_run().of_type("remote:Command"), "pulumi cannot reach pool members"
    user_data = stack_run().one("DropletAutoscale").inputs["dropletTemplate"]["userData"]
    assert "DATABASE_URL=" in user_data, "a member boots alone: its secrets are in its user data"


def test_the_cost_range_is_the_sum_of_list_prices():
    """Independent of the cost model: the stack file's figures times the catalog's prices."""
    config = yaml.safe_load(STACK_FILE.read_text())["config"]
    app, db = config["webstack:app"], config["webstack:database"]
    droplets, databases = catalog()["droplet_sizes"], catalog()["database_sizes"]
    droplet = Decimal(droplets[app["dropletSize"]]["monthly_usd"])
    fixed = (Decimal(catalog()["load_balancer_node"]["monthly_usd"]) * config[
        "webstack:frontend"]["sizeUnit"]
        + Decimal(databases[db["size"]]["monthly_usd"]) * db["nodeCount"]
        + sum(Decimal(databases[r["size"]]["monthly_usd"]) for r in db["replicas"])
        # uptime checks: /healthz, and /readyz/replication with replicas
        + Decimal(catalog()["uptime_check"]["monthly_usd"]) * (1 + bool(db["replicas"])))
    least = fixed + droplet * app["scaling"]["minInstances"]
    most = fixed + droplet * app["scaling"]["maxInstances"]
    outputs = stack_run().outputs
    assert (Decimal(outputs["monthly_cost_usd"]), Decimal(outputs["monthly_cost_max_usd"])) == (
        least, most) == (Decimal("116.00"), Decimal("140.00"))
    pool = next(line for line in outputs["cost_breakdown"] if line["kind"] == "pool droplets")
    assert (pool["quantity"], pool["quantity_max"]) == (2, 6)
    assert (pool["monthly_usd"], pool["monthly_max_usd"]) == ("12.00", "36.00")


def test_the_budget_holds_the_most_the_pool_may_cost(tmp_path):
    """116.00 at the least is within 120, 140.00 at the most is not: the plan stops."""
    data = yaml.safe_load(STACK_FILE.read_text())
    data["config"]["webstack:budget"] = {"monthlyUsd": 120, "enforce": True}
    path = tmp_path / "Pulumi.prodautoscale.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "tools.plan", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout
    assert "webstack:budget.monthlyUsd is $120.00 but the stack may cost up to $140.00" in \
        result.stderr


def test_the_plan_shows_the_pool_the_lb_by_tag_and_the_cost_range():
    result = subprocess.run([sys.executable, "-m", "tools.plan", str(STACK_FILE)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "+ digitalocean:DropletAutoscale  prod-autoscale-app-pool" in out
    assert "2-6 droplets, target cpu 60%, cooldown 10 min" in out
    assert "target tag=webstack-prod-autoscale-app" in out
    assert "$116.00 to $140.00" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:] == ["116.00", "140.00"]


def test_the_readme_worked_example_is_the_plans():
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `prod-autoscale`"))
    least, most = (cell.strip() for cell in row.strip("|").split("|")[-2:])
    outputs = stack_run().outputs
    assert (least, most) == (outputs["monthly_cost_usd"], outputs["monthly_cost_max_usd"])
    fixed = next(line for line in readme.splitlines() if line.startswith("| `prod`: 3 fixed"))
    assert fixed.rstrip(" |").endswith(run_program(ROOT / "Pulumi.prod.yaml").outputs[
        "monthly_cost_usd"])
