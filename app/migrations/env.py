"""Alembic environment, driven by ``app.migrate`` (online mode only).

The whole upgrade runs in one transaction (PostgreSQL has transactional DDL) that first takes
a transaction-level advisory lock, so concurrent runs from several droplets queue up and the
later ones find the schema at head. A transaction-level lock also holds through PgBouncer in
transaction mode, where a session-level lock could stay behind on a pooled server connection.
A migration that needs ``op.get_context().autocommit_block()`` would end that transaction and
with it the lock: don't write one without another guard.
"""

from alembic import context
from sqlalchemy import text

from app.migrate import MIGRATION_LOCK_KEY
from app.models import metadata

VERSION_TABLE_READ_ONLY = """
DO $$ DECLARE grantee regrole; BEGIN
  FOR grantee IN SELECT DISTINCT a.grantee::regrole
      FROM pg_class c, aclexplode(c.relacl) a
      WHERE c.oid = 'public.alembic_version'::regclass AND a.grantee NOT IN (0, c.relowner)
        AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
  LOOP
    EXECUTE 'REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON public.alembic_version FROM '
            || grantee::text;
  END LOOP;
END $$
"""
"""``alembic_version`` records the migrator's work: other roles, such as the app's user, whom
default privileges give every new table's rows (``components/database.py``), keep at most
SELECT on it. Idempotent."""

if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()
        connection.execute(text(VERSION_TABLE_READ_ONLY))
