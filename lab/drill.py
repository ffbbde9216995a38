"""The restore drill: point-in-time recovery of the lab's primary, checked write by write.

Writes run through the pool (the app's DATABASE_URL path), one at a time, each recorded once
PostgreSQL acknowledged its commit. A point in time is taken between two writes, more writes
follow, then the primary is replaced by its base backup replayed from the WAL archive up to
that point (PostgreSQL's `recovery_target_time`) on the same port, and the pool, unchanged,
serves from it. The report: every write acknowledged before the point is present, none after.

    python -m lab.drill [--writes N]     # prints the report as JSON; exit 1 if it fails
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from lab.pgcluster import PgCluster


def _write(pool_url: str, first: int, count: int) -> list[int]:
    """`count` inserts through the pool, one per transaction; the acknowledged ones."""
    acked = []
    with psycopg.connect(pool_url, autocommit=True, prepare_threshold=None) as conn:
        for n in range(first, first + count):
            conn.execute("INSERT INTO drill (n) VALUES (%s)", (n,))
            acked.append(n)
    return acked


def run_drill(base_dir: Path, writes: int = 200) -> dict:
    cluster = PgCluster(base_dir, replicas=0)
    urls = cluster.start()
    try:
        archive = cluster.enable_archiving()
        PgCluster.wait_ready(urls.pool)
        with psycopg.connect(urls.primary, autocommit=True) as conn:
            conn.execute("CREATE TABLE drill (n integer PRIMARY KEY,"
                         " at timestamptz NOT NULL DEFAULT clock_timestamp())")
        base = cluster.base_backup()
        before = _write(urls.pool, 0, writes)
        time.sleep(0.05)
        with psycopg.connect(urls.primary, autocommit=True) as conn:
            point = conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
        time.sleep(0.05)
        after = _write(urls.pool, writes, writes)
        cluster.archive_current_wal()

        started = time.monotonic()
        cluster.restore_primary(base, archive, point)
        restored_s = time.monotonic() - started
        PgCluster.wait_ready(urls.pool)
        serving_s = time.monotonic() - started
        with psycopg.connect(urls.pool, autocommit=True, prepare_threshold=None) as conn:
            present = {row[0] for row in conn.execute("SELECT n FROM drill")}
    finally:
        cluster.stop_all()
    missing = sorted(set(before) - present)
    resurrected = sorted(set(after) & present)
    return {
        "point_in_time": point,
        "acknowledged_before": len(before), "acknowledged_after": len(after),
        "present_of_before": len(set(before) & present), "present_of_after": len(resurrected),
        "missing_before": missing[:10], "present_after": resurrected[:10],
        "restore_seconds": round(restored_s, 2), "pool_serving_seconds": round(serving_s, 2),
        "passed": not missing and not resurrected,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=200, help="writes before and after")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drill-") as tmp:
        report = run_drill(Path(tmp), args.writes)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
