"""The metadata firewall of every droplet (components/metadata_firewall.py): checked by nft's own
check mode, then loaded for real in a network namespace of its own and tried as several users.

nft resolves user names when it reads a ruleset, so both run where `do-agent` exists, as on a
droplet (bootcmd creates it): a copy of /etc/passwd with that user, bind-mounted in a mount
namespace of the test's own. The host's ruleset, users and network are never touched.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from components.metadata_firewall import (
    AGENT_USER,
    METADATA_IP,
    metadata_bootcmd,
    render_metadata_ruleset,
)
from tools.mocks import ROOT, run_program

AGENT_UID = 64990
"""The uid `do-agent` gets in the test's passwd (any uid but root's and the probes' own)."""
APP_UID = 64991
"""Stands for the app's user, nginx's, anyone's: not exempt."""
PORT = 8080



def namespace(tmp: Path, script: str) -> subprocess.CompletedProcess:
    """`script` (sh) in new mount and network namespaces (and a user namespace when not root),
    with `do-agent` in /etc/passwd; `$RULES` is the rendered ruleset's path."""
    passwd = tmp / "passwd"
    passwd.write_text(Path("/etc/passwd").read_text()
                      + f"{AGENT_USER}:x:{AGENT_UID}:{AGENT_UID}::/nonexistent:/bin/false\n")
    rules = tmp / "metadata.nft"
    if not rules.exists():
        rules.write_text(render_metadata_ruleset())
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return subprocess.run(
        ["unshare", *user, "--mount", "--net", "sh", "-c",
         f'set -e; mount --bind "$PASSWD" /etc/passwd; {script}'],
        env={"PATH": os.environ["PATH"], "PASSWD": str(passwd), "RULES": str(rules)},
        capture_output=True, text=True, timeout=60)


def test_the_ruleset_passes_nfts_check_mode(tmp_path):
    checked = namespace(tmp_path, 'nft -c -f "$RULES"')
    assert checked.returncode == 0, checked.stderr
    # The same check refuses a ruleset naming a user the droplet lacks, and a typo.
    for broken in (render_metadata_ruleset().replace(f'"{AGENT_USER}"', '"no-such-user"'),
                   render_metadata_ruleset().replace("meta skuid", "meta skuidd")):
        (tmp_path / "metadata.nft").write_text(broken)
        refused = namespace(tmp_path, 'nft -c -f "$RULES"')
        assert refused.returncode != 0 and "Error" in refused.stderr, broken


@pytest.mark.skipif(os.geteuid() != 0, reason="probes as other uids: needs root (as .ci/run is)")
def test_the_loaded_rule_admits_root_and_the_agent_and_refuses_everyone_else(tmp_path):
    """The metadata address on the namespace's loopback, a listener on it; the ruleset loaded
    twice (every boot loads it again); a TCP connection tried as each uid."""
    python = "/usr/bin/python3"
    probe = (f"import socket; socket.create_connection(('{METADATA_IP}', {PORT}), timeout=3)")
    done = namespace(tmp_path, f"""
ip link set lo up
ip addr add {METADATA_IP}/32 dev lo
nft -f "$RULES"; nft -f "$RULES"
{python} -c "import socket, time; s = socket.socket(); s.bind(('{METADATA_IP}', {PORT}));\
 s.listen(8); time.sleep(30)" &
server=$!
sleep 1
for uid in 0 {AGENT_UID} {APP_UID} 65534; do
  if setpriv --reuid=$uid --regid=$uid --clear-groups {python} -c "{probe}" 2>/dev/null
  then echo "$uid open"; else echo "$uid refused"; fi
done
nft list table inet webstack_metadata | grep -c reject
kill $server
""")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:8] == ["0", "open", str(AGENT_UID), "open", str(APP_UID), "refused",
                         "65534", "refused"], done.stdout
    assert lines[8] == "1", "loaded twice, one rule: the load replaces it"


@pytest.mark.parametrize("stack", ["Pulumi.prod.yaml", "tests/stacks/Pulumi.prod-nginx.yaml",
                                   "Pulumi.staging.yaml"])
def test_every_droplet_loads_the_firewall_first_thing_in_its_boot(stack):
    """bootcmd runs before write_files, the packages and the services (cloud-init's network
    stage); the ruleset is its argument, the file checked above byte for byte."""
    droplets = run_program(ROOT / stack).of_type("index/droplet:Droplet")
    assert any("-lb-" in d.name for d in droplets) is ("nginx" in stack)
    for droplet in droplets:
        document = yaml.safe_load(droplet.inputs["userData"])
        assert list(document)[0] == "bootcmd", droplet.name
        assert document["bootcmd"] == [metadata_bootcmd()], droplet.name
        assert document["bootcmd"][0][-1] == render_metadata_ruleset()
