"""Alembic migrations of the app's schema; run them with ``python -m app.migrate``."""
