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

Least privilege: a second `DatabaseUser`, `migrator`, owns the schema and runs the migrations;
the app's user may only read and write rows. DigitalOcean creates both as plain ("normal")
users and leaves privileges to us ("Additional permissions must be managed manually":
provider@401992a1 docs/resources/database_user.md), and the database it creates is owned by
doadmin, which on PostgreSQL 15+ is the only one allowed to create tables in `public`. So one
grant step sets the privileges (`app_grants_steps`): doadmin gives the migrator the schema and
the app user USAGE only; the migrator gives the app user SELECT, INSERT, UPDATE, DELETE on its
tables and USAGE on its sequences, now and by default for every table a later migration
creates. It must run inside the VPC (`app_grants_script`, from an app droplet) and is wired
where the droplets are known.

Every URI verifies the server: `sslmode=verify-full` against the cluster's CA certificate
(`ca_certificate`, the provider's `getDatabaseCa`), which the droplets keep at
`DatabaseClusterArgs.ca_file`.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pulumi
import pulumi_digitalocean as digitalocean

from components import ssh
from components.runtime import MIGRATE_UNIT, DropletLayout
from components.settings import MIGRATOR, ConfigError, DatabaseSettings


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
    ca_file: str
    """Where the droplets keep the cluster's CA certificate: every URI's `sslrootcert`."""


def owner_grants_sql(name: str) -> str:
    """What doadmin, the database's owner, runs in the app database `name`: the migrator may
    create in `public`, the app's user (also `name`) may only use it, and nobody may create
    temporary tables. Idempotent.

    Stacks deployed before the migrator existed have their tables owned by the app user, with
    CREATE on `public`: the REVOKE takes that back, and whatever the app user owns here goes
    to the migrator (REASSIGN OWNED needs doadmin in both roles for a moment: PostgreSQL 15
    lets its CREATEROLE grant that; nothing is done when the app user owns nothing)."""
    app, migrator = f'"{name}"', f'"{MIGRATOR}"'
    return f"""GRANT CONNECT ON DATABASE {app} TO {app}, {migrator};
REVOKE TEMPORARY ON DATABASE {app} FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO {migrator};
REVOKE CREATE ON SCHEMA public FROM {app};
GRANT USAGE ON SCHEMA public TO {app};
DO $$ BEGIN
  IF EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relowner = '{app}'::regrole) THEN
    GRANT {app}, {migrator} TO CURRENT_USER;
    REASSIGN OWNED BY {app} TO {migrator};
    REVOKE {app}, {migrator} FROM CURRENT_USER;
  END IF;
END $$;
"""


def migrator_grants_sql(name: str) -> str:
    """What the migrator runs in the app database: the app's user `name` may read and write
    the rows of every table the migrator owns, now and later (default privileges), and draw
    from its sequences (identity columns), nothing else. Idempotent."""
    tables = "SELECT, INSERT, UPDATE, DELETE"
    return (f'GRANT {tables} ON ALL TABLES IN SCHEMA public TO "{name}";\n'
            f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{name}";\n'
            f'ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {tables} ON TABLES TO "{name}";\n'
            f'ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE ON SEQUENCES TO "{name}";\n')


APPLY_GRANT_STEPS = """import json, sys, psycopg
for uri, sql in json.load(sys.stdin):
    with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)
"""
"""Python that runs each `[uri, sql]` of the JSON on its stdin (`app_grants_steps`)."""


def app_grants_script(layout: DropletLayout) -> str:
    """The shell script that applies the grant steps from an app droplet (inside the
    database's tag firewall), with the app's venv of `layout`, then restarts the migrations.
    The steps come on stdin (`APPLY_GRANT_STEPS`), so no URI is ever on a command line or on
    disk."""
    return "set -eu\n" + ssh.wait_for_cloud_init() + f"""{layout.venv}/bin/python -c \\
{shlex.quote(APPLY_GRANT_STEPS)}
systemctl restart --no-block {MIGRATE_UNIT}
"""


def verified(uri: str, ca_file: str) -> str:
    """`uri` with `sslmode=verify-full` against the CA certificate at `ca_file`, whatever
    sslmode DigitalOcean's URI carried (`require`: any certificate)."""
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    query.update(sslmode="verify-full", sslrootcert=ca_file)
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def _uri(user: str, password: str, host: str, port: int, database: str, ca_file: str) -> str:
    return verified(f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:"
                    f"{port}/{quote(database, safe='')}", ca_file)


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
    """Secret. One URI per replica: app user, replica's private host, app database, verified
    TLS."""
    migration_uri: pulumi.Output[str]
    """Secret. The migrator straight to the primary's private host, for `python -m app.migrate`
    (session advisory locks do not survive a transaction pool)."""
    ca_certificate: pulumi.Output[str]
    """The cluster's CA certificate (PEM, not secret), which every URI verifies the server
    with."""
    replica_ids: pulumi.Output[list[str]]
    """The replicas' uuids (never their `.id`, which 404s: pulumi-digitalocean #324)."""
    app_grants_steps: pulumi.Output[str]
    """Secret. The one-time grant as JSON `[[uri, sql], ...]`: doadmin's `owner_grants_sql`,
    then the migrator's `migrator_grants_sql`, in the app database (for `app_grants_script`,
    piped over SSH); never in user data or on a droplet's disk."""
    admin_uri: pulumi.Output[str]
    """Secret. doadmin to the app database on the primary's private host: only for the
    one-time grant."""

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
            migrator = digitalocean.get_database_user_output(
                cluster_id=cluster.id, name=MIGRATOR)
        else:
            db_name = digitalocean.DatabaseDb(
                f"{name}-db", cluster_id=cluster.id, name=db_settings.name, opts=protected).name
            user = digitalocean.DatabaseUser(
                f"{name}-user", cluster_id=cluster.id, name=db_settings.name, opts=child)
            migrator = digitalocean.DatabaseUser(
                f"{name}-migrator", cluster_id=cluster.id, name=MIGRATOR, opts=child)
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

        def uri(who, host: pulumi.Output[str], port: pulumi.Output[int]) -> pulumi.Output[str]:
            return pulumi.Output.all(who.name, who.password, host, port, db_name).apply(
                lambda a: _uri(*a, args.ca_file))

        self.cluster_id = cluster.id
        self.cluster_urn = cluster.cluster_urn
        self.host = cluster.private_host
        self.port = cluster.port
        self.pool_uri = pulumi.Output.secret(
            pool.private_uri.apply(lambda u: verified(u, args.ca_file)))
        self.replica_uris = pulumi.Output.secret(pulumi.Output.all(
            *[uri(user, r.private_host, r.port) for r in replicas]))
        self.migration_uri = pulumi.Output.secret(
            uri(migrator, cluster.private_host, cluster.port))
        # The replicas share the cluster's CA: DigitalOcean's is one per project (the API
        # reference's example certificate, openapi@7c1300c4 specification/resources/databases/
        # models/ca.yml, is self-signed with the subject "CN = <uuid> Project CA").
        self.ca_certificate = digitalocean.get_database_ca_output(
            cluster_id=cluster.id).certificate
        self.replica_ids = pulumi.Output.all(*[r.uuid for r in replicas])
        self.admin_uri = pulumi.Output.secret(pulumi.Output.all(
            cluster.user, cluster.password, cluster.private_host, cluster.port, db_name,
        ).apply(lambda a: _uri(*a, args.ca_file)))
        self.app_grants_steps = pulumi.Output.secret(pulumi.Output.all(
            self.admin_uri, self.migration_uri).apply(lambda u: json.dumps([
                [u[0], owner_grants_sql(db_settings.name)],
                [u[1], migrator_grants_sql(db_settings.name)]])))
        self.register_outputs({
            "cluster_id": self.cluster_id, "cluster_urn": self.cluster_urn, "host": self.host,
            "port": self.port, "pool_uri": self.pool_uri, "replica_uris": self.replica_uris,
            "migration_uri": self.migration_uri, "replica_ids": self.replica_ids,
            "ca_certificate": self.ca_certificate, "admin_uri": self.admin_uri,
            "app_grants_steps": self.app_grants_steps,
        })

