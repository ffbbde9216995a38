"""Stack settings: the one place where configuration is read and validated.

`load_settings` turns the `webstack:*` config of a stack into frozen dataclasses, or raises
`ConfigError` naming the key, the bad value and what is allowed. Components, renderers, the
offline plan, the cost model and the lab all take a `Settings`; none reads config on its own.
"""

from __future__ import annotations

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
POOL_MODES = ("transaction", "session", "statement")
# What the API contract (components/contract.yaml, with its sources) lets these keys be.
LOAD_BALANCER = "digitalocean:index/loadBalancer:LoadBalancer"
DATABASE_CLUSTER = "digitalocean:index/databaseCluster:DatabaseCluster"
POOL = "digitalocean:index/databaseConnectionPool:DatabaseConnectionPool"
PG_VERSIONS = tuple(contract.when_enum(DATABASE_CLUSTER, "version", engine="pg"))
"""PostgreSQL versions DigitalOcean creates new clusters with today (14 reached end of life)."""
ALERT_WINDOWS = tuple(
    w for w in contract.rules("digitalocean:index/monitorAlert:MonitorAlert", "window")["enum"]
    if w in contract.rules("digitalocean:index/uptimeAlert:UptimeAlert", "period")["enum"])
"""Both the alert policies' window and the uptime latency alert's period take it."""
NAME_LENGTH = (contract.rules(POOL, "name")["min_length"],
               contract.rules(POOL, "name")["max_length"])
"""database.name is also the pool's name: the API allows pool names of 3 to 60 characters."""
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

_EMAIL = re.compile(r"^[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_FINGERPRINT = re.compile(r"^([0-9a-f]{2}:){15}[0-9a-f]{2}$")


class ConfigError(ValueError):
    """A stack setting is invalid. The message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{NAMESPACE}:{key}: {value!r} is not allowed; {allowed}")


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

    path: str = "/healthz"
    interval_seconds: int = 10
    timeout_seconds: int = 5
    unhealthy_threshold: int = 3
    healthy_threshold: int = 5

    @property
    def detection_seconds(self) -> int:
        """Worst case until a dead droplet stops receiving traffic."""
        return self.unhealthy_threshold * self.interval_seconds + self.timeout_seconds


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """The app droplets and what runs on them."""

    droplet_count: int = 2
    droplet_size: str = "s-1vcpu-1gb"
    image: str = "ubuntu-24-04-x64"
    gunicorn_workers: int = 0
    """0 means `2 x cores + 1` of the droplet size."""
    gunicorn_threads: int = 2
    backups: str = "off"
    """Droplet backup plan: off, weekly or daily. Off by default: app droplets are stateless."""
    max_body_mb: int = 1
    """Largest request body nginx accepts (client_max_body_size)."""

    @property
    def size(self) -> Size:
        return droplet_size(self.droplet_size)

    @property
    def workers(self) -> int:
        return self.gunicorn_workers or 2 * self.size.vcpus + 1


@dataclass(frozen=True, kw_only=True)
class FrontendSettings:
    """How traffic reaches the app droplets."""

    mode: str = "managed"
    size_unit: int = 1
    health_check: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    nginx_droplet_size: str = "s-1vcpu-1gb"
    nginx_droplet_count: int = 1
    """nginx mode: LB droplets; the reserved IP points at the first, the others are warm spares."""


@dataclass(frozen=True, kw_only=True)
class ReplicaSettings:
    size: str
    region: str


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    mode: str = "transaction"
    size: int = 10


@dataclass(frozen=True, kw_only=True)
class MaintenanceSettings:
    day: str = "sunday"
    hour: int = 3
    """UTC hour at which the maintenance window starts."""


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """The managed PostgreSQL cluster, its standbys, replicas and pool."""

    version: str = "15"
    size: str = "db-s-1vcpu-1gb"
    node_count: int = 1
    replicas: tuple[ReplicaSettings, ...] = ()
    pool: PoolSettings = field(default_factory=PoolSettings)
    maintenance: MaintenanceSettings = field(default_factory=MaintenanceSettings)
    protect: bool = False
    name: str = "app"
    """The app's database, its user and its pool share this name (never doadmin)."""


@dataclass(frozen=True, kw_only=True)
class AlertSettings:
    """Who is told, and when."""

    emails: tuple[str, ...] = ()
    slack_channel: str | None = None
    slack_url: Secret | None = None
    cpu_percent: int = 80
    memory_percent: int = 85
    disk_percent: int = 85
    window: str = "5m"
    latency_ms: int = 1000
    """Threshold for the LB p95 latency and uptime latency alerts."""
    uptime_check: bool = True
    """An uptime check on the site's /healthz from several regions ($1 a month)."""


@dataclass(frozen=True, kw_only=True)
class BudgetSettings:
    monthly_usd: Decimal | None = None
    enforce: bool = False


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a stack is, validated. Built by `load_settings`."""

    stack: str
    environment: str
    region: str
    domain: str | None
    hostname: str
    ssh_keys: tuple[str, ...]
    ssh_private_key: Secret | None = None
    """Private half of one of `ssh_keys`, for the deploy steps run over SSH from the machine
    running `pulumi up` (health-gated rollout, nginx upstream updates, database grants)."""
    admin_cidrs: tuple[str, ...] = ()
    vpc_ip_range: str | None = None
    app: AppSettings = field(default_factory=AppSettings)
    frontend: FrontendSettings = field(default_factory=FrontendSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)

    @property
    def production(self) -> bool:
        return self.environment == "production"

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


# --------------------------------------------------------------------------- loading


class _Reader:
    """Reads one config object, checking types and ranges, and refusing unknown keys."""

    def __init__(self, raw: Any, prefix: str):
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(prefix.rstrip("."), raw, "must be an object")
        self.raw, self.prefix, self.used = raw, prefix, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        value = self.raw.get(name)
        return default if value is None or value == "" else value

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.get(name, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(self.key(name), value, f"must be an integer from {lo} to {hi}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(self.key(name), value, "must be true or false")
        return value

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(self.key(name), value, "must be a non-empty string")
        return value.strip() if value is not None else None

    def choice(self, name: str, default: str, allowed: tuple[str, ...] | list[str]) -> str:
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
        return _Reader(self.get(name), self.key(name) + ".")

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(
                self.key(unknown[0]), self.raw[unknown[0]],
                f"unknown key; known keys here: {', '.join(sorted(self.used))}",
            )


def _size(r: _Reader, name: str, default: str, table: str) -> str:
    return r.choice(name, default, list(catalog()[table]))


def _cidr(key: str, value: Any) -> str:
    try:
        net = ipaddress.ip_network(value, strict=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, value, f"must be a CIDR such as 203.0.113.7/32 ({exc})") from None
    if net.prefixlen == 0:
        raise ConfigError(key, value, "must not open SSH to the whole internet; list admin CIDRs")
    return str(net)


def _lb_range(field: str) -> tuple[int, int]:
    """The API contract's range for a load-balancer health-check field."""
    return contract.bounds(LOAD_BALANCER, f"healthcheck.{field}")


def _health_check(r: _Reader) -> HealthCheckSettings:
    path = r.str("path", "/healthz")
    if not path.startswith("/"):
        raise ConfigError(r.key("path"), path, "must be an absolute path such as /healthz")
    hc = HealthCheckSettings(
        path=path,
        interval_seconds=r.int("intervalSeconds", 10, *_lb_range("checkIntervalSeconds")),
        timeout_seconds=r.int("timeoutSeconds", 5, *_lb_range("responseTimeoutSeconds")),
        unhealthy_threshold=r.int("unhealthyThreshold", 3, *_lb_range("unhealthyThreshold")),
        healthy_threshold=r.int("healthyThreshold", 5, *_lb_range("healthyThreshold")),
    )
    if hc.timeout_seconds > hc.interval_seconds:
        raise ConfigError(
            r.key("timeoutSeconds"), hc.timeout_seconds,
            f"must not exceed intervalSeconds ({hc.interval_seconds}), or checks overlap",
        )
    r.done()
    return hc


def _app(r: _Reader, production: bool) -> AppSettings:
    lo = 2 if production else 1
    backups = r.get("backups", "off")
    if backups is True:
        backups = "weekly"
    elif backups is False:
        backups = "off"
    if backups not in BACKUP_PLANS:
        raise ConfigError(r.key("backups"), backups, f"must be one of: {', '.join(BACKUP_PLANS)}")
    app = AppSettings(
        droplet_count=r.int("dropletCount", 3 if production else 1, lo, 50),
        droplet_size=_size(r, "dropletSize", "s-1vcpu-1gb", "droplet_sizes"),
        image=r.choice("image", "ubuntu-24-04-x64", catalog()["droplet_images"]),
        gunicorn_workers=r.int("gunicornWorkers", 0, 0, 64),
        gunicorn_threads=r.int("gunicornThreads", 2, 1, 32),
        backups=backups,
        max_body_mb=r.int("maxBodyMb", 1, 1, 1024),
    )
    r.done()
    return app


def _frontend(r: _Reader) -> FrontendSettings:
    frontend = FrontendSettings(
        mode=r.choice("mode", "managed", FRONTEND_MODES),
        size_unit=r.int("sizeUnit", 1, *contract.bounds(LOAD_BALANCER, "sizeUnit")),
        health_check=_health_check(r.obj("healthCheck")),
        nginx_droplet_size=_size(r, "nginxDropletSize", "s-1vcpu-1gb", "droplet_sizes"),
        nginx_droplet_count=r.int("nginxDropletCount", 1, 1, 3),
    )
    r.done()
    return frontend


def _database(r: _Reader, region: str, production: bool) -> DatabaseSettings:
    size_slug = _size(r, "size", "db-s-1vcpu-1gb", "database_sizes")
    size = database_size(size_slug)
    node_count = r.int("nodeCount", 2 if production else 1, 2 if production else 1, 3)
    ha_sizes = contract.when_enum(DATABASE_CLUSTER, "size", engine="pg", nodeCount=node_count)
    if node_count > 1 and size_slug not in ha_sizes:  # one node: every catalog plan (a test)
        raise ConfigError(
            r.key("nodeCount"), node_count,
            f"standby nodes need a plan with at least 2 GiB; {size_slug} has {size.memory_gib} GiB"
            f" (use nodeCount 1, or database.size one of: {', '.join(ha_sizes)})",
        )
    replicas = []
    for i, item in enumerate(r.list("replicas")):
        rr = _Reader(item, r.key(f"replicas[{i}]."))
        replica = ReplicaSettings(
            size=_size(rr, "size", size_slug, "database_sizes"),
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
    if production and not replicas:
        raise ConfigError(r.key("replicas"), [], "production needs at least one read replica")

    pr = r.obj("pool")
    budget = pool_connection_budget(size)
    pool = PoolSettings(
        mode=pr.choice("mode", "transaction", POOL_MODES),
        size=pr.int("size", min(10, budget), 1, budget),
    )
    pr.done()
    mr = r.obj("maintenance")
    maintenance = MaintenanceSettings(
        day=mr.choice("day", "sunday", WEEKDAYS), hour=mr.int("hour", 3, 0, 23)
    )
    mr.done()
    version = str(r.get("version", "15"))
    if version not in PG_VERSIONS:
        raise ConfigError(r.key("version"), version, f"must be one of: {', '.join(PG_VERSIONS)}")
    name = r.str("name", "app")
    lo, hi = NAME_LENGTH
    if not re.fullmatch(rf"[a-z_][a-z0-9_]{{{lo - 1},{hi - 1}}}", name) or \
            name in ("doadmin", "defaultdb"):
        raise ConfigError(
            r.key("name"), name,
            f"must be a lowercase identifier of {lo} to {hi} characters (the connection pool"
            " shares it, and the API allows pool names of 60 at most), not doadmin",
        )
    db = DatabaseSettings(
        version=version, size=size_slug, node_count=node_count, replicas=tuple(replicas),
        pool=pool, maintenance=maintenance, protect=r.bool("protect", production), name=name,
    )
    r.done()
    return db


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
        cpu_percent=r.int("cpuPercent", 80, 1, 100),
        memory_percent=r.int("memoryPercent", 85, 1, 100),
        disk_percent=r.int("diskPercent", 85, 1, 100),
        window=r.choice("window", "5m", ALERT_WINDOWS),
        latency_ms=r.int("latencyMs", 1000, 1, 60000),
        uptime_check=r.bool("uptimeCheck", True),
    )
    r.done()
    return alerts


def _budget(r: _Reader, production: bool) -> BudgetSettings:
    value = r.get("monthlyUsd")
    if value is not None:
        try:
            value = Decimal(str(value))
        except ArithmeticError:
            raise ConfigError(r.key("monthlyUsd"), value, "must be a number") from None
        if value <= 0:
            raise ConfigError(r.key("monthlyUsd"), r.raw["monthlyUsd"], "must be above 0")
    budget = BudgetSettings(monthly_usd=value, enforce=r.bool("enforce", production))
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
    key = r.str("sshPrivateKey")
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
    raw: Mapping[str, Any], *, stack: str, secret_keys: frozenset[str] = frozenset()
) -> Settings:
    """Validate the `webstack:*` config of a stack (keys without the namespace).

    `secret_keys` names the top-level keys Pulumi holds as secrets (such as `alerts`).
    Raises ConfigError on the first bad value.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", stack):
        raise ConfigError(
            "(stack name)", stack,
            "stack names must be lowercase letters, digits and hyphens: they become droplet tags",
        )
    r = _Reader(raw, "")
    default_env = "production" if stack.startswith("prod") else "staging"
    environment = r.choice("environment", default_env, ENVIRONMENTS)
    production = environment == "production"
    region = r.choice("region", "nyc3", catalog()["regions"])

    domain = r.str("domain")
    if domain is not None:
        domain = domain.lower().rstrip(".")
        labels = domain.split(".")
        if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
            raise ConfigError("domain", domain, "must be a DNS domain such as example.com")
    elif production:
        raise ConfigError("domain", None, "production needs a domain (HTTPS); set webstack:domain")
    hostname = r.str("hostname", "www").lower()
    if hostname != "@" and not all(_LABEL.match(label) for label in hostname.split(".")):
        raise ConfigError("hostname", hostname, "must be a DNS label such as www, or @ for apex")

    admin_cidrs = tuple(_cidr(f"adminCidrs[{i}]", c) for i, c in enumerate(r.list("adminCidrs")))
    vpc_ip_range = r.str("vpcIpRange")
    if vpc_ip_range is not None:
        net = ipaddress.ip_network(_cidr("vpcIpRange", vpc_ip_range))
        if not net.is_private or not 16 <= net.prefixlen <= 24:
            raise ConfigError("vpcIpRange", vpc_ip_range, "must be a private range from /16 to /24")

    settings = Settings(
        stack=stack,
        environment=environment,
        region=region,
        domain=domain,
        hostname=hostname,
        ssh_keys=_ssh_keys(r),
        ssh_private_key=_ssh_private_key(r, "sshPrivateKey" in secret_keys, admin_cidrs),
        admin_cidrs=admin_cidrs,
        vpc_ip_range=vpc_ip_range,
        app=_app(r.obj("app"), production),
        frontend=_frontend(r.obj("frontend")),
        database=_database(r.obj("database"), region, production),
        alerts=_alerts(r.obj("alerts"), "alerts" in secret_keys),
        budget=_budget(r.obj("budget"), production),
    )
    r.done()
    _check_replica_connections(settings)
    return settings


def _check_replica_connections(settings: Settings) -> None:
    """Reads reach replicas directly (no pool): one connection per gunicorn thread of every
    worker on every droplet (the env file sets DB_POOL_SIZE to the threads, no overflow)."""
    app = settings.app
    needed = app.droplet_count * app.workers * app.gunicorn_threads
    for i, replica in enumerate(settings.database.replicas):
        budget = pool_connection_budget(database_size(replica.size))
        if needed > budget:
            raise ConfigError(
                f"database.replicas[{i}].size", replica.size,
                f"allows {budget} connections, but the app opens up to {needed} to each replica"
                f" (dropletCount {app.droplet_count} x {app.workers} workers x"
                f" {app.gunicorn_threads} threads): use a larger replica or fewer"
                " app.gunicornWorkers / app.gunicornThreads",
            )


def settings_from_config(
    config: Mapping[str, str], *, stack: str, secret_keys: Collection[str] = ()
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
    return load_settings(raw, stack=stack, secret_keys=frozenset(secret))


def from_pulumi_config() -> Settings:
    """Read the stack's `webstack:*` config through the Pulumi runtime: the program's only read."""
    import pulumi
    from pulumi.runtime.config import CONFIG, is_config_secret

    config = CONFIG.get()  # set by the language host before the program runs
    return settings_from_config(
        config, stack=pulumi.get_stack(), secret_keys=[k for k in config if is_config_secret(k)])


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
