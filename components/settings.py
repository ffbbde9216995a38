"""Stack settings: the one place where configuration is read and validated.

`load_settings` turns the `webstack:*` config of a stack into frozen dataclasses, or raises
`ConfigError` naming the key, the bad value and what is allowed. Components, renderers, the
offline plan, the cost model and the lab all take a `Settings`; none reads config on its own.

Every key is declared once, in `KEYS`: default, allowed values, one line of doc. The reader
takes them from there, and Pulumi.yaml's typed keys and docs/configuration.md's table are
printed from them (`pulumi_config`, `config_table`); the dataclasses carry no defaults.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from components import contract

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")
NAMESPACE = "webstack"

ENVIRONMENTS = ("staging", "production")
FRONTEND_MODES = ("managed", "nginx")
BACKUP_PLANS = ("off", "weekly", "daily")
SCALING_MODES = ("fixed", "autoscale")
POOL_MODES = ("transaction", "session", "statement")
# What the API contract (components/contract.yaml, with its sources) lets these keys be.
LOAD_BALANCER = "digitalocean:index/loadBalancer:LoadBalancer"
DATABASE_CLUSTER = "digitalocean:index/databaseCluster:DatabaseCluster"
POOL = "digitalocean:index/databaseConnectionPool:DatabaseConnectionPool"
AUTOSCALE = "digitalocean:index/dropletAutoscale:DropletAutoscale"
PG_VERSIONS = tuple(contract.when_enum(DATABASE_CLUSTER, "version", engine="pg"))
"""PostgreSQL versions DigitalOcean creates new clusters with today (14 reached end of life)."""
ALERT_WINDOWS = tuple(
    w for w in contract.rules("digitalocean:index/monitorAlert:MonitorAlert", "window")["enum"]
    if w in contract.rules("digitalocean:index/uptimeAlert:UptimeAlert", "period")["enum"])
"""Both the alert policies' window and the uptime latency alert's period take it."""
NAME_LENGTH = (contract.rules(POOL, "name")["min_length"],
               contract.rules(POOL, "name")["max_length"])
"""database.name is also the pool's name: the API allows pool names of 3 to 60 characters."""
MIGRATOR = "migrator"
"""The database user that owns the schema and runs the migrations (components/database.py):
`database.name`, the app's user, may not be it."""
TARGET_PERCENT = tuple(
    round(100 * n) for n in contract.bounds(AUTOSCALE, "config.targetCpuUtilization"))
"""A pool's CPU or memory target in percent: the API takes 0.05 to 1 (the provider 0 to 1)."""
RETENTION_DAYS = 7
"""How far back a PostgreSQL cluster can be restored: backups are kept for seven days
(https://docs.digitalocean.com/products/databases/postgresql/how-to/restore-from-backups/; the
API description states no window)."""
_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9-]{1,61}[a-z0-9]$")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
HEALTH_PATH = "/healthz"
"""What the load balancer checks: the app's liveness endpoint (app/health.py), which the policy
pack requires too (policy/rules.py). Not a config key: no other path would be served."""
REPLICATION_PATH = "/readyz/replication"
"""The app's replication-lag endpoint (app/health.py): 503 while a replica lags past
`database.maxReplicaLagSeconds`. The lag uptime check fetches it through the load balancer."""
REPLICA_LAG_SAMPLE_SECONDS = 2
"""How often each app process measures the replicas' lag (DB_REPLICA_LAG_SAMPLE_SECONDS): the
bound holds up to one sample late, so `database.maxReplicaLagSeconds` is at least a few."""

_EMAIL = re.compile(r"^[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_FINGERPRINT = re.compile(r"^([0-9a-f]{2}:){15}[0-9a-f]{2}$")


class ConfigError(ValueError):
    """A stack setting is invalid. The message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        name = key if key.isupper() else f"{NAMESPACE}:{key}"  # an environment variable's as is
        super().__init__(f"{name}: {value!r} is not allowed; {allowed}")


class Secret(str):
    """A config value that must stay secret: plain for validation, masked in any repr."""

    def __repr__(self) -> str:
        return "[secret]"


@dataclass(frozen=True)
class Size:
    """A droplet or database plan from the catalog."""

    slug: str
    vcpus: int
    memory_gib: float
    monthly_usd: Decimal


@cache
def catalog() -> dict[str, Any]:
    """The catalog of regions, images, sizes and prices (`components/catalog.yaml`)."""
    return yaml.safe_load(CATALOG_PATH.read_text())


def droplet_size(slug: str) -> Size:
    spec = catalog()["droplet_sizes"][slug]
    return Size(slug, spec["vcpus"], spec["memory_gib"], Decimal(spec["monthly_usd"]))


def database_size(slug: str) -> Size:
    spec = catalog()["database_sizes"][slug]
    return Size(slug, spec["vcpus"], spec["memory_gib"], Decimal(spec["monthly_usd"]))


def pool_connection_budget(size: Size) -> int:
    """Connections a PostgreSQL plan allows for pools: 25 per GiB of RAM, minus 3 reserved."""
    return int(25 * size.memory_gib) - 3


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True, kw_only=True)
class HealthCheckSettings:
    """The load balancer's active check of every app droplet."""

    path: str = field(default=HEALTH_PATH, init=False)
    """Not a config key: the app answers health checks on HEALTH_PATH only."""
    interval_seconds: int
    timeout_seconds: int
    unhealthy_threshold: int
    healthy_threshold: int

    @property
    def detection_seconds(self) -> int:
        """Worst case until a dead droplet stops receiving traffic."""
        return self.unhealthy_threshold * self.interval_seconds + self.timeout_seconds


# The section dataclasses carry no defaults: every value comes from the key's declaration
# (KEYS, below) through `load_settings`.


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """The app droplets and what runs on them."""

    droplet_count: int
    droplet_size: str
    image: str
    gunicorn_workers: int
    """0: one per core of the droplet size, 2 x cores + 1 sync workers (`workers`)."""
    gunicorn_threads: int
    backups: str
    """Droplet backup plan: off, weekly or daily."""
    max_body_mb: int
    """Largest request body: nginx's client_max_body_size and the app's MAX_BODY_MB."""
    microcache: MicrocacheSettings
    scaling: ScalingSettings

    @property
    def size(self) -> Size:
        return droplet_size(self.droplet_size)

    @property
    def autoscale(self) -> bool:
        return self.scaling.mode == "autoscale"

    @property
    def running_droplets(self) -> int:
        """Droplets running at the least: dropletCount, or the pool's minInstances."""
        return self.scaling.min_instances if self.autoscale else self.droplet_count

    @property
    def most_droplets(self) -> int:
        """Droplets running at the most: dropletCount, or the pool's maxInstances."""
        return self.scaling.max_instances if self.autoscale else self.droplet_count

    @property
    def workers(self) -> int:
        """gunicorn's worker processes: with threads (gthread), one per core, since a Python
        process runs on one core at a time and the threads carry the concurrency. A second
        process on one vCPU only competes for it: nginx's kept-alive upstream connections
        stay with the worker that accepted them, and spread over two workers they served
        fewer note lists than one worker did (`lab.bench --models`, docs/benchmarks.md, "The
        worker model"). The price: while a lone worker is replaced (max_requests, a crash)
        the droplet queues requests for about a second; `app.gunicornWorkers: 2` trades
        capacity for none. Sync workers (`gunicornThreads: 1`) serve one request each, so
        gunicorn's own advice for them: 2 x cores + 1."""
        if self.gunicorn_workers:
            return self.gunicorn_workers
        return self.size.vcpus if self.gunicorn_threads > 1 else 2 * self.size.vcpus + 1


@dataclass(frozen=True, kw_only=True)
class MicrocacheSettings:
    """The droplet's nginx caches anonymous GET responses under `paths` for `seconds`."""

    seconds: int
    """0: off."""
    paths: tuple[str, ...]
    """URI prefixes ("/api/notes"); the cache covers only these."""

    def covers(self, uri: str) -> bool:
        """Whether an anonymous GET of `uri` (path and query) may be answered from the cache."""
        path = uri.partition("?")[0]
        return self.seconds > 0 and any(path.startswith(prefix) for prefix in self.paths)


@dataclass(frozen=True, kw_only=True)
class ScalingSettings:
    """`app.scaling.*`: fixed droplets, or a DigitalOcean Droplet Autoscale pool."""

    mode: str
    min_instances: int
    max_instances: int
    target_cpu_percent: int | None
    """The pool adds members above this average CPU use, removes them below; None: not used."""
    target_memory_percent: int | None
    cooldown_minutes: int
    """Minutes between scaling events; also how long new members get to boot before old ones
    are destroyed after a template change (docs/runbook.md)."""


@dataclass(frozen=True, kw_only=True)
class FrontendSettings:
    """How traffic reaches the app droplets."""

    mode: str
    size_unit: int
    health_check: HealthCheckSettings
    nginx_droplet_size: str
    nginx_droplet_count: int
    """nginx mode: LB droplets; the reserved IP points at the first, the others are warm spares."""
    rate_limit: RateLimitSettings
    body_timeout_seconds: int
    """The longest a client may take to send a whole request body (droplet site, nginx LB)."""


@dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    """Per client address, in the droplet site and the nginx load balancer (the VPC exempt)."""

    requests_per_second: int
    burst: int
    """Requests over the rate served at once before the rest get 429."""
    connections: int


@dataclass(frozen=True, kw_only=True)
class ReplicaSettings:
    size: str
    region: str


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    mode: str
    size: int


@dataclass(frozen=True, kw_only=True)
class MaintenanceSettings:
    day: str
    hour: int
    """UTC hour at which the maintenance window starts."""


@dataclass(frozen=True, kw_only=True)
class RestoreSettings:
    """`database.restoreFrom`: the cluster whose backup the new cluster is created from."""

    cluster: str
    at: dt.datetime | None
    """UTC; None: the latest backup."""


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """The managed PostgreSQL cluster, its standbys, replicas and pool."""

    version: str
    size: str
    node_count: int
    replicas: tuple[ReplicaSettings, ...]
    pool: PoolSettings
    maintenance: MaintenanceSettings
    protect: bool
    name: str
    """The app's database, its user and its pool share this name (never doadmin)."""
    restores: int
    """How many times the stack's cluster was restored: 0 is the cluster the program created
    (it creates the database and user too); n names the nth restored cluster, which adopts the
    database and user its backup holds. Kept after `restore_from` is removed."""
    restore_from: RestoreSettings | None
    """Set for the run that creates restored cluster number `restores`."""
    max_replica_lag_seconds: int
    """A replica further behind is skipped for reads, and the lag endpoint answers 503."""


@dataclass(frozen=True, kw_only=True)
class AlertSettings:
    """Who is told, and when."""

    emails: tuple[str, ...]
    slack_channel: str | None
    slack_url: Secret | None
    cpu_percent: int
    memory_percent: int
    disk_percent: int
    window: str
    latency_ms: int
    """Threshold for the LB p95 latency and uptime latency alerts."""
    uptime_check: bool
    """An uptime check on the site's /healthz from several regions ($1 a month)."""


@dataclass(frozen=True, kw_only=True)
class SmtpSettings:
    """An SMTP relay for Alertmanager's emails (STARTTLS, with a login)."""

    smarthost: str
    """host:port"""
    sender: str
    username: str
    password: Secret


@dataclass(frozen=True, kw_only=True)
class MonitoringSettings:
    """The optional Prometheus droplet in the VPC."""

    prometheus: bool
    prometheus_size: str
    smtp: SmtpSettings | None
    """How Alertmanager sends `alerts.emails` (droplets cannot send mail on port 25)."""

    @property
    def size(self) -> Size:
        return droplet_size(self.prometheus_size)


@dataclass(frozen=True, kw_only=True)
class BudgetSettings:
    monthly_usd: Decimal | None
    enforce: bool


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a stack is, validated. Built by `load_settings`."""

    stack: str
    environment: str
    region: str
    domain: str | None
    hostname: str
    ssh_keys: tuple[str, ...]
    ssh_private_key: Secret | None
    """Private half of one of `ssh_keys`, for the deploy steps run over SSH from the machine
    running `pulumi up` (health-gated rollout, nginx upstream updates, database grants)."""
    admin_cidrs: tuple[str, ...]
    """Where SSH to the droplets is allowed from, besides `deploy_cidr`."""
    deploy_cidr: str | None
    """The deploying machine's own address (one host), admitted to SSH for one `pulumi up`:
    `WEBSTACK_EXTRA_ADMIN_CIDR` in the environment (the deploy workflow's runner)."""
    vpc_ip_range: str | None
    app: AppSettings
    frontend: FrontendSettings
    database: DatabaseSettings
    alerts: AlertSettings
    monitoring: MonitoringSettings
    budget: BudgetSettings

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @property
    def ssh_sources(self) -> tuple[str, ...]:
        """Every CIDR the droplets' firewalls admit to SSH: `adminCidrs`, then `deploy_cidr`."""
        return self.admin_cidrs + ((self.deploy_cidr,) if self.deploy_cidr else ())

    @property
    def fqdn(self) -> str | None:
        """The site's name, or None when the stack has no domain (plain HTTP on the LB's IP)."""
        if not self.domain:
            return None
        return self.domain if self.hostname == "@" else f"{self.hostname}.{self.domain}"

    @property
    def app_tag(self) -> str:
        """The tag on every app droplet: what the LB, firewalls and alerts select by."""
        return f"webstack-{self.stack}-app"

    @property
    def lb_tag(self) -> str:
        """The tag on the nginx load-balancer droplets (nginx frontend mode)."""
        return f"webstack-{self.stack}-lb"

    @property
    def prometheus_tag(self) -> str:
        """The tag on the Prometheus droplet (`monitoring.prometheus`)."""
        return f"webstack-{self.stack}-prometheus"


# --------------------------------------------------------------------------- the keys


@dataclass(frozen=True)
class PerEnvironment:
    """A default or lower bound that differs between staging and production."""

    staging: Any
    production: Any

    def pick(self, production: bool) -> Any:
        return self.production if production else self.staging


@dataclass(frozen=True)
class Key:
    """One `webstack:` config key, declared once: its default, what it allows, one line of doc.

    The reader takes its default, bounds and choices from here; Pulumi.yaml's typed keys and
    docs/configuration.md's table are `pulumi_config()` and `config_table()` of these, kept in
    step by tests/test_readme.py. A default or bound computed from other keys is passed by the
    reader and described by `default_text` / `allowed_text`.
    """

    name: str
    kind: str
    """int, number, bool, choice, str, list, secret or object-list (Pulumi.yaml's type)."""
    doc: str
    default: Any = None
    """None: unset unless given (see `required`)."""
    choices: tuple[str, ...] = ()
    bounds: tuple[int | PerEnvironment, int] | None = None
    required: bool = False
    default_text: str | None = None
    allowed_text: str | None = None

    def default_for(self, production: bool) -> Any:
        if isinstance(self.default, PerEnvironment):
            return self.default.pick(production)
        return self.default

    def default_cell(self) -> str:
        if self.default_text:
            return self.default_text
        if self.required:
            return "required"
        if isinstance(self.default, PerEnvironment):
            return (f"{_text(self.default.staging)} (staging), "
                    f"{_text(self.default.production)} (production)")
        return "none" if self.default is None else _text(self.default)

    def allowed_cell(self) -> str:
        if self.allowed_text:
            return self.allowed_text
        if self.choices:
            return ", ".join(self.choices)
        if self.kind == "bool":
            return "true, false"
        lo, hi = self.bounds
        if isinstance(lo, PerEnvironment):
            return f"{lo.staging}-{hi} (production {lo.production}-{hi})"
        return f"{lo}-{hi}"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "[]" if value == () else str(value)


def _lb_range(field: str) -> tuple[int, int]:
    """The API contract's range for a load-balancer health-check field."""
    return contract.bounds(LOAD_BALANCER, f"healthcheck.{field}")


def _pool_range(field: str) -> tuple[int, int]:
    """The API contract's range for a Droplet Autoscale pool's config field."""
    return contract.bounds(AUTOSCALE, f"config.{field}")


_PRODUCTION = PerEnvironment(False, True)
_DROPLET_SIZES = tuple(catalog()["droplet_sizes"])
_HC = "frontend.healthCheck."

KEYS: dict[str, Key] = {key.name: key for key in [
    Key("environment", "choice", "production requires a domain, ≥2 app droplets, a standby, a"
        " replica; turns on protection and budget enforcement", choices=ENVIRONMENTS,
        default_text="from the stack name (`prod*` is production)"),
    Key("region", "choice", "every resource's region", "nyc3",
        choices=tuple(catalog()["regions"])),
    Key("domain", "str", "HTTPS site; without it (staging only) the LB serves plain HTTP on its"
        " IP, with a warning", allowed_text="a DNS domain on DigitalOcean"),
    Key("hostname", "str", "the site is `hostname.domain`", "www",
        allowed_text="a DNS label, or `@` for the apex"),
    Key("sshKeys", "list", "keys on every droplet; names are looked up in the account",
        required=True, allowed_text="≥1 key name, id or fingerprint"),
    Key("sshPrivateKey", "secret", "deploy steps over SSH: the app's environment file and"
        " Alertmanager's configuration (their secrets stay out of the user data), health gates,"
        " database grants, nginx-LB upstreams, Prometheus's targets",
        default_text="none (required in production)",
        allowed_text="a secret OpenSSH/PEM private key; needs `adminCidrs`"),
    Key("adminCidrs", "list", "SSH sources; empty means no SSH rule at all", (),
        allowed_text="CIDRs covering together at most a /16's worth of IPv4 and a /48's worth of"
        " IPv6 addresses (so `0.0.0.0/1` + `128.0.0.0/1` is refused like `/0`; the policy pack"
        " holds every firewall rule but the LB's web ports to the same cap)"),
    Key("vpcIpRange", "str", "the VPC's range", default_text="chosen by DigitalOcean",
        allowed_text="private, /16 to /24"),
    Key("app.dropletCount", "int", "app droplets", PerEnvironment(1, 3),
        bounds=(PerEnvironment(1, 2), 50)),
    Key("app.dropletSize", "choice", "app droplet size", "s-1vcpu-1gb", choices=_DROPLET_SIZES,
        allowed_text=f"{', '.join(_DROPLET_SIZES)} (`components/catalog.yaml`)"),
    Key("app.image", "choice", "app droplet image", "ubuntu-24-04-x64",
        choices=tuple(catalog()["droplet_images"])),
    Key("app.gunicornWorkers", "int", "gunicorn worker processes; gthread threads carry the"
        " concurrency ([benchmarks.md](benchmarks.md), \"The worker model\")",
        0, bounds=(0, 64),
        default_text="0 (= cores; sync: 2 x cores + 1)"),
    Key("app.gunicornThreads", "int", "threads per worker (gthread) that may do database work;"
        " gunicorn runs one more, kept for `/healthz` ([app.md](app.md))", 2, bounds=(1, 32)),
    Key("app.backups", "choice", "droplet backups (the droplets are stateless)", "off",
        choices=BACKUP_PLANS),
    Key("app.maxBodyMb", "int", "largest request body, for nginx (`client_max_body_size`) and"
        " the app (`MAX_BODY_MB`)", 1, bounds=(1, 1024)),
    Key("app.microcache.seconds", "int", "the droplet's nginx caches 200 responses to GETs"
        " without a session cookie under `app.microcache.paths` for this long, one request"
        " upstream at a time (stale while it updates; `X-Cache-Status`); 0: off", 0,
        bounds=(0, 60)),
    Key("app.microcache.paths", "list", "URI prefixes the micro-cache covers", (),
        allowed_text="paths such as `/api/notes` (letters, digits, `/._~-`); required when"
        " `app.microcache.seconds` is above 0"),
    Key("app.scaling.mode", "choice", "`fixed`: dropletCount droplets; `autoscale`: one"
        " DigitalOcean Droplet Autoscale pool of the same droplet, behind the managed LB by tag"
        " (README, 'Fixed or autoscale')", "fixed", choices=SCALING_MODES,
        allowed_text="fixed, autoscale (autoscale needs `frontend.mode` managed, `app.backups`"
        " off, no `sshPrivateKey`)"),
    Key("app.scaling.minInstances", "int", "autoscale: the pool's fewest droplets",
        PerEnvironment(1, 2), bounds=(PerEnvironment(1, 2), _pool_range("minInstances")[1])),
    Key("app.scaling.maxInstances", "int", "autoscale: the pool's most droplets (the cost"
        " range's top; the budget is checked against it)", default_text="2 x minInstances",
        bounds=(1, _pool_range("maxInstances")[1]),
        allowed_text=f"minInstances-{_pool_range('maxInstances')[1]}"),
    Key("app.scaling.targetCpuPercent", "int", "autoscale: average CPU use the pool scales to",
        allowed_text=f"{TARGET_PERCENT[0]}-{TARGET_PERCENT[1]} (the API's 0.05-1); autoscale"
        " needs this and/or targetMemoryPercent"),
    Key("app.scaling.targetMemoryPercent", "int", "autoscale: average memory use the pool"
        " scales to", allowed_text=f"{TARGET_PERCENT[0]}-{TARGET_PERCENT[1]} (the API's"
        " 0.05-1)"),
    Key("app.scaling.cooldownMinutes", "int", "autoscale: minutes between scaling events, and"
        " what new members get to boot before old ones go after a template change", 10,
        bounds=_pool_range("cooldownMinutes")),
    Key("frontend.mode", "choice", "DigitalOcean LB, or nginx LB droplets + reserved IP",
        "managed", choices=FRONTEND_MODES),
    Key("frontend.sizeUnit", "int", "managed LB nodes (~10,000 req/s each; the API allows 100,"
        " the provider 200)", 1, bounds=contract.bounds(LOAD_BALANCER, "sizeUnit")),
    Key(_HC + "intervalSeconds", "int", f"seconds between checks of `{HEALTH_PATH}` (the only"
        " path the app answers checks on; must answer 2xx, never a redirect)", 10,
        bounds=_lb_range("checkIntervalSeconds")),
    Key(_HC + "timeoutSeconds", "int", "seconds a check may take", 5,
        bounds=_lb_range("responseTimeoutSeconds"),
        allowed_text="{}-{}, ≤ interval".format(*_lb_range("responseTimeoutSeconds"))),
    Key(_HC + "unhealthyThreshold", "int", "a dead droplet leaves after threshold x interval",
        3, bounds=_lb_range("unhealthyThreshold")),
    Key(_HC + "healthyThreshold", "int", "consecutive passed checks before a droplet gets"
        " traffic (and before a health-gated rollout moves on)", 5,
        bounds=_lb_range("healthyThreshold")),
    Key("frontend.nginxDropletSize", "choice", "nginx mode", "s-1vcpu-1gb",
        choices=_DROPLET_SIZES, allowed_text="as `app.dropletSize`"),
    Key("frontend.nginxDropletCount", "int", "nginx mode: the reserved IP's droplet plus warm"
        " spares", 1, bounds=(1, 3)),
    Key("frontend.rateLimit.requestsPerSecond", "int", "requests a second per client address, in"
        " the droplet site and the nginx LB (the VPC and the health checks exempt); over it, 429",
        20, bounds=(1, 10000)),
    Key("frontend.rateLimit.burst", "int", "requests over the rate served at once before 429",
        40, bounds=(0, 100000)),
    Key("frontend.rateLimit.connections", "int", "open connections per client address; over"
        " it, 429", 50, bounds=(1, 10000)),
    Key("frontend.bodyTimeoutSeconds", "int", "the longest a client may take to send a whole"
        " request body (droplet site and nginx LB), however slowly it trickles in; then nginx"
        " closes the connection (408)", 30, bounds=(1, 600)),
    Key("database.version", "choice", "PostgreSQL major version (15 matches the local tests);"
        " 14 reached end of life on 2026-11-12 and new clusters can no longer use it", "15",
        choices=PG_VERSIONS),
    Key("database.size", "choice", "primary (and standby) plan", "db-s-1vcpu-1gb",
        choices=tuple(catalog()["database_sizes"])),
    Key("database.nodeCount", "int", "primary + standbys", PerEnvironment(1, 2),
        bounds=(PerEnvironment(1, 2), 3),
        allowed_text="1-3 (production 2-3); >1 needs ≥2 GiB"),
    Key("database.replicas", "object-list", "read replicas (the app reads them directly,"
        " without a pool)", (), default_text="[] (production needs ≥1)",
        allowed_text="list of `{size, region}`; size ≥ the primary's and with room for"
        " dropletCount x workers x threads connections; region = `region`"),
    Key("database.pool.mode", "choice", "PgBouncer mode", "transaction", choices=POOL_MODES),
    Key("database.pool.size", "int", "pool connections", default_text="min(10, budget)",
        allowed_text="1 to 25 x GiB - 3 of the plan"),
    Key("database.maintenance.day", "choice", "maintenance window's day", "sunday",
        choices=WEEKDAYS, allowed_text="monday to sunday"),
    Key("database.maintenance.hour", "int", "maintenance window's start", 3, bounds=(0, 23),
        allowed_text="0-23 (UTC)"),
    Key("database.protect", "bool", "Pulumi deletion protection on the cluster and database",
        _PRODUCTION),
    Key("database.name", "str", "the app's database, user and pool (the API allows pool names"
        " of 60 characters at most)", "app",
        allowed_text=f"{NAME_LENGTH[0]}-{NAME_LENGTH[1]} lowercase characters, not doadmin"
        f" or {MIGRATOR}"),
    Key("database.restores", "int", "times this stack's cluster was restored from a backup:"
        " 0 creates the app database and user; n ≥ 1 is the nth restored cluster, which adopts"
        " them (raise it with `restoreFrom`, keep it after)", 0, bounds=(0, 99)),
    Key("database.restoreFrom.cluster", "str", "create restored cluster number `restores` from"
        " this cluster's backup (remove `restoreFrom` after the switch; the old cluster is left"
        " alone)", allowed_text="an existing cluster's name: 3-63 lowercase letters, digits,"
        " hyphens"),
    Key("database.restoreFrom.at", "str", "the point in time to restore to",
        default_text="the latest backup",
        allowed_text=f"ISO 8601 UTC (`2026-11-30T08:15:00Z`), within the last {RETENTION_DAYS}"
        " days"),
    Key("database.maxReplicaLagSeconds", "int", "a replica further behind the primary is"
        f" skipped for reads until it catches up, and `{REPLICATION_PATH}` (the lag uptime"
        f" check's) answers 503; measured every {REPLICA_LAG_SAMPLE_SECONDS} s by each app"
        " process", 30, bounds=(5, 3600)),
    Key("alerts.emails", "list", "alert recipients", required=True, allowed_text="≥1 email"),
    Key("alerts.slackChannel", "str", "Slack notifications",
        allowed_text="a channel, with `slackUrl`"),
    Key("alerts.slackUrl", "secret", "Slack notifications",
        allowed_text="a Slack webhook URL, set as a secret, with `slackChannel`"),
    Key("alerts.cpuPercent", "int", "droplet and database CPU threshold", 80, bounds=(1, 100)),
    Key("alerts.memoryPercent", "int", "droplet and database memory threshold", 85,
        bounds=(1, 100)),
    Key("alerts.diskPercent", "int", "droplet and database disk threshold", 85,
        bounds=(1, 100)),
    Key("alerts.window", "choice", "alert evaluation window", "5m", choices=ALERT_WINDOWS),
    Key("alerts.latencyMs", "int", "LB p95 and uptime latency alerts", 1000, bounds=(1, 60000)),
    Key("alerts.uptimeCheck", "bool", f"an uptime check on `{HEALTH_PATH}` and, with replicas,"
        f" one on `{REPLICATION_PATH}` (1.00 a month each)", True),
    Key("monitoring.prometheus", "bool", "a Prometheus + Alertmanager droplet in the VPC"
        " scraping the app droplets ([monitoring.md](monitoring.md))", False),
    Key("monitoring.prometheusSize", "choice", "the Prometheus droplet's size", "s-1vcpu-1gb",
        choices=_DROPLET_SIZES, allowed_text="as `app.dropletSize`"),
    Key("monitoring.smtp.smarthost", "str", "the SMTP relay Alertmanager mails `alerts.emails`"
        " through (DigitalOcean blocks port 25)", allowed_text="`host:port` (587), with the"
        " other `smtp` keys"),
    Key("monitoring.smtp.from", "str", "the alert mails' sender", allowed_text="an email"),
    Key("monitoring.smtp.username", "str", "the relay's login", allowed_text="a user name"),
    Key("monitoring.smtp.password", "secret", "the relay's password",
        allowed_text="set as a secret"),
    Key("budget.monthlyUsd", "number", "the stack's monthly budget", allowed_text="> 0"),
    Key("budget.enforce", "bool", "over budget: an error that stops the preview, else a"
        " warning", _PRODUCTION),
]}

_PULUMI_TYPES = {"str": "string", "choice": "string", "list": "array"}


def pulumi_config() -> dict[str, dict[str, Any]]:
    """Pulumi.yaml's `config:` block: the top-level text and list keys, typed, with their
    default (empty where it is computed or unset). Secrets and objects are not declared."""
    block = {}
    for key in KEYS.values():
        if "." in key.name or key.kind not in _PULUMI_TYPES:
            continue
        entry: dict[str, Any] = {"type": _PULUMI_TYPES[key.kind]}
        if key.kind == "list":
            entry["items"] = {"type": "string"}
        entry["description"] = key.doc
        if not key.required:
            entry["default"] = [] if key.kind == "list" else (key.default or "")
        block[key.name] = entry
    return block


def config_table() -> str:
    """docs/configuration.md's table of every key."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| `{k.name}` | {k.default_cell()} | {k.allowed_cell()} | {k.doc} |"
             for k in KEYS.values()]
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------- loading


_DECLARED = object()
"""The reader's default for a default: the key's declaration in KEYS."""


class _Reader:
    """Reads one config object, checking types and ranges, and refusing unknown keys.

    Defaults, bounds and choices come from the key's declaration (KEYS) unless the caller
    passes them: for values computed from other keys, and for the items of a list."""

    def __init__(self, raw: Any, prefix: str, production: bool):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(prefix.rstrip("."), raw, "must be an object")
        self.raw, self.prefix, self.production, self.used = raw, prefix, production, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def declared(self, name: str) -> Key:
        return KEYS[self.key(name)]

    def get(self, name: str, default: Any = _DECLARED) -> Any:
        if default is _DECLARED:
            default = self.declared(name).default_for(self.production)
        self.used.add(name)
        value = self.raw.get(name)
        return default if value is None or value == "" else value

    def int(self, name: str, default: Any = _DECLARED, bounds: tuple | None = None) -> int:
        lo, hi = bounds or self.declared(name).bounds
        if isinstance(lo, PerEnvironment):
            lo = lo.pick(self.production)
        value = self.get(name, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(self.key(name), value, f"must be an integer from {lo} to {hi}")
        return value

    def bool(self, name: str) -> bool:
        value = self.get(name)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), value, "must be true or false")
        return value

    def str(self, name: str) -> str | None:
        value = self.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(self.key(name), value, "must be a non-empty string")
        return value.strip() if value is not None else None

    def choice(self, name: str, default: Any = _DECLARED,
               allowed: Collection[str] | None = None) -> str:
        allowed = allowed or self.declared(name).choices
        value = self.get(name, default)
        if value not in allowed:
            raise ConfigError(self.key(name), value, f"must be one of: {', '.join(allowed)}")
        return value

    def list(self, name: str) -> list[Any]:
        value = self.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(self.key(name), value, "must be a list")
        return value

    def obj(self, name: str) -> _Reader:
        return _Reader(self.get(name, None), self.key(name) + ".", self.production)

    def item(self, name: str, index: int, raw: Any) -> _Reader:
        """A reader for item `index` of the list `name` (its keys are not declared)."""
        return _Reader(raw, self.key(f"{name}[{index}]."), self.production)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(
                self.key(unknown[0]), self.raw[unknown[0]],
                f"unknown key; known keys here: {', '.join(sorted(self.used))}",
            )


ADMIN_MAX_PREFIX = {4: 16, 6: 48}
"""The most SSH may be open to, per IP version: together the admin CIDRs cover at most as many
addresses as one /16 (IPv4) or one /48 (IPv6), a large office or a provider's block, so a split
world (`0.0.0.0/1` + `128.0.0.0/1`) is refused as `/0` is. The policy pack holds firewalls to the
same numbers (`policy/rules.py`, MAX_SOURCE_PREFIX)."""


def _admin_cidrs(values: list[Any]) -> tuple[str, ...]:
    cidrs = tuple(_cidr(f"adminCidrs[{i}]", c) for i, c in enumerate(values))
    for version, prefix in ADMIN_MAX_PREFIX.items():
        nets = [n for n in map(ipaddress.ip_network, cidrs) if n.version == version]
        covered = sum(n.num_addresses for n in ipaddress.collapse_addresses(nets))
        bits = 32 if version == 4 else 128
        if covered > 2 ** (bits - prefix):
            raise ConfigError("adminCidrs", list(cidrs),
                              f"cover {covered} IPv{version} addresses together; at most a "
                              f"/{prefix}'s worth ({2 ** (bits - prefix)}) may reach SSH")
    return cidrs


def _deploy_cidr(value: str | None) -> str | None:
    """`WEBSTACK_EXTRA_ADMIN_CIDR`: one host (a /32 or a /128), or None."""
    if value is None:
        return None
    cidr = _cidr(DEPLOY_CIDR_VARIABLE, value.strip())
    if ipaddress.ip_network(cidr).num_addresses != 1:
        raise ConfigError(DEPLOY_CIDR_VARIABLE, value, "must be a single host such as"
                          " 203.0.113.7/32 or 2001:db8::7/128: the deploying machine's address")
    return cidr


def _cidr(key: str, value: Any) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, value, f"must be a CIDR such as 203.0.113.7/32 ({exc})") from None
    if net.prefixlen == 0:
        raise ConfigError(key, value, "must not open SSH to the whole internet; list admin CIDRs")
    return str(net)


def _health_check(r: _Reader) -> HealthCheckSettings:
    hc = HealthCheckSettings(
        interval_seconds=r.int("intervalSeconds"),
        timeout_seconds=r.int("timeoutSeconds"),
        unhealthy_threshold=r.int("unhealthyThreshold"),
        healthy_threshold=r.int("healthyThreshold"),
    )
    if hc.timeout_seconds > hc.interval_seconds:
        raise ConfigError(
            r.key("timeoutSeconds"), hc.timeout_seconds,
            f"must not exceed intervalSeconds ({hc.interval_seconds}), or checks overlap",
        )
    r.done()
    return hc


def _app(r: _Reader) -> AppSettings:
    backups = r.get("backups")
    if backups is True:
        backups = "weekly"
    elif backups is False:
        backups = "off"
    if backups not in BACKUP_PLANS:
        raise ConfigError(r.key("backups"), backups, f"must be one of: {', '.join(BACKUP_PLANS)}")
    app = AppSettings(
        droplet_count=r.int("dropletCount"),
        droplet_size=r.choice("dropletSize"),
        image=r.choice("image"),
        gunicorn_workers=r.int("gunicornWorkers"),
        gunicorn_threads=r.int("gunicornThreads"),
        backups=backups,
        max_body_mb=r.int("maxBodyMb"),
        microcache=_microcache(r.obj("microcache")),
        scaling=_scaling(r.obj("scaling")),
    )
    if app.autoscale and r.raw.get("dropletCount") is not None:
        raise ConfigError(r.key("dropletCount"), r.raw["dropletCount"], "autoscale sizes the"
                          " pool itself: set app.scaling.minInstances and maxInstances instead")
    if app.autoscale and app.backups != "off":
        raise ConfigError(r.key("backups"), app.backups, "must be off with autoscale: a pool's"
                          " droplet template has no backups (the droplets are stateless)")
    r.done()
    return app


_CACHE_PATH = re.compile(r"/[A-Za-z0-9._~/-]*")


def _microcache(r: _Reader) -> MicrocacheSettings:
    seconds = r.int("seconds")
    paths = []
    for i, path in enumerate(r.list("paths")):
        if not isinstance(path, str) or not _CACHE_PATH.fullmatch(path):
            raise ConfigError(r.key(f"paths[{i}]"), path, "must be a path such as /api/notes"
                              " (letters, digits and /._~- only)")
        paths.append(path)
    if seconds and not paths:
        raise ConfigError(r.key("paths"), [], "list at least one path prefix when"
                          f" {r.key('seconds')} is above 0")
    r.done()
    return MicrocacheSettings(seconds=seconds, paths=tuple(paths))


def _target_percent(r: _Reader, name: str) -> int | None:
    value = r.get(name)
    if value is None:
        return None
    lo, hi = TARGET_PERCENT
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < lo:
        raise ConfigError(r.key(name), value, f"must be an integer from {lo} to {hi}: the API"
                          " refuses a target below 0.05 (5%), though the provider passes it")
    return r.int(name, bounds=TARGET_PERCENT)


def _scaling(r: _Reader) -> ScalingSettings:
    min_instances = r.int("minInstances")
    scaling = ScalingSettings(
        mode=r.choice("mode"), min_instances=min_instances,
        max_instances=r.int("maxInstances", 2 * min_instances),
        target_cpu_percent=_target_percent(r, "targetCpuPercent"),
        target_memory_percent=_target_percent(r, "targetMemoryPercent"),
        cooldown_minutes=r.int("cooldownMinutes"),
    )
    if scaling.max_instances < min_instances:
        raise ConfigError(r.key("maxInstances"), scaling.max_instances,
                          f"must be at least minInstances ({min_instances})")
    if scaling.mode == "autoscale" and \
            scaling.target_cpu_percent is None and scaling.target_memory_percent is None:
        raise ConfigError(r.key("targetCpuPercent"), None, "autoscale needs targetCpuPercent"
                          f" and/or targetMemoryPercent ({TARGET_PERCENT[0]}-"
                          f"{TARGET_PERCENT[1]}): what the pool scales to")
    r.done()
    return scaling


def _rate_limit(r: _Reader) -> RateLimitSettings:
    limit = RateLimitSettings(requests_per_second=r.int("requestsPerSecond"), burst=r.int("burst"),
                              connections=r.int("connections"))
    r.done()
    return limit


def _frontend(r: _Reader) -> FrontendSettings:
    frontend = FrontendSettings(
        mode=r.choice("mode"),
        size_unit=r.int("sizeUnit"),
        health_check=_health_check(r.obj("healthCheck")),
        nginx_droplet_size=r.choice("nginxDropletSize"),
        nginx_droplet_count=r.int("nginxDropletCount"),
        rate_limit=_rate_limit(r.obj("rateLimit")),
        body_timeout_seconds=r.int("bodyTimeoutSeconds"),
    )
    r.done()
    return frontend


def _database(r: _Reader, region: str) -> DatabaseSettings:
    size_slug = r.choice("size")
    size = database_size(size_slug)
    node_count = r.int("nodeCount")
    ha_sizes = contract.when_enum(DATABASE_CLUSTER, "size", engine="pg", nodeCount=node_count)
    if node_count > 1 and size_slug not in ha_sizes:  # one node: every catalog plan (a test)
        raise ConfigError(
            r.key("nodeCount"), node_count,
            f"standby nodes need a plan with at least 2 GiB; {size_slug} has {size.memory_gib} GiB"
            f" (use nodeCount 1, or database.size one of: {', '.join(ha_sizes)})",
        )
    replicas = []
    for i, item in enumerate(r.list("replicas")):
        rr = r.item("replicas", i, item)
        replica = ReplicaSettings(
            size=rr.choice("size", size_slug, KEYS["database.size"].choices),
            region=rr.choice("region", region, [region]),  # the VPC is regional
        )
        rs = database_size(replica.size)
        if rs.memory_gib < size.memory_gib or rs.vcpus < size.vcpus:
            raise ConfigError(
                rr.key("size"), replica.size,
                f"a read replica must be the same size as the primary ({size_slug}) or larger",
            )
        rr.done()
        replicas.append(replica)
    if r.production and not replicas:
        raise ConfigError(r.key("replicas"), [], "production needs at least one read replica")

    pr = r.obj("pool")
    budget = pool_connection_budget(size)
    pool = PoolSettings(mode=pr.choice("mode"), size=pr.int("size", min(10, budget), (1, budget)))
    pr.done()
    mr = r.obj("maintenance")
    maintenance = MaintenanceSettings(day=mr.choice("day"), hour=mr.int("hour"))
    mr.done()
    version = r.choice("version", str(r.get("version")))  # YAML may give 15 as a number
    name = r.str("name")
    lo, hi = NAME_LENGTH
    if not re.fullmatch(rf"[a-z_][a-z0-9_]{{{lo - 1},{hi - 1}}}", name) or \
            name in ("doadmin", "defaultdb", MIGRATOR):
        raise ConfigError(
            r.key("name"), name,
            f"must be a lowercase identifier of {lo} to {hi} characters (the connection pool"
            f" shares it, and the API allows pool names of 60 at most), not doadmin or {MIGRATOR}",
        )
    restores = r.int("restores")
    restore_from = _restore_from(r.obj("restoreFrom"))
    if restore_from and restores == 0:
        raise ConfigError(r.key("restores"), restores, "must be at least 1 with restoreFrom: raise"
                          " it by one for every restore, so the restored cluster is a new one")
    db = DatabaseSettings(
        version=version, size=size_slug, node_count=node_count, replicas=tuple(replicas),
        pool=pool, maintenance=maintenance, protect=r.bool("protect"), name=name,
        restores=restores, restore_from=restore_from,
        max_replica_lag_seconds=r.int("maxReplicaLagSeconds"),
    )
    r.done()
    return db


def _restore_from(r: _Reader) -> RestoreSettings | None:
    """`database.restoreFrom`, or None when absent. Whether the cluster exists is asked of the
    provider where the cluster is built (components/database.py)."""
    cluster, at_text, at = r.str("cluster"), r.str("at"), None
    r.done()
    if cluster is None and at_text is None:
        return None
    if cluster is None or not _CLUSTER_NAME.match(cluster):
        raise ConfigError(r.key("cluster"), cluster, "must be the source cluster's name:"
                          " 3 to 63 lowercase letters, digits and hyphens")
    if at_text is not None:
        try:
            at = dt.datetime.fromisoformat(at_text.replace("Z", "+00:00"))
        except ValueError:
            at = None
        if at is None or at.utcoffset() != dt.timedelta(0):
            raise ConfigError(r.key("at"), at_text,
                              "must be an ISO 8601 UTC time such as 2026-11-30T08:15:00Z")
        now = dt.datetime.now(dt.UTC)
        if not now - dt.timedelta(days=RETENTION_DAYS) <= at <= now:
            raise ConfigError(r.key("at"), at_text, f"must lie within the last {RETENTION_DAYS}"
                              " days (the backups' retention) and not in the future")
    return RestoreSettings(cluster=cluster, at=at)


def _alerts(r: _Reader, secret: bool) -> AlertSettings:
    emails = []
    for i, email in enumerate(r.list("emails")):
        if not isinstance(email, str) or not _EMAIL.match(email):
            raise ConfigError(r.key(f"emails[{i}]"), email, "must be an email address")
        emails.append(email)
    if not emails:
        raise ConfigError(r.key("emails"), [], "list at least one email address for alerts")
    channel = r.str("slackChannel")
    url = r.str("slackUrl")
    if url is not None:
        if not secret:
            raise ConfigError(
                r.key("slackUrl"), "[plain text]",
                "must be set as a secret: pulumi config set --secret --path alerts.slackUrl URL",
            )
        if not url.startswith("https://hooks.slack.com/"):
            raise ConfigError(r.key("slackUrl"), "[secret]", "must be a Slack webhook URL")
    if (channel is None) != (url is None):
        raise ConfigError(r.key("slackChannel"), channel, "set slackChannel and slackUrl together")
    alerts = AlertSettings(
        emails=tuple(emails),
        slack_channel=channel,
        slack_url=Secret(url) if url else None,
        cpu_percent=r.int("cpuPercent"),
        memory_percent=r.int("memoryPercent"),
        disk_percent=r.int("diskPercent"),
        window=r.choice("window"),
        latency_ms=r.int("latencyMs"),
        uptime_check=r.bool("uptimeCheck"),
    )
    r.done()
    return alerts


def _monitoring(r: _Reader, secret: bool, alerts: AlertSettings) -> MonitoringSettings:
    prometheus = r.bool("prometheus")
    monitoring = MonitoringSettings(prometheus=prometheus,
                                    prometheus_size=r.choice("prometheusSize"),
                                    smtp=_smtp(r.obj("smtp"), secret))
    r.done()
    if prometheus and not monitoring.smtp and not alerts.slack_url:
        raise ConfigError("monitoring.prometheus", True, "Alertmanager needs somewhere to send"
                          " alerts: set monitoring.smtp (for alerts.emails) or alerts.slackUrl")
    return monitoring


def _smtp(r: _Reader, secret: bool) -> SmtpSettings | None:
    values = {name: r.str(name) for name in ("smarthost", "from", "username", "password")}
    r.done()
    if not any(values.values()):
        return None
    for name, value in values.items():
        if value is None:
            raise ConfigError(r.key(name), None, "set smarthost, from, username and password"
                              " together")
    if not re.fullmatch(r"[A-Za-z0-9.-]+:\d{1,5}", values["smarthost"]):
        raise ConfigError(r.key("smarthost"), values["smarthost"], "must be host:port")
    if not _EMAIL.match(values["from"]):
        raise ConfigError(r.key("from"), values["from"], "must be an email address")
    if not secret:
        raise ConfigError(r.key("password"), "[plain text]", "must be set as a secret: pulumi"
                          " config set --secret --path monitoring.smtp.password PASSWORD")
    return SmtpSettings(smarthost=values["smarthost"], sender=values["from"],
                        username=values["username"], password=Secret(values["password"]))


def _budget(r: _Reader) -> BudgetSettings:
    value = r.get("monthlyUsd")
    if value is not None:
        try:
            value = Decimal(str(value))
        except ArithmeticError:
            raise ConfigError(r.key("monthlyUsd"), value, "must be a number") from None
        if value <= 0:
            raise ConfigError(r.key("monthlyUsd"), r.raw["monthlyUsd"], "must be above 0")
    budget = BudgetSettings(monthly_usd=value, enforce=r.bool("enforce"))
    r.done()
    return budget


def _ssh_keys(r: _Reader) -> tuple[str, ...]:
    keys = r.list("sshKeys")
    for i, key in enumerate(keys):
        if not isinstance(key, (str, int)) or not str(key).strip():
            raise ConfigError(r.key(f"sshKeys[{i}]"), key, "must be a key name, id or fingerprint")
    if not keys:
        raise ConfigError(
            r.key("sshKeys"), [],
            "list at least one SSH key (name, id or fingerprint) registered in DigitalOcean",
        )
    return tuple(str(k).strip() for k in keys)


def _ssh_private_key(r: _Reader, secret: bool, admin_cidrs: tuple[str, ...]) -> Secret | None:
    key = r.str("sshPrivateKey")  # required in production unless autoscale: _check_deploy_key
    if key is None:
        return None
    if not secret:
        raise ConfigError("sshPrivateKey", "[plain text]",
                          "must be set as a secret: pulumi config set --secret sshPrivateKey < KEY")
    if "PRIVATE KEY-----" not in key:
        raise ConfigError("sshPrivateKey", "[secret]", "must be an OpenSSH or PEM private key")
    if not admin_cidrs:
        raise ConfigError("sshPrivateKey", "[secret]",
                          "needs adminCidrs: SSH from the deploying machine is otherwise blocked")
    return Secret(key)


def is_ssh_fingerprint_or_id(key: str) -> bool:
    """True when a `sshKeys` entry can go to a droplet as is; False for a name to look up."""
    return key.isdigit() or bool(_FINGERPRINT.match(key))


def load_settings(
    raw: Mapping[str, Any], *, stack: str, secret_keys: frozenset[str] = frozenset(),
    deploy_cidr: str | None = None,
) -> Settings:
    """Validate the `webstack:*` config of a stack (keys without the namespace).

    `secret_keys` names the top-level keys Pulumi holds as secrets (such as `alerts`).
    `deploy_cidr` is `WEBSTACK_EXTRA_ADMIN_CIDR` (see `from_pulumi_config`): one host.
    Raises ConfigError on the first bad value.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", stack):
        raise ConfigError(
            "(stack name)", stack,
            "stack names must be lowercase letters, digits and hyphens: they become droplet tags",
        )
    r = _Reader(raw, "", production=False)
    default_env = "production" if stack.startswith("prod") else "staging"
    environment = r.choice("environment", default_env)
    production = r.production = environment == "production"  # for every default after this
    region = r.choice("region")

    domain = r.str("domain")
    if domain is not None:
        domain = domain.lower().rstrip(".")
        labels = domain.split(".")
        if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
            raise ConfigError("domain", domain, "must be a DNS domain such as example.com")
    elif production:
        raise ConfigError("domain", None, "production needs a domain (HTTPS); set webstack:domain")
    hostname = r.str("hostname").lower()
    if hostname != "@" and not all(_LABEL.match(label) for label in hostname.split(".")):
        raise ConfigError("hostname", hostname, "must be a DNS label such as www, or @ for apex")

    admin_cidrs = _admin_cidrs(r.list("adminCidrs"))
    vpc_ip_range = r.str("vpcIpRange")
    if vpc_ip_range is not None:
        net = ipaddress.ip_network(_cidr("vpcIpRange", vpc_ip_range))
        if not net.is_private or not 16 <= net.prefixlen <= 24:
            raise ConfigError("vpcIpRange", vpc_ip_range, "must be a private range from /16 to /24")

    alerts = _alerts(r.obj("alerts"), "alerts" in secret_keys)
    settings = Settings(
        stack=stack,
        environment=environment,
        region=region,
        domain=domain,
        hostname=hostname,
        ssh_keys=_ssh_keys(r),
        ssh_private_key=_ssh_private_key(r, "sshPrivateKey" in secret_keys, admin_cidrs),
        admin_cidrs=admin_cidrs,
        deploy_cidr=_deploy_cidr(deploy_cidr),
        vpc_ip_range=vpc_ip_range,
        app=_app(r.obj("app")),
        frontend=_frontend(r.obj("frontend")),
        database=_database(r.obj("database"), region),
        alerts=alerts,
        monitoring=_monitoring(r.obj("monitoring"), "monitoring" in secret_keys, alerts),
        budget=_budget(r.obj("budget")),
    )
    r.done()
    _check_deploy_key(settings)
    _check_autoscale(settings)
    _check_replica_connections(settings)
    return settings


def _check_deploy_key(settings: Settings) -> None:
    """Fixed production droplets get their secrets over SSH: a deploy key is required. A pool's
    members boot on their own, beyond SSH, so their secrets stay in the user data
    (docs/runbook.md, "Autoscale")."""
    if settings.production and settings.ssh_private_key is None and not settings.app.autoscale:
        raise ConfigError("sshPrivateKey", None, "production needs a deploy key, so the app's"
                          " secrets reach the droplets over SSH instead of in their user data:"
                          " pulumi config set --secret sshPrivateKey < KEY (or"
                          " app.scaling.mode autoscale, whose members hold them in user data)")


def _check_autoscale(settings: Settings) -> None:
    """What a pool cannot have: addresses known to pulumi, or SSH deploy steps on its members."""
    if not settings.app.autoscale:
        return
    if settings.frontend.mode == "nginx":
        raise ConfigError(
            "app.scaling.mode", "autoscale", "needs frontend.mode managed: the nginx LB's"
            " upstreams are the app droplets' private addresses, and a pool's members are"
            " created and destroyed by DigitalOcean, unknown to pulumi; use frontend.mode"
            " managed (the DigitalOcean LB follows the app tag) or app.scaling.mode fixed")
    regions = contract.rules(AUTOSCALE, "dropletTemplate.region")["enum"]
    if settings.region not in regions:
        raise ConfigError("region", settings.region, "autoscale pools are offered in "
                          f"{', '.join(r for r in regions if r in catalog()['regions'])} only")
    if settings.ssh_private_key:
        raise ConfigError(
            "sshPrivateKey", "[secret]", "must be unset with app.scaling.mode autoscale: pool"
            " members are created by DigitalOcean, so no deploy step can reach them over SSH"
            " (health gates, database grants); run the one-time grant of README 'Database"
            " privileges' on any member instead")


def _check_replica_connections(settings: Settings) -> None:
    """Reads reach replicas directly (no pool): one connection per gunicorn thread of every
    worker on every droplet (the env file sets DB_POOL_SIZE to the threads, no overflow), at
    the most droplets the stack may run."""
    app = settings.app
    count = app.most_droplets
    needed = count * app.workers * app.gunicorn_threads
    for i, replica in enumerate(settings.database.replicas):
        budget = pool_connection_budget(database_size(replica.size))
        if needed > budget:
            raise ConfigError(
                f"database.replicas[{i}].size", replica.size,
                f"allows {budget} connections, but the app opens up to {needed} to each replica"
                f" ({'maxInstances' if app.autoscale else 'dropletCount'} {count} x"
                f" {app.workers} worker{'s' if app.workers > 1 else ''} x"
                f" {app.gunicorn_threads} threads): use a larger replica or fewer"
                " app.gunicornWorkers / app.gunicornThreads",
            )


def settings_from_config(
    config: Mapping[str, str], *, stack: str, secret_keys: Collection[str] = (),
    deploy_cidr: str | None = None,
) -> Settings:
    """Settings from the engine's config map (`webstack:key` -> text, JSON for objects and
    lists), as Pulumi hands it to the program; `secret_keys` are the map's secret keys.
    Keys of other namespaces (`digitalocean:token`) are not ours; ours are all checked."""
    raw, secret = {}, set()
    for full_key, value in config.items():
        namespace, _, key = full_key.partition(":")
        if namespace != NAMESPACE:
            continue
        try:
            raw[key] = json.loads(value)
        except ValueError:
            raw[key] = value
        if full_key in secret_keys:
            secret.add(key)
    return load_settings(raw, stack=stack, secret_keys=frozenset(secret), deploy_cidr=deploy_cidr)


DEPLOY_CIDR_VARIABLE = "WEBSTACK_EXTRA_ADMIN_CIDR"
"""The environment variable a deploy sets to admit its own machine to SSH for one `pulumi up`
(`.github/workflows/deploy.yml`); unset, or empty, admits nothing more."""


def from_pulumi_config() -> Settings:
    """Read the stack's `webstack:*` config through the Pulumi runtime, and the deploying
    machine's address from `DEPLOY_CIDR_VARIABLE`: the program's only reads."""
    import os

    import pulumi
    from pulumi.runtime.config import CONFIG, is_config_secret

    config = CONFIG.get()  # set by the language host before the program runs
    return settings_from_config(
        config, stack=pulumi.get_stack(), secret_keys=[k for k in config if is_config_secret(k)],
        deploy_cidr=os.environ.get(DEPLOY_CIDR_VARIABLE) or None)


# --------------------------------------------------------------------------- stack files

_ROOT = Path(__file__).resolve().parent.parent


_PLACEHOLDERS = {
    "alerts": "https://hooks.slack.com/services/offline/plan/placeholder",
    "sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\noffline-plan-placeholder\n"
                     "-----END OPENSSH PRIVATE KEY-----\n",
}
"""Stand-ins of the right shape for secrets the offline plan cannot decrypt."""


def stack_config(path: Path) -> tuple[dict[str, str], set[str]]:
    """Reads a `Pulumi.<stack>.yaml` into the engine's config map (JSON for objects).

    Secure values cannot be decrypted offline: they stand in as a placeholder of the right
    shape and the key is marked secret, as Pulumi would mark it.
    """
    data = yaml.safe_load(path.read_text()) or {}
    config, secret = {}, set()

    def unseal(value: Any, key: str) -> Any:
        if isinstance(value, Mapping) and set(value) == {"secure"}:
            secret.add(key)
            return _PLACEHOLDERS.get(key.rpartition(":")[2], "offline-placeholder-secret")
        if isinstance(value, Mapping):
            return {k: unseal(v, key) for k, v in value.items()}
        if isinstance(value, list):
            return [unseal(v, key) for v in value]
        if isinstance(value, dt.date):  # YAML reads an unquoted ISO 8601 time as a datetime
            return value.isoformat()
        return value

    for key, value in (data.get("config") or {}).items():
        full = key if ":" in key else f"{NAMESPACE}:{key}"
        value = unseal(value, full)
        config[full] = value if isinstance(value, str) else json.dumps(value)
    # Defaults declared in Pulumi.yaml apply where the stack sets nothing, as in the CLI.
    project = yaml.safe_load((_ROOT / "Pulumi.yaml").read_text())
    for key, decl in (project.get("config") or {}).items():
        full = key if ":" in key else f"{NAMESPACE}:{key}"
        if full not in config and isinstance(decl, Mapping) and "default" in decl:
            default = decl["default"]
            config[full] = default if isinstance(default, str) else json.dumps(default)
    return config, secret


def find_stack_file(name: str) -> Path:
    """`Pulumi.<name>.yaml` of the repository, or `name` itself when it is a path to a stack
    file. FileNotFoundError names the known stacks."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"no stack config file at {name}")
        return path.resolve()
    path = _ROOT / f"Pulumi.{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[len("Pulumi."):-len(".yaml")] for p in _ROOT.glob("Pulumi.*.yaml"))
        raise FileNotFoundError(
            f"unknown stack {name!r}; stacks: {', '.join(known)}, or a file path")
    return path


def stack_name(stack_file: Path) -> str:
    """The stack a `Pulumi.<stack>.yaml` file configures."""
    return stack_file.name.removeprefix("Pulumi.").removesuffix(".yaml")


def settings_for_stack_file(stack_file: Path, *, stack: str | None = None):
    """The validated `Settings` of a stack file, as the program would load them (secrets are
    the offline placeholders of `stack_config`). Raises `ConfigError` on a bad value."""
    config, secret = stack_config(stack_file)
    return settings_from_config(config, stack=stack or stack_name(stack_file), secret_keys=secret)
