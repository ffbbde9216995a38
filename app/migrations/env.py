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

if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported")

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()
