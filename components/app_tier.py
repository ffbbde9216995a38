"""The app droplets and their cloud firewall.

Creates:
- `settings.app.droplet_count` x `digitalocean.Droplet` (`{name}-{i}`): in the VPC, tagged
  `settings.app_tag`, monitoring agent on, the caller's cloud-config as user data, IPv6 off,
  backups only when `app.backups` is weekly or daily. Droplets are auto-named by Pulumi (a random
  suffix), so a replacement can be created before the old droplet is deleted.
- one `digitalocean.Firewall` (`{name}-fw`) selecting the droplets by tag, so replacements are
  covered the moment they boot: port 80 only from the load balancer (managed LB uids or the nginx
  LB droplets' tag), SSH only from `adminCidrs` (no SSH rule when there are none), all outbound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_digitalocean as digitalocean

from components.settings import Settings

ANYWHERE = ["0.0.0.0/0", "::/0"]


@dataclass(frozen=True, kw_only=True)
class AppTierArgs:
    settings: Settings
    """The stack's validated settings (region, app sizes and counts, tags, admin CIDRs)."""
    vpc_id: pulumi.Input[str]
    """The VPC the droplets join; the LB and the database reach them over it."""
    ssh_keys: Sequence[pulumi.Input[str]]
    """SSH key ids or fingerprints, already resolved by the caller."""
    user_data: pulumi.Input[str]
    """The droplets' rendered cloud-config (a secret Output). Changing it replaces every droplet."""
    lb_uids: Sequence[pulumi.Input[str]] = ()
    """Managed frontend: ids of the load balancers allowed to reach port 80."""
    web_source_tags: Sequence[str] = ()
    """nginx frontend: tags of the LB droplets allowed to reach port 80 (`settings.lb_tag`)."""


class AppTier(pulumi.ComponentResource):
    """N stateless app droplets behind a firewall that admits web traffic from the LB only."""

    droplets: list[digitalocean.Droplet]
    """The app droplets, in order."""
    droplet_ids: pulumi.Output[list[str]]
    """Their ids."""
    private_ips: pulumi.Output[list[str]]
    """Their VPC addresses (what an nginx LB proxies to)."""
    droplet_urns: pulumi.Output[list[str]]
    """Their DigitalOcean URNs (`do:droplet:ID`), for a `digitalocean.Project`."""
    firewall_id: pulumi.Output[str]
    """The id of the app droplets' cloud firewall."""

    def __init__(self, name: str, args: AppTierArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        if not args.lb_uids and not args.web_source_tags:
            raise ValueError(
                "AppTier needs lb_uids (frontend.mode managed) or web_source_tags "
                "(frontend.mode nginx): port 80 must be open to the load balancer only")
        super().__init__("webstack:index:AppTier", name, None, opts)
        s = args.settings

        self.droplets = [self._droplet(name, i, args) for i in range(s.app.droplet_count)]
        firewall = digitalocean.Firewall(
            f"{name}-fw",
            tags=[s.app_tag],
            inbound_rules=self._inbound_rules(args),
            # Open outbound: the droplets fetch apt and pip packages, sync time (NTP), resolve
            # names (DNS), reach the managed database and Let's Encrypt; the firewall is
            # stateful, so replies to inbound traffic need no rule of their own.
            outbound_rules=[
                digitalocean.FirewallOutboundRuleArgs(
                    protocol="tcp", port_range="1-65535", destination_addresses=ANYWHERE),
                digitalocean.FirewallOutboundRuleArgs(
                    protocol="udp", port_range="1-65535", destination_addresses=ANYWHERE),
                digitalocean.FirewallOutboundRuleArgs(
                    protocol="icmp", destination_addresses=ANYWHERE),
            ],
            opts=pulumi.ResourceOptions(parent=self),
        )

        self.droplet_ids = pulumi.Output.all(*[d.id for d in self.droplets])
        self.private_ips = pulumi.Output.all(*[d.ipv4_address_private for d in self.droplets])
        self.droplet_urns = pulumi.Output.all(*[d.droplet_urn for d in self.droplets])
        self.firewall_id = firewall.id
        self.register_outputs({
            "droplet_ids": self.droplet_ids,
            "private_ips": self.private_ips,
            "droplet_urns": self.droplet_urns,
            "firewall_id": self.firewall_id,
        })

    def _droplet(self, name: str, i: int, args: AppTierArgs) -> digitalocean.Droplet:
        """App droplet number `i`. No fixed `name`: Pulumi auto-names it."""
        app = args.settings.app
        backups = app.backups in ("weekly", "daily")
        return digitalocean.Droplet(
            f"{name}-{i}",
            image=app.image,
            size=app.droplet_size,
            region=args.settings.region,
            vpc_uuid=args.vpc_id,
            tags=[args.settings.app_tag],
            ssh_keys=list(args.ssh_keys),
            monitoring=True,
            ipv6=False,
            user_data=args.user_data,
            backups=backups,
            backup_policy=digitalocean.DropletBackupPolicyArgs(plan=app.backups)
            if backups else None,
            # Let gunicorn finish in-flight requests before a replaced droplet goes away.
            graceful_shutdown=True,
            opts=pulumi.ResourceOptions(parent=self),
        )

    @staticmethod
    def _inbound_rules(args: AppTierArgs) -> list[digitalocean.FirewallInboundRuleArgs]:
        rules = []
        if args.lb_uids:
            rules.append(digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range="80", source_load_balancer_uids=list(args.lb_uids)))
        if args.web_source_tags:
            rules.append(digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range="80", source_tags=list(args.web_source_tags)))
        if args.settings.admin_cidrs:
            rules.append(digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range="22", source_addresses=list(args.settings.admin_cidrs)))
        return rules
