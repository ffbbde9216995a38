"""The metadata firewall of every droplet (app and nginx load balancer).

DigitalOcean's metadata service (`METADATA_IP`) answers any process on the droplet, without
authentication, with the droplet's user data. `render_metadata_ruleset` is an nftables ruleset
that refuses it to every user but root and `EXEMPT_USERS`; `metadata_bootcmd` is the cloud-init
`bootcmd` entry that installs and loads it.

Why bootcmd: it is the earliest step user data controls. cloud-init runs it in its network
stage on every boot, first boot included, before `write_files` and the packages, and that stage
is ordered before network-online.target, which every service of ours (and nginx) waits for. A
unit of our own ordered Before=network-pre.target would do for later boots only: on the first
boot its file is written by cloud-init long after systemd passed network-pre.target.

The load fails closed: if `nft` is missing (the image lacks the nftables package), bootcmd
installs it first; if the ruleset cannot be loaded, cloud-init reports an error, which fails the
droplet's health gate and stops the rollout.
"""

from __future__ import annotations

from components.render import render_template

METADATA_IP = "169.254.169.254"
RULESET_PATH = "/etc/webstack/metadata.nft"
AGENT_USER = "do-agent"
"""DigitalOcean's monitoring agent (`monitoring=True`) runs as this user and fetches its
auth token from the metadata service (do-agent@bc91446b: packaging/etc/systemd/system/
do-agent.service `User=do-agent`; pkg/clients/tsclient/client.go reads
`/metadata/v1/auth-token`): refused, the droplet's metrics and the alerts built on them stop."""
EXEMPT_USERS = ("root", AGENT_USER)
"""Who may reach the metadata service. nft resolves the names when the ruleset is loaded."""


def render_metadata_ruleset() -> str:
    """The nftables ruleset: reject what any other user sends to `METADATA_IP`. Loading it
    again replaces it (flush, then define): idempotent on every boot."""
    return render_template("metadata-firewall.nft.j2", address=METADATA_IP,
                           exempt_users=[f'"{user}"' for user in EXEMPT_USERS])


_LOAD = f"""set -eu
command -v nft >/dev/null 2>&1 || {{
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables; }}
# The agent's package creates its user the same way (after_install.sh), later in this boot.
id -u {AGENT_USER} >/dev/null 2>&1 ||
  useradd --system --no-create-home --shell /bin/false {AGENT_USER}
mkdir -p {RULESET_PATH.rsplit("/", 1)[0]}
printf '%s' "$1" > {RULESET_PATH}
nft -f {RULESET_PATH}
"""


def metadata_bootcmd() -> list[str]:
    """The `bootcmd` entry that writes `RULESET_PATH` and loads it: the ruleset is the script's
    argument, so no quoting of its text is involved."""
    return ["sh", "-c", _LOAD, "webstack-metadata-firewall", render_metadata_ruleset()]
