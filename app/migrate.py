"""Bring the database schema to the latest revision: ``python -m app.migrate``.

Run once per deploy (from cloud-init or a deploy step), never per worker. Connects with
``DATABASE_MIGRATION_URL``, a direct connection to the primary, or ``DATABASE_URL`` when
that is unset. Prefer the direct URL: DDL and long-running statements don't belong in a
PgBouncer transaction pool. Idempotent, and safe to run from several droplets at once (see
``app/migrations/env.py``). Exit status 0 on success.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from app.config import ConfigError, sqlalchemy_url

MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT = 10
MIGRATION_LOCK_KEY = 0x77656273746B
"""Advisory lock key ("webstk") that serialises runs; taken in ``migrations/env.py``."""


def upgrade(url: str, key: str = "DATABASE_MIGRATION_URL") -> None:
    """Apply every pending migration to the database at ``url`` (``key`` names it in errors)."""
    engine = create_engine(
        sqlalchemy_url(url, key),
        poolclass=NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT, "prepare_threshold": None},
    )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    try:
        command.upgrade(config, "head")
    finally:
        engine.dispose()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for key in ("DATABASE_MIGRATION_URL", "DATABASE_URL"):
        if os.environ.get(key):
            try:
                upgrade(os.environ[key], key)
            except ConfigError as exc:
                print(f"app.migrate: {exc}", file=sys.stderr)
                return 2
            return 0
    print("app.migrate: set DATABASE_MIGRATION_URL or DATABASE_URL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
