"""The cost model: what a stack costs per month, priced from the resources it registers.

It reads resources, not config, so it cannot drift from what `pulumi up` would create.
Two ways in, one pricing core:

* In the program, under the real engine or the mocks: `CostTracker.install()`, before any
  resource, registers an SDK-side stack transformation that records every resource's type, name
  and props as registered; `finish(tracker, budget)` prices them, logs the total, applies the
  budget and returns the cost stack outputs.
* Offline: `price_run(run)` / `breakdown_from_resources(resources)` price what a
  `tools.mocks.Run` recorded (camelCase inputs).

Both become `Registered(type, name, props)` with snake_case props, which `price` turns into a
`Breakdown` of `LineItem`s in exact cents, from the prices in `components/catalog.yaml`.
A slug the catalog does not list, a digitalocean type the model neither prices nor knows to be
free, or a price-bearing field given as an Output is a `CostError` naming it: never a silent zero.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pulumi

from components.settings import BudgetSettings, catalog

CENT = Decimal("0.01")
DROPLET = "digitalocean:index/droplet:Droplet"
LOAD_BALANCER = "digitalocean:index/loadBalancer:LoadBalancer"
DATABASE_CLUSTER = "digitalocean:index/databaseCluster:DatabaseCluster"
DATABASE_REPLICA = "digitalocean:index/databaseReplica:DatabaseReplica"
RESERVED_IP = "digitalocean:index/reservedIp:ReservedIp"
UPTIME_CHECK = "digitalocean:index/uptimeCheck:UptimeCheck"
AUTOSCALE_POOL = "digitalocean:index/dropletAutoscale:DropletAutoscale"
DATABASE_KINDS = ("database nodes", "read replica")
"""Line kinds that an App Platform setup keeps as they are."""


class CostError(ValueError):
    """A registered resource cannot be priced; the message names the resource and the reason."""


class BudgetError(pulumi.RunError):
    """The stack would cost more than its enforced `webstack:budget.monthlyUsd`.

    A `pulumi.RunError`, so `pulumi preview/up` stops with this message and no traceback.
    """


def cents(value: Decimal) -> Decimal:
    """`value` rounded to the cent, half up."""
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Registered:
    """One resource as the program registered it: type token, name and snake_case props."""

    type: str
    name: str
    props: Mapping[str, Any]


@dataclass(frozen=True)
class LineItem:
    """One priced line: `quantity` x `unit_usd` per month for `resource`."""

    resource: str
    kind: str
    """What it is, independent of its size (droplet, droplet backups, database nodes...)."""
    detail: str
    """The plan behind the price, such as the size slug."""
    quantity: int
    unit_usd: Decimal
    source: str
    """The price's source: a key of `sources` in the catalog."""
    quantity_max: int | None = None
    """The most there may be (an autoscale pool's maxInstances); None: `quantity`, always."""

    @property
    def most(self) -> int:
        return self.quantity if self.quantity_max is None else self.quantity_max

    @property
    def monthly_usd(self) -> Decimal:
        """The least it costs a month (`quantity` of it)."""
        return cents(self.unit_usd * self.quantity)

    @property
    def monthly_max_usd(self) -> Decimal:
        """The most it costs a month (`most` of it, all month)."""
        return cents(self.unit_usd * self.most)

    def to_json(self) -> dict[str, Any]:
        """Plain values for a stack output or JSON; amounts as strings, exact to the cent."""
        return {
            "resource": self.resource, "kind": self.kind, "detail": self.detail,
            "quantity": self.quantity, "quantity_max": self.most, "unit_usd": str(self.unit_usd),
            "monthly_usd": str(self.monthly_usd), "monthly_max_usd": str(self.monthly_max_usd),
            "source": self.source,
        }


@dataclass(frozen=True)
class Breakdown:
    """What a stack costs per month, line by line."""

    lines: tuple[LineItem, ...]
    stack: str = ""
    """The stack whose resources these are: names start with `<stack>-`, which `diff` ignores."""

    @property
    def total(self) -> Decimal:
        """The least the stack costs a month (an autoscale pool at minInstances)."""
        return sum((line.monthly_usd for line in self.lines), Decimal("0.00"))

    @property
    def max_total(self) -> Decimal:
        """The most it costs a month (a pool at maxInstances all month); `total` when fixed."""
        return sum((line.monthly_max_usd for line in self.lines), Decimal("0.00"))

    @property
    def range_text(self) -> str:
        """"$40.00", or "$40.00 to $58.00" for a stack whose cost varies."""
        if self.max_total == self.total:
            return f"${self.total}"
        return f"${self.total} to ${self.max_total}"


def breakdown_json(breakdown: Breakdown) -> dict[str, Any]:
    """The cost stack outputs: `monthly_cost_usd` ("61.00", the least), `monthly_cost_max_usd`
    (the most: an autoscale pool at maxInstances; the same when fixed) and `cost_breakdown`.

    Amounts are strings so that cents stay exact in JSON and in `pulumi stack output`.
    """
    return {
        "monthly_cost_usd": str(breakdown.total),
        "monthly_cost_max_usd": str(breakdown.max_total),
        "cost_breakdown": [line.to_json() for line in breakdown.lines],
    }


# --------------------------------------------------------------------------- the pricing core


def _label(r: Registered) -> str:
    return f"{r.type.rpartition(':')[2]} {r.name!r}"


def _plain(r: Registered, *path: str) -> Any:
    """The value at `path` in the props (None when unset); CostError when it is an Output."""
    value: Any = r.props
    for key in path:
        if value is None:
            return None
        value = value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)
        if isinstance(value, pulumi.Output) or inspect.isawaitable(value):
            raise CostError(
                f"{_label(r)}: {'.'.join(path)} is a pulumi Output, but its price depends on it;"
                " pass a plain value"
            )
    return value


def _count(r: Registered, key: str, default: int | None = None) -> int:
    value = _plain(r, key)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise CostError(f"{_label(r)}: {key} must be a whole number to price it, not {value!r}")
    return int(value)


def _entry(r: Registered, table: str, slug: Any, key: str) -> Mapping[str, Any]:
    """The catalog entry `slug` of `table`; CostError naming the slug if the catalog lacks it."""
    entry = catalog()[table].get(slug) if isinstance(slug, str) else None
    if entry is None:
        raise CostError(
            f"{_label(r)}: {key} {slug!r} has no price in components/catalog.yaml ({table});"
            f" known: {', '.join(catalog()[table])}"
        )
    return entry


def _line(r: Registered, kind: str, detail: str, quantity: int, entry: Mapping) -> LineItem:
    return LineItem(r.name, kind, detail, quantity, Decimal(entry["monthly_usd"]), entry["source"])


def _no_extra_storage(r: Registered) -> None:
    if _plain(r, "storage_size_mib") is not None:
        raise CostError(f"{_label(r)}: storage_size_mib (extra disk) has no price in the catalog")


def _droplet(r: Registered) -> list[LineItem]:
    slug = _plain(r, "size")
    size = _entry(r, "droplet_sizes", slug, "size")
    lines = [_line(r, "droplet", slug, 1, size)]
    if _plain(r, "backups"):
        plan = _plain(r, "backup_policy", "plan") or "daily"  # the provider's default plan
        backup = _entry(r, "droplet_backups", plan, "backup_policy.plan")
        fraction = Decimal(backup["fraction"])
        lines.append(LineItem(
            r.name, "droplet backups", f"{plan}, {fraction * 100:.0f}% of {slug}", 1,
            cents(Decimal(size["monthly_usd"]) * fraction), backup["source"],
        ))
    return lines


def _autoscale_pool(r: Registered) -> list[LineItem]:
    """Members are ordinary droplets, billed by the hour like any droplet (Droplet Pricing,
    https://docs.digitalocean.com/products/droplets/details/pricing); no separate charge for a
    pool is listed there or in the API description. `minInstances` of them at the least,
    `maxInstances` all month at the most. No backups: the template has none."""
    slug = _plain(r, "droplet_template", "size")
    size = _entry(r, "droplet_sizes", slug, "droplet_template.size")
    least, most = (_plain(r, "config", key) for key in ("min_instances", "max_instances"))
    for key, value in (("min_instances", least), ("max_instances", most)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CostError(f"{_label(r)}: config.{key} must be a whole number, not {value!r}")
    line = _line(r, "pool droplets", slug, least, size)
    return [dataclasses.replace(line, quantity_max=most)]


def _load_balancer(r: Registered) -> list[LineItem]:
    if _plain(r, "size") is not None:
        raise CostError(f"{_label(r)}: size {_plain(r, 'size')!r} has no price; use size_unit")
    if _plain(r, "type") not in (None, "REGIONAL"):
        raise CostError(f"{_label(r)}: type {_plain(r, 'type')!r} has no price; only REGIONAL")
    nodes = _count(r, "size_unit", 1)  # the provider's default
    return [_line(r, "load balancer nodes", "regional", nodes, catalog()["load_balancer_node"])]


def _database_cluster(r: Registered) -> list[LineItem]:
    if _plain(r, "engine") != "pg":
        raise CostError(f"{_label(r)}: engine {_plain(r, 'engine')!r} has no price; only pg")
    _no_extra_storage(r)
    slug, nodes = _plain(r, "size"), _count(r, "node_count")
    entry = _entry(r, "database_sizes", slug, "size")
    standbys = f"primary + {nodes - 1} standby" if nodes > 1 else "primary only"
    return [_line(r, "database nodes", f"{slug}, {standbys}", nodes, entry)]


def _database_replica(r: Registered) -> list[LineItem]:
    _no_extra_storage(r)
    slug = _plain(r, "size")
    return [_line(r, "read replica", slug, 1, _entry(r, "database_sizes", slug, "size"))]


def _reserved_ip(r: Registered) -> list[LineItem]:
    return [_line(r, "reserved ip", "free while assigned", 1, catalog()["reserved_ip"])]


def _uptime_check(r: Registered) -> list[LineItem]:
    return [_line(r, "uptime check", "per check", 1, catalog()["uptime_check"])]


_PRICERS: dict[str, Callable[[Registered], list[LineItem]]] = {
    DROPLET: _droplet,
    AUTOSCALE_POOL: _autoscale_pool,
    LOAD_BALANCER: _load_balancer,
    DATABASE_CLUSTER: _database_cluster,
    DATABASE_REPLICA: _database_replica,
    RESERVED_IP: _reserved_ip,
    UPTIME_CHECK: _uptime_check,
}


def price(records: Iterable[Registered], stack: str = "") -> Breakdown:
    """Price registered resources; CostError for a digitalocean resource it cannot price.

    Resources of other packages (components, providers, random, command) cost nothing here.
    """
    free = set(catalog()["no_charge_types"]["types"])
    lines: list[LineItem] = []
    for r in records:
        if r.type in _PRICERS:
            lines.extend(_PRICERS[r.type](r))
        elif r.type.startswith("digitalocean:") and r.type not in free:
            raise CostError(
                f"{_label(r)}: {r.type} is neither priced nor listed in no_charge_types"
                " in components/catalog.yaml"
            )
    return Breakdown(tuple(sorted(lines, key=lambda line: natural_key(line.resource))), stack)


def natural_key(name: str) -> list[Any]:
    """Sort key for names in natural order: app-2 before app-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- in the program


class CostTracker:
    """Records what the program registers, for `finish` to price.

    `install()` must come before the first resource: the transformation is inherited by
    resources created after it. A read of an existing resource (`.get`) creates nothing and is
    not recorded.
    """

    def __init__(self) -> None:
        self.records: list[Registered] = []

    @classmethod
    def install(cls) -> CostTracker:
        tracker = cls()
        pulumi.runtime.register_stack_transformation(tracker._record)
        return tracker

    def _record(self, args: pulumi.ResourceTransformationArgs) -> None:
        if not args.opts.id:
            self.records.append(Registered(args.type_, args.name, dict(args.props)))

    def breakdown(self) -> Breakdown:
        """Price what was recorded so far."""
        return price(self.records, pulumi.get_stack())


def check_budget(breakdown: Breakdown, budget: BudgetSettings) -> None:
    """Over budget: BudgetError when the budget is enforced, else a warning. At budget is fine.
    The budget holds the most the stack may cost (an autoscale pool at maxInstances)."""
    most = breakdown.max_total
    if budget.monthly_usd is None or most <= budget.monthly_usd:
        return
    limit = cents(budget.monthly_usd)
    would = "would cost" if most == breakdown.total else "may cost up to"
    message = (
        f"webstack:budget.monthlyUsd is ${limit} but the stack {would} ${most}"
        f" per month (${most - limit} over)"
    )
    if budget.enforce:
        raise BudgetError(f"{message}; raise the budget or shrink the stack")
    pulumi.log.warn(f"{message}; not enforced (webstack:budget.enforce is false)")


def finish(tracker: CostTracker, budget: BudgetSettings) -> dict[str, Any]:
    """Price what the program registered, log it, apply the budget; return the cost outputs.

    The outputs are those of `breakdown_json`. Raises BudgetError over an enforced budget.
    """
    breakdown = tracker.breakdown()
    limit = "no budget" if budget.monthly_usd is None else f"budget ${cents(budget.monthly_usd)}"
    pulumi.log.info(
        f"webstack: monthly cost {breakdown.range_text} ({len(breakdown.lines)} lines, {limit})"
    )
    check_budget(breakdown, budget)
    return breakdown_json(breakdown)


# --------------------------------------------------------------------------- offline


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _snake_keys(value: Any) -> Any:
    """camelCase inputs (as on the wire) to the SDK's snake_case, objects within included."""
    if isinstance(value, Mapping):
        return {_snake(k): _snake_keys(v) for k, v in value.items()}
    return value


def breakdown_from_resources(resources: Iterable[Any]) -> Breakdown:
    """Price `tools.mocks.Resource` records (type, name, urn, custom, camelCase inputs)."""
    custom = [r for r in resources if r.custom]
    stack = custom[0].urn.split("::")[0].removeprefix("urn:pulumi:") if custom else ""
    return price(
        (Registered(r.type, r.name, _snake_keys(r.inputs)) for r in custom),
        stack,
    )


def price_run(run: Any) -> Breakdown:
    """Price everything a `tools.mocks.Run` registered."""
    return breakdown_from_resources(run.resources)


# --------------------------------------------------------------------------- comparisons


def reference_design() -> Breakdown:
    """The original design: 3 x s-1vcpu-1gb, 1 LB node, PostgreSQL db-s-1vcpu-1gb + 1 replica."""
    records = [  # named as the program names them, so that `diff` pairs the lines
        *(Registered(DROPLET, f"reference-app-{i}", {"size": "s-1vcpu-1gb"}) for i in range(3)),
        Registered(LOAD_BALANCER, "reference-web-lb", {"size_unit": 1}),
        Registered(DATABASE_CLUSTER, "reference-db-cluster",
                   {"engine": "pg", "size": "db-s-1vcpu-1gb", "node_count": 1}),
        Registered(DATABASE_REPLICA, "reference-db-replica-0", {"size": "db-s-1vcpu-1gb"}),
    ]
    return price(records, "reference")


def app_platform_equivalent(breakdown: Breakdown, app_instances: int) -> Breakdown:
    """App Platform with the same redundancy: `app_instances` 1 GiB containers (load balancing
    included) plus the same managed database lines as `breakdown`."""
    container = catalog()["app_platform_container_1gb"]
    prefix = f"{breakdown.stack}-" if breakdown.stack else ""
    app = LineItem(f"{prefix}app", "app platform", "1 GiB container", app_instances,
                   Decimal(container["monthly_usd"]), container["source"])
    databases = tuple(line for line in breakdown.lines if line.kind in DATABASE_KINDS)
    return Breakdown((app, *databases), breakdown.stack)
