"""PrometheusServer: an optional Prometheus + Alertmanager droplet in the VPC (`monitoring.*`).

Creates, all children of one component:
- `digitalocean.Droplet` (`{name}-droplet`, tagged `tag`, size `monitoring.prometheusSize`) in
  the VPC, booted by `render_prometheus_cloud_config`: Debian's/Ubuntu's `prometheus` and
  `prometheus-alertmanager` packages, the configuration, the alert rules and Alertmanager's
  routes below (with a deploy key, routes to a receiver that sends nothing until the deploy
  delivers the real ones);
- `digitalocean.Firewall` (`{name}-fw`): 9090 (Prometheus) and 9093 (Alertmanager) and SSH from
  `adminCidrs` only, nothing else in; all outbound (scrapes in the VPC, Slack, the SMTP relay);
- with `ssh_private_key`: a `command.remote.Command` (`{name}-targets`) writing the scrape
  targets file (`TARGETS_PATH`, the app droplets' private addresses) whenever they change, and
  one (`{name}-alertmanager`) writing Alertmanager's configuration (`ALERTMANAGER_PATH`, the
  Slack webhook and the SMTP password) whenever it changes, then reloading Alertmanager.

What it scrapes, every `SCRAPE_INTERVAL`: each app droplet's `/metrics` (the app: requests,
latency, fall-backs, its connection pools, replication lag) and `/nginx-metrics` (the droplet's
nginx stub status through `prometheus-nginx-exporter`), both on port 80 and answered by the
droplet's nginx only to the VPC (the app firewall admits port 80 from this droplet's tag);
itself and Alertmanager.

Why a targets file and not the addresses in the user data, nor DigitalOcean's service
discovery: user data forces replacement, so a Prometheus with the app addresses in it would be
replaced (its history lost) by every rollout; `digitalocean_sd_configs` needs an API token on
the droplet (at best custom-scoped to reading droplets), which the stack cannot create. The
file is written over SSH after the new app droplets exist and before the old ones are deleted
(Prometheus rereads it by itself), so a rolling replacement loses no scrape; without
`sshPrivateKey` copy the `prometheus_targets` output to `TARGETS_PATH` by hand.

Why Alertmanager's configuration comes over SSH too (with a deploy key, as the app droplets'
secrets do): in the user data, the webhook and the SMTP password would be served by the
metadata service, and a new one would replace the droplet and lose its history. Without a deploy
key it stays in the user data (README, "What the user data holds").

Renderers are pure functions of settings (and plain values), as for the other droplets;
tests/test_prometheus.py runs promtool and amtool over what they render.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_command as command
import pulumi_digitalocean as digitalocean
import yaml

from components import ssh
from components.cloud_config import within_user_data_limit
from components.metadata_firewall import metadata_bootcmd
from components.runtime import APP_PORT, NGINX_METRICS_PATH
from components.settings import AlertSettings, MonitoringSettings, Settings

CONFIG_PATH = "/etc/prometheus/prometheus.yml"
RULES_PATH = "/etc/prometheus/webstack-rules.yml"
ALERTMANAGER_PATH = "/etc/prometheus/alertmanager.yml"
TARGETS_PATH = "/etc/prometheus/webstack-targets.json"
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
SCRAPE_INTERVAL = "15s"
RETENTION = "15d"

ANYWHERE = ["0.0.0.0/0", "::/0"]


@dataclass(frozen=True)
class Rule:
    """One alert: its PromQL, how long it must hold, and what it says."""

    name: str
    expr: str
    hold: str
    summary: str


def alert_rules(alerts: AlertSettings) -> list[Rule]:
    """Every alert Prometheus evaluates. Label `instance` is an app droplet (`ip:80`)."""
    latency = alerts.latency_ms / 1000
    return [
        Rule("ReplicaLagging",
             "max by (replica) (webstack_db_replica_lag_seconds"
             " > on (instance, job) group_left webstack_db_replica_max_lag_seconds)",
             "1m", "{{ $labels.replica }} is {{ $value }} s behind the primary, past the bound:"
                   " reads skip it"),
        Rule("ReplicaFallbacks",
             "sum by (reason) (rate(webstack_db_replica_fallbacks_total[5m])) > 1",
             "10m", "{{ $value }} reads a second served by the primary instead of a replica"
                    " ({{ $labels.reason }})"),
        Rule("HighErrorRate",
             "sum by (endpoint) (rate(webstack_http_requests_total{status=~\"5..\"}[5m]))"
             " / sum by (endpoint) (rate(webstack_http_requests_total[5m])) > 0.05",
             "5m", "{{ $labels.endpoint }}: {{ $value | humanizePercentage }} of responses"
                   " are 5xx"),
        Rule("HighLatency",
             "histogram_quantile(0.95, sum by (endpoint, le)"
             " (rate(webstack_http_request_duration_seconds_bucket[5m])))"
             f" > {latency:g}",
             "10m", "{{ $labels.endpoint }}: p95 latency {{ $value }} s, over"
                    f" {latency:g} s (alerts.latencyMs)"),
        Rule("PoolSaturated",
             "max by (instance, engine)"
             " (webstack_db_pool_checked_out / webstack_db_pool_size) >= 1",
             "5m", "{{ $labels.instance }}: every pooled connection to {{ $labels.engine }}"
                   " is in use"),
        Rule("TargetDown", "up == 0", "2m",
             "{{ $labels.job }} on {{ $labels.instance }} does not answer scrapes"),
    ]


def render_rules(alerts: AlertSettings, *, hold: str | None = None) -> str:
    """The rule file. `hold` replaces every rule's `for` (the lab's short runs only)."""
    rules = [{"alert": r.name, "expr": r.expr, "for": hold or r.hold,
              "labels": {"severity": "page"}, "annotations": {"summary": r.summary}}
             for r in alert_rules(alerts)]
    return yaml.safe_dump({"groups": [{"name": "webstack", "rules": rules}]},
                          sort_keys=False, width=1000)


def render_prometheus_config(*, targets_file: str = TARGETS_PATH,
                             rules_file: str = RULES_PATH,
                             self_address: str = f"127.0.0.1:{PROMETHEUS_PORT}",
                             alertmanager: str = f"127.0.0.1:{ALERTMANAGER_PORT}",
                             scrape_interval: str = SCRAPE_INTERVAL) -> str:
    """prometheus.yml: the app droplets from `targets_file` (file_sd, reread on change)."""
    droplets = [{"files": [targets_file]}]
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [rules_file],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [
            {"job_name": "app", "metrics_path": "/metrics", "file_sd_configs": droplets},
            {"job_name": "nginx", "metrics_path": NGINX_METRICS_PATH,
             "file_sd_configs": droplets},
            {"job_name": "prometheus", "static_configs": [{"targets": [self_address]}]},
            {"job_name": "alertmanager", "static_configs": [{"targets": [alertmanager]}]},
        ],
    }
    return yaml.safe_dump(config, sort_keys=False, width=1000)


def render_targets(addresses: Sequence[str], port: int = APP_PORT) -> str:
    """The file_sd targets file: every app droplet's nginx."""
    return json.dumps([{"targets": [f"{a}:{port}" for a in addresses]}], indent=2) + "\n"


def render_alertmanager_config(settings: Settings, *, notify: bool = True) -> str:
    """alertmanager.yml: every alert to `alerts.emails` (through `monitoring.smtp`) and the
    Slack channel. Holds the webhook URL and the SMTP password: a secret.

    notify=False: the same routes to a receiver that sends nothing, with no secret in it: what
    the droplet starts with until the deploy delivers the real file, and the lab's."""
    alerts, smtp = settings.alerts, settings.monitoring.smtp
    receiver: dict[str, Any] = {"name": "webstack"}
    config: dict[str, Any] = {}
    if smtp and notify:
        config["global"] = {"smtp_smarthost": smtp.smarthost, "smtp_from": smtp.sender,
                            "smtp_auth_username": smtp.username,
                            "smtp_auth_password": str(smtp.password),
                            "smtp_require_tls": True}
        receiver["email_configs"] = [{"to": email, "send_resolved": True}
                                     for email in alerts.emails]
    if alerts.slack_url and notify:
        receiver["slack_configs"] = [{
            "api_url": str(alerts.slack_url), "channel": alerts.slack_channel,
            "send_resolved": True,
            "title": f"webstack {settings.stack}: {{{{ .CommonLabels.alertname }}}}"
                     " {{ .Status }}",
            "text": "{{ range .Alerts }}{{ .Annotations.summary }}\n{{ end }}"}]
    config["route"] = {"receiver": "webstack", "group_by": ["alertname"],
                       "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"}
    config["receivers"] = [receiver]
    return yaml.safe_dump(config, sort_keys=False, width=1000)


def render_prometheus_cloud_config(settings: Settings, *, over_ssh: bool) -> str:
    """The Prometheus droplet's user data. Depends on settings only, never on app addresses.

    over_ssh: Alertmanager's configuration is delivered over SSH (`INSTALL_ALERTMANAGER`), so
    the user data holds a placeholder and no secret, and stays the same when a secret changes.
    Otherwise it holds the Slack webhook and the SMTP password: a secret."""
    files = [
        (CONFIG_PATH, "0644", render_prometheus_config()),
        (RULES_PATH, "0644", render_rules(settings.alerts)),
        (TARGETS_PATH, "0644", render_targets(())),
        (ALERTMANAGER_PATH, "0640", render_alertmanager_config(settings, notify=not over_ssh)),
        ("/etc/default/prometheus", "0644",
         f'ARGS="--storage.tsdb.retention.time={RETENTION}"\n'),
    ]
    owners = {ALERTMANAGER_PATH: "root:prometheus"}  # the services run as prometheus
    document = {
        "bootcmd": [metadata_bootcmd()],  # the metadata service for root only, as on every droplet
        "package_update": True,
        "packages": ["prometheus", "prometheus-alertmanager"],
        # Deferred to the final stage: after the packages (and their user) exist.
        "write_files": [{"path": path, "permissions": mode, "content": content,
                         **({"owner": owners[path]} if path in owners else {}), "defer": True}
                        for path, mode, content in files],
        "runcmd": [
            ["systemctl", "enable", "prometheus", "prometheus-alertmanager"],
            ["systemctl", "restart", "prometheus", "prometheus-alertmanager"],
        ],
    }
    text = "#cloud-config\n" + yaml.safe_dump(document, sort_keys=False, width=1000)
    return within_user_data_limit(text, "Prometheus droplet")


def _install_script(path: str, mode: str, *, owner: str = "", check: str = "",
                    then: str = "") -> str:
    """Run on the Prometheus droplet with a file on stdin, once cloud-init is done: `path`
    replaced in one move (written to a root-only mktemp file first), so no service reads half
    a file. `check` (a command given the new file) must pass first; `then` runs after."""
    quoted = shlex.quote(path)
    return "".join((
        f"set -eu\n{ssh.wait_for_cloud_init()}",
        f"tmp=$(mktemp {quoted}.XXXXXX)\ncat > \"$tmp\"\n",
        f"chown {owner} \"$tmp\"\n" if owner else "",
        f"chmod {mode} \"$tmp\"\n",
        f"{check} \"$tmp\" >/dev/null 2>&1 || {{ rm -f \"$tmp\"; echo \"{path}: refused by"
        f" {check}\" >&2; exit 1; }}\n" if check else "",
        f"mv \"$tmp\" {quoted}\n",
        f"{then}\n" if then else ""))


INSTALL_TARGETS = _install_script(TARGETS_PATH, "0644")
"""With the targets file on stdin; Prometheus rereads it by itself."""

INSTALL_ALERTMANAGER = _install_script(
    ALERTMANAGER_PATH, "0640", owner="root:prometheus", check="amtool check-config",
    then="systemctl reload-or-restart prometheus-alertmanager")
"""With alertmanager.yml on stdin: checked (amtool's output, which may quote the file, is not
shown), installed, and Alertmanager reloaded."""


@dataclass(frozen=True, kw_only=True)
class PrometheusServerArgs:
    monitoring: MonitoringSettings
    """The `monitoring.*` settings: the droplet's size."""
    region: str
    tag: str
    """The Prometheus droplet's tag (the app firewall admits it on port 80)."""
    image: str
    vpc_id: pulumi.Input[str]
    ssh_keys: Sequence[pulumi.Input[str]]
    admin_cidrs: Sequence[str]
    """The only sources of 9090 and 9093."""
    ssh_cidrs: Sequence[str]
    """The only sources of SSH: `adminCidrs` and, during a deploy, the runner's address."""
    user_data: pulumi.Input[str]
    """`render_prometheus_cloud_config` of the stack's settings (a secret when it holds
    Alertmanager's configuration)."""
    app_private_ips: pulumi.Input[Sequence[str]]
    """The app droplets' VPC addresses: the scrape targets."""
    ssh_private_key: pulumi.Input[str] | None = None
    """Deploy key: deliver the targets file (and `alertmanager_config`) on change. None: copy
    `targets` by hand."""
    alertmanager_config: pulumi.Input[str] | None = None
    """`render_alertmanager_config` (a secret) when it is not in `user_data`: delivered over
    SSH whenever it changes. Needs `ssh_private_key` and `admin_cidrs`."""


class PrometheusServer(pulumi.ComponentResource):
    """One Prometheus + Alertmanager droplet in the VPC, reachable from `adminCidrs` only."""

    droplet_id: pulumi.Output[str]
    """The Prometheus droplet's id."""
    private_ip: pulumi.Output[str]
    """Its VPC address."""
    public_ip: pulumi.Output[str]
    """Its public address (9090/9093 and SSH open to `adminCidrs` only)."""
    droplet_urn: pulumi.Output[str]
    """Its DigitalOcean URN, for a `digitalocean.Project`."""
    targets: pulumi.Output[str]
    """The scrape targets file (`TARGETS_PATH`) for the current app droplets."""

    def __init__(self, name: str, args: PrometheusServerArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("webstack:index:PrometheusServer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        admin = list(args.admin_cidrs)
        over_ssh = args.ssh_private_key is not None and bool(admin)
        if args.alertmanager_config is not None and not over_ssh:
            raise ValueError("PrometheusServerArgs.alertmanager_config is delivered over SSH:"
                             " it needs ssh_private_key and admin_cidrs")
        sources = {PROMETHEUS_PORT: admin, ALERTMANAGER_PORT: admin, 22: list(args.ssh_cidrs)}
        firewall = digitalocean.Firewall(
            f"{name}-fw", tags=[args.tag],
            inbound_rules=[digitalocean.FirewallInboundRuleArgs(
                protocol="tcp", port_range=str(port), source_addresses=cidrs)
                for port, cidrs in sources.items()] if admin else [],
            # Scrapes in the VPC, apt, NTP, DNS, Slack and the SMTP relay.
            outbound_rules=[digitalocean.FirewallOutboundRuleArgs(
                protocol=p, port_range=None if p == "icmp" else "1-65535",
                destination_addresses=ANYWHERE) for p in ("tcp", "udp", "icmp")],
            opts=child)
        droplet = digitalocean.Droplet(
            f"{name}-droplet", image=args.image, size=args.monitoring.prometheus_size,
            region=args.region, vpc_uuid=args.vpc_id, tags=[args.tag],
            ssh_keys=list(args.ssh_keys), monitoring=True, ipv6=False,
            user_data=args.user_data, graceful_shutdown=True,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[firewall]))
        self.targets = pulumi.Output.from_input(args.app_private_ips).apply(render_targets)
        if over_ssh:
            connection = ssh.connection(droplet.ipv4_address, args.ssh_private_key)
            # Again on a new droplet (its id) and whenever stdin changes: in place.
            files = [("targets", INSTALL_TARGETS, self.targets)]
            if args.alertmanager_config is not None:
                files.append(("alertmanager", INSTALL_ALERTMANAGER,
                              pulumi.Output.secret(args.alertmanager_config)))
            for suffix, script, stdin in files:
                command.remote.Command(
                    f"{name}-{suffix}", connection=connection, create=script, stdin=stdin,
                    triggers=[droplet.id],
                    opts=pulumi.ResourceOptions(parent=self, depends_on=[firewall]))
        else:
            pulumi.log.warn("Prometheus's scrape targets are not delivered (no sshPrivateKey"
                            f" or adminCidrs): copy the prometheus_targets output to"
                            f" {TARGETS_PATH} on the Prometheus droplet", resource=self)
        self.droplet_id = droplet.id
        self.private_ip = droplet.ipv4_address_private
        self.public_ip = droplet.ipv4_address
        self.droplet_urn = droplet.droplet_urn
        self.register_outputs({"droplet_id": self.droplet_id, "private_ip": self.private_ip,
                               "public_ip": self.public_ip, "droplet_urn": self.droplet_urn,
                               "targets": self.targets})
