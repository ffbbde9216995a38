"""The Prometheus droplet's Prometheus and Alertmanager, run against a lab's droplets.

    monitor = Monitor(lab)      # a started `lab.stack.Lab`
    monitor.start()             # exporters, Alertmanager, Prometheus; waits until ready
    monitor.targets()           # {"app 127.0.0.11:8080": "up", ...}
    monitor.alerts()            # Prometheus's alerts: [{"labels": ..., "state": "firing"}]
    stop_monitor(lab.state_dir) # also done by `stop_lab`

On loopback, beside the lab's droplets (`lab/stack.py`):

    <net>.30:9090       Prometheus: the configuration and the rules of
                        `components/prometheus.py`, with the lab's addresses
    <net>.30:9093       Alertmanager: its rendered routes to a receiver that sends nothing (the lab
                        tells nobody; the alerts it receives are read from its API)
    <net>.1i:9113       droplet i's prometheus-nginx-exporter (`nginx_exporter_args` of the
                        droplet's layout), behind its nginx's /nginx-metrics

What differs from the droplet, and only that: addresses, paths (under `state_dir/monitor`),
a 1 s scrape and evaluation interval and a `for` of `HOLD` on every rule, so a chaos run sees
an alert fire and resolve in seconds. The rules' expressions are the droplet's; their
production hold times are proven by `promtool test rules` (tests/test_prometheus.py).
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from pathlib import Path

from components.prometheus import (
    ALERTMANAGER_PORT,
    PROMETHEUS_PORT,
    render_alertmanager_config,
    render_prometheus_config,
    render_rules,
    render_targets,
)
from components.runtime import nginx_exporter_args
from lab.process import lab_pid, raise_if_exited, signal_group, wait_gone, wait_until

MONITOR_HOST = 30
SCRAPE_INTERVAL = "1s"
HOLD = "3s"
"""Every rule's `for` in the lab."""
PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
NGINX_EXPORTER = "/usr/bin/prometheus-nginx-exporter"
START_TIMEOUT = 30.0


class Monitor:
    """Prometheus, Alertmanager and the droplets' nginx exporters of one lab."""

    def __init__(self, lab) -> None:
        self.lab = lab
        self.dir = lab.state_dir / "monitor"
        self.host = f"{lab.net}.{MONITOR_HOST}"
        self.prometheus = f"{self.host}:{PROMETHEUS_PORT}"
        self.alertmanager = f"{self.host}:{ALERTMANAGER_PORT}"
        self._started: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        """Write the configuration, start everything, wait until Prometheus is ready."""
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = self.lab.settings
        files = {
            "prometheus.yml": render_prometheus_config(
                targets_file=str(self.dir / "targets.json"),
                rules_file=str(self.dir / "rules.yml"), self_address=self.prometheus,
                alertmanager=self.alertmanager, scrape_interval=SCRAPE_INTERVAL),
            "rules.yml": render_rules(settings.alerts, hold=HOLD),
            "targets.json": self.render_targets(),
            "alertmanager.yml": render_alertmanager_config(settings, notify=False),
        }
        for name, text in files.items():
            (self.dir / name).write_text(text)
        for droplet in self.lab.droplets:
            self._spawn(f"exporter-{droplet.name}",
                        [NGINX_EXPORTER, *nginx_exporter_args(droplet.layout)])
        self._spawn("alertmanager", [
            ALERTMANAGER, f"--config.file={self.dir / 'alertmanager.yml'}",
            f"--storage.path={self.dir / 'alertmanager-data'}",
            f"--web.listen-address={self.alertmanager}", "--cluster.listen-address="])
        self._spawn("prometheus", [
            PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address={self.prometheus}"])
        wait_until(lambda: self._ready(), START_TIMEOUT, "Prometheus ready")

    def render_targets(self) -> str:
        """The targets file with the droplets' nginx addresses (8080 in the lab)."""
        port = int(self.lab.droplets[0].site.rpartition(":")[2])
        return render_targets([d.address for d in self.lab.droplets], port=port)

    def targets(self) -> dict[str, str]:
        """Every active scrape target ("job instance") and its health (up, down, unknown)."""
        data = self._get(f"http://{self.prometheus}/api/v1/targets")["data"]
        return {f"{t['labels']['job']} {t['labels']['instance']}": t["health"]
                for t in data["activeTargets"]}

    def alerts(self, name: str | None = None) -> list[dict]:
        """Prometheus's pending and firing alerts (of one name)."""
        alerts = self._get(f"http://{self.prometheus}/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if name is None or a["labels"]["alertname"] == name]

    def received(self, name: str) -> list[dict]:
        """The alerts of that name Alertmanager holds (active ones)."""
        alerts = self._get(f"http://{self.alertmanager}/api/v2/alerts")
        return [a for a in alerts if a["labels"]["alertname"] == name]

    def _spawn(self, name: str, command: list[str]) -> None:
        """A detached process group; `sh` keeps the state directory on its command line,
        which `lab_pid` looks for when `stop_monitor` finds it again (an exporter's own
        arguments do not name it)."""
        with (self.dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                ["sh", "-c", '"$@"; exit $?', str(self.dir), *command],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self._started[name] = proc
        (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        self._check_started()

    def _check_started(self) -> None:
        """Raise if a process this monitor started has exited. Asked of the process handle,
        not of `lab_pid`: `Popen` returns once the kernel has begun the new program, which
        sets the program's arguments a moment later, so a command line read right after
        the start can be empty, and `lab_pid` would call the process gone (the CI run of
        f36235f: `prometheus exited:` with an empty log while Prometheus started)."""
        for name, proc in self._started.items():
            raise_if_exited(proc, name, self.dir / f"{name}.log")

    def _ready(self) -> bool:
        self._check_started()
        try:
            with urllib.request.urlopen(f"http://{self.prometheus}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @staticmethod
    def _get(url: str):
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)


def stop_monitor(state_dir: Path) -> None:
    """Stop every process `Monitor` started in the lab of `state_dir`."""
    directory = Path(state_dir).resolve() / "monitor"
    pids = [pid for pidfile in directory.glob("*.pid") if (pid := lab_pid(pidfile, directory))]
    for pid in pids:
        signal_group(pid, signal.SIGTERM)
    if not wait_gone(pids, 10):
        for pid in pids:
            signal_group(pid, signal.SIGKILL)
    for pidfile in directory.glob("*.pid"):
        pidfile.unlink()
