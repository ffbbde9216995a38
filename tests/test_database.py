"""DatabaseCluster under the mocks: what it registers, and what it hands the app."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pulumi
import pytest
from pulumi.runtime.sync_await import _sync_await

from components.database import DatabaseCluster
from components.runtime import DropletLayout
from components.settings import MIGRATOR, Settings, database_size, pool_connection_budget
from components.stack import database_args
from tests.factories import make_settings, settings_for
from tools.mocks import DATABASE_CA, Run, run_function

VPC = "vpc-0d1e"


def build(settings: Settings) -> tuple[Run, DatabaseCluster]:
    built: dict[str, DatabaseCluster] = {}

    def body() -> None:
        built["db"] = DatabaseCluster("db", database_args(settings, vpc_id=VPC))

    return run_function(body, stack=settings.stack), built["db"]


def resolve(output: pulumi.Output) -> tuple[Any, bool]:
    """An output's value and whether it is secret."""
    return _sync_await(output.future()), _sync_await(output.is_secret())


def plain_strings(value: Any):
    """Every string in a recorded input (the mocks record secrets unwrapped: skip those)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from plain_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from plain_strings(item)
    elif isinstance(value, str):
        yield value


def test_staging_cluster_is_postgres_in_the_vpc_with_the_settings():
    settings = make_settings(database={"maintenance": {"day": "tuesday", "hour": 7}})
    run, db = build(settings)
    component = run.one("webstack:index:DatabaseCluster")
    cluster = run.one("databaseCluster:DatabaseCluster")
    assert cluster.parent == component.urn
    assert cluster.inputs["engine"] == "pg"
    assert cluster.inputs["version"] == settings.database.version
    assert cluster.inputs["size"] == settings.database.size
    assert cluster.inputs["region"] == settings.region
    assert cluster.inputs["nodeCount"] == 1
    assert cluster.inputs["privateNetworkUuid"] == VPC
    assert cluster.inputs["maintenanceWindows"] == [{"day": "tuesday", "hour": "07:00"}]
    assert cluster.inputs["tags"] == ["webstack-staging"]
    assert "name" not in cluster.inputs, "a fixed name blocks create-before-delete replacement"
    assert not cluster.protect
    assert not run.of_type("DatabaseReplica")
    assert resolve(db.cluster_urn)[0] == cluster.outputs["clusterUrn"]
    assert resolve(db.host)[0] == cluster.outputs["privateHost"]


def test_prod_has_a_standby_protection_and_replicas_sized_from_settings():
    settings = settings_for("prod", database={
        "replicas": [{"size": "db-s-4vcpu-8gb"}, {}]})
    run, db = build(settings)
    cluster = run.one("databaseCluster:DatabaseCluster")
    assert cluster.inputs["nodeCount"] == 2
    assert cluster.protect and run.one("databaseDb:DatabaseDb").protect
    replicas = sorted(run.of_type("DatabaseReplica"), key=lambda r: r.name)
    assert [r.inputs["size"] for r in replicas] == ["db-s-4vcpu-8gb", "db-s-2vcpu-4gb"]
    cluster_id = resolve(db.cluster_id)[0]
    for replica in replicas:
        assert replica.inputs["clusterId"] == cluster_id
        assert replica.inputs["region"] == settings.region
        assert replica.inputs["privateNetworkUuid"] == VPC
        assert replica.inputs["tags"] == ["webstack-prod"]
        assert "name" not in replica.inputs
    assert resolve(db.replica_ids)[0] == [r.outputs["uuid"] for r in replicas]


def test_protected_the_cluster_database_and_firewall_are_never_deleted_by_pulumi():
    """What a restore leaves behind stays in DigitalOcean, with its firewall (docs/runbook.md)."""
    prod, _ = build(settings_for("prod"))
    retained = {r.name for r in prod.resources if r.retain_on_delete}
    assert retained == {"db-cluster", "db-db", "db-firewall"}
    staging, _ = build(settings_for("staging"))
    assert not any(r.retain_on_delete for r in staging.resources)


def test_staging_is_not_protected_unless_asked():
    run, _ = build(make_settings())
    assert not run.one("databaseCluster:DatabaseCluster").protect
    run, _ = build(make_settings(database={"protect": True}))
    assert run.one("databaseCluster:DatabaseCluster").protect


def test_firewalls_admit_only_the_app_tag_on_the_cluster_and_each_replica_by_uuid():
    settings = settings_for("prod", database={"replicas": [{}, {}]})
    run, db = build(settings)
    replicas = run.of_type("DatabaseReplica")
    firewalls = run.of_type("DatabaseFirewall")
    assert len(firewalls) == 1 + len(replicas) == 3
    for firewall in firewalls:
        assert firewall.inputs["rules"] == [{"type": "tag", "value": settings.app_tag}]
    targets = sorted(f.inputs["clusterId"] for f in firewalls)
    expected = sorted([resolve(db.cluster_id)[0], *(r.outputs["uuid"] for r in replicas)])
    assert targets == expected
    assert not {f"{r.name}-id" for r in replicas} & set(targets), "a replica's .id 404s (#324)"


def test_app_database_user_and_transaction_pool_within_the_budget():
    settings = settings_for("prod")
    run, _ = build(settings)
    name = settings.database.name
    assert run.one("databaseDb:DatabaseDb").inputs["name"] == name
    users = {u.name: u.inputs["name"] for u in run.of_type("databaseUser:DatabaseUser")}
    assert users == {"db-user": name, "db-migrator": MIGRATOR} and name != "doadmin"
    pool = run.one("DatabaseConnectionPool")
    assert pool.inputs["mode"] == "transaction"
    assert pool.inputs["user"] == name and pool.inputs["dbName"] == name
    assert 0 < pool.inputs["size"] <= pool_connection_budget(database_size(settings.database.size))
    assert pool.delete_before_replace, "the pool's name is fixed: replace must delete first"


def test_pool_mode_and_size_come_from_settings():
    run, _ = build(make_settings(database={"pool": {"mode": "session", "size": 5}}))
    pool = run.one("DatabaseConnectionPool")
    assert (pool.inputs["mode"], pool.inputs["size"]) == ("session", 5)


VERIFIED = f"sslmode=verify-full&sslrootcert={DropletLayout().db_ca_file}"


def test_app_uris_are_secret_private_verify_the_server_and_use_the_app_user():
    settings = settings_for("prod", database={"name": "shop", "replicas": [{}, {}]})
    run, db = build(settings)
    cluster = run.one("databaseCluster:DatabaseCluster")
    passwords = {u.inputs["name"]: u.outputs["password"]
                 for u in run.of_type("databaseUser:DatabaseUser")}

    pool_uri, secret = resolve(db.pool_uri)
    private_uri = run.one("DatabaseConnectionPool").outputs["privateUri"]
    assert secret and pool_uri == private_uri.replace("sslmode=require", VERIFIED)

    migration_uri, secret = resolve(db.migration_uri)
    assert secret
    assert migration_uri == (f"postgresql://{MIGRATOR}:{passwords[MIGRATOR]}@"
                             f"{cluster.outputs['privateHost']}:{cluster.outputs['port']}/shop?"
                             + VERIFIED)

    replica_uris, secret = resolve(db.replica_uris)
    assert secret
    hosts = [r.outputs["privateHost"] for r in run.of_type("DatabaseReplica")]
    assert sorted(replica_uris) == sorted(
        f"postgresql://shop:{passwords['shop']}@{host}:25060/shop?{VERIFIED}" for host in hosts)
    assert not any("doadmin" in uri for uri in [pool_uri, migration_uri, *replica_uris])


def test_the_ca_certificate_comes_from_the_provider_and_is_not_secret():
    _, db = build(settings_for("prod"))
    pem, secret = resolve(db.ca_certificate)
    assert not secret and pem == DATABASE_CA.read_text()
    assert pem.startswith("-----BEGIN CERTIFICATE-----")


def test_the_grant_steps_run_as_doadmin_then_as_the_migrator_and_are_secret():
    run, db = build(make_settings(database={"name": "shop"}))
    steps, secret = resolve(db.app_grants_steps)
    (admin_uri, owner_sql), (migrator_uri, migrator_sql) = json.loads(steps)
    host = run.one("databaseCluster:DatabaseCluster").outputs["privateHost"]
    assert secret and admin_uri.startswith("postgresql://doadmin:")
    assert admin_uri.endswith(f"@{host}:25060/shop?{VERIFIED}")
    assert (migrator_uri, secret) == resolve(db.migration_uri)
    assert f'GRANT USAGE, CREATE ON SCHEMA public TO "{MIGRATOR}";' in owner_sql
    assert 'REVOKE CREATE ON SCHEMA public FROM "shop";' in owner_sql
    assert 'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "shop";' in migrator_sql


def test_no_uri_or_password_in_plain_inputs():
    run, _ = build(settings_for("prod"))
    for resource in run.resources:
        plain = {k: v for k, v in resource.inputs.items() if k not in resource.secret_inputs}
        for text in plain_strings(plain):
            assert "postgresql://" not in text and "password" not in text, resource.name


@pytest.mark.parametrize(("database", "key"), [
    ({"replicas": [{"region": "fra1"}]}, "database.replicas[0].region"),
    ({"name": "db"}, "database.name"),
])
def test_combinations_digitalocean_refuses_are_named(database, key):
    with pytest.raises(ValueError, match=re.escape(f"webstack:{key}:")):
        build(make_settings(database=database))


def restore_settings(stack: str = "prod", restores: int = 1, **restore_from: Any) -> Settings:
    base = settings_for(stack)
    database = {"size": base.database.size, "nodeCount": base.database.node_count,
                "replicas": [{}] * len(base.database.replicas), "restores": restores}
    if restore_from:
        database["restoreFrom"] = restore_from
    return settings_for(stack, database=database)


def an_hour_ago() -> str:
    at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_restore_creates_a_new_cluster_from_the_backup_and_adopts_the_database_and_user():
    at = an_hour_ago()
    run, db = build(restore_settings(cluster="prod-db-cluster-a1b2c3d", at=at))
    cluster = run.one("databaseCluster:DatabaseCluster")
    assert cluster.name == "db-r1-cluster"  # new: the provider restores only when it creates
    assert cluster.inputs["backupRestore"] == {
        "databaseName": "prod-db-cluster-a1b2c3d", "backupCreatedAt": at}
    assert cluster.ignore_changes == ("backupRestore",)
    assert cluster.protect
    assert run.of_type("databaseDb:DatabaseDb") == []
    assert run.of_type("databaseUser:DatabaseUser") == []  # app user and migrator adopted
    pool = run.one("databaseConnectionPool:DatabaseConnectionPool")
    assert (pool.inputs["dbName"], pool.inputs["user"]) == ("app", "app")
    assert len(run.of_type("databaseFirewall:DatabaseFirewall")) == 2  # cluster + replica
    assert len(run.of_type("databaseReplica:DatabaseReplica")) == 1
    uri, secret = resolve(db.migration_uri)
    assert secret and uri.startswith(
        f"postgresql://{MIGRATOR}:mock-restored-{MIGRATOR}-password@private-")
    for resource in run.resources:
        plain = {k: v for k, v in resource.inputs.items() if k not in resource.secret_inputs}
        assert not any("password" in text for text in plain_strings(plain)), resource.name


def test_the_latest_backup_when_no_time_is_given():
    run, _ = build(restore_settings(cluster="prod-db-cluster-a1b2c3d"))
    assert run.one("databaseCluster:DatabaseCluster").inputs["backupRestore"] == {
        "databaseName": "prod-db-cluster-a1b2c3d"}


def test_removing_restore_from_changes_no_input_that_replaces_the_cluster():
    """Acceptance 2: `name`, `engine`, `private_network_uuid` and `project_id` are the
    cluster's ForceNew inputs (provider@401992a1 resource_database_cluster.go l.40-53,
    145-158); the run after the switch registers the same cluster with the same ones."""
    during, _ = build(restore_settings(cluster="prod-db-cluster-a1b2c3d", at=an_hour_ago()))
    after, _ = build(restore_settings())
    before, after_cluster = (r.one("databaseCluster:DatabaseCluster") for r in (during, after))
    assert after_cluster.name == before.name
    for key in ("name", "engine", "privateNetworkUuid", "projectId"):
        assert after_cluster.inputs.get(key) == before.inputs.get(key), key
    assert after_cluster.ignore_changes == ("backupRestore",)  # so no diff at all
    assert "backupRestore" not in after_cluster.inputs
    assert after.of_type("databaseDb:DatabaseDb") == []  # still adopted
    assert after.of_type("databaseUser:DatabaseUser") == []


def test_a_never_restored_cluster_keeps_its_name_and_creates_database_and_user():
    run, _ = build(settings_for("prod"))
    assert run.one("databaseCluster:DatabaseCluster").name == "db-cluster"
    assert run.one("databaseCluster:DatabaseCluster").ignore_changes == ()
    assert len(run.of_type("databaseDb:DatabaseDb")) == 1
    assert len(run.of_type("databaseUser:DatabaseUser")) == 2  # the app's and the migrator


def test_an_unknown_source_cluster_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=re.escape("webstack:database.restoreFrom.cluster:")):
        build(restore_settings(cluster="someone-elses-cluster"))
