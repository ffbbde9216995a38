"""Test-wide fixtures: the real PostgreSQL primary, replica and pgbouncer (tests/pg_fixtures.py)."""

pytest_plugins = ["tests.pg_fixtures"]
