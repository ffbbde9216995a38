"""The whole stack: wires the four components of one environment and returns its outputs.

Order follows the data: VPC, then the database (its URIs go into the app's environment file),
then
the frontend and the app tier. A managed load balancer selects droplets by tag, so it exists
before them and the app firewall admits only its uid; nginx load-balancer droplets need the app
droplets' private IPs, so in nginx mode the app tier comes first and admits the LB droplets' tag.
An autoscale pool (managed frontend only) is reached the same way as fixed droplets: the LB, the
app firewall, the database firewalls and the droplet alerts all select the app tag, which the
pool's template puts on every member.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_command as command
import pulumi_digitalocean as do
import pulumi_random as random

from components import cost, ssh
from components.app_tier import AppTier, AppTierArgs
from components.cloud_config import render_app_cloud_config
from components.database import DatabaseCluster, DatabaseClusterArgs, app_grants_script
from components.frontend import (
    LoadBalancedFrontend,
    LoadBalancedFrontendArgs,
    NginxDroplets,
    WebSource,
)
from components.lb_nginx import render_lb_cloud_config
from components.monitoring import MonitoringAlerts, MonitoringAlertsArgs
from components.prometheus import (
    PrometheusServer,
    PrometheusServerArgs,
    render_alertmanager_config,
    render_prometheus_cloud_config,
)
from components.runtime import AppSecrets, DropletLayout, render_app_env
from components.settings import ConfigError, Settings, is_ssh_fingerprint_or_id

# --------------------------------------------------------------------------- each its section
# What each component takes from the settings, in one place (the tests build their Args here).


def app_tier_args(settings: Settings, **wiring: Any) -> AppTierArgs:
    scrapers = [settings.prometheus_tag] if settings.monitoring.prometheus else []
    return AppTierArgs(app=settings.app, health_check=settings.frontend.health_check,
                       region=settings.region, tag=settings.app_tag,
                       admin_cidrs=settings.ssh_sources, scraper_tags=scrapers, **wiring)


def frontend_args(settings: Settings, **wiring: Any) -> LoadBalancedFrontendArgs:
    nginx = {} if settings.frontend.mode != "nginx" else {
        "lb_tag": settings.lb_tag, "lb_image": settings.app.image,
        "lb_user_data": render_lb_cloud_config(settings), "admin_cidrs": settings.ssh_sources,
        "production": settings.production}
    return LoadBalancedFrontendArgs(
        frontend=settings.frontend, stack=settings.stack, region=settings.region,
        domain=settings.domain, hostname=settings.hostname, fqdn=settings.fqdn,
        app_tag=settings.app_tag, **nginx, **wiring)


def database_args(settings: Settings, **wiring: Any) -> DatabaseClusterArgs:
    return DatabaseClusterArgs(database=settings.database, stack=settings.stack,
                               region=settings.region, app_tag=settings.app_tag,
                               ca_file=DropletLayout().db_ca_file, **wiring)


def prometheus_args(settings: Settings, **wiring: Any) -> PrometheusServerArgs:
    # Alertmanager's secrets as the app's: over SSH with a deploy key (which needs adminCidrs).
    over_ssh = settings.ssh_private_key is not None
    user_data = render_prometheus_cloud_config(settings, over_ssh=over_ssh)
    return PrometheusServerArgs(
        monitoring=settings.monitoring, region=settings.region, tag=settings.prometheus_tag,
        image=settings.app.image, admin_cidrs=settings.admin_cidrs,
        ssh_cidrs=settings.ssh_sources,
        user_data=user_data if over_ssh else pulumi.Output.secret(user_data),
        alertmanager_config=pulumi.Output.secret(render_alertmanager_config(settings))
        if over_ssh else None, **wiring)


def alerts_args(settings: Settings, **wiring: Any) -> MonitoringAlertsArgs:
    return MonitoringAlertsArgs(alerts=settings.alerts, stack=settings.stack,
                                app_tag=settings.app_tag,
                                watch_replication=bool(settings.database.replicas), **wiring)


# --------------------------------------------------------------------------- the stack


def _ssh_keys(settings: Settings) -> list[pulumi.Input[str]]:
    """Key ids and fingerprints as given; names looked up in the account (a provider invoke)."""
    return [
        key if is_ssh_fingerprint_or_id(key) else do.get_ssh_key_output(name=key).fingerprint
        for key in settings.ssh_keys
    ]


def _grant_app_privileges(
    settings: Settings, db: DatabaseCluster, app: AppTier, key: pulumi.Input[str] | None
) -> None:
    """PostgreSQL 15+ lets only a database's owner (doadmin here) create tables in it: doadmin
    gives the schema to the migrator, which grants the app user its rows, once, from the first
    app droplet, over SSH."""
    if key is None:
        pulumi.log.warn(
            "webstack: no sshPrivateKey, so the app user's database grants are not applied; "
            "run the one-time grant of README 'Database privileges' before the first deploy "
            "can migrate" + (" (on any pool member: pulumi cannot reach them)"
                             if settings.app.autoscale else ""))
        return
    first = app.droplets[0]
    command.remote.Command(
        f"{settings.stack}-db-grants",
        connection=ssh.connection(first.ipv4_address, key),
        create=app_grants_script(DropletLayout()),
        stdin=db.app_grants_steps,
        triggers=[db.cluster_id, first.id],
        opts=pulumi.ResourceOptions(depends_on=[first]),
    )


def _app_user_data(
    settings: Settings, secrets: pulumi.Output[AppSecrets], vpc_cidr: pulumi.Output[str],
    db_ca: pulumi.Output[str], *, over_ssh: bool,
) -> tuple[pulumi.Output[str], pulumi.Output[str] | None]:
    """The app droplets' user data, and the environment file their gates deliver over SSH.

    The one path of the app's secrets (`AppSecrets`): over SSH with a deploy key, so the user
    data holds none and a new password or SECRET_KEY updates the droplets in place; in the user
    data without one (staging; README "What the user data holds")."""
    if not over_ssh:
        return pulumi.Output.secret(pulumi.Output.all(secrets, vpc_cidr, db_ca).apply(
            lambda v: render_app_cloud_config(settings, secrets=v[0], vpc_cidr=v[1],
                                              db_ca=v[2]))), None
    app_env = pulumi.Output.secret(secrets.apply(
        lambda s: render_app_env(settings, s, bind=DropletLayout().gunicorn_bind)))
    user_data = pulumi.Output.all(vpc_cidr, db_ca).apply(
        lambda v: render_app_cloud_config(settings, secrets=None, vpc_cidr=v[0], db_ca=v[1]))
    return user_data, app_env


def build(settings: Settings) -> dict[str, Any]:
    """Register every resource of the stack; return the stack outputs by name."""
    nginx = settings.frontend.mode == "nginx"
    if nginx and settings.ssh_private_key and not settings.admin_cidrs:
        raise ConfigError(
            "adminCidrs", [], "it blocks SSH to the nginx LB droplets, so the upstream list "
            "cannot be delivered: list the CIDR of the machine running pulumi, or give no "
            "sshPrivateKey")
    tracker = cost.CostTracker.install()
    stack = settings.stack

    vpc = do.Vpc(
        f"{stack}-vpc",
        region=settings.region,
        ip_range=settings.vpc_ip_range,
        description=f"webstack {stack}: app droplets, load balancer and database",
    )
    ssh_keys = _ssh_keys(settings)
    db = DatabaseCluster(f"{stack}-db", database_args(settings, vpc_id=vpc.id))

    # One key for every droplet, so a session signed by one droplet is valid on the others.
    secret_key = random.RandomPassword(f"{stack}-app-secret-key", length=64, special=False)
    secrets = pulumi.Output.all(
        db.pool_uri, db.replica_uris, db.migration_uri, secret_key.result
    ).apply(lambda v: AppSecrets(database_url=v[0], replica_urls=v[1], migration_url=v[2],
                                 secret_key=v[3]))
    key = pulumi.Output.secret(settings.ssh_private_key) if settings.ssh_private_key else None
    user_data, app_env = _app_user_data(settings, secrets, vpc.ip_range, db.ca_certificate,
                                        over_ssh=key is not None)

    def app_tier(web_source: WebSource) -> AppTier:
        return AppTier(f"{stack}-app", app_tier_args(
            settings, web_source=web_source, vpc_id=vpc.id, ssh_keys=ssh_keys,
            user_data=user_data, ssh_private_key=key, app_env=app_env))

    if settings.frontend.mode == "managed":
        frontend = LoadBalancedFrontend(f"{stack}-web", frontend_args(
            settings, vpc_id=vpc.id, ssh_keys=ssh_keys))
        app = app_tier(frontend.web_source)
    else:
        app = app_tier(NginxDroplets.web_source_for(settings.lb_tag))
        frontend = LoadBalancedFrontend(f"{stack}-web", frontend_args(
            settings, vpc_id=vpc.id, ssh_keys=ssh_keys, app_private_ips=app.private_ips,
            ssh_private_key=key))
    _grant_app_privileges(settings, db, app, key)
    manual_grant = {} if key else {"db_grants": db.app_grants_steps}  # the one-time grant

    alerts = MonitoringAlerts(f"{stack}-alerts", alerts_args(
        settings, frontend=frontend.alert_targets, db_cluster_id=db.cluster_id))
    prometheus = PrometheusServer(f"{stack}-prometheus", prometheus_args(
        settings, vpc_id=vpc.id, ssh_keys=ssh_keys, app_private_ips=app.private_ips,
        ssh_private_key=key)) if settings.monitoring.prometheus else None

    do.Project(
        f"{stack}-project",
        name=f"webstack-{stack}",
        description=f"webstack {stack} stack, managed by Pulumi",
        purpose="Web Application",
        environment="Production" if settings.production else "Staging",
        resources=pulumi.Output.all(
            app.droplet_urns, frontend.resource_urns, db.cluster_urn,
            prometheus.droplet_urn if prometheus else None,
        ).apply(lambda v: [*v[0], *v[1], v[2], *([v[3]] if v[3] else [])]),
    )

    # A pool's members come and go (DigitalOcean creates them): its id and the tag they carry.
    members: dict[str, Any] = {"app_pool_id": app.pool_id, "app_tag": settings.app_tag} \
        if app.pool_id is not None else {
            "app_droplet_ids": app.droplet_ids, "app_private_ips": app.private_ips}
    outputs: dict[str, Any] = {
        "url": frontend.url,
        "frontend_ip": frontend.ip,
        **members,
        "vpc_id": vpc.id,
        "db_cluster_id": db.cluster_id,
        "db_host": db.host,
        "db_pool_uri": db.pool_uri,
        "db_replica_uris": db.replica_uris,
        "alert_policy_ids": alerts.alert_policy_ids,
        "uptime_check_id": alerts.uptime_check_id,
        "replication_check_id": alerts.replication_check_id,
    }
    outputs.update(manual_grant)
    if frontend.upstream_conf is not None:
        outputs["lb_upstream_conf"] = frontend.upstream_conf
    if prometheus is not None:
        outputs.update(prometheus_ip=prometheus.public_ip,
                       prometheus_private_ip=prometheus.private_ip,
                       prometheus_targets=prometheus.targets)
    outputs.update(cost.finish(tracker, settings.budget))
    return outputs
