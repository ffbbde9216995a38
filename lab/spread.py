"""How a gunicorn's load falls on its workers: wrk runs against a URL, each worker's CPU.

    python -m lab.spread .lab/lab/droplet-1/gunicorn.pid http://127.0.0.11:8000/api/notes

For each of `--runs` wrk runs (`--connections` kept-alive connections, `--duration` s) it
prints the rate and the CPU time each worker of the gunicorn spent in it (utime + stime from
/proc, in clock ticks), busiest first. A gthread worker keeps every connection it accepted,
so wrk's connections can fall unevenly on the workers, and one Python process uses one core
at most (docs/benchmarks.md). Loopback only, like every lab server.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lab.bench import CONNECTIONS, DURATION, run_wrk
from lab.process import cpu_ticks, descendants, read_pid


def worker_ticks(master: int) -> dict[int, int]:
    """CPU clock ticks (user + system) of each live worker of gunicorn `master`."""
    ticks = {pid: cpu_ticks(pid) for pid in descendants(master) if pid != master}
    return {pid: t for pid, t in ticks.items() if t is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.spread", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pidfile", type=Path, help="the gunicorn master's pid file")
    parser.add_argument("url", help="a URL that gunicorn serves (loopback)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--duration", type=int, default=DURATION, help="seconds per run")
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    args = parser.parse_args(argv)
    master = read_pid(args.pidfile)
    if master is None or not worker_ticks(master):
        parser.error(f"{args.pidfile}: no running gunicorn with workers")
    per_second = os.sysconf("SC_CLK_TCK")
    print(f"{'rps':>8}  CPU ticks per worker, busiest first ({per_second} a second)")
    for _ in range(args.runs):
        before = worker_ticks(master)
        run = run_wrk(args.url, args.duration, args.connections)
        after = worker_ticks(master)
        spent = sorted((after[pid] - before.get(pid, 0) for pid in after), reverse=True)
        print(f"{run.rps:>8.0f}  {' '.join(f'{t:>4}' for t in spent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
