"""webstack: a high-availability, cost-optimized Python web stack on DigitalOcean.

Reads the stack's settings once (refusing bad config before any resource is registered),
builds the stack and exports its outputs. See README.md and components/.
"""

import pulumi

from components.settings import ConfigError, from_pulumi_config
from components.stack import build

try:
    settings = from_pulumi_config()
except ConfigError as error:
    raise pulumi.RunError(str(error)) from None

for name, value in build(settings).items():
    pulumi.export(name, value)
