"""The GitHub Actions workflows: valid for GitHub, clean under zizmor, and shaped as promised.

Schema and security come from the real offline tools (check-jsonschema with GitHub's workflow
schema, zizmor's audits); the shape tests pin what a reviewer relies on: previews of both
stacks on pull requests, staging then prod (behind the `production` environment) on main,
and the policy pack on every preview and up.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))
PULUMI_ACTION = "pulumi/actions@"
PINNED = re.compile(r"^\s*(?:-\s*)?uses:\s*[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*\b")


def tool(name: str) -> str:
    """A tool from the project's venv (next to this Python), else from PATH."""
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -r requirements.txt"
    return found


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job.get("steps", []) if s.get("uses", "").startswith(action)]


def pulumi_step(job: dict[str, Any]) -> dict[str, Any]:
    """The job's first pulumi/actions step (prod's deploy has a second: SSH closed again)."""
    return steps_using(job, PULUMI_ACTION)[0]


TOKENS = {
    "PULUMI_ACCESS_TOKEN": "${{ secrets.PULUMI_ACCESS_TOKEN }}",
    "DIGITALOCEAN_TOKEN": "${{ secrets.DIGITALOCEAN_TOKEN }}",
}
RUNNER_CIDR = {"WEBSTACK_EXTRA_ADMIN_CIDR": "${{ steps.runner.outputs.cidr }}"}


def test_there_are_workflows():
    assert {f.name for f in FILES} >= {"checks.yml", "pull-request.yml", "deploy.yml"}


def test_workflows_match_githubs_schema():
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, FILES)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing_above_low():
    result = subprocess.run(
        [tool("zizmor"), "--offline", "--format", "json", str(WORKFLOWS)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.stdout.strip(), result.stderr
    findings = json.loads(result.stdout)
    serious = [
        f"{f['ident']} ({f['determinations']['severity']}): {f['desc']}"
        for f in findings
        if f["determinations"]["severity"] not in ("Unknown", "Informational", "Low")
    ]
    assert not serious, serious


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_least_privilege_and_hygiene(path: Path):
    wf = load(path.name)
    assert wf.get("permissions") == {}, "grant permissions per job only"
    for name, job in wf["jobs"].items():
        granted = job.get("permissions", {})
        writes = {k for k, v in granted.items() if v == "write"}
        assert writes <= {"pull-requests"}, f"{name} writes {writes}"
        assert not writes or name == "preview", f"only the preview comments: {name}"
        for step in job.get("steps", []):
            assert "${{" not in step.get("run", ""), f"{name}: expression inside a run script"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name
            if step.get("uses", "").startswith("actions/setup-python@"):
                assert step["with"]["python-version"] == "3.11", "quoted, the project's Python"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_remote_action_is_pinned_to_a_commit_with_its_version(path: Path):
    for line in path.read_text().splitlines():
        if re.match(r"^\s*(-\s*)?uses:\s*[^.\s]", line):
            assert PINNED.match(line), f"not pinned to a full SHA with a version comment: {line}"


def pulumi_jobs() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}:{name}", job)
        for path in FILES
        for name, job in load(path.name)["jobs"].items()
        if steps_using(job, PULUMI_ACTION)
    ]


@pytest.mark.parametrize("label,job", pulumi_jobs(), ids=[label for label, _ in pulumi_jobs()])
def test_pulumi_runs_install_first_apply_the_policy_pack_and_take_secrets_from_env(label, job):
    steps = job["steps"]
    pulumi = pulumi_step(job)
    install = [i for i, s in enumerate(steps) if "make venv" in s.get("run", "")]
    assert install and install[0] < steps.index(pulumi), "dependencies before pulumi/actions"
    assert "policy/requirements.txt" in steps[install[0]]["run"]
    for step in steps_using(job, PULUMI_ACTION):
        assert step["with"]["policyPacks"] == "policy"
        # The tokens, and on a deploy's first `up` the runner's address: nothing else.
        assert step["env"] in (TOKENS, {**TOKENS, **RUNNER_CIDR}), step["env"]


def test_pull_requests_lint_test_and_preview_both_stacks_with_a_comment():
    wf = load("pull-request.yml")
    assert "pull_request" in wf["on"] and "pull_request_target" not in wf["on"]
    assert wf["jobs"]["checks"]["uses"] == "./.github/workflows/checks.yml"
    checks = load("checks.yml")["jobs"]
    assert any("make lint" in s.get("run", "") for s in checks["lint"]["steps"])
    assert any("make test" in s.get("run", "") for s in checks["test"]["steps"])

    preview = wf["jobs"]["preview"]
    assert preview["strategy"]["matrix"]["stack"] == ["staging", "prod"]
    assert preview["permissions"] == {"contents": "read", "pull-requests": "write"}
    step = pulumi_step(preview)
    assert step["with"]["command"] == "preview"
    assert step["with"]["stack-name"] == "${{ matrix.stack }}"
    assert step["with"]["comment-on-pr"] is True


def test_main_deploys_staging_then_prod_behind_the_production_environment():
    wf = load("deploy.yml")
    assert wf["on"] == {"push": {"branches": ["main"]}}
    staging, prod = wf["jobs"]["staging"], wf["jobs"]["prod"]
    assert staging["needs"] == "checks"
    assert prod["needs"] == "staging"
    assert prod["environment"] == "production"
    for job, stack in ((staging, "staging"), (prod, "prod")):
        step = pulumi_step(job)
        assert (step["with"]["command"], step["with"]["stack-name"]) == ("up", stack)
        assert job["concurrency"] == {"group": f"deploy-{stack}", "cancel-in-progress": False}


def test_prod_admits_its_runner_to_ssh_for_one_up_and_closes_it_whatever_happened():
    """The runner's address (one /32, checked again by the program) goes to the first `up`
    only; a second `up` without it runs even when the first failed, once the address is known.
    Staging has no deploy key and never opens SSH to its runner."""
    prod = load("deploy.yml")["jobs"]["prod"]
    steps = prod["steps"]
    runner = next(s for s in steps if s.get("id") == "runner")
    assert "checkip.amazonaws.com" in runner["run"] and "/32" in runner["run"]
    first, second = steps_using(prod, PULUMI_ACTION)
    assert steps.index(runner) < steps.index(first) < steps.index(second)
    assert first["env"] == {**TOKENS, **RUNNER_CIDR}
    assert second["env"] == TOKENS, "the second `up` removes the runner from the SSH rule"
    assert (first["with"]["command"], second["with"]["command"]) == ("up", "up")
    assert first["with"]["stack-name"] == second["with"]["stack-name"] == "prod"
    assert second["if"] == "${{ always() && steps.runner.outputs.cidr != '' }}"
    staging = load("deploy.yml")["jobs"]["staging"]
    assert all("WEBSTACK_EXTRA_ADMIN_CIDR" not in s.get("env", {}) for s in staging["steps"])
