"""`python -m lab up STACK | down | chaos STACK`: what `make lab`, `lab-down` and `chaos` run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lab.stack import LABS_DIR, Lab, lab_dirs, stack_file, stop_lab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a stack's lab on loopback and return")
    up.add_argument("stack", help="a stack name (Pulumi.<stack>.yaml) or a stack file")
    up.add_argument("--dir", type=Path, default=LABS_DIR / "lab", help="state directory")
    up.add_argument("--net", default="127.0.0", help="first three octets of the addresses")
    down = sub.add_parser("down", help="stop every lab under .lab/ (or the one in --dir)")
    down.add_argument("--dir", type=Path, action="append", help="state directory")
    chaos = sub.add_parser("chaos", help="run the chaos scenarios in a lab of their own")
    chaos.add_argument("stack")
    chaos.add_argument("rest", nargs=argparse.REMAINDER, help="options of lab.chaos")
    args = parser.parse_args(argv)

    if args.command == "up":
        lab = Lab(stack_file(args.stack), state_dir=args.dir, net=args.net)
        lab.start()
        hc = lab.settings.frontend.health_check
        print(f"webstack lab, stack {lab.settings.stack}: {len(lab.droplets)} droplets, "
              f"{len(lab.settings.database.replicas)} replica(s), pool of "
              f"{lab.settings.database.pool.size}, {lab.mode} frontend"
              + (f" (check every {hc.interval_seconds}s)" if lab.mode == "managed" else ""))
        for droplet in lab.droplets:
            print(f"  {droplet.name}: nginx http://{droplet.site}  gunicorn {droplet.bind}")
        print(f"  state and logs: {lab.state_dir}")
        print(lab.url)
        return 0
    if args.command == "down":
        directories = args.dir or lab_dirs()
        for directory in directories:
            stop_lab(directory)
            print(f"stopped the lab in {directory}")
        if not directories:
            print("no lab to stop")
        return 0
    from lab import chaos as chaos_module

    return chaos_module.main([args.stack, *args.rest])


if __name__ == "__main__":
    sys.exit(main())
