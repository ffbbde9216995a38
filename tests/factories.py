"""Valid `Settings` for tests, built through `load_settings` exactly as a stack file would be.

    settings_for("staging")                        # 1 app droplet, 1 DB node, no domain (HTTP)
    settings_for("prod")                           # HA counts, standby, replica, domain, Slack,
                                                   # a deploy key and an admin CIDR
    make_settings(database={"replicas": [{}]})     # staging plus overrides

Overrides are stack config keys (camelCase, without `webstack:`); a dict is merged into the
base's dict of the same key, and None removes the key. `alerts` is marked secret whenever it
holds a `slackUrl`, as `pulumi config set --secret --path alerts.slackUrl` would, and
`sshPrivateKey` whenever it is set.
"""

from __future__ import annotations

from typing import Any

from components.settings import Settings, load_settings

SLACK_URL = "https://hooks.slack.com/services/T0TEST/B0TEST/not-a-real-hook"
DEPLOY_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\ntest\n-----END OPENSSH PRIVATE KEY-----\n"

STAGING: dict[str, Any] = {
    "region": "nyc3",
    "sshKeys": ["deploy"],
    "alerts": {"emails": ["ops@example.com"]},
}

PRODUCTION: dict[str, Any] = {
    "region": "nyc3",
    "domain": "example.com",
    "sshKeys": ["deploy"],
    "sshPrivateKey": DEPLOY_KEY,
    "adminCidrs": ["203.0.113.10/32"],
    "database": {"size": "db-s-2vcpu-4gb", "nodeCount": 2, "replicas": [{}]},
    "alerts": {"emails": ["ops@example.com"], "slackChannel": "#ops", "slackUrl": SLACK_URL},
}


def settings_for(stack: str = "staging", **overrides: Any) -> Settings:
    """Settings of a prod-like stack when `stack` starts with "prod", else staging-like."""
    raw = dict(PRODUCTION if stack.startswith("prod") else STAGING)
    for key, value in overrides.items():
        if value is None:
            raw.pop(key, None)
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    secret = frozenset({"alerts"} if "slackUrl" in raw.get("alerts", {}) else ()) | (
        {"sshPrivateKey"} if "sshPrivateKey" in raw else set())
    return load_settings(raw, stack=stack, secret_keys=secret)


def make_settings(**overrides: Any) -> Settings:
    """Staging-like settings with `overrides` applied (see the module docstring)."""
    return settings_for("staging", **overrides)
