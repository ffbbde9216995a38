"""The public entry: a managed DigitalOcean load balancer, or nginx on droplets (the cheap mode).

`frontend.mode` picks one: `ManagedLoadBalancer` or `NginxDroplets`, each a small class with
one interface (`ip`, `resource_urns`, `web_source` for the app firewall, `alert_targets`);
`LoadBalancedFrontend` adds what both share (DNS, the URL) and keeps one contract.

managed creates:
- `digitalocean.Certificate` (`{name}-cert`, Let's Encrypt for the fqdn, auto-named), referenced
  by name (a Let's Encrypt certificate's id changes on renewal) - only when the stack has a domain;
- `digitalocean.LoadBalancer` (`{name}-lb`) in the VPC, sending to the droplets tagged
  `app_tag`: 443 https -> 80 http and 80 -> 80 with a redirect to HTTPS, HTTP health
  check from `frontend.healthCheck`, backend keepalive, no DNS records of DigitalOcean's own;
- `digitalocean.DnsRecord` (`{name}-dns`): A fqdn -> the LB's IP.
Without a domain (staging only): no certificate, no DNS record, plain HTTP on the LB's IP and a
warning saying so.

nginx creates:
- `frontend.nginxDropletCount` x `digitalocean.Droplet` (`{name}-lb-{i}`, tagged
  `lb_tag`) running the caller's `lb_user_data` (`components/lb_nginx.py`): least_conn over the app
  droplets' private IPs, passive health checks, retries, TLS by certbot (HTTP-01) for the fqdn;
- `digitalocean.ReservedIp` (`{name}-ip`) + `digitalocean.ReservedIpAssignment`
  (`{name}-ip-assignment`) to the first (active) LB droplet; the others are warm spares;
- `digitalocean.DnsRecord` (`{name}-dns`): A fqdn -> the reserved IP, when there is a domain;
- `digitalocean.Firewall` (`{name}-lb-fw`): 80/443 from anywhere, 22 from `adminCidrs` only;
- with `ssh_private_key`: one `command.remote.Command` (`{name}-upstream-{i}`) per LB droplet.

The upstream list (app IPs) is delivered over SSH after boot, never in the LB droplets' user
data (which forces replacement); without `ssh_private_key`, copy the `upstream_conf` output by
hand. A single LB droplet is a single point of failure; fail-over to a warm spare is manual.
Both in docs/design.md, "LoadBalancedFrontend: the nginx upstream and fail-over".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_command as command
import pulumi_digitalocean as digitalocean

from components import ssh
from components.lb_nginx import UPSTREAM_PATH, render_lb_upstream
from components.runtime import APP_PORT
from components.settings import REPLICATION_PATH, FrontendSettings

ANYWHERE = ["0.0.0.0/0", "::/0"]
DNS_TTL = 300
HTTP_IDLE_TIMEOUT = 60
"""DigitalOcean's default, made explicit: below nginx's 75 s keepalive_timeout on the droplets,
so the LB (not the droplet) closes idle keepalive connections and never reuses a closed one."""

# Run on an LB droplet with the rendered upstream file on stdin.
INSTALL_UPSTREAM = f"""set -e
{ssh.wait_for_cloud_init(strict=False)}f={UPSTREAM_PATH}
cp "$f" "$f.previous"
cat > "$f.new"
mv "$f.new" "$f"
if nginx -t -q; then systemctl reload nginx; else mv "$f.previous" "$f"; exit 1; fi
"""


@dataclass(frozen=True, kw_only=True)
class WebSource:
    """Who may reach the app droplets' port 80 (the app firewall's source)."""

    load_balancer_uids: Sequence[pulumi.Input[str]] = ()
    tags: Sequence[str] = ()


@dataclass(frozen=True, kw_only=True)
class AlertTargets:
    """What `MonitoringAlerts` watches of the frontend, beside the app droplets."""

    health_url: pulumi.Input[str]
    """What the uptime check fetches: https://fqdn/healthz, or http://ip/healthz."""
    https: bool
    replication_url: pulumi.Input[str] | None = None
    """The app's replication-lag endpoint through the load balancer (the lag uptime check)."""
    load_balancer_ids: Sequence[pulumi.Input[str]] = ()
    """Managed load balancers (5xx rate, latency, droplet health)."""
    droplet_tags: Sequence[str] = ()
    """Droplets of the frontend itself (CPU, memory, disk): the nginx LB droplets."""


@dataclass(frozen=True, kw_only=True)
class LoadBalancedFrontendArgs:
    frontend: FrontendSettings
    """The `frontend.*` settings: mode, size unit, health check, nginx droplet size and count."""
    stack: str
    """The stack's name (in warnings)."""
    region: str
    """The region of the load balancer or the LB droplets."""
    domain: str | None
    """The DNS zone the A record goes in; None: no DNS record, plain HTTP on the IP."""
    hostname: str
    """The record's name in `domain` (`@` for the apex)."""
    fqdn: str | None
    """The site's name (`hostname`.`domain`): the certificate's, the URL's."""
    app_tag: str
    """The tag of the app droplets: the managed LB sends to them."""
    vpc_id: pulumi.Input[str]
    """The VPC of the app droplets; the LB (or LB droplets) reach them over it."""
    ssh_keys: Sequence[pulumi.Input[str]]
    """SSH key ids or fingerprints for the nginx LB droplets, already resolved by the caller."""
    lb_tag: str = ""
    """nginx mode: the tag of the LB droplets (their firewall, the app firewall's source)."""
    lb_image: str = ""
    """nginx mode: the LB droplets' image."""
    lb_user_data: str = ""
    """nginx mode: the LB droplets' cloud-config (`lb_nginx.render_lb_cloud_config`): settings
    only, never the app IPs."""
    admin_cidrs: Sequence[str] = ()
    """nginx mode: where SSH to the LB droplets is allowed from (none: no SSH rule)."""
    production: bool = False
    """nginx mode: a single LB droplet in production gets a warning."""
    app_private_ips: pulumi.Input[Sequence[str]] = ()
    """nginx mode: the app droplets' private IPs (`AppTier.private_ips`). Ignored in managed
    mode, where the LB selects droplets by tag."""
    ssh_private_key: pulumi.Input[str] | None = None
    """nginx mode: the private key (OpenSSH/PEM text, a secret) of one of `ssh_keys`, used to
    deliver the upstream list to the LB droplets. None: deliver `upstream_conf` by hand."""


class _Mode:
    """What each frontend mode gives `LoadBalancedFrontend` (the defaults: none of it)."""

    ip: pulumi.Output[str]
    resource_urns: pulumi.Output[list[str]]
    web_source: WebSource
    load_balancer_ids: Sequence[pulumi.Input[str]] = ()
    droplet_tags: Sequence[str] = ()
    lb_id: pulumi.Output[str] | None = None
    certificate_name: pulumi.Output[str] | None = None
    upstream_conf: pulumi.Output[str] | None = None
    lb_droplet_ids: pulumi.Output[list[str]] | None = None


class ManagedLoadBalancer(_Mode):
    """frontend.mode `managed`: a DigitalOcean load balancer selecting the app droplets by tag,
    with a Let's Encrypt certificate when the stack has a domain."""

    def __init__(self, name: str, args: LoadBalancedFrontendArgs, parent: pulumi.Resource):
        hc = args.frontend.health_check
        child = pulumi.ResourceOptions(parent=parent)
        rules = [digitalocean.LoadBalancerForwardingRuleArgs(
            entry_port=80, entry_protocol="http", target_port=APP_PORT, target_protocol="http")]
        if args.fqdn:
            cert = digitalocean.Certificate(
                f"{name}-cert", type="lets_encrypt", domains=[args.fqdn], opts=child)
            self.certificate_name = cert.name
            rules.insert(0, digitalocean.LoadBalancerForwardingRuleArgs(
                entry_port=443, entry_protocol="https", target_port=APP_PORT,
                target_protocol="http", certificate_name=cert.name))
        lb = digitalocean.LoadBalancer(
            f"{name}-lb",
            region=args.region,
            vpc_uuid=args.vpc_id,
            size_unit=args.frontend.size_unit,
            droplet_tag=args.app_tag,
            forwarding_rules=rules,
            redirect_http_to_https=bool(args.fqdn),
            # Our DnsRecord is the only record: DigitalOcean would otherwise add an apex A record.
            disable_lets_encrypt_dns_records=True,
            # Only 2xx is healthy: the app's /healthz must not redirect.
            healthcheck=digitalocean.LoadBalancerHealthcheckArgs(
                protocol="http", port=80, path=hc.path,
                check_interval_seconds=hc.interval_seconds,
                response_timeout_seconds=hc.timeout_seconds,
                unhealthy_threshold=hc.unhealthy_threshold,
                healthy_threshold=hc.healthy_threshold),
            http_idle_timeout_seconds=HTTP_IDLE_TIMEOUT,
            enable_backend_keepalive=True,
            opts=child,
        )
        self.lb_id = lb.id
        self.ip = lb.ip
        self.resource_urns = pulumi.Output.all(lb.load_balancer_urn)
        self.web_source = WebSource(load_balancer_uids=[lb.id])
        self.load_balancer_ids = [lb.id]


class NginxDroplets(_Mode):
    """frontend.mode `nginx`: nginx LB droplets behind a reserved IP on the first, the others
    warm spares; the upstream list delivered over SSH (docs/design.md)."""

    @staticmethod
    def web_source_for(lb_tag: str) -> WebSource:
        """The app firewall's source in nginx mode, known before the LB droplets exist (the
        app tier comes first: the LB needs its private IPs)."""
        return WebSource(tags=[lb_tag])

    def __init__(self, name: str, args: LoadBalancedFrontendArgs, parent: pulumi.Resource):
        fe = args.frontend
        child = pulumi.ResourceOptions(parent=parent)
        if args.production and fe.nginx_droplet_count == 1:
            pulumi.log.warn(
                "frontend.nginxDropletCount is 1: the nginx LB droplet is a single point of "
                "failure; 2 keeps a warm spare for a manual fail-over", resource=parent)
        droplets = [
            digitalocean.Droplet(
                f"{name}-lb-{i}",
                image=args.lb_image,
                size=fe.nginx_droplet_size,
                region=args.region,
                vpc_uuid=args.vpc_id,
                tags=[args.lb_tag],
                ssh_keys=list(args.ssh_keys),
                monitoring=True,
                ipv6=False,
                user_data=args.lb_user_data,
                graceful_shutdown=True,
                opts=child,
            )
            for i in range(fe.nginx_droplet_count)
        ]
        firewall = digitalocean.Firewall(
            f"{name}-lb-fw",
            tags=[args.lb_tag],
            inbound_rules=[
                # The public entry: HTTP (ACME challenges, redirect) and HTTPS from anywhere.
                digitalocean.FirewallInboundRuleArgs(
                    protocol="tcp", port_range="80", source_addresses=ANYWHERE),
                digitalocean.FirewallInboundRuleArgs(
                    protocol="tcp", port_range="443", source_addresses=ANYWHERE),
            ] + ([digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range="22", source_addresses=list(args.admin_cidrs))]
                if args.admin_cidrs else []),
            # Open outbound: app droplets (VPC), apt, NTP, DNS and Let's Encrypt.
            outbound_rules=[
                digitalocean.FirewallOutboundRuleArgs(
                    protocol=p, port_range=None if p == "icmp" else "1-65535",
                    destination_addresses=ANYWHERE)
                for p in ("tcp", "udp", "icmp")
            ],
            opts=child,
        )
        reserved = digitalocean.ReservedIp(f"{name}-ip", region=args.region, opts=child)
        # A separate assignment (not ReservedIp.droplet_id): the IP outlives the droplet and
        # can be moved to a spare without replacing anything.
        digitalocean.ReservedIpAssignment(
            f"{name}-ip-assignment", ip_address=reserved.ip_address,
            droplet_id=droplets[0].id.apply(int), opts=child)

        self.upstream_conf = pulumi.Output.from_input(args.app_private_ips).apply(
            lambda ips: render_lb_upstream([f"{ip}:{APP_PORT}" for ip in ips]))
        if args.ssh_private_key is not None:
            for i, droplet in enumerate(droplets):
                command.remote.Command(
                    f"{name}-upstream-{i}",
                    connection=ssh.connection(droplet.ipv4_address, args.ssh_private_key),
                    create=INSTALL_UPSTREAM,
                    stdin=self.upstream_conf,
                    triggers=[droplet.id],
                    opts=pulumi.ResourceOptions(parent=parent, depends_on=[firewall]),
                )
        self.lb_droplet_ids = pulumi.Output.all(*[d.id for d in droplets])
        # The Projects API stores a reserved IP as do:floatingip:IP, not as the provider's
        # `reserved_ip_urn` (do:reservedip:IP): listing that one would show a diff on every
        # later `pulumi up` and try to move the assigned IP, which the API refuses with a 412
        # (terraform-provider-digitalocean #1031; its floating IP resource rewrites the URN the
        # same way, digitalocean/reservedip/resource_floating_ip.go).
        self.resource_urns = pulumi.Output.all(
            *[d.droplet_urn for d in droplets],
            pulumi.Output.concat("do:floatingip:", reserved.ip_address))
        self.ip = reserved.ip_address
        self.web_source = self.web_source_for(args.lb_tag)
        self.droplet_tags = [args.lb_tag]


class LoadBalancedFrontend(pulumi.ComponentResource):
    """The site's public entry point, managed LB or nginx droplets with a reserved IP."""

    ip: pulumi.Output[str]
    """The public IPv4 address: the LB's, or the reserved IP in nginx mode."""
    url: pulumi.Output[str]
    """https://fqdn, or http://ip when the stack has no domain."""
    lb_id: pulumi.Output[str] | None
    """managed: the load balancer's id."""
    lb_droplet_ids: pulumi.Output[list[str]]
    """nginx: the LB droplets' ids, the active one first; managed: empty."""
    certificate_name: pulumi.Output[str] | None
    """managed with a domain: the Let's Encrypt certificate's name."""
    resource_urns: pulumi.Output[list[str]]
    """DigitalOcean URNs of the LB, or of the LB droplets and the reserved IP (for a Project)."""
    upstream_conf: pulumi.Output[str] | None
    """nginx: the rendered upstream file for `lb_nginx.UPSTREAM_PATH` (the manual fallback)."""
    web_source: WebSource
    """Who may reach the app droplets' port 80: the managed LB's uid or the LB droplets' tag."""
    alert_targets: AlertTargets
    """The health URL and the load balancers or LB droplets for `MonitoringAlerts`."""

    def __init__(self, name: str, args: LoadBalancedFrontendArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("webstack:index:LoadBalancedFrontend", name, None, opts)
        mode_class = NginxDroplets if args.frontend.mode == "nginx" else ManagedLoadBalancer
        mode = mode_class(name, args, parent=self)
        self.ip, self.resource_urns, self.web_source = mode.ip, mode.resource_urns, mode.web_source
        self.lb_id, self.certificate_name = mode.lb_id, mode.certificate_name
        self.upstream_conf = mode.upstream_conf
        self.lb_droplet_ids = mode.lb_droplet_ids or pulumi.Output.from_input([])
        if args.fqdn:
            digitalocean.DnsRecord(
                f"{name}-dns", domain=args.domain, type="A", name=args.hostname, value=self.ip,
                ttl=DNS_TTL, opts=pulumi.ResourceOptions(parent=self))
            self.url = pulumi.Output.from_input(f"https://{args.fqdn}")
        else:
            pulumi.log.warn(
                f"webstack:domain is not set: stack {args.stack} serves plain HTTP (no TLS) on "
                "the load balancer's IP address", resource=self)
            self.url = pulumi.Output.concat("http://", self.ip)
        health_path = args.frontend.health_check.path
        self.alert_targets = AlertTargets(
            health_url=self.url.apply(lambda url: f"{url}{health_path}"), https=bool(args.fqdn),
            replication_url=self.url.apply(lambda url: f"{url}{REPLICATION_PATH}"),
            load_balancer_ids=mode.load_balancer_ids, droplet_tags=mode.droplet_tags)

        outputs = {"ip": self.ip, "url": self.url, "lb_droplet_ids": self.lb_droplet_ids,
                   "resource_urns": self.resource_urns}
        for key in ("lb_id", "certificate_name", "upstream_conf"):
            if getattr(self, key) is not None:
                outputs[key] = getattr(self, key)
        self.register_outputs(outputs)
