"""The one-time grant, against real PostgreSQL 15 laid out as DigitalOcean lays it out: the
app's database owned by the admin, the app user with no rights of its own (README, "Database
privileges"). Without the grant the app user cannot migrate; with it, it can, twice."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.migrate import upgrade
from components.database import app_grants_sql

NAME = "doapp"


@pytest.fixture
def do_layout(pg_cluster):
    """A database and a login role as DigitalOcean's API creates them; dropped afterwards."""
    admin = pg_cluster.admin_dsn()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {NAME} LOGIN PASSWORD 'grant-test'")
        conn.execute(f"CREATE DATABASE {NAME}")  # owned by the admin, like doadmin's
    url = make_url(pg_cluster.urls.primary).set(
        username=NAME, password="grant-test", database=NAME).render_as_string(hide_password=False)
    try:
        yield url, pg_cluster.admin_dsn(dbname=NAME)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
            conn.execute(f"DROP ROLE IF EXISTS {NAME}")


def test_app_user_migrates_only_after_the_grant(do_layout):
    url, admin_in_app_db = do_layout
    with pytest.raises(Exception, match="permission denied for schema public"):
        upgrade(url, key="DATABASE_URL")
    with psycopg.connect(admin_in_app_db, autocommit=True) as conn:
        for _ in range(2):  # idempotent, as `pulumi up` may run it again
            conn.execute(app_grants_sql(NAME))
    upgrade(url, key="DATABASE_URL")
    upgrade(url, key="DATABASE_URL")  # and the migration is a no-op the second time
    with psycopg.connect(url) as conn:
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'")
        assert owner.fetchone() == (NAME,)
