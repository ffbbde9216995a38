"""pytest plugin: a real PostgreSQL cluster for the app's tests, started once per session.

The cluster (primary, one streaming replica, pgbouncer in transaction mode) comes from
``lab/pgcluster.py``. Apps under test use it as on DigitalOcean: ``DATABASE_URL`` is the
pgbouncer pool, ``DATABASE_REPLICA_URLS`` the replica, migrations go to the primary directly.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy.engine import make_url

from app import create_app
from app.migrate import upgrade
from lab import pgcluster

ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database of the same server."""
    return make_url(url).set(database=database).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pgcluster.PgCluster]:
    """The session's cluster, with the app's schema migrated. Always stopped afterwards."""
    base_dir = tempfile.mkdtemp(prefix="webstack-pg-")
    cluster = pgcluster.PgCluster(base_dir, replicas=1)
    try:
        urls = cluster.start()
        upgrade(urls.primary)
        cluster.wait_for_replay(0)
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def cluster(pg_cluster: pgcluster.PgCluster) -> Iterator[pgcluster.PgCluster]:
    """The session's cluster for a test that stops servers or delays replay: restored after."""
    yield pg_cluster
    pg_cluster.start_primary()
    pg_cluster.start_replica(0)
    pg_cluster.set_apply_delay(0, 0)
    pg_cluster.wait_for_replay(0)
    pg_cluster.wait_ready(pg_cluster.urls.pool)  # pgbouncer past its login retry backoff


@pytest.fixture
def make_app(pg_cluster: pgcluster.PgCluster) -> Iterator[Callable[..., Flask]]:
    """Build apps wired to the cluster; ``overrides`` replace settings. Pools closed after."""
    apps: list[Flask] = []
    urls = pg_cluster.urls

    def make(**overrides: object) -> Flask:
        config = {
            "TESTING": True,
            "DATABASE_URL": urls.pool,
            "DATABASE_REPLICA_URLS": ",".join(urls.replicas),
            "DB_STATEMENT_TIMEOUT_MS": "1000",
            "DB_REPLICA_RETRY_SECONDS": "0.5",
            **overrides,
        }
        app = create_app(config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["webstack"].database.dispose()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def run_sql(pg_cluster: pgcluster.PgCluster) -> Callable[..., list[tuple]]:
    """Run SQL as superuser on ``node`` ("primary", "replica-0"), bypassing the app."""

    def run(sql: str, params: tuple = (), node: str = "primary", dbname: str = "webstack"):
        return pg_cluster.sql(sql, params, node, dbname)

    return run
