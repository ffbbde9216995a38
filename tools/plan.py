"""The offline plan: what `pulumi preview` would create for a stack, with no account at all.

Runs the real `__main__.py` under the project's Pulumi mocks with a stack's config, holds every
registered resource against the API contract (`components/contract.yaml`: a violation stops the
plan with one line, before anything is printed), and prints the resource tree (type, name,
parent) with the properties a reviewer cares about, the stack outputs (secrets as [secret]),
warnings, and the monthly cost.

    python -m tools.plan staging            # or prod, or a path to a Pulumi.<stack>.yaml
    python -m tools.plan prod --json
    python -m tools.plan prod --diff staging
    python -m tools.plan prod --diagram docs/prod.png
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the program imports `components` as `pulumi up` would
    sys.path.insert(0, str(ROOT))

from components import contract, cost  # noqa: E402
from components.cost import Breakdown, LineItem, natural_key  # noqa: E402
from components.settings import ConfigError, find_stack_file  # noqa: E402
from tools.mocks import Resource, Run, run_program  # noqa: E402


class PlanError(Exception):
    """The program refused the stack (bad config, or a budget it may not exceed), or a resource
    it registers breaks the API contract."""


def plan(name: str) -> Run:
    """Run the program for a stack under the mocks and check every resource against the API
    contract; PlanError if the program refuses the stack or DigitalOcean would."""
    try:
        run = run_program(find_stack_file(name))
        contract.check(run.resources)
        return run
    except (ConfigError, FileNotFoundError, contract.ContractError) as error:
        raise PlanError(str(error)) from None
    except Exception as error:  # the engine wraps what the program raised
        root = error
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        if isinstance(root, (ConfigError, cost.BudgetError, cost.CostError)) or \
                "RunError" in type(error).__name__:
            raise PlanError(str(root)) from None
        raise


# --------------------------------------------------------------------------- cost as text


def _table(rows: list[tuple[str, ...]], right: set[int]) -> str:
    """Rows as aligned text columns; the columns in `right` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )


def cost_table(breakdown: Breakdown) -> str:
    """The breakdown as a text table, one row per line item, and the total. A stack whose cost
    varies (an autoscale pool) gets the most beside the least: `qty max` and `monthly max`."""
    if breakdown.max_total == breakdown.total:
        rows = [("resource", "item", "qty", "unit", "monthly")]
        rows += [(line.resource, f"{line.kind}: {line.detail}", str(line.quantity),
                  str(line.unit_usd), str(line.monthly_usd)) for line in breakdown.lines]
        rows.append(("total", "", "", "", str(breakdown.total)))
        return _table(rows, right={2, 3, 4})
    rows = [("resource", "item", "qty", "qty max", "unit", "monthly", "monthly max")]
    rows += [(line.resource, f"{line.kind}: {line.detail}", str(line.quantity), str(line.most),
              str(line.unit_usd), str(line.monthly_usd), str(line.monthly_max_usd))
             for line in breakdown.lines]
    rows.append(("total", "", "", "", "", str(breakdown.total), str(breakdown.max_total)))
    return _table(rows, right={2, 3, 4, 5, 6})


def _key(line: LineItem, stack: str) -> tuple[str, str]:
    return (line.resource.removeprefix(f"{stack}-") if stack else line.resource), line.kind


def cost_diff(a: Breakdown, b: Breakdown) -> str:
    """The lines that differ from `a` to `b` (such as staging to prod), and the total change.

    Lines pair by resource name less the stack prefix, and kind: a resize is one changed line.
    """
    old = {_key(line, a.stack): line for line in a.lines}
    new = {_key(line, b.stack): line for line in b.lines}

    def side(line: LineItem | None) -> str:
        return "-" if line is None else f"{line.quantity} x {line.detail}: {line.monthly_usd}"

    def monthly(line: LineItem | None) -> Decimal:
        return Decimal("0.00") if line is None else line.monthly_usd

    rows = [("resource", "item", a.stack or "before", b.stack or "after", "change")]
    unchanged = 0
    for key in sorted({*old, *new}, key=lambda key: (natural_key(key[0]), key[1])):
        before, after = old.get(key), new.get(key)
        if side(before) == side(after):
            unchanged += 1
            continue
        rows.append((*key, side(before), side(after), f"{monthly(after) - monthly(before):+}"))
    rows.append(("total", "", str(a.total), str(b.total), f"{b.total - a.total:+}"))
    note = f"\n({unchanged} unchanged lines not shown)" if unchanged else ""
    return _table(rows, right={4}) + note


# --------------------------------------------------------------------------- properties


def _rules(rules: list[dict[str, Any]] | None, direction: str) -> list[str]:
    out = []
    for rule in rules or []:
        sources = [*rule.get("sourceAddresses", []), *rule.get("destinationAddresses", []),
                   *(f"tag:{t}" for t in rule.get("sourceTags", [])),
                   *(f"lb:{u}" for u in rule.get("sourceLoadBalancerUids", [])),
                   *(f"droplet:{d}" for d in rule.get("sourceDropletIds", []))]
        port = rule.get("portRange") or "all"
        word = "from" if direction == "in" else "to"
        out.append(f"{direction} {rule.get('protocol')} {port} {word} {', '.join(sources)}")
    return out


def _droplet(i: dict) -> list[str]:
    return [f"{i.get('size')} {i.get('image')} in {i.get('region')}",
            f"monitoring={i.get('monitoring')} backups={i.get('backups', False)}"
            f" ssh_keys={len(i.get('sshKeys') or [])} tags={','.join(i.get('tags') or [])}"]


def _pool(i: dict) -> list[str]:
    c, t = i.get("config") or {}, i.get("dropletTemplate") or {}
    targets = ", ".join(f"{what} {round(c[key] * 100)}%" for what, key in (
        ("cpu", "targetCpuUtilization"), ("memory", "targetMemoryUtilization")) if key in c)
    return [f"{c.get('minInstances')}-{c.get('maxInstances')} droplets, target {targets},"
            f" cooldown {c.get('cooldownMinutes')} min",
            f"template: {t.get('size')} {t.get('image')} in {t.get('region')}"
            f" agent={t.get('withDropletAgent')} ssh_keys={len(t.get('sshKeys') or [])}"
            f" tags={','.join(t.get('tags') or [])}"]


def _lb(i: dict) -> list[str]:
    hc = i.get("healthcheck") or {}
    rules = [f"{r['entryProtocol']}:{r['entryPort']} -> {r['targetProtocol']}:{r['targetPort']}"
             for r in i.get("forwardingRules") or []]
    return [f"size_unit={i.get('sizeUnit')} target tag={i.get('dropletTag')}"
            f" redirect_http_to_https={i.get('redirectHttpToHttps', False)}",
            f"rules: {'; '.join(rules)}",
            f"health: {hc.get('protocol')}:{hc.get('port')}{hc.get('path', '')} every "
            f"{hc.get('checkIntervalSeconds')}s timeout {hc.get('responseTimeoutSeconds')}s "
            f"unhealthy {hc.get('unhealthyThreshold')} healthy {hc.get('healthyThreshold')}"]


def _db(i: dict) -> list[str]:
    windows = i.get("maintenanceWindows") or []
    mw = f" maintenance {windows[0]['day']} {windows[0]['hour']}" if windows else ""
    return [f"{i.get('engine')} {i.get('version')} {i.get('size')} x{i.get('nodeCount')}"
            f" in {i.get('region')}{mw}"]


def _alert(i: dict) -> list[str]:
    scope = i.get("entities") or [f"tag:{t}" for t in i.get("tags") or []]
    return [f"{i.get('type')} {i.get('compare')} {i.get('value')} over {i.get('window')}"
            f" scope={len(scope)} {'entity' if i.get('entities') else 'tag'}"]


PROPERTIES: dict[str, Callable[[dict], list[str]]] = {
    "Droplet": _droplet,
    "DropletAutoscale": _pool,
    "LoadBalancer": _lb,
    "DatabaseCluster": _db,
    "DatabaseReplica": lambda i: [f"{i.get('size')} in {i.get('region')}"],
    "DatabaseConnectionPool": lambda i: [
        f"pgbouncer {i.get('mode')} size={i.get('size')} db={i.get('dbName')}"
        f" user={i.get('user')}"],
    "DatabaseFirewall": lambda i: [
        "allow " + ", ".join(f"{r['type']}:{r['value']}" for r in i.get("rules") or [])],
    "Firewall": lambda i: [*_rules(i.get("inboundRules"), "in"),
                           *_rules(i.get("outboundRules"), "out")],
    "MonitorAlert": _alert,
    "UptimeCheck": lambda i: [f"{i.get('type')} {i.get('target')}"],
    "UptimeAlert": lambda i: [f"{i.get('type')} {i.get('comparison', '')}"
                              f" {i.get('threshold', '')}".rstrip()],
    "DnsRecord": lambda i: [f"{i.get('type')} {i.get('name')}.{i.get('domain')}"],
    "Certificate": lambda i: [f"{i.get('type')} for {', '.join(i.get('domains') or [])}"],
    "Vpc": lambda i: [f"{i.get('region')} {i.get('ipRange') or '(range chosen by DO)'}"],
    "Project": lambda i: [f"{i.get('name')} ({i.get('environment')})"],
    "ReservedIp": lambda i: [f"in {i.get('region')}"],
}


def short_type(resource: Resource) -> str:
    pkg, _, rest = resource.type.partition(":")
    return f"{pkg}:{rest.rpartition(':')[2]}"


def properties(resource: Resource) -> list[str]:
    fn = PROPERTIES.get(resource.type.rpartition(":")[2]) if resource.custom else None
    return fn(resource.inputs) if fn else []


def tree(run: Run) -> list[tuple[int, Resource]]:
    """Resources in tree order (children under their parent, by type then name)."""
    children: dict[str | None, list[Resource]] = {}
    urns = {r.urn for r in run.resources}
    for r in run.resources:
        children.setdefault(r.parent if r.parent in urns else None, []).append(r)
    out: list[tuple[int, Resource]] = []

    def walk(parent: str | None, depth: int) -> None:
        for r in sorted(children.get(parent, []), key=lambda r: (r.custom, r.type, r.name)):
            out.append((depth, r))
            walk(r.urn, depth + 1)

    walk(None, 0)
    return out


def restore_lines(run: Run) -> list[str]:
    """What a `database.restoreFrom` run restores, adopts and creates (components/database.py)."""
    lines = []
    for cluster in run.of_type("databaseCluster:DatabaseCluster"):
        restore = cluster.inputs.get("backupRestore")
        if not restore:
            continue
        siblings = [r for r in run.resources if r.parent == cluster.parent and r is not cluster]
        pool = next(r for r in siblings if r.type.endswith(":DatabaseConnectionPool"))
        at = restore.get("backupCreatedAt") or "its latest backup"
        lines += [
            f"source: cluster '{restore['databaseName']}' (left as it is), restored to {at}",
            f"new: {cluster.name} (a new cluster), "
            + ", ".join(sorted(f"{short_type(r)} {r.name}" for r in siblings)),
            f"adopted from the backup, not created: database '{pool.inputs.get('dbName')}',"
            f" user '{pool.inputs.get('user')}'",
            "the app droplets switch by their rolling replacement (new URIs in their user data);"
            " the source cluster is not in this plan and costs until it is deleted",
        ]
    return lines


def shown_outputs(run: Run) -> dict[str, Any]:
    return {k: "[secret]" if k in run.secret_outputs else v for k, v in run.outputs.items()}


def app_instances(run: Run) -> int:
    """App droplets the stack runs at the least: its droplets, or its pool's minInstances."""
    pools = run.of_type("dropletAutoscale:DropletAutoscale")
    if pools:
        return pools[0].inputs["config"]["minInstances"]
    return len(run.outputs["app_droplet_ids"])


def as_json(run: Run, name: str) -> dict[str, Any]:
    return {
        "stack": name,
        "resources": [
            {"type": r.type, "name": r.name, "parent": r.parent and r.parent.rpartition("::")[2],
             "protect": r.protect, "properties": properties(r)} for _, r in tree(run)],
        "restore": restore_lines(run),
        "outputs": shown_outputs(run),
        "warnings": sorted(run.warnings),  # the engine logs in no fixed order
        "cost": cost.breakdown_json(cost.price_run(run)),
    }


def print_plan(run: Run, name: str) -> None:
    print(f"webstack stack '{name}': {len(run.resources)} resources would be created\n")
    for depth, r in tree(run):
        flag = "  [protected]" if r.protect else ""
        print(f"{'  ' * depth}+ {short_type(r)}  {r.name}{flag}")
        for line in properties(r):
            print(f"{'  ' * depth}    {line}")
    restore = restore_lines(run)
    if restore:
        print("\nDatabase restore (database.restoreFrom):")
        for line in restore:
            print(f"  {line}")
    print("\nOutputs:")
    for key, value in shown_outputs(run).items():
        print(f"  {key}: {json.dumps(value, default=str)}")
    if run.warnings:
        print("\nWarnings:")
        for warning in sorted(run.warnings):
            print(f"  ! {warning}")
    breakdown = cost.price_run(run)
    ranged = breakdown.max_total != breakdown.total
    print("\nMonthly cost (USD, list prices" + (
        f"; {breakdown.range_text}, the pool from minInstances to maxInstances all month;"
        " the budget holds the most)" if ranged else "):"))
    print(cost_table(breakdown))
    app_platform = cost.app_platform_equivalent(breakdown, app_instances(run))
    print(f"\nFor comparison: App Platform with the same redundancy ${app_platform.total};"
          f" the original design ${cost.reference_design().total}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", nargs="?", default="staging",
                        help="stack name (staging, prod) or path to a Pulumi.<stack>.yaml")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--diff", metavar="OTHER", help="print the cost difference to OTHER")
    parser.add_argument("--diagram", metavar="FILE.png", help="draw the architecture to FILE")
    args = parser.parse_args(argv)
    try:
        run = plan(args.stack)
        other = plan(args.diff) if args.diff else None
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        # A program that raised leaves the engine's event loops open; collected at interpreter
        # exit, after their selectors, they would print tracebacks under the one-line error.
        gc.collect()
        return 2
    if args.json:
        print(json.dumps(as_json(run, args.stack), indent=2, default=str))
    else:
        print_plan(run, args.stack)
    if other is not None:
        print(f"\nCost difference {args.diff} -> {args.stack}:")
        print(cost_diff(cost.price_run(other), cost.price_run(run)))
    if args.diagram:
        from tools.diagram import draw

        draw(run, Path(args.diagram), title=f"webstack {args.stack}")
        print(f"\nwrote {args.diagram}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
