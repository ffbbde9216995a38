"""webstack's security and reliability rules, written once as plain functions.

Each rule takes what Pulumi knows of a resource (its type token and its properties, named in
camelCase as on the wire: `sshKeys`, `inboundRules`, `redirectHttpToHttps`, ...) and returns the
violations it finds as messages; an empty list means compliant. The policy pack (`pack.py`)
wraps them in `ResourceValidationPolicy` / `StackValidationPolicy`; the unit tests call them on
resources recorded under the mocks (`tools/mocks.py`). Nothing here imports Pulumi, so the same
functions work on the policy SDK's read-only proxies and on plain dicts.

During a preview some props are unknown (ids of resources not created yet); reading one makes
the SDK skip that policy for that resource with an advisory note, and `pulumi up` checks it
again with the real values before it creates anything. The rules read as little as they need.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DROPLET = "digitalocean:index/droplet:Droplet"
AUTOSCALE_POOL = "digitalocean:index/dropletAutoscale:DropletAutoscale"
FIREWALL = "digitalocean:index/firewall:Firewall"
LOAD_BALANCER = "digitalocean:index/loadBalancer:LoadBalancer"
MONITOR_ALERT = "digitalocean:index/monitorAlert:MonitorAlert"
DATABASE_FIREWALL = "digitalocean:index/databaseFirewall:DatabaseFirewall"
DATABASE_CLUSTER = "digitalocean:index/databaseCluster:DatabaseCluster"
DATABASE_REPLICA = "digitalocean:index/databaseReplica:DatabaseReplica"

HEALTH_PATH = "/healthz"
"""The liveness path every load balancer must check (the app's health blueprint serves it)."""
PUBLIC_WEB_PORTS = frozenset({"80", "443"})
"""The only ports that may be open to the world, and only on the nginx LB droplets' firewall."""
HTTPS_PROTOCOLS = frozenset({"https", "http2", "http3"})
MAX_SOURCE_PREFIX = {4: 16, 6: 48}
"""The most any inbound rule but the LB's web ports may admit, per IP version: its sources
together cover at most a /16's worth of IPv4 and a /48's worth of IPv6 addresses (settings hold
`adminCidrs` to the same numbers, `components/settings.py` ADMIN_MAX_PREFIX)."""


def _items(value: Any) -> list[Any]:
    """A list property as a list: absent (None) is empty; a string is not a list of letters."""
    if value is None or isinstance(value, str):
        return []
    return list(value) if isinstance(value, Sequence) else []


def lb_tag(stack: str) -> str:
    """The tag of the nginx-mode load-balancer droplets (as `Settings.lb_tag`)."""
    return f"webstack-{stack}-lb"


def app_tag(stack: str) -> str:
    """The tag of the app droplets (as `Settings.app_tag`)."""
    return f"webstack-{stack}-app"


def stack_of(urn: str) -> str:
    """The stack name in a URN: `urn:pulumi:<stack>::<project>::<type>::<name>`."""
    return urn.split("::", 1)[0].removeprefix("urn:pulumi:")


def _too_wide(sources: Iterable[Any]) -> list[str]:
    """Per IP version whose sources together cover more than MAX_SOURCE_PREFIX allows, what
    they cover (unparsable sources count for nothing: the provider refuses them)."""
    nets = []
    for source in sources:
        try:
            nets.append(ipaddress.ip_network(str(source).strip(), strict=False))
        except ValueError:
            continue
    found = []
    for version, prefix in MAX_SOURCE_PREFIX.items():
        same = [n for n in nets if n.version == version]
        covered = sum(n.num_addresses for n in ipaddress.collapse_addresses(same))
        limit = 2 ** ((32 if version == 4 else 128) - prefix)
        if covered > limit:
            found.append(
                f"{covered} IPv{version} addresses (more than a /{prefix}'s worth, {limit})")
    return found


def _is_world(cidr: Any) -> bool:
    try:
        return ipaddress.ip_network(str(cidr).strip(), strict=False).prefixlen == 0
    except ValueError:
        return False


# --------------------------------------------------------------------------- resource rules


def firewall_no_world_ingress(props: Mapping[str, Any], *, stack: str) -> list[str]:
    """No inbound rule open to 0.0.0.0/0 or ::/0, except TCP 80 and 443 on the firewall of the
    nginx load-balancer droplets (the public entry in nginx mode): the firewall whose only
    target is the stack's LB tag. SSH (or anything else) from the world is never allowed, nor
    from CIDRs that together cover more than a /16's worth of IPv4 or a /48's worth of IPv6
    addresses (the world cut in pieces)."""
    public_entry = (
        sorted(_items(props.get("tags"))) == [lb_tag(stack)]
        and not _items(props.get("dropletIds"))
    )
    name = props.get("name") or "firewall"
    found = []
    for rule in _items(props.get("inboundRules")):
        sources = _items(rule.get("sourceAddresses"))
        protocol, ports = rule.get("protocol"), str(rule.get("portRange") or "all")
        if public_entry and protocol == "tcp" and ports in PUBLIC_WEB_PORTS:
            continue
        world = [s for s in sources if _is_world(s)]
        if world:
            found.append(
                f"{name}: inbound {protocol} port {ports} is open to {', '.join(world)}; only "
                f"tcp 80/443 on the nginx LB droplets' firewall (tag {lb_tag(stack)}) may be public"
            )
        elif wide := _too_wide(sources):
            found.append(
                f"{name}: inbound {protocol} port {ports} sources cover {' and '.join(wide)} "
                "together; narrow them (adminCidrs for SSH)"
            )
    return found


def droplet_ssh_keys_and_monitoring(props: Mapping[str, Any], *, stack: str) -> list[str]:
    """Every droplet has SSH keys (no emailed root password) and the metrics agent, which
    alert policies need and which can only be enabled at creation."""
    name = props.get("name") or "droplet"
    found = []
    if not _items(props.get("sshKeys")):
        found.append(f"{name}: no sshKeys; DigitalOcean would email a root password")
    if props.get("monitoring") is not True:
        found.append(f"{name}: monitoring is not true; droplet alerts would never fire")
    return found


def load_balancer_https_and_health(props: Mapping[str, Any], *, stack: str) -> list[str]:
    """A load balancer that serves HTTPS redirects HTTP to it, and every load balancer checks
    droplets over HTTP on /healthz (a TCP check passes while the app is down)."""
    name = props.get("name") or "load balancer"
    found = []
    entries = {rule.get("entryProtocol") for rule in _items(props.get("forwardingRules"))}
    if entries & HTTPS_PROTOCOLS and props.get("redirectHttpToHttps") is not True:
        found.append(f"{name}: serves HTTPS but redirectHttpToHttps is not true")
    check = props.get("healthcheck") or {}
    if check.get("protocol") not in ("http", "https") or check.get("path") != HEALTH_PATH:
        found.append(
            f"{name}: health check is {check.get('protocol')} {check.get('path') or ''}".rstrip()
            + f"; it must be an HTTP check of {HEALTH_PATH}"
        )
    return found


def monitor_alert_scoped(props: Mapping[str, Any], *, stack: str) -> list[str]:
    """An alert with neither entities nor tags watches every resource in the account."""
    # Tags first: they are known at preview, entities (resource ids) may not be yet.
    if _items(props.get("tags")) or _items(props.get("entities")):
        return []
    name = props.get("description") or props.get("type") or "alert"
    return [f"{name}: no entities or tags; it would apply to every resource in the account"]


def database_firewall_tag_rules(props: Mapping[str, Any], *, stack: str) -> list[str]:
    """Database access is granted to droplet tags only: no IP addresses, no single droplets
    (which would lock out a replacement droplet), no apps or clusters."""
    rules = _items(props.get("rules"))
    if not rules:
        return ["database firewall has no rules"]
    return [
        f"database firewall rule {rule.get('type')}={rule.get('value')} is not of type tag"
        for rule in rules
        if rule.get("type") != "tag"
    ]


def pool_template_ssh_keys_and_agent(props: Mapping[str, Any], *, stack: str) -> list[str]:
    """Every autoscale pool's droplet template has SSH keys and the metrics agent
    (`withDropletAgent`: the template's `monitoring`, which the droplet alerts and the pool's
    CPU or memory target need)."""
    name = props.get("name") or "autoscale pool"
    template = props.get("dropletTemplate") or {}
    found = []
    if not _items(template.get("sshKeys")):
        found.append(f"{name}: no dropletTemplate.sshKeys")
    if template.get("withDropletAgent") is not True:
        found.append(f"{name}: dropletTemplate.withDropletAgent is not true; droplet alerts"
                     " would never fire and the pool could not scale on CPU or memory")
    return found


@dataclass(frozen=True)
class ResourceRule:
    """One rule over one resource type: the policy's name, what it enforces, its check."""

    name: str
    resource_type: str
    check: Callable[..., list[str]]

    @property
    def description(self) -> str:
        return " ".join((self.check.__doc__ or self.name).split())


RESOURCE_RULES: tuple[ResourceRule, ...] = (
    ResourceRule("firewall-no-world-ingress", FIREWALL, firewall_no_world_ingress),
    ResourceRule("droplet-ssh-keys-and-monitoring", DROPLET, droplet_ssh_keys_and_monitoring),
    ResourceRule("pool-template-ssh-keys-and-agent", AUTOSCALE_POOL,
                 pool_template_ssh_keys_and_agent),
    ResourceRule("load-balancer-https-and-healthz", LOAD_BALANCER, load_balancer_https_and_health),
    ResourceRule("monitor-alert-scoped", MONITOR_ALERT, monitor_alert_scoped),
    ResourceRule("database-firewall-tag-rules", DATABASE_FIREWALL, database_firewall_tag_rules),
)


def check_resource(resource_type: str, props: Mapping[str, Any], *, stack: str) -> list[str]:
    """Every resource rule that applies to the type, each violation prefixed with its rule."""
    return [
        f"[{rule.name}] {message}"
        for rule in RESOURCE_RULES
        if rule.resource_type == resource_type
        for message in rule.check(props, stack=stack)
    ]


# --------------------------------------------------------------------------- stack rules


@dataclass(frozen=True)
class StackResource:
    """What a stack rule sees of a resource. `protect` is a resource option, not a property:
    the policy SDK gives it as `PolicyResource.opts.protect`, the mocks as `Resource.protect`."""

    type: str
    props: Mapping[str, Any]
    protect: bool = False


PROD_REDUNDANCY_DESCRIPTION = (
    "A stack whose name starts with 'prod' has at least 2 app droplets (fixed, or an autoscale "
    "pool's minInstances), a database cluster "
    "with a standby (nodeCount >= 2) and deletion protection, and at least 1 read replica."
)


def prod_redundancy(stack: str, resources: Iterable[StackResource]) -> list[str]:
    """Production survives the loss of one droplet or one database node."""
    if not stack.startswith("prod"):
        return []
    resources = list(resources)
    found = []
    app_droplets = sum(
        1 for r in resources
        if r.type == DROPLET and app_tag(stack) in _items(r.props.get("tags"))
    ) + sum(
        (r.props.get("config") or {}).get("minInstances") or 0 for r in resources
        if r.type == AUTOSCALE_POOL
        and app_tag(stack) in _items((r.props.get("dropletTemplate") or {}).get("tags"))
    )
    if app_droplets < 2:
        found.append(
            f"{app_droplets} app droplet(s) tagged {app_tag(stack)} (fixed, or a pool's"
            " minInstances); production needs >= 2"
        )
    clusters = [r for r in resources if r.type == DATABASE_CLUSTER]
    if not clusters:
        found.append("no database cluster")
    for cluster in clusters:
        name = cluster.props.get("name") or "database cluster"
        nodes = cluster.props.get("nodeCount") or 1
        if nodes < 2:
            found.append(f"{name}: nodeCount {nodes}; production needs a standby (>= 2)")
        if not cluster.protect:
            found.append(f"{name}: not protected; `pulumi destroy` could delete production data")
    if not any(r.type == DATABASE_REPLICA for r in resources):
        found.append("no database read replica; production needs >= 1")
    return found
