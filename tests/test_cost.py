"""The cost model, to the cent: resources registered directly, then the whole program.

Golden figures come from the price table (components/catalog.yaml), so a change of price moves
the expectation with it, while a change in what the program registers fails the test.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pulumi
import pulumi_digitalocean as do
import pytest
import yaml

from components import cost
from components.settings import BudgetSettings, catalog
from tools import plan
from tools.mocks import Run, run_function, run_program

REFERENCE = Path(__file__).parent / "stacks" / "Pulumi.reference.yaml"


def droplet_price(slug: str) -> Decimal:
    return Decimal(catalog()["droplet_sizes"][slug]["monthly_usd"])


def database_price(slug: str) -> Decimal:
    return Decimal(catalog()["database_sizes"][slug]["monthly_usd"])


def tracked(register, budget: BudgetSettings | None = None) -> tuple[Run, dict[str, Any]]:
    """Run `register` under the mocks between `CostTracker.install()` and `finish`."""
    outputs: dict[str, Any] = {}

    def program() -> None:
        tracker = cost.CostTracker.install()
        register()
        no_budget = BudgetSettings(monthly_usd=None, enforce=False)
        outputs.update(cost.finish(tracker, budget or no_budget))

    return run_function(program, stack="t"), outputs


def reference_resources(stack: str = "t") -> None:
    """The original design, registered directly: 3 droplets, 1 LB node, PG + 1 replica."""
    for i in range(3):
        do.Droplet(f"{stack}-app-{i}", size="s-1vcpu-1gb", image="debian-12-x64", region="nyc3")
    do.LoadBalancer(f"{stack}-lb", region="nyc3", size_unit=1, forwarding_rules=[])
    db = do.DatabaseCluster(f"{stack}-db", engine="pg", version="15", size="db-s-1vcpu-1gb",
                            node_count=1, region="nyc3")
    do.DatabaseReplica(f"{stack}-db-replica", cluster_id=db.id, size="db-s-1vcpu-1gb",
                       region="nyc3")
    do.Vpc(f"{stack}-vpc", region="nyc3")  # no charge: priced at nothing, and no error


def one_droplet(**props: Any) -> cost.Breakdown:
    run, _ = tracked(lambda: do.Droplet("t-app", image="debian-12-x64", region="nyc3", **props))
    return cost.price_run(run)


# --------------------------------------------------------------------------- pricing


def test_reference_design_costs_60():
    assert cost.reference_design().total == Decimal("60.00")


def test_the_tracker_prices_registered_resources_under_the_mocks():
    run, outputs = tracked(reference_resources)

    assert outputs["monthly_cost_usd"] == "60.00"
    assert [line["resource"] for line in outputs["cost_breakdown"]] == [
        "t-app-0", "t-app-1", "t-app-2", "t-db", "t-db-replica", "t-lb"]
    assert "webstack: monthly cost $60.00 (6 lines, no budget)" in run.infos
    # One pricing core: the offline plan's view of the same run says the same, line by line.
    assert cost.breakdown_json(cost.price_run(run)) == outputs


def test_a_standby_adds_one_node_of_its_plan():
    def cluster(node_count: int):
        return lambda: do.DatabaseCluster("t-db", engine="pg", version="15", region="nyc3",
                                          size="db-s-1vcpu-2gb", node_count=node_count)

    single, with_standby = (cost.price_run(tracked(cluster(n))[0]) for n in (1, 2))
    assert with_standby.total - single.total == database_price("db-s-1vcpu-2gb") == Decimal(30)
    assert "primary + 1 standby" in plan.cost_table(with_standby)


@pytest.mark.parametrize(("policy", "fraction"), [
    ({"plan": "weekly", "weekday": "SUN", "hour": 4}, "0.20"),
    ({"plan": "daily", "hour": 4}, "0.30"),
    (None, "0.30"),  # backups on without a policy: the provider's default plan is daily
])
def test_droplet_backups_add_the_tables_fraction(policy, fraction):
    plain = one_droplet(size="s-1vcpu-2gb")
    backed_up = one_droplet(size="s-1vcpu-2gb", backups=True, backup_policy=policy)
    assert backed_up.total - plain.total == droplet_price("s-1vcpu-2gb") * Decimal(fraction)
    assert [line.kind for line in backed_up.lines] == ["droplet", "droplet backups"]


def test_backup_policy_given_as_args_is_read_in_the_program():
    _, outputs = tracked(lambda: do.Droplet(
        "t-app", size="s-1vcpu-1gb", image="debian-12-x64", region="nyc3", backups=True,
        backup_policy=do.DropletBackupPolicyArgs(plan="weekly", weekday="SUN", hour=4)))
    assert outputs["monthly_cost_usd"] == "7.20"  # 6.00 + 20 %


def test_load_balancer_nodes_and_uptime_checks_and_reserved_ips():
    run, outputs = tracked(lambda: (
        do.LoadBalancer("t-lb", region="nyc3", size_unit=3, forwarding_rules=[]),
        do.UptimeCheck("t-uptime", target="https://example.com/healthz"),
        do.ReservedIp("t-ip", region="nyc3"),
    ))
    lines = {line["resource"]: line for line in outputs["cost_breakdown"]}
    assert lines["t-lb"]["quantity"] == 3 and lines["t-lb"]["monthly_usd"] == "36.00"
    assert lines["t-uptime"]["monthly_usd"] == "1.00"
    assert lines["t-ip"]["monthly_usd"] == "0.00"
    assert outputs["monthly_cost_usd"] == "37.00"


def test_app_platform_equivalent_keeps_the_databases_and_prices_containers():
    reference = cost.reference_design()
    app_platform = cost.app_platform_equivalent(reference, app_instances=3)
    container = Decimal(catalog()["app_platform_container_1gb"]["monthly_usd"])
    assert app_platform.total == 3 * container + 2 * database_price("db-s-1vcpu-1gb")
    assert app_platform.total == Decimal("66.00")
    assert "+6.00" in plan.cost_diff(reference, app_platform)


def test_a_read_of_an_existing_resource_is_not_priced():
    run, outputs = tracked(lambda: do.Droplet.get("t-existing", "123"))
    assert outputs["monthly_cost_usd"] == "0.00"
    assert cost.price_run(run).total == 0


# --------------------------------------------------------------------------- refusals


def test_an_unknown_slug_fails_naming_it():
    with pytest.raises(cost.CostError, match="s-64vcpu-512gb"):
        one_droplet(size="s-64vcpu-512gb")
    with pytest.raises(cost.CostError, match="db-s-99vcpu"):
        tracked(lambda: do.DatabaseCluster("t-db", engine="pg", version="15", region="nyc3",
                                           size="db-s-99vcpu", node_count=1))


def test_a_price_bearing_output_fails_naming_the_field():
    with pytest.raises(cost.CostError, match="Droplet 't-app': size is a pulumi Output"):
        tracked(lambda: do.Droplet("t-app", size=pulumi.Output.from_input("s-1vcpu-1gb"),
                                   image="debian-12-x64", region="nyc3"))


def test_an_unpriced_digitalocean_type_fails_rather_than_costing_nothing():
    with pytest.raises(cost.CostError, match="digitalocean:index/volume:Volume"):
        tracked(lambda: do.Volume("t-data", region="nyc3", size=100))


# --------------------------------------------------------------------------- budget


def test_over_an_enforced_budget_fails_naming_the_budget_and_the_total():
    budget = BudgetSettings(monthly_usd=Decimal("50"), enforce=True)
    with pytest.raises(cost.BudgetError) as error:
        tracked(reference_resources, budget)
    message = str(error.value)
    assert "webstack:budget.monthlyUsd" in message
    assert "$50.00" in message and "$60.00" in message and "$10.00 over" in message


def test_over_a_budget_not_enforced_warns_and_goes_on():
    budget = BudgetSettings(monthly_usd=Decimal("59.99"), enforce=False)
    run, outputs = tracked(reference_resources, budget)
    assert outputs["monthly_cost_usd"] == "60.00"
    [warning] = [w for w in run.warnings if "budget" in w]
    assert "webstack:budget.monthlyUsd is $59.99" in warning and "$60.00" in warning


def test_exactly_at_budget_is_within_it():
    run, _ = tracked(reference_resources, BudgetSettings(monthly_usd=Decimal("60"), enforce=True))
    assert not run.warnings


# --------------------------------------------------------------------------- text


def test_format_table_lists_every_line_and_the_total():
    table = plan.cost_table(cost.reference_design())
    assert table.splitlines()[-1].split() == ["total", "60.00"]
    for line in cost.reference_design().lines:
        assert line.resource in table


def test_diff_pairs_lines_across_stacks_and_shows_only_changes():
    small, _ = tracked(reference_resources)

    def bigger() -> None:
        reference_resources("u")
        do.Droplet("u-app-3", size="s-1vcpu-1gb", image="debian-12-x64", region="nyc3")

    text = plan.cost_diff(cost.price_run(small), cost.price_run(run_function(bigger, stack="u")))
    rows = text.splitlines()
    assert rows[0].split()[2:] == ["t", "u", "change"]
    assert rows[1].split() == ["app-3", "droplet", "-", "1", "x", "s-1vcpu-1gb:", "6.00", "+6.00"]
    assert rows[2].split() == ["total", "60.00", "66.00", "+6.00"]
    assert rows[3] == "(6 unchanged lines not shown)"


# --------------------------------------------------------------------------- whole program


def stack_variant(tmp_path: Path, name: str, **changes: dict[str, Any]) -> Path:
    """A copy of the reference stack with some config objects updated, as Pulumi.<name>.yaml."""
    data = yaml.safe_load(REFERENCE.read_text())
    for key, values in changes.items():
        data["config"].setdefault(f"webstack:{key}", {}).update(values)
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_reference_stack_costs_the_reference_design_to_the_cent():
    run = run_program(REFERENCE)
    breakdown = cost.price_run(run)
    assert breakdown.total == cost.reference_design().total == Decimal("60.00")
    # The program's own outputs (the SDK transformation) agree with the offline pricing.
    assert cost.breakdown_json(breakdown) == {
        key: run.outputs[key]
        for key in ("monthly_cost_usd", "monthly_cost_max_usd", "cost_breakdown")}
    # Line by line, the program registers exactly the reference design.
    rows = plan.cost_diff(cost.reference_design(), breakdown).splitlines()
    assert rows[-1] == "(6 unchanged lines not shown)", rows


def test_the_uptime_checks_add_the_tables_figure_each(tmp_path):
    """The reference design has a replica: one check on /healthz, one on the lag endpoint."""
    base = cost.price_run(run_program(REFERENCE)).total
    checked = run_program(stack_variant(tmp_path, "checked", alerts={"uptimeCheck": True}))
    uptime = Decimal(catalog()["uptime_check"]["monthly_usd"])
    assert len(checked.of_type("UptimeCheck")) == 2
    assert cost.price_run(checked).total - base == 2 * uptime == Decimal("2.00")


def test_weekly_backups_in_config_add_the_tables_figure(tmp_path):
    base = cost.price_run(run_program(REFERENCE)).total
    weekly = run_program(stack_variant(tmp_path, "weekly", app={"backups": "weekly"}))
    fraction = Decimal(catalog()["droplet_backups"]["weekly"]["fraction"])
    assert cost.price_run(weekly).total - base == 3 * droplet_price("s-1vcpu-1gb") * fraction
    assert cost.price_run(weekly).total - base == Decimal("3.60")


def test_a_standby_in_config_adds_one_node_of_a_2gib_plan(tmp_path):
    two_gib = {"size": "db-s-1vcpu-2gb", "replicas": [{"size": "db-s-1vcpu-2gb"}]}
    single = run_program(stack_variant(tmp_path, "single", database={**two_gib, "nodeCount": 1}))
    standby = run_program(stack_variant(tmp_path, "standby", database={**two_gib, "nodeCount": 2}))
    change = cost.price_run(standby).total - cost.price_run(single).total
    assert change == database_price("db-s-1vcpu-2gb") == Decimal("30.00")


def test_the_program_stops_over_an_enforced_budget(tmp_path):
    over = stack_variant(tmp_path, "over", budget={"monthlyUsd": 55, "enforce": True})
    with pytest.raises(cost.BudgetError, match=r"monthlyUsd is \$55.00 .* \$60.00"):
        run_program(over)
