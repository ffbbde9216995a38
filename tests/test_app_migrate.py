"""``python -m app.migrate``: idempotent, and safe when several droplets run it at once."""

import os
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from app.migrate import MIGRATION_LOCK_KEY
from tests.pg_fixtures import ROOT, with_database


@pytest.fixture
def fresh_database(pg_cluster, run_sql):
    """An empty database owned by the app's user; dropped afterwards."""
    name = f"migrate_{uuid.uuid4().hex[:8]}"
    run_sql(f"CREATE DATABASE {name} OWNER webstack")
    yield name
    run_sql(f"DROP DATABASE {name} WITH (FORCE)")


def _migrate(**env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "app.migrate"],
        cwd=ROOT,
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


def _schema(run_sql, database):
    return {
        "version": run_sql("SELECT version_num FROM alembic_version", dbname=database),
        "notes": run_sql("SELECT to_regclass('notes') IS NOT NULL", dbname=database),
    }


def _lock_waiters(run_sql, database) -> int:
    return run_sql(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = %s)",
        (database,),
    )[0][0]


def test_concurrent_runs_migrate_once(pg_cluster, run_sql, fresh_database):
    """Four runs meet at the lock (held here until all wait), then one of them migrates."""
    url = with_database(pg_cluster.urls.primary, fresh_database)
    with psycopg.connect(pg_cluster.admin_dsn(dbname=fresh_database), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        runs = [_migrate(DATABASE_MIGRATION_URL=url) for _ in range(4)]
        deadline = time.monotonic() + 30
        while _lock_waiters(run_sql, fresh_database) < 4:
            assert time.monotonic() < deadline, "the runs did not all wait for the lock"
            assert all(run.poll() is None for run in runs), "a run finished without the lock"
            time.sleep(0.1)
    outputs = [_finish(run) for run in runs]
    assert sum("Running upgrade  -> 0001" in output for output in outputs) == 1
    assert _schema(run_sql, fresh_database) == {"version": [("0002",)], "notes": [(True,)]}

    again = _finish(_migrate(DATABASE_MIGRATION_URL=url))
    assert "Running upgrade" not in again
    assert _schema(run_sql, fresh_database) == {"version": [("0002",)], "notes": [(True,)]}


def test_a_run_waits_for_the_lock(pg_cluster, run_sql, fresh_database):
    url = with_database(pg_cluster.urls.primary, fresh_database)
    with psycopg.connect(pg_cluster.admin_dsn(dbname=fresh_database), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        run = _migrate(DATABASE_MIGRATION_URL=url)
        time.sleep(2)
        assert run.poll() is None, "migrated while another run held the lock"
        assert run_sql("SELECT to_regclass('notes')", dbname=fresh_database) == [(None,)]
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        _finish(run)
    assert _schema(run_sql, fresh_database)["notes"] == [(True,)]


def test_database_url_is_used_when_no_migration_url(pg_cluster, run_sql, fresh_database):
    """Without DATABASE_MIGRATION_URL it migrates through DATABASE_URL, here the pgbouncer pool."""
    pool = with_database(pg_cluster.urls.pool, fresh_database)
    runs = [_migrate(DATABASE_URL=pool) for _ in range(2)]
    for run in runs:
        _finish(run)
    assert _schema(run_sql, fresh_database) == {"version": [("0002",)], "notes": [(True,)]}


@pytest.mark.parametrize(
    ("env", "message"),
    [({}, "set DATABASE_MIGRATION_URL or DATABASE_URL"),
     ({"DATABASE_MIGRATION_URL": "mysql://x@h/db"}, "DATABASE_MIGRATION_URL must use")],
)
def test_bad_configuration_exits_with_a_message(env, message):
    run = _migrate(**env)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 2
    assert message in output
