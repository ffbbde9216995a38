"""The app droplets (fixed, or a Droplet Autoscale pool), their cloud firewall and, with a
deploy key, a health-gated rollout.

Creates:
- one `digitalocean.Firewall` (`{name}-fw`) selecting the droplets by tag, so replacements and
  pool members are covered the moment they boot: port 80 only from the load balancer (managed
  LB uids or the nginx LB droplets' tag), SSH only from `adminCidrs` (no SSH rule when there are
  none), all outbound.
- `app.scaling.mode` fixed: `app.droplet_count` x `digitalocean.Droplet` (`{name}-{i}`): in the
  VPC, tagged `tag`, monitoring agent on, the caller's cloud-config as user data, IPv6 off,
  backups only when `app.backups` is weekly or daily. Droplets are auto-named by Pulumi (a random
  suffix), so a replacement can be created before the old droplet is deleted.
- with `ssh_private_key`: one `command.remote.Command` health gate (`{name}-gate-{i}`) per droplet;
  with `app_env` too, the gate first installs the environment file (the app's secrets) from its
  stdin and restarts the services.
- `app.scaling.mode` autoscale: one `digitalocean.DropletAutoscale` (`{name}-pool`) whose
  template is the same droplet (`droplet_spec`, the one source of both): monitoring becomes
  `with_droplet_agent` (the template has no `monitoring`; the agent is also what the pool scales
  on), and the template has no backups and no graceful shutdown (settings refuse
  `app.backups` with autoscale; DigitalOcean stops a member and waits 60 s before destroying it).
  No gates, so no `app_env`: DigitalOcean creates and destroys members, pulumi never knows their
  addresses, and a member's secrets are in its user data (docs/design.md, "AppTier: fixed
  droplets or an autoscale pool").

Rolling replacement: `user_data` forces replacement, so a deploy replaces every droplet; with
`ssh_private_key`, gate i (cloud-init done, then the LB's health path answered 2xx
`healthyThreshold` times in a row) must pass before droplet i+1 is created, and the old droplets
are deleted only after the last gate. Without a key there are no gates (a warning says so).
Why the engine orders it that way, and why there are no in-place deploys:
docs/design.md, "AppTier: the health-gated rollout".

Secrets in place: `app_env` is the gate's stdin, not part of the user data. A new password or
SECRET_KEY changes the stdin only, so the gates run again (pulumi-command re-runs `create` when
an input changes) on the droplets as they are, one after the other (gate i+1 waits for gate i),
each restarting its app and waiting for it to pass the health check again.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_command as command
import pulumi_digitalocean as digitalocean

from components import ssh
from components.frontend import WebSource
from components.runtime import APP_PORT, DropletLayout, install_env_script
from components.settings import AppSettings, HealthCheckSettings, ScalingSettings

ANYWHERE = ["0.0.0.0/0", "::/0"]
GATE_GRACE_SECONDS = 120
"""Time a droplet gets, after cloud-init, for gunicorn and nginx to answer the health path."""


def health_gate_seconds(health_check: HealthCheckSettings) -> int:
    """How long a gate polls the health path before it fails the update: the grace time plus
    the LB's own healthy window (`healthyThreshold` x `intervalSeconds`); 170 s by default."""
    return GATE_GRACE_SECONDS + health_check.healthy_threshold * health_check.interval_seconds


def health_gate_script(health_check: HealthCheckSettings,
                       cloud_init_seconds: int = ssh.CLOUD_INIT_TIMEOUT_SECONDS, *,
                       install_env: DropletLayout | None = None) -> str:
    """The gate, run as root on an app droplet: 0 once the droplet is ready for traffic.

    Waits for cloud-init; with `install_env` (the droplet's layout), installs the environment
    file from stdin and restarts the services (`runtime.install_env_script`); then checks the
    health path through the droplet's nginx as the LB does: only 2xx counts (a redirect is a
    failure), `healthyThreshold` answers in a row.
    """
    hc = health_check
    url = shlex.quote(f"http://127.0.0.1{hc.path}")
    checks = -(-health_gate_seconds(hc) // hc.interval_seconds)  # rounded up
    install = install_env_script(install_env) if install_env else ""
    return f"""set -u
{ssh.wait_for_cloud_init(cloud_init_seconds)}{install}url={url}
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
    app: AppSettings
    """The `app.*` settings: droplet count or scaling, size, image and backups."""
    health_check: HealthCheckSettings
    """The load balancer's health check, which each droplet's gate waits for."""
    region: str
    """The droplets' region."""
    tag: str
    """The tag on every app droplet: the firewall, the LB and the database select by it."""
    admin_cidrs: Sequence[str]
    """Where SSH is allowed from (none: no SSH rule, and no gates)."""
    web_source: WebSource
    """Who may reach port 80: the frontend's `web_source` (managed LB uid or LB droplets' tag)."""
    scraper_tags: Sequence[str] = ()
    """Droplets that scrape `/metrics` on port 80 (the Prometheus droplet's tag); nginx answers
    `/metrics` to the VPC only."""
    vpc_id: pulumi.Input[str]
    """The VPC the droplets join; the LB and the database reach them over it."""
    ssh_keys: Sequence[pulumi.Input[str]]
    """SSH key ids or fingerprints, already resolved by the caller."""
    user_data: pulumi.Input[str]
    """The droplets' rendered cloud-config (a secret Output when it holds the environment file).
    Changing it replaces every droplet."""
    ssh_private_key: pulumi.Input[str] | None = None
    """The private key (OpenSSH/PEM text, a secret) of one of `ssh_keys`, used from the machine
    running `pulumi up` (inside `adminCidrs`) to health-gate each droplet, so that replacements
    roll one at a time. None, or no `adminCidrs`: rollouts are not gated (a warning says so)."""
    app_env: pulumi.Input[str] | None = None
    """The environment file (`runtime.render_app_env`, a secret) the gates install before they
    check, when it is not in `user_data`. Needs `ssh_private_key` and `admin_cidrs`."""


MONITORING = True
"""The metrics agent on every app droplet: the droplet alerts need it, and so does a pool that
scales on CPU or memory (the template's `with_droplet_agent`)."""


def droplet_spec(args: AppTierArgs) -> dict[str, Any]:
    """What every app droplet is, fixed or pool member, as keyword arguments both
    `digitalocean.Droplet` and `DropletAutoscaleDropletTemplateArgs` take."""
    return {
        "image": args.app.image,
        "size": args.app.droplet_size,
        "region": args.region,
        "vpc_uuid": args.vpc_id,
        "tags": [args.tag],
        "ssh_keys": list(args.ssh_keys),
        "ipv6": False,
        # One render for both modes; its size is checked there (cloud_config.USER_DATA_LIMIT).
        "user_data": args.user_data,
    }


def pool_template(args: AppTierArgs) -> digitalocean.DropletAutoscaleDropletTemplateArgs:
    """The pool's droplet template: `droplet_spec`, monitoring as `with_droplet_agent`."""
    return digitalocean.DropletAutoscaleDropletTemplateArgs(
        **droplet_spec(args), with_droplet_agent=MONITORING)


def pool_config(scaling: ScalingSettings) -> digitalocean.DropletAutoscaleConfigArgs:
    """`app.scaling.*` as the API takes it: targets as decimals (60 % is 0.6)."""
    def decimal(percent: int | None) -> float | None:
        return None if percent is None else percent / 100

    return digitalocean.DropletAutoscaleConfigArgs(
        min_instances=scaling.min_instances, max_instances=scaling.max_instances,
        target_cpu_utilization=decimal(scaling.target_cpu_percent),
        target_memory_utilization=decimal(scaling.target_memory_percent),
        cooldown_minutes=scaling.cooldown_minutes)


class AppTier(pulumi.ComponentResource):
    """N stateless app droplets, or a pool of them, behind a firewall that admits web traffic
    from the LB only."""

    droplets: list[digitalocean.Droplet]
    """The app droplets, in order (none in autoscale mode)."""
    pool: digitalocean.DropletAutoscale | None
    """The Droplet Autoscale pool (autoscale mode), else None."""
    droplet_ids: pulumi.Output[list[str]]
    """Their ids (empty in autoscale mode: members come and go)."""
    private_ips: pulumi.Output[list[str]]
    """Their VPC addresses (what an nginx LB proxies to; empty in autoscale mode)."""
    droplet_urns: pulumi.Output[list[str]]
    """Their DigitalOcean URNs (`do:droplet:ID`), for a `digitalocean.Project`."""
    firewall_id: pulumi.Output[str]
    """The id of the app droplets' cloud firewall."""
    pool_id: pulumi.Output[str] | None
    """The pool's id (autoscale mode), else None."""

    def __init__(self, name: str, args: AppTierArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("webstack:index:AppTier", name, None, opts)

        firewall = digitalocean.Firewall(
            f"{name}-fw",
            tags=[args.tag],
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

        self.droplets, self.pool, self.pool_id = [], None, None
        if args.app.autoscale:
            if args.app_env is not None:
                raise ValueError("AppTierArgs.app_env is delivered by gates over SSH, and a pool"
                                 " has none: its members' secrets are in their user data")
            self.pool = digitalocean.DropletAutoscale(
                f"{name}-pool",
                config=pool_config(args.app.scaling),
                droplet_template=pool_template(args),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[firewall]),
            )
            self.pool_id = self.pool.id
        else:
            self._fixed(name, args, firewall)

        self.droplet_ids = pulumi.Output.all(*[d.id for d in self.droplets])
        self.private_ips = pulumi.Output.all(*[d.ipv4_address_private for d in self.droplets])
        self.droplet_urns = pulumi.Output.all(*[d.droplet_urn for d in self.droplets])
        self.firewall_id = firewall.id
        self.register_outputs({
            "droplet_ids": self.droplet_ids,
            "private_ips": self.private_ips,
            "droplet_urns": self.droplet_urns,
            "firewall_id": self.firewall_id,
            **({"pool_id": self.pool_id} if self.pool_id is not None else {}),
        })

    def _fixed(self, name: str, args: AppTierArgs, firewall: digitalocean.Firewall) -> None:
        """`app.droplet_count` droplets, each after the previous one's gate when gated."""
        gated = args.ssh_private_key is not None and bool(args.admin_cidrs)
        if args.app_env is not None and not gated:
            raise ValueError("AppTierArgs.app_env is delivered by the gates over SSH: it needs"
                             " ssh_private_key and admin_cidrs")
        if not gated:
            pulumi.log.warn(
                "app rollouts are not health-gated ("
                + ("adminCidrs is empty, so SSH to the droplets is blocked" if
                   args.ssh_private_key is not None else "no sshPrivateKey")
                + "): replacements are created together and the old droplets can be deleted "
                "before the new ones answer the health check", resource=self)
        gate: command.remote.Command | None = None
        for i in range(args.app.droplet_count):
            # The firewall first: no droplet is ever up without it.
            after = [firewall] if gate is None else [firewall, gate]
            droplet = self._droplet(name, i, args, after=after)
            self.droplets.append(droplet)
            if gated:
                gate = command.remote.Command(
                    f"{name}-gate-{i}",
                    connection=ssh.connection(droplet.ipv4_address, args.ssh_private_key),
                    create=health_gate_script(
                        args.health_check,
                        install_env=DropletLayout() if args.app_env is not None else None),
                    stdin=args.app_env,
                    triggers=[droplet.id],
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[firewall]),
                )

    def _droplet(self, name: str, i: int, args: AppTierArgs,
                 after: list[pulumi.Resource]) -> digitalocean.Droplet:
        """App droplet number `i`, created only after the resources `after` (the firewall and
        the previous droplet's gate). No fixed `name`: Pulumi auto-names it."""
        app = args.app
        backups = app.backups in ("weekly", "daily")
        return digitalocean.Droplet(
            f"{name}-{i}",
            **droplet_spec(args),
            monitoring=MONITORING,
            backups=backups,
            backup_policy=digitalocean.DropletBackupPolicyArgs(plan=app.backups)
            if backups else None,
            # Let gunicorn finish in-flight requests before a replaced droplet goes away.
            graceful_shutdown=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=after),
        )

    @staticmethod
    def _inbound_rules(args: AppTierArgs) -> list[digitalocean.FirewallInboundRuleArgs]:
        web = args.web_source
        rules = [digitalocean.FirewallInboundRuleArgs(
            protocol="tcp", port_range=str(APP_PORT),
            source_load_balancer_uids=list(web.load_balancer_uids) or None,
            source_tags=list(web.tags) or None)]
        if args.scraper_tags:
            rules.append(digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range=str(APP_PORT), source_tags=list(args.scraper_tags)))
        if args.admin_cidrs:
            rules.append(digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range="22", source_addresses=list(args.admin_cidrs)))
        return rules
