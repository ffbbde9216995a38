"""The app droplets, their cloud firewall and, with a deploy key, a health-gated rollout.

Creates:
- one `digitalocean.Firewall` (`{name}-fw`) selecting the droplets by tag, so replacements are
  covered the moment they boot: port 80 only from the load balancer (managed LB uids or the nginx
  LB droplets' tag), SSH only from `adminCidrs` (no SSH rule when there are none), all outbound.
- `settings.app.droplet_count` x `digitalocean.Droplet` (`{name}-{i}`): in the VPC, tagged
  `settings.app_tag`, monitoring agent on, the caller's cloud-config as user data, IPv6 off,
  backups only when `app.backups` is weekly or daily. Droplets are auto-named by Pulumi (a random
  suffix), so a replacement can be created before the old droplet is deleted.
- with `ssh_private_key`: one `command.remote.Command` health gate (`{name}-gate-{i}`) per droplet.

Rolling replacement. `user_data` forces replacement, so a new app bundle (or any change to the
rendered cloud-config) replaces every droplet. Gate i logs in as root on droplet i's public IPv4,
waits for cloud-init (exit 1 on a cloud-init error or after 15 minutes), then asks the droplet's
nginx for the LB's health path (`http://127.0.0.1/healthz`) until it answered 2xx
`healthyThreshold` times in a row, `intervalSeconds` apart (what the LB needs before it sends
traffic), and exits 1 after `health_gate_seconds`. `triggers=[droplet.id]`: a replaced droplet
gets a new gate (a Command without `update` is replaced, so re-run, when its triggers change).
Droplet i+1 `depends_on` gate i. How the engine orders that (pulumi 3.x, read in its source):
- The SDK sends droplet i+1's registration only once gate i's URN has resolved
  (`pulumi/runtime/rpc.py` `_add_dependency` awaits the URN of every `depends_on` resource), and
  the engine answers a registration only after its step has completed ("After the action
  completes, the engine returns the new state of the resource to the Pulumi program",
  pulumi/pulumi developer-docs/architecture/resource-registration.md). So replacement i is
  created, gate i succeeds, and only then is replacement i+1 created.
- Replacement is create-before-delete by default
  (https://www.pulumi.com/docs/iac/concepts/options/deletebeforereplace/): the engine "first
  creates a new instance of the resource, then updates all dependent resources to point to the
  new one, and finally after all of that, deletes the old resource"; the delete step "is
  generated later on, after all creates/updates finish" (pkg/resource/deploy/step_generator.go).
  Deletes run once the program has exited, in reverse dependency order (`ScheduleDeletes`); the
  program exits only after the last gate has answered, so every old droplet goes after every
  replacement has passed its gate.
- A failing gate fails the update before droplet i+1 and before any delete: every old droplet
  keeps serving beside the new droplets 0..i (tagged, so the LB uses those that pass its check).
  The replaced old droplets stay in the state marked for deletion and are deleted with the deletes
  of the next successful `pulumi up`, at its end (older engines deleted them at its start:
  "completing deletion from previous update", pulumi/pulumi#9979).
- The chain is a `depends_on` edge only: replacing gate i never replaces droplet i+1 (none of its
  inputs come from the gate); a droplet is replaced only by a change of its own inputs. When only
  some droplets are replaced (`pulumi up --target-replace`), only their gates run; the others are
  still registered in order, each after the previous gate, but as same steps that change nothing.
  `deleteBeforeReplace` must stay unset: it would delete droplet i before its replacement exists.
- The first `pulumi up` and a scale-out go one droplet at a time as well (boot + gate each).
- nginx frontend mode: the upstream list is delivered once the last droplet exists, not once it
  has passed its gate; nginx's passive checks (`max_fails`) cover that droplet meanwhile.
Without `ssh_private_key` (or without `adminCidrs`, which blocks SSH) there are no gates and a
warning says so: all replacements are created in parallel and the old droplets are deleted at the
end of the update, which can be before the new ones answer /healthz (a droplet counts as created
once it is booted, minutes before cloud-init is done). The LB keeps unready droplets out of
rotation (it selects by tag and sends traffic only to droplets passing its check), but with the
old droplets gone and the new still booting it has nothing healthy and answers 503.

In-place deploys are not offered: a deploy is a replacement. Immutable droplets mean every
droplet runs exactly its user data, a deploy is the same path as a fresh scale-out or a
replacement after failure, and cloud-init is proven on every deploy rather than on the day a
droplet dies. A hotfix can be copied in place by hand (README, "In-place hotfix"); the next
`pulumi up` replaces those droplets anyway.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_command as command
import pulumi_digitalocean as digitalocean

from components import ssh
from components.settings import HealthCheckSettings, Settings

ANYWHERE = ["0.0.0.0/0", "::/0"]
GATE_GRACE_SECONDS = 120
"""Time a droplet gets, after cloud-init, for gunicorn and nginx to answer the health path."""


def health_gate_seconds(health_check: HealthCheckSettings) -> int:
    """How long a gate polls the health path before it fails the update: the grace time plus
    the LB's own healthy window (`healthyThreshold` x `intervalSeconds`); 170 s by default."""
    return GATE_GRACE_SECONDS + health_check.healthy_threshold * health_check.interval_seconds


def health_gate_script(health_check: HealthCheckSettings,
                       cloud_init_seconds: int = ssh.CLOUD_INIT_TIMEOUT_SECONDS) -> str:
    """The gate, run as root on an app droplet: 0 once the droplet is ready for traffic.

    Waits for cloud-init, then checks the health path through the droplet's nginx as the LB
    does: only 2xx counts (a redirect is a failure), `healthyThreshold` answers in a row.
    """
    hc = health_check
    url = shlex.quote(f"http://127.0.0.1{hc.path}")
    checks = -(-health_gate_seconds(hc) // hc.interval_seconds)  # rounded up
    return f"""set -u
{ssh.wait_for_cloud_init(cloud_init_seconds)}url={url}
ok=0
n=0
while [ "$n" -lt {checks} ]; do
  n=$((n + 1))
  code=$(curl -fsS -o /dev/null -w '%{{http_code}}' --max-time {hc.timeout_seconds} "$url")
  case "$code" in 2??) ok=$((ok + 1)) ;; *) ok=0 ;; esac
  if [ "$ok" -ge {hc.healthy_threshold} ]; then echo "healthy: $url"; exit 0; fi
  sleep {hc.interval_seconds}
done
echo "not healthy: $url did not answer 2xx {hc.healthy_threshold} times in a row in {checks} \
checks" >&2
exit 1
"""


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
    ssh_private_key: pulumi.Input[str] | None = None
    """The private key (OpenSSH/PEM text, a secret) of one of `ssh_keys`, used from the machine
    running `pulumi up` (inside `adminCidrs`) to health-gate each droplet, so that replacements
    roll one at a time. None, or no `adminCidrs`: rollouts are not gated (a warning says so)."""
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

        gated = args.ssh_private_key is not None and bool(s.admin_cidrs)
        if not gated:
            pulumi.log.warn(
                "app rollouts are not health-gated ("
                + ("adminCidrs is empty, so SSH to the droplets is blocked" if
                   args.ssh_private_key is not None else "no sshPrivateKey")
                + "): replacements are created together and the old droplets can be deleted "
                "before the new ones answer the health check", resource=self)
        self.droplets = []
        gate: command.remote.Command | None = None
        for i in range(s.app.droplet_count):
            # The firewall first: no droplet is ever up without it.
            after = [firewall] if gate is None else [firewall, gate]
            droplet = self._droplet(name, i, args, after=after)
            self.droplets.append(droplet)
            if gated:
                gate = command.remote.Command(
                    f"{name}-gate-{i}",
                    connection=ssh.connection(droplet.ipv4_address, args.ssh_private_key),
                    create=health_gate_script(s.frontend.health_check),
                    triggers=[droplet.id],
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[firewall]),
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

    def _droplet(self, name: str, i: int, args: AppTierArgs,
                 after: list[pulumi.Resource]) -> digitalocean.Droplet:
        """App droplet number `i`, created only after the resources `after` (the firewall and
        the previous droplet's gate). No fixed `name`: Pulumi auto-names it."""
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
            opts=pulumi.ResourceOptions(parent=self, depends_on=after),
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
