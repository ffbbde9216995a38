"""Wait for an autoscale pool's rollout: after `pulumi up` changed its template, until
DigitalOcean has replaced the members and every one is active and healthy.

    python -m tools.pool_rollout "$(pulumi stack output app_pool_id)" --since "$T0"

The API has no rolling-update endpoint: a changed template (`PUT /v2/droplets/autoscale/{id}`,
what `pulumi up` sends, without waiting) is itself the rollout, which DigitalOcean runs new
droplets first, paced by the cooldown (docs/runbook.md, "Autoscale"). What this reads, and
the only thing the API offers to watch it (openapi@7c1300c4 specification/resources/
autoscale_pools/): `GET .../history` (`history`: events with `reason` CONFIGURATION_CHANGE,
SCALE_UP or SCALE_DOWN and `status` in_progress, success or error; models/history.yml) and
`GET .../members` (`droplets`: `status` provisioning, active, deleting or off and
`health_status` healthy or unhealthy; models/member.yml).

Exit status: 0 done; 1 the newest configuration change ended in `error`; 2 not done within
`--timeout` (the change still in progress, or members not active and healthy). Reads the token
from DIGITALOCEAN_TOKEN; prints one line per change of state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

API = "https://api.digitalocean.com"
DONE, WAITING, FAILED = "done", "waiting", "failed"


def rollout_state(history: Sequence[Mapping[str, Any]], members: Sequence[Mapping[str, Any]],
                  since: str = "") -> tuple[str, str]:
    """(DONE | WAITING | FAILED, why) from the pool's history events and members: the newest
    CONFIGURATION_CHANGE created at or after `since` (ISO 8601 UTC, compared as text) must be
    a success, and every member active and healthy."""
    changes = sorted((e for e in history if e.get("reason") == "CONFIGURATION_CHANGE"
                      and e.get("created_at", "") >= since), key=lambda e: e["created_at"])
    if not changes:
        return WAITING, f"no configuration change since {since or 'the pool was made'} yet"
    newest = changes[-1]
    if newest.get("status") == "error":
        return FAILED, f"configuration change of {newest['created_at']} ended in error"
    if newest.get("status") != "success":
        return WAITING, f"configuration change of {newest['created_at']} {newest.get('status')}"
    unready = [f"{m.get('droplet_id')} {m.get('status')}/{m.get('health_status')}"
               for m in members
               if m.get("status") != "active" or m.get("health_status") != "healthy"]
    if unready or not members:
        return WAITING, f"members not ready: {', '.join(unready) or 'none yet'}"
    return DONE, f"{len(members)} members active and healthy"


def fetch(api: str, token: str, pool: str, what: str) -> list[dict[str, Any]]:
    """Every page of `GET /v2/droplets/autoscale/{pool}/{what}` (history or members)."""
    key = {"history": "history", "members": "droplets"}[what]
    items: list[dict[str, Any]] = []
    page = 1
    while True:
        request = urllib.request.Request(
            f"{api}/v2/droplets/autoscale/{pool}/{what}?per_page=200&page={page}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        items += body.get(key) or []
        if not (body.get("links") or {}).get("pages", {}).get("next"):
            return items
        page += 1


def watch(read: Callable[[str], list[dict[str, Any]]], since: str, timeout: float,
          interval: float, say: Callable[[str], None] = print) -> int:
    """Poll `read("history")` and `read("members")` until done (0), failed (1) or timed out (2)."""
    deadline, last = time.monotonic() + timeout, ""
    while True:
        state, why = rollout_state(read("history"), read("members"), since)
        if why != last:
            say(f"pool rollout: {state}: {why}")
            last = why
        if state != WAITING:
            return 0 if state == DONE else 1
        if time.monotonic() >= deadline:
            say(f"pool rollout: not done within {timeout:.0f} s")
            return 2
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.pool_rollout",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("pool", help="the pool's id (stack output app_pool_id)")
    parser.add_argument("--since", default="", help="ISO 8601 UTC time taken before pulumi up")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds (default 3600)")
    parser.add_argument("--interval", type=float, default=30, help="seconds between polls")
    parser.add_argument("--api", default=API, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    token = os.environ.get("DIGITALOCEAN_TOKEN")
    if not token:
        print("error: set DIGITALOCEAN_TOKEN", file=sys.stderr)
        return 2
    return watch(lambda what: fetch(args.api, token, args.pool, what), args.since,
                 args.timeout, args.interval)


if __name__ == "__main__":
    sys.exit(main())
