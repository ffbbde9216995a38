"""The restore drill: the database restored to a point in time into a new cluster, the app
switched to it droplet by droplet, every write checked through the app.

A lab of the stack (`lab/stack.py`, state in `.lab/drill`, addresses 127.0.5.x) with WAL
archiving on its primary and a base backup. Writes run continuously through the frontend
(POST /api/notes: the load balancer, the droplet's nginx, gunicorn, the pool), each one
acknowledged when its 201 arrives. A point in time is taken on the primary, and the writes go
on. Then a new cluster is made as a restore on DigitalOcean makes one (`PgCluster.restore`):
the base backup replayed from the WAL archive up to the point (`recovery_target_time`) on a
primary of its own, with its own replicas and pool; the old cluster keeps running, untouched.
The droplets switch to it one at a time through the lab's rolling change (`Lab.roll`: out of
the load balancer, stopped, their files written again with the new cluster's URLs, started,
healthy, back in), the writes still running. Then, through the app (GET /api/notes/<id>, the
same text): every write acknowledged before the point is there; none sent after it, before
the switch; every write after the switch is there, and directly on the clusters it is on the
new one only. Each droplet's DATABASE_URL leads to the new pool, and its gunicorn was
restarted by its turn in the switch and never after.

    python -m lab.drill [STACK] [--rate N] [--seconds S]   # the report as JSON; exit 1 if it fails
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from lab.load import FAILURES, Load, Request, Sample, counts
from lab.pgcluster import PgCluster
from lab.process import http_status, wait_until
from lab.stack import LABS_DIR, Droplet, Lab, stack_file

NET = "127.0.5"
STATE_DIR = LABS_DIR / "drill"


def _write(n: int) -> Request:
    return Request("POST", "/api/notes", json.dumps({"text": f"drill {n}"}).encode(),
                   tag=f"drill {n}")


def _acknowledged(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if s.status == 201]


def _read_back(url: str, writes: list[Sample]) -> dict[str, list[int]]:
    """Each write read through the app by its id: "present" (same text), "absent" (404),
    "reused" (its id now names another note), "unreadable" (anything else); and the
    servers that answered ("served_by": the app's X-Served-By)."""
    notes = [s.json() for s in writes]
    with Load(url, lambda n: Request("GET", f"/api/notes/{notes[n]['id']}", tag=str(n)),
              workers=4, rate=None, max_requests=len(notes), max_seconds=120) as load:
        load.wait()
    found: dict[str, list] = {"present": [], "absent": [], "reused": [], "unreadable": [],
                              "served_by": sorted({s.served_by or "-" for s in load.samples})}
    for sample in load.samples:
        note = notes[int(sample.tag)]
        if sample.status == 200:
            kind = "present" if sample.json()["text"] == note["text"] else "reused"
        else:
            kind = "absent" if sample.status == 404 else "unreadable"
        found[kind].append(note["id"])
    return found


def _tally(found: dict[str, list]) -> dict[str, object]:
    return {kind: found[kind] if kind == "served_by" else len(found[kind]) for kind in found}


def _texts_on(cluster: PgCluster, database: str, texts: list[str]) -> set[str]:
    with psycopg.connect(cluster.admin_dsn(dbname=database), autocommit=True) as conn:
        return {row[0] for row in conn.execute(
            "SELECT text FROM notes WHERE text = ANY(%s)", (texts,))}


def _database_port(droplet: Droplet) -> int:
    """The port of the DATABASE_URL in the droplet's environment file."""
    for line in (droplet.dir / "app.env").read_text().splitlines():
        if line.startswith("DATABASE_URL="):
            return make_url(shlex.split(line.removeprefix("DATABASE_URL="))[0]).port
    raise RuntimeError(f"{droplet.name}: no DATABASE_URL")


def run_drill(stack_path: Path, state_dir: Path = STATE_DIR, *, rate: float = 40.0,
              seconds: float = 2.0) -> dict:
    """The drill on a lab of `stack_path`: `seconds` of writes at `rate` per second before the
    point, as long after it, then the restore and the switch (writes running), and `seconds`
    more. The report (see the module's docstring); "passed" and the failed "criteria"."""
    lab = Lab(stack_path, state_dir=state_dir, net=NET)
    settings = lab.settings.database
    restored = PgCluster(tempfile.mkdtemp(prefix="webstack-drill-pg-"),
                         replicas=len(settings.replicas), database=settings.name,
                         user=settings.name, pool_size=settings.pool.size)
    try:
        lab.start()
        archive = lab.pg.enable_archiving()  # restarts the primary: wait for the app
        wait_until(lambda: all(http_status(d.site, "/readyz") == 200 for d in lab.droplets),
                   30, "the droplets' primary back")
        base = lab.pg.base_backup()
        pids_before = {d.name: d.gunicorn_pid for d in lab.droplets}
        with Load(lab.url, _write, workers=2, rate=rate, max_requests=100_000,
                  max_seconds=600) as load:
            load.sleep(seconds)
            point_begins = load.mark("point")
            with psycopg.connect(lab.pg.admin_dsn(), autocommit=True) as conn:
                point = conn.execute("SELECT clock_timestamp()::text").fetchone()[0]
            point_ends = load.now()
            load.sleep(seconds)
            lab.pg.archive_current_wal()
            started = time.monotonic()
            restored.restore(base, archive, point, lab.pg.passwords())
            restore_s = time.monotonic() - started
            urls = restored.start()
            cluster_s = time.monotonic() - started
            lab.secrets = dataclasses.replace(
                lab.secrets, database_url=urls.pool, replica_urls=urls.replicas,
                migration_url=urls.primary)
            switch_begins = load.mark("switch")
            steps = {d.name: round(lab.roll(d, rewrite=True), 1) for d in lab.droplets}
            switched = load.mark("switched")
            pids_switched = {d.name: d.gunicorn_pid for d in lab.droplets}
            load.sleep(seconds)
        writes = _acknowledged(load.samples)
        before = [s for s in writes if s.end < point_begins]
        lost = [s for s in writes if s.start > point_ends and s.end < switch_begins]
        during = [s for s in writes if s.start >= switch_begins and s.end <= switched]
        after = [s for s in writes if s.start > switched]
        read = {name: _read_back(lab.url, group)
                for name, group in (("before", before), ("lost", lost), ("after", after))}
        texts = {name: [s.json()["text"] for s in group]
                 for name, group in (("during", during), ("after", after))}
        on_old = _texts_on(lab.pg, settings.name, texts["during"] + texts["after"])
        on_new = _texts_on(restored, settings.name, texts["during"] + texts["after"])
        droplets = {d.name: {"database_port": _database_port(d),
                             "readyz": http_status(d.site, "/readyz"),
                             "gunicorn_restarted_in_switch": pids_switched[d.name]
                             != pids_before[d.name],
                             "gunicorn_restarted_after_switch": d.gunicorn_pid
                             != pids_switched[d.name]}
                    for d in lab.droplets}
        clusters = {"old": {"primary_port": lab.pg.ports["primary"],
                            "pool_port": lab.pg.ports["pool"], "timeline": lab.pg.timeline()},
                    "restored": {"primary_port": restored.ports["primary"],
                                 "pool_port": restored.ports["pool"],
                                 "timeline": restored.timeline(),
                                 "replica_ports": restored.ports["replicas"]}}
    finally:
        lab.stop()
        restored.stop_all()
        if (restored.base_dir / "logs").is_dir():
            shutil.copytree(restored.base_dir / "logs", lab.state_dir / "restored-pg-logs",
                            dirs_exist_ok=True)
        shutil.rmtree(restored.base_dir, ignore_errors=True)

    criteria = {
        "every write acknowledged before the point is present":
            bool(before) and len(read["before"]["present"]) == len(before),
        "no write sent after the point, before the switch, is present":
            bool(lost) and not read["lost"]["present"] and not read["lost"]["unreadable"],
        "every write after the switch is present, on the restored cluster only":
            bool(after) and len(read["after"]["present"]) == len(after)
            and set(texts["after"]) <= on_new and not set(texts["after"]) & on_old,
        "every write during the switch is on exactly one cluster":
            all((text in on_old) != (text in on_new) for text in texts["during"]),
        "every droplet's DATABASE_URL leads to the restored pool, /readyz 200":
            all(d["database_port"] == clusters["restored"]["pool_port"] and d["readyz"] == 200
                for d in droplets.values()),
        "every gunicorn restarted by the switch, and only then":
            all(d["gunicorn_restarted_in_switch"] and not d["gunicorn_restarted_after_switch"]
                for d in droplets.values()),
        "no write failed": not any(counts(load.samples)[kind] for kind in FAILURES),
    }
    return {
        "stack": lab.settings.stack,
        "point_in_time": point,
        "writes": {**counts(load.samples), "acknowledged": len(writes),
                   "before_point": len(before), "after_point_before_switch": len(lost),
                   "during_switch": len(during), "after_switch": len(after),
                   "in_flight_at_a_boundary": len(writes) - len(before) - len(lost)
                   - len(during) - len(after)},
        "read_through_app": {
            "before_point": _tally(read["before"]),
            "after_point_before_switch": _tally(read["lost"]),
            "after_switch": _tally(read["after"]),
            "missing_before_point": sorted(set(n["id"] for n in map(Sample.json, before))
                                           - set(read["before"]["present"]))[:10],
            "present_after_point": read["lost"]["present"][:10],
        },
        "during_switch_on": {"restored": len(set(texts["during"]) & on_new),
                             "old": len(set(texts["during"]) & on_old)},
        "clusters": clusters,
        "droplets": droplets,
        "restore_seconds": round(restore_s, 2),
        "restored_cluster_seconds": round(cluster_s, 2),
        "switch_seconds": round(switched - switch_begins, 1),
        "switch_seconds_per_droplet": steps,
        "criteria": criteria,
        "passed": all(criteria.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("stack", nargs="?", default="staging",
                        help="a stack name (Pulumi.<stack>.yaml) or a stack file")
    parser.add_argument("--rate", type=float, default=40.0, help="writes per second")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds of writes before the point, after it, after the switch")
    parser.add_argument("--dir", type=Path, default=STATE_DIR, help="state directory")
    args = parser.parse_args(argv)
    report = run_drill(stack_file(args.stack), args.dir, rate=args.rate, seconds=args.seconds)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
