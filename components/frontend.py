"""The public entry: a managed DigitalOcean load balancer, or nginx on droplets (the cheap mode).

`settings.frontend.mode` picks one.

managed creates:
- `digitalocean.Certificate` (`{name}-cert`, Let's Encrypt for the fqdn, auto-named), referenced
  by name (a Let's Encrypt certificate's id changes on renewal) - only when the stack has a domain;
- `digitalocean.LoadBalancer` (`{name}-lb`) in the VPC, sending to the droplets tagged
  `settings.app_tag`: 443 https -> 80 http and 80 -> 80 with a redirect to HTTPS, HTTP health
  check from `frontend.healthCheck`, backend keepalive, no DNS records of DigitalOcean's own;
- `digitalocean.DnsRecord` (`{name}-dns`): A fqdn -> the LB's IP.
Without a domain (staging only): no certificate, no DNS record, plain HTTP on the LB's IP and a
warning saying so.

nginx creates:
- `frontend.nginxDropletCount` x `digitalocean.Droplet` (`{name}-lb-{i}`, tagged
  `settings.lb_tag`) running nginx from `components/lb_nginx.py`: least_conn over the app
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
from components.lb_nginx import APP_PORT, UPSTREAM_PATH, render_lb_cloud_config, render_lb_upstream
from components.settings import Settings

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
class LoadBalancedFrontendArgs:
    settings: Settings
    """The stack's validated settings (mode, domain, health check, sizes, tags, admin CIDRs)."""
    vpc_id: pulumi.Input[str]
    """The VPC of the app droplets; the LB (or LB droplets) reach them over it."""
    ssh_keys: Sequence[pulumi.Input[str]]
    """SSH key ids or fingerprints for the nginx LB droplets, already resolved by the caller."""
    app_private_ips: pulumi.Input[Sequence[str]] | None = None
    """nginx mode (required there): the app droplets' private IPs (`AppTier.private_ips`).
    Ignored in managed mode, where the LB selects droplets by tag."""
    ssh_private_key: pulumi.Input[str] | None = None
    """nginx mode: the private key (OpenSSH/PEM text, a secret) of one of `ssh_keys`, used to
    deliver the upstream list to the LB droplets. None: deliver `upstream_conf` by hand."""


class LoadBalancedFrontend(pulumi.ComponentResource):
    """The site's public entry point, managed LB or nginx droplets with a reserved IP."""

    ip: pulumi.Output[str]
    """The public IPv4 address: the LB's, or the reserved IP in nginx mode."""
    url: pulumi.Output[str]
    """https://fqdn, or http://ip when the stack has no domain."""
    lb_id: pulumi.Output[str] | None
    """managed: the load balancer's id (for the app firewall's source_load_balancer_uids)."""
    lb_droplet_ids: pulumi.Output[list[str]]
    """nginx: the LB droplets' ids, the active one first; managed: empty."""
    certificate_name: pulumi.Output[str] | None
    """managed with a domain: the Let's Encrypt certificate's name."""
    resource_urns: pulumi.Output[list[str]]
    """DigitalOcean URNs of the LB, or of the LB droplets and the reserved IP (for a Project)."""
    upstream_conf: pulumi.Output[str] | None
    """nginx: the rendered upstream file for `lb_nginx.UPSTREAM_PATH` (the manual fallback)."""

    def __init__(self, name: str, args: LoadBalancedFrontendArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        s = args.settings
        nginx = s.frontend.mode == "nginx"
        if nginx and args.app_private_ips is None:
            raise ValueError("frontend.mode 'nginx' needs app_private_ips (AppTier.private_ips)")
        if nginx and args.ssh_private_key is not None and not s.admin_cidrs:
            raise ValueError(
                "adminCidrs: [] blocks SSH to the nginx LB droplets, so the upstream list cannot "
                "be delivered; list the CIDR of the machine running pulumi, or give no SSH key")
        super().__init__("webstack:index:LoadBalancedFrontend", name, None, opts)

        self.lb_id = self.certificate_name = self.upstream_conf = None
        self.lb_droplet_ids = pulumi.Output.from_input([])
        if nginx:
            self.ip = self._nginx(name, args)
        else:
            self.ip = self._managed(name, args)
        if s.fqdn:
            digitalocean.DnsRecord(
                f"{name}-dns", domain=s.domain, type="A", name=s.hostname, value=self.ip,
                ttl=DNS_TTL, opts=pulumi.ResourceOptions(parent=self))
            self.url = pulumi.Output.from_input(f"https://{s.fqdn}")
        else:
            pulumi.log.warn(
                f"webstack:domain is not set: stack {s.stack} serves plain HTTP (no TLS) on the "
                "load balancer's IP address", resource=self)
            self.url = pulumi.Output.concat("http://", self.ip)

        outputs = {"ip": self.ip, "url": self.url, "lb_droplet_ids": self.lb_droplet_ids,
                   "resource_urns": self.resource_urns}
        for key in ("lb_id", "certificate_name", "upstream_conf"):
            if getattr(self, key) is not None:
                outputs[key] = getattr(self, key)
        self.register_outputs(outputs)

    # ----------------------------------------------------------------------- managed

    def _managed(self, name: str, args: LoadBalancedFrontendArgs) -> pulumi.Output[str]:
        s, hc = args.settings, args.settings.frontend.health_check
        child = pulumi.ResourceOptions(parent=self)
        rules = [digitalocean.LoadBalancerForwardingRuleArgs(
            entry_port=80, entry_protocol="http", target_port=80, target_protocol="http")]
        if s.fqdn:
            cert = digitalocean.Certificate(
                f"{name}-cert", type="lets_encrypt", domains=[s.fqdn], opts=child)
            self.certificate_name = cert.name
            rules.insert(0, digitalocean.LoadBalancerForwardingRuleArgs(
                entry_port=443, entry_protocol="https", target_port=80, target_protocol="http",
                certificate_name=cert.name))
        lb = digitalocean.LoadBalancer(
            f"{name}-lb",
            region=s.region,
            vpc_uuid=args.vpc_id,
            size_unit=s.frontend.size_unit,
            droplet_tag=s.app_tag,
            forwarding_rules=rules,
            redirect_http_to_https=bool(s.fqdn),
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
        self.resource_urns = pulumi.Output.all(lb.load_balancer_urn)
        return lb.ip

    # ----------------------------------------------------------------------- nginx

    def _nginx(self, name: str, args: LoadBalancedFrontendArgs) -> pulumi.Output[str]:
        s = args.settings
        child = pulumi.ResourceOptions(parent=self)
        if s.production and s.frontend.nginx_droplet_count == 1:
            pulumi.log.warn(
                "frontend.nginxDropletCount is 1: the nginx LB droplet is a single point of "
                "failure; 2 keeps a warm spare for a manual fail-over", resource=self)
        user_data = render_lb_cloud_config(s)  # settings only: never the app IPs
        droplets = [
            digitalocean.Droplet(
                f"{name}-lb-{i}",
                image=s.app.image,
                size=s.frontend.nginx_droplet_size,
                region=s.region,
                vpc_uuid=args.vpc_id,
                tags=[s.lb_tag],
                ssh_keys=list(args.ssh_keys),
                monitoring=True,
                ipv6=False,
                user_data=user_data,
                graceful_shutdown=True,
                opts=child,
            )
            for i in range(s.frontend.nginx_droplet_count)
        ]
        firewall = digitalocean.Firewall(
            f"{name}-lb-fw",
            tags=[s.lb_tag],
            inbound_rules=[
                # The public entry: HTTP (ACME challenges, redirect) and HTTPS from anywhere.
                digitalocean.FirewallInboundRuleArgs(
                    protocol="tcp", port_range="80", source_addresses=ANYWHERE),
                digitalocean.FirewallInboundRuleArgs(
                    protocol="tcp", port_range="443", source_addresses=ANYWHERE),
            ] + ([digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range="22", source_addresses=list(s.admin_cidrs))]
                if s.admin_cidrs else []),
            # Open outbound: app droplets (VPC), apt, NTP, DNS and Let's Encrypt.
            outbound_rules=[
                digitalocean.FirewallOutboundRuleArgs(
                    protocol=p, port_range=None if p == "icmp" else "1-65535",
                    destination_addresses=ANYWHERE)
                for p in ("tcp", "udp", "icmp")
            ],
            opts=child,
        )
        reserved = digitalocean.ReservedIp(f"{name}-ip", region=s.region, opts=child)
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
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[firewall]),
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
        return reserved.ip_address
