"""The offline plan as a newcomer runs it: `python -m tools.plan STACK [--json] [--diff] ...`."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.mocks import ROOT


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def prod_text() -> str:
    result = plan("prod")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_prints_tree_outputs_and_cost(prod_text):
    assert "+ webstack:DatabaseCluster  prod-db" in prod_text
    assert "  + digitalocean:DatabaseCluster  prod-db-cluster  [protected]" in prod_text
    assert "health: http:80/healthz every 5s timeout 3s unhealthy 2 healthy 3" in prod_text
    assert 'db_pool_uri: "[secret]"' in prod_text and 'db_replica_uris: "[secret]"' in prod_text
    assert prod_text.rstrip().splitlines()[-3].split()[-1] == "122.00"  # the total


def test_no_secret_is_printed(prod_text):
    as_json = plan("prod", "--json").stdout
    for text in (prod_text, as_json):
        assert "password" not in text and "postgresql://" not in text
        assert "PRIVATE KEY" not in text and "hooks.slack.com" not in text


def test_json_carries_the_same_numbers(prod_text):
    data = json.loads(plan("prod", "--json").stdout)
    assert data["outputs"]["monthly_cost_usd"] == data["cost"]["monthly_cost_usd"] == "122.00"
    assert data["outputs"]["db_pool_uri"] == "[secret]"
    assert {r["name"] for r in data["resources"]} >= {"prod-db-cluster", "prod-web-lb"}
    lines = {line["resource"]: line["monthly_usd"] for line in data["cost"]["cost_breakdown"]}
    assert lines["prod-db-cluster"] == "60.00" and lines["prod-db-replica-0"] == "30.00"


def test_diff_prints_per_line_differences():
    result = plan("prod", "--diff", "staging")
    assert result.returncode == 0, result.stderr
    diff = result.stdout.split("Cost difference staging -> prod:", 1)[1]
    assert "db-replica-0" in diff and "+30.00" in diff
    assert diff.strip().splitlines()[-2].split()[-3:] == ["40.00", "122.00", "+82.00"]


def test_over_an_enforced_budget_the_plan_fails_naming_budget_and_total(tmp_path: Path):
    data = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    data["config"]["webstack:budget"] = {"monthlyUsd": 100, "enforce": True}
    path = tmp_path / "Pulumi.prodtight.yaml"
    path.write_text(yaml.safe_dump(data))
    result = plan(str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "webstack:budget.monthlyUsd" in lines[0] and "$100.00" in lines[0]
    assert "$122.00" in lines[0]


def test_unknown_size_slug_fails_naming_the_slug(tmp_path: Path):
    data = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())
    data["config"]["webstack:app"]["dropletSize"] = "s-3vcpu-7gb"
    path = tmp_path / "Pulumi.badslug.yaml"
    path.write_text(yaml.safe_dump(data))
    result = plan(str(path))
    assert result.returncode == 2 and "s-3vcpu-7gb" in result.stderr
    assert "webstack:app.dropletSize" in result.stderr


def test_diagram_is_written(tmp_path: Path):
    png = tmp_path / "prod.png"
    result = plan("prod", "--diagram", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_stack_names_the_known_ones():
    result = plan("qa")
    assert result.returncode == 2
    assert "unknown stack 'qa'" in result.stderr and "prod, staging" in result.stderr


def restore_stack(tmp_path: Path, source: str, at: str) -> Path:
    data = yaml.safe_load((ROOT / "Pulumi.prod.yaml").read_text())
    data["config"]["webstack:database"].update(
        {"restores": 1, "restoreFrom": {"cluster": source, "at": at}})
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_restore_is_shown_plainly_and_priced(tmp_path: Path):
    at = (datetime.datetime.now(datetime.UTC)
          - datetime.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = plan(str(restore_stack(tmp_path, "prod-db-cluster-a1b2c3d", at)))
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("Database restore (database.restoreFrom):\n", 1)[1]
    lines = section.split("\n\n", 1)[0].splitlines()
    assert lines[0].strip() == f"source: cluster 'prod-db-cluster-a1b2c3d' (left as it is),"\
        f" restored to {at}"
    assert lines[1].strip().startswith("new: prod-db-r1-cluster (a new cluster), ")
    assert "digitalocean:DatabaseConnectionPool prod-db-r1-pool" in lines[1]
    assert "adopted from the backup, not created: database 'app', user 'app'" in lines[2]
    assert "digitalocean:DatabaseUser" not in result.stdout
    assert result.stdout.rstrip().splitlines()[-3].split()[-1] == "122.00"  # the same stack


def test_a_restore_from_an_unknown_cluster_fails_naming_the_key(tmp_path: Path):
    at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = plan(str(restore_stack(tmp_path, "no-such-cluster", at)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "webstack:database.restoreFrom.cluster: 'no-such-cluster'" in result.stderr
