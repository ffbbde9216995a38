"""DatabaseCluster: the managed PostgreSQL behind the app.

Creates, all children of one component:
- a `digitalocean.DatabaseCluster` (engine pg, auto-named) in the stack's VPC: the primary plus
  `database.nodeCount - 1` standbys, a weekly maintenance window, the stack tag, and deletion
  protection when `database.protect` is set (the default in production), with which Pulumi
  also never deletes the cluster, its database or its firewall (`retain_on_delete`);
- the app's `DatabaseDb` and `DatabaseUser`, both named `database.name` (never doadmin); the
  database is protected like the cluster, since replacing it drops its data;
- a PgBouncer `DatabaseConnectionPool` for the app's writes (`database.pool`, transaction mode
  by default), connecting as the app user;
- one `DatabaseReplica` per `database.replicas` entry, in the same VPC, referenced by its uuid;
- one `DatabaseFirewall` for the cluster and one per replica, admitting only droplets tagged
  with the app tag.

Restored (`database.restores` n ≥ 1): every resource above is named `<name>-r<n>-...`, a new
cluster and new children. In the run with `database.restoreFrom` the cluster is created from
that cluster's backup (`backup_restore`); the database and user its backup holds are adopted
(the database by name, the user through the provider's look-up) instead of created, in that
run and every later one. Removing `restoreFrom` afterwards changes none of the cluster's inputs
that force a replacement; see docs/runbook.md for the whole restore.

On PostgreSQL 15+ the app user may not create tables in the app database until doadmin grants
it the public schema (the database is owned by doadmin): `app_grants_sql` and `admin_uri` are
for that one grant, which must run inside the VPC (`app_grants_script`, from an app droplet)
and is wired where the droplets are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import pulumi
import pulumi_digitalocean as digitalocean

from components import ssh
from components.runtime import MIGRATE_UNIT, DropletLayout
from components.settings import ConfigError, DatabaseSettings


@dataclass(frozen=True, kw_only=True)
class DatabaseClusterArgs:
    """What the database needs from the rest of the stack."""

    database: DatabaseSettings
    """The `database.*` settings: version, sizes, nodes, replicas, pool, maintenance, name."""
    stack: str
    """The stack's name (the cluster's tag `webstack-<stack>`)."""
    region: str
    """The primary's region (replicas name their own)."""
    app_tag: str
    """The tag of the app droplets: the only ones the database firewalls admit."""
    vpc_id: pulumi.Input[str]
    """The VPC the cluster and its replicas join; only their private hosts are handed out."""


def app_grants_sql(name: str) -> str:
    """What doadmin runs once in the app database so the app user (same name) can create its
    tables: PostgreSQL 15+ leaves CREATE on `public` to the database's owner, and a database
    created through DigitalOcean's API is owned by doadmin. Idempotent."""
    return (f'GRANT CONNECT ON DATABASE "{name}" TO "{name}";\n'
            f'GRANT USAGE, CREATE ON SCHEMA public TO "{name}";\n')


def app_grants_script(layout: DropletLayout) -> str:
    """The shell script that applies `app_grants_sql` from an app droplet (inside the
    database's tag firewall), with the app's venv of `layout`, then restarts the migrations.
    doadmin's URI comes on the first line of stdin and the SQL after it, so the URI is never
    on a command line or on disk."""
    return "set -eu\n" + ssh.wait_for_cloud_init() + f"""{layout.venv}/bin/python -c '
import sys, psycopg
uri = sys.stdin.readline().strip()
with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
    conn.execute(sys.stdin.read())
'
systemctl restart --no-block {MIGRATE_UNIT}
"""


def _uri(user: str, password: str, host: str, port: int, database: str) -> str:
    return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/"
            f"{quote(database, safe='')}?sslmode=require")


def _check_source(cluster: str) -> None:
    """ConfigError naming `database.restoreFrom.cluster` unless the account holds a cluster of
    that name. The provider's look-up returns no id for an unknown name (provider@401992a1
    digitalocean/database/datasource_database_cluster.go l.229-287)."""
    try:
        found = digitalocean.get_database_cluster(name=cluster).id
    except Exception as exc:  # the provider's error, e.g. "Unable to find any database clusters"
        raise ConfigError("database.restoreFrom.cluster", cluster,
                          f"must name a cluster in the account ({exc})") from None
    if not found:
        raise ConfigError("database.restoreFrom.cluster", cluster,
                          "must name a cluster in the account; there is none of that name")


class DatabaseCluster(pulumi.ComponentResource):
    """Managed PostgreSQL with standbys, read replicas, a PgBouncer pool and tag-only firewalls."""

    cluster_id: pulumi.Output[str]
    """The primary cluster's id (a uuid), for alerts."""
    cluster_urn: pulumi.Output[str]
    """The cluster's DigitalOcean URN (`do:dbaas:...`), for the DigitalOcean project."""
    host: pulumi.Output[str]
    """The primary's private host name (VPC only)."""
    port: pulumi.Output[int]
    """The primary's port (the pool listens on its own port, inside `pool_uri`)."""
    pool_uri: pulumi.Output[str]
    """Secret. The app's DATABASE_URL: the pool's private URI; writes go through PgBouncer."""
    replica_uris: pulumi.Output[list[str]]
    """Secret. One URI per replica: app user, replica's private host, app database, TLS."""
    migration_uri: pulumi.Output[str]
    """Secret. App user straight to the primary's private host, for `python -m app.migrate`
    (session advisory locks do not survive a transaction pool)."""
    replica_ids: pulumi.Output[list[str]]
    """The replicas' uuids (never their `.id`, which 404s: pulumi-digitalocean #324)."""
    app_grants_sql: str
    """Idempotent SQL that doadmin must run once in the app database (PostgreSQL 15+)."""
    admin_uri: pulumi.Output[str]
    """Secret. doadmin to the app database on the primary's private host: only for running
    `app_grants_sql` once (e.g. piped over SSH); never in user data or on a droplet's disk."""

    def __init__(self, name: str, args: DatabaseClusterArgs,
                 opts: pulumi.ResourceOptions | None = None):
        db_settings = args.database
        if db_settings.restore_from:
            _check_source(db_settings.restore_from.cluster)
        super().__init__("webstack:index:DatabaseCluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        # Protected, Pulumi never deletes the data: a cluster or database dropped from the
        # program (the old one after a restore) is only dropped from the stack, and the
        # cluster's firewall stays with it (docs/runbook.md).
        protected = pulumi.ResourceOptions(
            parent=self, protect=db_settings.protect, retain_on_delete=db_settings.protect)
        stack_tag = f"webstack-{args.stack}"
        firewall_rules = [digitalocean.DatabaseFirewallRuleArgs(type="tag", value=args.app_tag)]

        restore = db_settings.restore_from
        if db_settings.restores:
            # A restored cluster is a new cluster (new logical and DigitalOcean names): the
            # provider reads `backup_restore` only when it creates one, so adding it to the
            # existing cluster would do nothing. Its children are new too, so the old pool keeps
            # serving until the app droplets have switched.
            name = f"{name}-r{db_settings.restores}"
        cluster = digitalocean.DatabaseCluster(
            f"{name}-cluster",
            engine="pg",
            version=db_settings.version,
            size=db_settings.size,
            region=args.region,
            node_count=db_settings.node_count,
            private_network_uuid=args.vpc_id,
            maintenance_windows=[digitalocean.DatabaseClusterMaintenanceWindowArgs(
                day=db_settings.maintenance.day, hour=f"{db_settings.maintenance.hour:02d}:00")],
            tags=[stack_tag],
            backup_restore=restore and digitalocean.DatabaseClusterBackupRestoreArgs(
                database_name=restore.cluster,
                backup_created_at=restore.at and restore.at.strftime("%Y-%m-%dT%H:%M:%SZ")),
            # `backup_restore` is read only at create and is not ForceNew (provider@401992a1
            # digitalocean/database/resource_database_cluster.go l.243-259, 370-372): removing
            # `restoreFrom` after the switch would be an empty update; ignoring it makes it none.
            opts=pulumi.ResourceOptions.merge(protected, pulumi.ResourceOptions(
                ignore_changes=["backupRestore"] if db_settings.restores else None)),
        )
        digitalocean.DatabaseFirewall(
            f"{name}-firewall", cluster_id=cluster.id, rules=firewall_rules,
            opts=pulumi.ResourceOptions(parent=self, retain_on_delete=db_settings.protect))
        if db_settings.restores:
            # The backup holds the app's database and user: adopt them. There is no database
            # data source, and `import_` takes a plain id that does not exist before the cluster
            # does, so the database is its name and the user a look-up
            # (provider@401992a1 digitalocean/database/datasource_database_user.go).
            db_name = pulumi.Output.from_input(db_settings.name)
            user = digitalocean.get_database_user_output(
                cluster_id=cluster.id, name=db_settings.name)
        else:
            db_name = digitalocean.DatabaseDb(
                f"{name}-db", cluster_id=cluster.id, name=db_settings.name, opts=protected).name
            user = digitalocean.DatabaseUser(
                f"{name}-user", cluster_id=cluster.id, name=db_settings.name, opts=child)
        pool = digitalocean.DatabaseConnectionPool(
            f"{name}-pool",
            cluster_id=cluster.id,
            name=db_settings.name,
            mode=db_settings.pool.mode,
            size=db_settings.pool.size,
            db_name=db_name,
            user=user.name,
            # Every pool field forces a replacement, and the name is fixed within the cluster:
            # the old pool must go before the new one can be created.
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )

        replicas: list[digitalocean.DatabaseReplica] = []
        for i, replica_settings in enumerate(db_settings.replicas):
            replica = digitalocean.DatabaseReplica(
                f"{name}-replica-{i}",
                cluster_id=cluster.id,
                size=replica_settings.size,
                region=replica_settings.region,
                private_network_uuid=args.vpc_id,
                tags=[stack_tag],
                opts=child,
            )
            digitalocean.DatabaseFirewall(
                f"{name}-replica-{i}-firewall", cluster_id=replica.uuid, rules=firewall_rules,
                opts=child)
            replicas.append(replica)

        def app_uri(host: pulumi.Output[str], port: pulumi.Output[int]) -> pulumi.Output[str]:
            return pulumi.Output.all(user.name, user.password, host, port, db_name).apply(
                lambda a: _uri(*a))

        self.cluster_id = cluster.id
        self.cluster_urn = cluster.cluster_urn
        self.host = cluster.private_host
        self.port = cluster.port
        self.pool_uri = pulumi.Output.secret(pool.private_uri)
        self.replica_uris = pulumi.Output.secret(pulumi.Output.all(
            *[app_uri(r.private_host, r.port) for r in replicas]))
        self.migration_uri = pulumi.Output.secret(app_uri(cluster.private_host, cluster.port))
        self.replica_ids = pulumi.Output.all(*[r.uuid for r in replicas])
        self.app_grants_sql = app_grants_sql(db_settings.name)
        self.admin_uri = pulumi.Output.secret(pulumi.Output.all(
            cluster.user, cluster.password, cluster.private_host, cluster.port, db_name,
        ).apply(lambda a: _uri(*a)))
        self.register_outputs({
            "cluster_id": self.cluster_id, "cluster_urn": self.cluster_urn, "host": self.host,
            "port": self.port, "pool_uri": self.pool_uri, "replica_uris": self.replica_uris,
            "migration_uri": self.migration_uri, "replica_ids": self.replica_ids,
            "admin_uri": self.admin_uri,
        })

