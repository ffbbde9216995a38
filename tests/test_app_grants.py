"""The one-time grant, against real PostgreSQL 15 laid out as DigitalOcean lays it out: the
app's database owned by the admin (not a superuser: doadmin may create roles and databases),
the app user and the migrator plain login roles with no rights of their own (README, "Database
privileges"). After the grant the migrator migrates and owns the tables; the app user reads and
writes rows and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.migrate import upgrade
from components.database import APPLY_GRANT_STEPS, migrator_grants_sql, owner_grants_sql
from components.settings import MIGRATOR

NAME = "doapp"
ADMIN = "doadmin_lab"
NOTE = {"text": "least privilege"}


def _url(cluster, user: str) -> str:
    return make_url(cluster.urls.primary).set(
        username=user, password=f"{user}-pw", database=NAME).render_as_string(hide_password=False)


@pytest.fixture
def do_layout(pg_cluster):
    """The roles and the database as DigitalOcean's API creates them; dropped afterwards.
    Yields the URLs of the admin, the migrator and the app user in the app database."""
    admin = pg_cluster.admin_dsn()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {ADMIN} LOGIN CREATEDB CREATEROLE PASSWORD '{ADMIN}-pw'")
        for user in (NAME, MIGRATOR):
            conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{user}-pw'")
        conn.execute(f"CREATE DATABASE {NAME} OWNER {ADMIN}")
    try:
        yield _url(pg_cluster, ADMIN), _url(pg_cluster, MIGRATOR), _url(pg_cluster, NAME)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
            for user in (NAME, MIGRATOR, ADMIN):
                conn.execute(f"DROP ROLE IF EXISTS {user}")


def _grant(admin_url: str, migrator_url: str) -> None:
    """The grant step's steps, applied by the Python the step runs on a droplet."""
    steps = [[admin_url, owner_grants_sql(NAME)], [migrator_url, migrator_grants_sql(NAME)]]
    subprocess.run([sys.executable, "-c", APPLY_GRANT_STEPS], input=json.dumps(steps),
                   text=True, check=True, timeout=60)


def test_migrator_owns_the_schema_and_the_app_user_only_reads_and_writes(do_layout, make_app):
    admin_url, migrator_url, app_url = do_layout
    with pytest.raises(Exception, match="permission denied for schema public"):
        upgrade(migrator_url, key="DATABASE_MIGRATION_URL")
    for _ in range(2):  # idempotent, as `pulumi up` may run it again
        _grant(admin_url, migrator_url)
    upgrade(migrator_url, key="DATABASE_MIGRATION_URL")
    upgrade(migrator_url, key="DATABASE_MIGRATION_URL")  # a no-op the second time

    with psycopg.connect(app_url, autocommit=True) as conn:
        owners = conn.execute("SELECT DISTINCT tableowner FROM pg_tables "
                              "WHERE schemaname = 'public'").fetchall()
        assert owners == [(MIGRATOR,)]
        for ddl in ["CREATE TABLE intruder (id int)", "CREATE TEMP TABLE intruder (id int)",
                    "DROP TABLE notes", "ALTER TABLE notes ADD COLUMN x int",
                    "TRUNCATE notes", "CREATE INDEX intruder ON notes (text)",
                    "UPDATE alembic_version SET version_num = 'x'",
                    "DELETE FROM alembic_version"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(ddl)

    # A table a later migration adds is the app's to use at once: default privileges.
    with psycopg.connect(migrator_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE later (id bigint GENERATED ALWAYS AS IDENTITY, v text)")
    with psycopg.connect(app_url, autocommit=True) as conn:
        conn.execute("INSERT INTO later (v) VALUES ('x')")
        assert conn.execute("SELECT v FROM later").fetchall() == [("x",)]

    # And the app works as that user: write, read back (primary), list.
    client = make_app(DATABASE_URL=app_url, DATABASE_REPLICA_URLS="").test_client()
    created = client.post("/api/notes", json=NOTE, headers={"Idempotency-Key": "k1"})
    assert created.status_code == 201, created.get_json()
    note_id = created.get_json()["id"]
    assert client.get(f"/api/notes/{note_id}").get_json()["text"] == NOTE["text"]
    assert client.get("/api/notes").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_a_stack_from_before_the_migrator_moves_its_tables_to_it(do_layout, make_app):
    """Deployed before: the app user held CREATE and owned the tables. The grant moves them to
    the migrator (doadmin a CREATEROLE admin, as on DigitalOcean), after which the app user
    keeps its rows and loses DDL, and the migrator can migrate."""
    admin_url, migrator_url, app_url = do_layout
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'GRANT USAGE, CREATE ON SCHEMA public TO "{NAME}"')  # the old grant
    upgrade(app_url, key="DATABASE_URL")
    with psycopg.connect(app_url, autocommit=True) as conn:
        conn.execute("INSERT INTO notes (text) VALUES ('from before')")

    _grant(admin_url, migrator_url)
    with psycopg.connect(app_url, autocommit=True) as conn:
        owners = conn.execute("SELECT DISTINCT tableowner FROM pg_tables "
                              "WHERE schemaname = 'public'").fetchall()
        assert owners == [(MIGRATOR,)]
        assert conn.execute("SELECT text FROM notes").fetchall() == [("from before",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE intruder (id int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE notes")
    with psycopg.connect(migrator_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE notes ADD COLUMN later text")  # a migration's DDL
    with psycopg.connect(admin_url, autocommit=True) as conn:  # doadmin let go of both roles
        assert conn.execute(
            "SELECT count(*) FROM pg_auth_members WHERE member = current_user::regrole"
        ).fetchone() == (0,)
    client = make_app(DATABASE_URL=app_url, DATABASE_REPLICA_URLS="").test_client()
    assert client.post("/api/notes", json=NOTE).status_code == 201
