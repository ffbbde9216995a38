"""The README and the docs it links stay true: the first commands, the configuration table
(docs/configuration.md), the outputs and component tables (docs/components.md) match the code."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from components import settings as settings_module
from tools.mocks import ROOT, run_program

README = (ROOT / "README.md").read_text()
COMPONENTS_DOC = (ROOT / "docs" / "components.md").read_text()


def table(text: str, heading: str) -> list[str]:
    """First-column names (in backticks) of the table under a heading of `text`."""
    section = ("\n" + text).split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("#"):
            break
        match = re.match(r"\| `([^`]+)` \|", line)
        if match:
            rows.append(match.group(1))
    return rows


def test_readme_is_a_front_door_linking_every_doc():
    """At most 250 lines; the references it moved out (docs/*.md) are each linked from it."""
    assert len(README.splitlines()) <= 250
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in README, doc.name
    for target in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / target).exists(), target


def test_readme_begins_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make plan", "make test"]
    assert README.index("```sh") < README.index("\n## ")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()


def read_config_keys() -> set[str]:
    """Every key settings.py reads, recorded while loading a config that sets none of them."""
    seen: set[str] = set()
    reader = settings_module._Reader
    original = reader.get

    def get(self, name, *default):
        seen.add(self.key(name))
        return original(self, name, *default)

    reader.get = get
    try:
        settings_module.load_settings(
            {"sshKeys": ["k"], "alerts": {"emails": ["a@example.com"]},
             "database": {"replicas": [{}]}}, stack="staging")
    finally:
        reader.get = original
    keys = {re.sub(r"\[\d+\].*", "", key) for key in seen}  # a list's items: the list
    return {key for key in keys if not any(k.startswith(f"{key}.") for k in keys)}  # leaves


def test_every_key_read_is_declared_and_every_declared_key_is_read():
    assert set(settings_module.KEYS) == read_config_keys()


def test_configuration_table_is_the_declarations():
    """docs/configuration.md's table is `config_table()` (regenerate it with the command there)."""
    assert settings_module.config_table() in CONFIGURATION
    assert table(CONFIGURATION, "# Configuration") == list(settings_module.KEYS)


def test_pulumi_yaml_declares_the_keys_as_settings_do():
    declared = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())["config"]
    assert declared == settings_module.pulumi_config()


def test_outputs_table_matches_the_program(tmp_path: Path):
    nginx = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())
    nginx["config"]["webstack:frontend"] = {"mode": "nginx"}
    (tmp_path / "Pulumi.nginx.yaml").write_text(yaml.safe_dump(nginx))
    prom = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    prom["config"]["webstack:monitoring"] = {"prometheus": True}
    (tmp_path / "Pulumi.prom.yaml").write_text(yaml.safe_dump(prom))
    produced = set()
    for path in (ROOT / "Pulumi.staging.yaml", ROOT / "Pulumi.prod.yaml",
                 tmp_path / "Pulumi.nginx.yaml", tmp_path / "Pulumi.prom.yaml",
                 ROOT / "tests/stacks/Pulumi.prod-autoscale.yaml"):
        produced |= set(run_program(path).outputs)
    assert set(table(COMPONENTS_DOC, "## Stack outputs")) == produced


COMPONENTS = [("components.app_tier", "AppTier"), ("components.frontend", "LoadBalancedFrontend"),
              ("components.database", "DatabaseCluster"),
              ("components.monitoring", "MonitoringAlerts"),
              ("components.prometheus", "PrometheusServer")]


@pytest.mark.parametrize("module,name", COMPONENTS)
def test_component_tables_match_args_and_outputs(module, name):
    mod = importlib.import_module(module)
    inputs = [f.name for f in dataclasses.fields(getattr(mod, f"{name}Args"))]
    outputs = list(getattr(mod, name).__annotations__)
    section = f"### `{name}` (`{module.replace('.', '/')}.py`)"
    assert section in COMPONENTS_DOC
    rows = table(COMPONENTS_DOC, section)
    assert rows == inputs + outputs


def allowed_column(key: str) -> str:
    """The 'allowed' cell of a key's row in docs/configuration.md."""
    row = next(line for line in CONFIGURATION.splitlines() if line.startswith(f"| `{key}` |"))
    return row.split(" | ")[2]


def test_offered_values_are_the_ones_settings_allow():
    """The versions, sizes and regions the README offers are those settings (and so the API
    contract) accept."""
    catalog = settings_module.catalog()
    assert allowed_column("region") == ", ".join(catalog["regions"])
    assert allowed_column("database.version") == ", ".join(settings_module.PG_VERSIONS)
    assert allowed_column("database.size") == ", ".join(catalog["database_sizes"])
    assert allowed_column("app.dropletSize").startswith(", ".join(catalog["droplet_sizes"]))
    assert allowed_column("alerts.window") == ", ".join(settings_module.ALERT_WINDOWS)
    lo, hi = settings_module.NAME_LENGTH
    assert allowed_column("database.name").startswith(f"{lo}-{hi} ")
