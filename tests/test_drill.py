"""The restore drill (lab/drill.py): the database restored to a point in time into a new
cluster, the staging app switched to it droplet by droplet, every write read back through it."""

import shutil
import tempfile
from pathlib import Path

from lab.drill import run_drill
from lab.stack import stack_file


def test_the_app_serves_the_restored_cluster_every_write_before_the_point_and_none_after():
    state_dir = Path(tempfile.mkdtemp(prefix="webstack-drill-"))
    try:
        report = run_drill(stack_file("staging"), state_dir, seconds=1.0)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    writes, read = report["writes"], report["read_through_app"]
    old, restored = report["clusters"]["old"], report["clusters"]["restored"]
    failed = [name for name, ok in report["criteria"].items() if not ok]

    # Acknowledged before the point: all back, read through the app with the same text.
    assert writes["before_point"] > 0
    assert read["before_point"]["present"] == writes["before_point"], read["missing_before_point"]
    # Sent after the point and before the switch: none back (their ids may name new notes).
    assert writes["after_point_before_switch"] > 0
    assert read["after_point_before_switch"]["present"] == 0, read["present_after_point"]
    # After the switch the app writes to and reads from the restored cluster, a new one.
    assert read["after_switch"]["present"] == writes["after_switch"] > 0
    assert restored["primary_port"] != old["primary_port"]
    assert restored["timeline"] == old["timeline"] + 1
    assert report["during_switch_on"]["restored"] > 0
    for name, droplet in report["droplets"].items():
        assert droplet["database_port"] == restored["pool_port"], name
        assert droplet["readyz"] == 200, name
        assert droplet["gunicorn_restarted_in_switch"], name
        assert not droplet["gunicorn_restarted_after_switch"], name
    assert writes["http_5xx"] == writes["connection_error"] == writes["timeout"] == 0
    assert report["passed"], failed
