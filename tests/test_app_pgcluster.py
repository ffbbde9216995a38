"""lab/pgcluster.py's command line: start prints URLs, stop leaves no process behind."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from tests.pg_fixtures import ROOT

CLI = [sys.executable, "-m", "lab.pgcluster"]
"""Run from the repository's root (`cwd=ROOT`)."""


def _pids(base_dir: Path) -> list[int]:
    """Processes whose command line mentions the cluster's directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(base_dir) in (proc / "cmdline").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_cli_start_stop_restart():
    base_dir = Path(tempfile.mkdtemp(prefix="webstack-cli-"))
    try:
        started = subprocess.run([*CLI, "start", base_dir, "--replicas", "0"], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
        urls = json.loads(started.stdout)
        assert urls["replicas"] == []
        with psycopg.connect(urls["pool"], prepare_threshold=None) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("webstack",)
            conn.execute("CREATE TABLE kept (x int)")
        assert _pids(base_dir), "the servers should outlive the CLI"

        subprocess.run([*CLI, "stop", base_dir], cwd=ROOT, check=True)
        assert _pids(base_dir) == []

        again = subprocess.run([*CLI, "start", base_dir, "--replicas", "0"], check=True,
                               capture_output=True, text=True, cwd=ROOT)
        assert json.loads(again.stdout) == urls  # same ports and password
        with psycopg.connect(urls["primary"]) as conn:
            assert conn.execute("SELECT to_regclass('kept') IS NOT NULL").fetchone() == (True,)
    finally:
        subprocess.run([*CLI, "stop", base_dir], cwd=ROOT, check=True)
        assert _pids(base_dir) == []
        shutil.rmtree(base_dir, ignore_errors=True)
