"""Deploy steps over SSH: the connection and shell snippets shared by the components.

`pulumi_command.remote.Command` runs a script on a droplet from the machine running
`pulumi up`, which must be inside `adminCidrs` or be the host `WEBSTACK_EXTRA_ADMIN_CIDR` names
(the firewalls admit SSH from there only; `Settings.ssh_sources`).
"""

from __future__ import annotations

import pulumi
import pulumi_command as command

DIAL_ERROR_LIMIT = 30
"""SSH dial attempts before a Command fails: a droplet just created is still booting."""

CLOUD_INIT_TIMEOUT_SECONDS = 900
"""How long a deploy step waits for a droplet's first boot (apt, nginx, venv, pip install)."""


def connection(host: pulumi.Input[str],
               private_key: pulumi.Input[str]) -> command.remote.ConnectionArgs:
    """root@host with `private_key`, wrapped as a secret so it never shows in state or logs."""
    return command.remote.ConnectionArgs(
        host=host, user="root", private_key=pulumi.Output.secret(private_key),
        dial_error_limit=DIAL_ERROR_LIMIT)


def wait_for_cloud_init(timeout_seconds: int = CLOUD_INIT_TIMEOUT_SECONDS, *,
                        strict: bool = True) -> str:
    """Shell lines that wait until cloud-init has finished on the droplet.

    strict: exit 1 when cloud-init reports an error (`cloud-init status` exit code 1) or is
    still running after `timeout_seconds` (124, from `timeout`). Exit code 2 ("done" with
    recoverable errors, such as deprecated keys, cloud-init 23.4+) passes: the step's own
    checks decide. Not strict: wait at most `timeout_seconds`, then go on whatever the result.
    """
    wait = f"timeout {timeout_seconds} cloud-init status --wait >/dev/null"
    if not strict:
        return f"{wait} || true\n"
    return f"""ci=0; {wait} || ci=$?
case $ci in
  0|2) ;;
  124) echo "cloud-init still running after {timeout_seconds}s" >&2; exit 1 ;;
  *) echo "cloud-init failed (exit $ci):" >&2; cloud-init status --long >&2; exit 1 ;;
esac
"""
