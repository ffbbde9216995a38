"""MonitoringAlerts under the mocks: every alert has a target, thresholds and who is told."""

from __future__ import annotations

import pulumi
import pytest
from pulumi.runtime.sync_await import _sync_await

from components.frontend import AlertTargets
from components.monitoring import MonitoringAlerts
from components.settings import Settings
from components.stack import alerts_args
from tests.factories import SLACK_URL, make_settings, settings_for
from tools.mocks import Run, run_function

DB_ID, LB_ID = "db-cluster-7", "lb-3"
HTTP_URL, HTTPS_URL = "http://203.0.113.9/healthz", "https://www.example.com/healthz"
LAG_PATH = "/readyz/replication"


def health_check(run: Run):
    [check] = [c for c in run.of_type("UptimeCheck") if c.inputs["target"].endswith("/healthz")]
    return check


def health_alerts(run: Run, check) -> list:
    """The check's alerts (named after it)."""
    return [a for a in run.of_type("UptimeAlert") if a.name.startswith(f"{check.name}-")]


def build(settings: Settings, *, lb_id: str | None = LB_ID) -> tuple[Run, MonitoringAlerts]:
    """Run the component with the alert targets the stack's frontend mode gives (the health
    URL an Output, as the frontend gives it)."""
    built: dict[str, MonitoringAlerts] = {}
    nginx = settings.frontend.mode == "nginx"

    def body() -> None:
        targets = AlertTargets(
            health_url=pulumi.Output.from_input(HTTPS_URL if settings.fqdn else HTTP_URL),
            https=settings.fqdn is not None,
            replication_url=pulumi.Output.from_input(
                (HTTPS_URL if settings.fqdn else HTTP_URL).replace("/healthz", LAG_PATH)),
            load_balancer_ids=[lb_id] if lb_id and not nginx else [],
            droplet_tags=[settings.lb_tag] if nginx else [])
        built["alerts"] = MonitoringAlerts("mon", alerts_args(
            settings, frontend=targets, db_cluster_id=DB_ID))

    return run_function(body, stack=settings.stack), built["alerts"]


def by_type(run: Run) -> dict[str, list]:
    alerts: dict[str, list] = {}
    for alert in run.of_type("MonitorAlert"):
        alerts.setdefault(alert.inputs["type"], []).append(alert)
    return alerts


@pytest.mark.parametrize("mode", ["managed", "nginx"])
def test_every_alert_policy_targets_tags_or_entities(mode):
    lb_id = LB_ID if mode == "managed" else None
    run, _ = build(settings_for("prod", frontend={"mode": mode}), lb_id=lb_id)
    alerts = run.of_type("MonitorAlert")
    assert alerts
    for alert in alerts:
        assert alert.inputs.get("tags") or alert.inputs.get("entities"), alert.name


def test_thresholds_and_window_come_from_settings():
    settings = make_settings(alerts={
        "cpuPercent": 70, "memoryPercent": 60, "diskPercent": 50, "window": "10m",
        "latencyMs": 750})
    run, _ = build(settings)
    values = {t: [a.inputs["value"] for a in group] for t, group in by_type(run).items()}
    assert values["v1/insights/droplet/cpu"] == [70]
    assert values["v1/dbaas/alerts/cpu_alerts"] == [70]
    assert values["v1/insights/droplet/memory_utilization_percent"] == [60]
    assert values["v1/dbaas/alerts/memory_utilization_alerts"] == [60]
    assert values["v1/insights/droplet/disk_utilization_percent"] == [50]
    assert values["v1/dbaas/alerts/disk_utilization_alerts"] == [50]
    assert values["v1/insights/lbaas/high_http_request_response_time_95p"] == [750]
    for alert in run.of_type("MonitorAlert"):
        assert alert.inputs["window"] == "10m" and alert.inputs["compare"] == "GreaterThan"
    latency = next(a for a in run.of_type("UptimeAlert") if a.inputs["type"] == "latency")
    assert (latency.inputs["threshold"], latency.inputs["comparison"]) == (750, "greater_than")


def test_managed_mode_watches_the_load_balancer_by_id_and_app_droplets_by_tag():
    settings = make_settings()
    run, _ = build(settings)
    alerts = by_type(run)
    for kind in ("increase_in_http_error_rate_percentage_5xx",
                 "high_http_request_response_time_95p", "droplet_health"):
        [alert] = alerts[f"v1/insights/lbaas/{kind}"]
        assert alert.inputs["entities"] == [LB_ID] and not alert.inputs.get("tags")
    droplet_alerts = [a for t, g in alerts.items() if t.startswith("v1/insights/droplet/")
                      for a in g]
    assert len(droplet_alerts) == 3
    assert all(a.inputs["tags"] == [settings.app_tag] for a in droplet_alerts)


def test_nginx_mode_has_no_lb_alerts_and_watches_the_nginx_droplets_by_tag():
    settings = make_settings(frontend={"mode": "nginx"})
    run, _ = build(settings, lb_id=None)
    alerts = by_type(run)
    assert not [t for t in alerts if "/lbaas/" in t]
    for metric in ("cpu", "memory_utilization_percent", "disk_utilization_percent"):
        tags = sorted(a.inputs["tags"][0] for a in alerts[f"v1/insights/droplet/{metric}"])
        assert tags == sorted([settings.app_tag, settings.lb_tag])


def test_database_alerts_target_the_cluster():
    run, _ = build(make_settings())
    alerts = by_type(run)
    for metric in ("cpu_alerts", "memory_utilization_alerts", "disk_utilization_alerts"):
        [alert] = alerts[f"v1/dbaas/alerts/{metric}"]
        assert alert.inputs["entities"] == [DB_ID]


def test_notifications_go_to_emails_and_slack_with_the_webhook_kept_secret():
    settings = settings_for("prod")
    run, _ = build(settings)
    for alert in run.of_type("MonitorAlert"):
        assert "alerts" in alert.secret_inputs
        assert alert.inputs["alerts"] == {
            "emails": ["ops@example.com"], "slacks": [{"channel": "#ops", "url": SLACK_URL}]}
    for alert in run.of_type("UptimeAlert"):
        assert "notifications" in alert.secret_inputs
        assert alert.inputs["notifications"][0]["slacks"][0]["url"] == SLACK_URL


def test_without_slack_only_emails_are_notified():
    run, _ = build(make_settings(alerts={"emails": ["a@example.com", "b@example.com"]}))
    for alert in run.of_type("MonitorAlert"):
        assert alert.inputs["alerts"] == {"emails": ["a@example.com", "b@example.com"]}
    for alert in run.of_type("UptimeAlert"):
        assert alert.inputs["notifications"] == [{"emails": ["a@example.com", "b@example.com"]}]


def test_https_site_gets_an_https_check_and_a_certificate_expiry_alert():
    run, monitoring = build(settings_for("prod"))
    check = health_check(run)
    assert check.inputs["type"] == "https" and check.inputs["target"] == HTTPS_URL
    assert check.inputs["regions"]
    alerts = {a.inputs["type"]: a for a in health_alerts(run, check)}
    assert set(alerts) == {"down_global", "latency", "ssl_expiry"}
    assert alerts["ssl_expiry"].inputs["threshold"] == 14
    check_id = _sync_await(monitoring.uptime_check_id.future())
    assert all(a.inputs["checkId"] == check_id for a in alerts.values())


def test_every_uptime_alert_has_a_period_the_api_accepts():
    """The provider leaves `period` optional and sends an empty one; the API requires one of
    its values for every alert type, ssl_expiry included (it refused prod's expiry alert)."""
    run, _ = build(settings_for("prod"))
    periods = {a.inputs["type"]: a.inputs.get("period")
               for a in health_alerts(run, health_check(run))}
    assert set(periods) == {"down_global", "latency", "ssl_expiry"}
    assert all(p in ("2m", "3m", "5m", "10m", "15m", "30m", "1h") for p in periods.values()), \
        periods


def test_plain_http_site_has_no_certificate_alert():
    run, _ = build(make_settings())
    check = run.one("UptimeCheck")
    assert check.inputs["type"] == "http" and check.inputs["target"] == HTTP_URL
    assert {a.inputs["type"] for a in run.of_type("UptimeAlert")} == {"down_global", "latency"}


def test_outputs_list_every_policy_uuid():
    run, alerts = build(make_settings())
    ids = _sync_await(alerts.alert_policy_ids.future())
    assert len(ids) == len(run.of_type("MonitorAlert")) == 9
    assert sorted(ids) == sorted(a.outputs["uuid"] for a in run.of_type("MonitorAlert"))


def test_uptime_check_can_be_turned_off():
    run, component = build(make_settings(alerts={"uptimeCheck": False}))
    assert not run.of_type("UptimeCheck") and not run.of_type("UptimeAlert")
    assert component.uptime_check_id is None
    assert run.of_type("MonitorAlert"), "the alert policies stay"


def test_with_replicas_an_uptime_check_on_the_lag_endpoint_alerts_when_it_fails_everywhere():
    """DigitalOcean has no replication-lag alert policy: the app's endpoint answers 503 while a
    replica lags past the bound, and its uptime check's alert tells the same people."""
    run, monitoring = build(settings_for("prod"))
    [check] = [c for c in run.of_type("UptimeCheck") if c.inputs["target"].endswith(LAG_PATH)]
    assert check.inputs["target"] == "https://www.example.com/readyz/replication"
    assert check.inputs["type"] == "https" and check.inputs["regions"]
    [alert] = health_alerts(run, check)
    assert (alert.inputs["type"], alert.inputs["period"]) == ("down_global", "2m")
    assert alert.inputs["notifications"] == [
        {"emails": ["ops@example.com"], "slacks": [{"channel": "#ops", "url": SLACK_URL}]}]
    assert "notifications" in alert.secret_inputs
    check_id = _sync_await(monitoring.replication_check_id.future())
    assert alert.inputs["checkId"] == check_id
    assert check_id != _sync_await(monitoring.uptime_check_id.future())


def test_without_replicas_there_is_no_lag_check():
    run, monitoring = build(make_settings())
    assert [c.inputs["target"] for c in run.of_type("UptimeCheck")] == [HTTP_URL]
    assert monitoring.replication_check_id is None
    run, monitoring = build(settings_for("prod", alerts={"uptimeCheck": False}))
    assert not run.of_type("UptimeCheck") and monitoring.replication_check_id is None
