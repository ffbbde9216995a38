"""The restore drill (lab/drill.py): point-in-time recovery of the lab's primary."""

import shutil
import tempfile
from pathlib import Path

from lab.drill import run_drill


def test_every_write_before_the_point_is_back_and_none_after():
    base_dir = Path(tempfile.mkdtemp(prefix="webstack-drill-"))
    try:
        report = run_drill(base_dir, writes=60)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    assert report["acknowledged_before"] == report["acknowledged_after"] == 60
    assert report["present_of_before"] == 60, report["missing_before"]
    assert report["present_of_after"] == 0, report["present_after"]
    assert report["passed"]
