"""webstack policy pack: `pulumi preview --policy-pack policy` (and `up`) run it.

The policies live in `pack.py`, the rules they apply in `rules.py`. Constructing `PolicyPack`
starts the analyzer's gRPC server and serves until the engine stops it.
"""

from pack import PACK_NAME, POLICIES
from pulumi_policy import EnforcementLevel, PolicyPack

PolicyPack(name=PACK_NAME, policies=POLICIES, enforcement_level=EnforcementLevel.MANDATORY)
