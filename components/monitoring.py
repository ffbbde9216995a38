"""MonitoringAlerts: who is told when the stack is unhealthy.

Creates, all children of one component, every one notifying `alerts.emails` and, when set,
the Slack channel (its webhook URL kept secret):
- `MonitorAlert`s on the app droplets (CPU, memory, disk; by the app tag), and in nginx mode the
  same on the nginx load-balancer droplets (by the LB tag);
- in managed mode, `MonitorAlert`s on the load balancer (by its id): 5xx error rate, p95
  response time, unhealthy droplets;
- `MonitorAlert`s on the database cluster (by its id): CPU, memory, disk;
- an `UptimeCheck` on the health URL from a few regions, with `UptimeAlert`s: down everywhere,
  slow, and (HTTPS only) certificate expiring;
- with read replicas, an `UptimeCheck` on the app's replication-lag endpoint
  (`/readyz/replication`, 503 while a replica lags past `database.maxReplicaLagSeconds`) with
  an `UptimeAlert` when it fails everywhere: DigitalOcean's alert policies have no
  replication-lag type, so the app measures the lag and the uptime check carries the alert.

Every alert policy names its targets (tags or entities): one with neither would watch every
resource of the account. Thresholds and window come from `alerts.*`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_digitalocean as digitalocean

from components.frontend import AlertTargets
from components.settings import AlertSettings

LB_5XX_PERCENT = 5
"""Alert when 5xx responses rise by more than this many percent (no setting for it yet)."""
UPTIME_REGIONS = ("us_east", "eu_west", "se_asia")
UPTIME_DOWN_PERIOD = "2m"
SSL_EXPIRY_DAYS = 14
SSL_EXPIRY_PERIOD = "1h"
"""The API requires a period for every uptime alert, ssl_expiry included (the provider would send
an empty one): an expiry days away can wait an hour of failing checks before it alerts."""


@dataclass(frozen=True, kw_only=True)
class MonitoringAlertsArgs:
    """What the alerts watch."""

    alerts: AlertSettings
    """The `alerts.*` settings: who is told, thresholds, window, uptime check on or off."""
    stack: str
    """The stack's name (in every policy's description)."""
    app_tag: str
    """The tag of the app droplets."""
    frontend: AlertTargets
    """The frontend's `alert_targets`: its health URL, load balancers or LB droplets."""
    db_cluster_id: pulumi.Input[str]
    """The database cluster's id."""
    watch_replication: bool
    """Read replicas exist: check the frontend's `replication_url` too."""


class MonitoringAlerts(pulumi.ComponentResource):
    """Alert policies on droplets, load balancer and database, plus an uptime check."""

    alert_policy_ids: pulumi.Output[list[str]]
    """The uuids of every alert policy created here."""
    uptime_check_id: pulumi.Output[str] | None
    """The uptime check's id; None with `alerts.uptimeCheck: false`."""
    replication_check_id: pulumi.Output[str] | None
    """The replication-lag uptime check's id; None without replicas or uptime checks."""

    def __init__(self, name: str, args: MonitoringAlertsArgs,
                 opts: pulumi.ResourceOptions | None = None):
        a, fe = args.alerts, args.frontend
        super().__init__("webstack:index:MonitoringAlerts", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        slack_url = pulumi.Output.secret(str(a.slack_url)) if a.slack_url else None
        notify = digitalocean.MonitorAlertAlertsArgs(
            emails=list(a.emails),
            slacks=[digitalocean.MonitorAlertAlertsSlackArgs(
                channel=a.slack_channel, url=slack_url)] if slack_url else None,
        )
        policies: list[digitalocean.MonitorAlert] = []

        def alert(suffix: str, type_: str, value: float, what: str, **scope: Any) -> None:
            policies.append(digitalocean.MonitorAlert(
                f"{name}-{suffix}", type=type_, compare="GreaterThan", value=value, window=a.window,
                description=f"webstack {args.stack}: {what}", enabled=True, alerts=notify,
                opts=child, **scope))

        droplet_metrics = (("cpu", "cpu", a.cpu_percent),
                           ("memory", "memory_utilization_percent", a.memory_percent),
                           ("disk", "disk_utilization_percent", a.disk_percent))
        groups = [("app", args.app_tag)] + [("nginx", tag) for tag in fe.droplet_tags]
        for group, tag in groups:
            for short, metric, percent in droplet_metrics:
                alert(f"{group}-{short}", f"v1/insights/droplet/{metric}", percent,
                      f"{group} droplets {short} above {percent}%", tags=[tag])
        for lb_id in fe.load_balancer_ids:
            lb = {"entities": [lb_id]}
            alert("lb-5xx", "v1/insights/lbaas/increase_in_http_error_rate_percentage_5xx",
                  LB_5XX_PERCENT, f"load balancer 5xx rate up more than {LB_5XX_PERCENT}%", **lb)
            # Unverified: the API documents neither this value's unit (ms assumed; the metrics
            # endpoint reports seconds) nor droplet_health's ("alert on Droplet health status
            # changes"; read as a count of unhealthy droplets). Check both in the control panel.
            alert("lb-latency", "v1/insights/lbaas/high_http_request_response_time_95p",
                  a.latency_ms, f"load balancer p95 response time above {a.latency_ms} ms", **lb)
            alert("lb-health", "v1/insights/lbaas/droplet_health", 0,
                  "load balancer sees an unhealthy droplet", **lb)
        for short, metric, percent in (("cpu", "cpu_alerts", a.cpu_percent),
                                       ("memory", "memory_utilization_alerts", a.memory_percent),
                                       ("disk", "disk_utilization_alerts", a.disk_percent)):
            alert(f"db-{short}", f"v1/dbaas/alerts/{metric}", percent,
                  f"database {short} above {percent}%", entities=[args.db_cluster_id])

        self.uptime_check_id = self.replication_check_id = None
        if a.uptime_check:
            https = args.frontend.https
            self.uptime_check_id = self._uptime(
                f"{name}-uptime", args.frontend.health_url, args, slack_url, [
                    ("down", dict(type="down_global", period=UPTIME_DOWN_PERIOD)),
                    ("latency", dict(type="latency", threshold=a.latency_ms,
                                     comparison="greater_than", period=a.window)),
                ] + ([("ssl", dict(type="ssl_expiry", threshold=SSL_EXPIRY_DAYS,
                                   comparison="less_than", period=SSL_EXPIRY_PERIOD))]
                     if https else []))
        if a.uptime_check and args.watch_replication and args.frontend.replication_url:
            # 503 from every region: a replica lags past the bound (or the site is down,
            # which the health check reports too).
            self.replication_check_id = self._uptime(
                f"{name}-lag", args.frontend.replication_url, args, slack_url,
                [("down", dict(type="down_global", period=UPTIME_DOWN_PERIOD))])
        self.alert_policy_ids = pulumi.Output.all(*[p.uuid for p in policies])
        self.register_outputs({
            "alert_policy_ids": self.alert_policy_ids, "uptime_check_id": self.uptime_check_id,
            "replication_check_id": self.replication_check_id,
        })

    def _uptime(self, name: str, target: pulumi.Input[str], args: MonitoringAlertsArgs,
                slack_url: pulumi.Input[str] | None,
                uptime_alerts: list[tuple[str, dict[str, Any]]]) -> pulumi.Output[str]:
        """An uptime check on `target` and its alerts; returns the check's id."""
        a, https, child = args.alerts, args.frontend.https, pulumi.ResourceOptions(parent=self)
        check = digitalocean.UptimeCheck(
            name, target=target, type="https" if https else "http",
            regions=list(UPTIME_REGIONS), enabled=True, opts=child)
        notifications = [digitalocean.UptimeAlertNotificationArgs(
            emails=list(a.emails),
            slacks=[digitalocean.UptimeAlertNotificationSlackArgs(
                channel=a.slack_channel, url=slack_url)] if slack_url else None,
        )]
        for suffix, fields in uptime_alerts:
            digitalocean.UptimeAlert(f"{name}-{suffix}", check_id=check.id,
                                     notifications=notifications, opts=child, **fields)
        return check.id

