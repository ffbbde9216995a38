"""Replication lag (issue 16): measured by a background sampler from the servers' own WAL
positions and replay times, shown in /metrics and /readyz, and a replica lagging past the
bound skipped for reads until it catches up, on the real primary and replica."""

from __future__ import annotations

import time

import pytest

from app.lag import Lag, Replayed, ReplicationLag
from tests.test_app_api import _metric

MB = 1 << 20


class FakeServers:
    """A primary position and one replica's answer, set by the test."""

    def __init__(self) -> None:
        self.primary = 100
        self.replayed = Replayed(100, 600.0)
        self.primary_fails = False

    def primary_position(self) -> int:
        if self.primary_fails:
            raise OSError("primary unreachable")
        return self.primary

    def replica(self, name: str) -> Replayed:
        return self.replayed


@pytest.fixture
def servers():
    return FakeServers()


@pytest.fixture
def sampler(servers):
    return ReplicationLag(["replica-0"], primary_position=servers.primary_position,
                          replayed=servers.replica, interval=60, max_seconds=10)


def test_a_caught_up_replica_lags_zero_however_old_its_last_commit(servers, sampler):
    sampler.sample()
    assert sampler.of("replica-0") == Lag(0.0, 0)
    assert not sampler.stale("replica-0")


def test_an_idle_primary_s_fresh_commit_does_not_make_a_healthy_replica_stale(servers,
                                                                           sampler):
    """The primary was idle for ten minutes, commits once, and the sample falls before the
    replica replays it: the commit age says 600 s, the last caught-up sample a moment ago."""
    sampler.sample()
    servers.primary = 200
    sampler.sample()
    lag = sampler.of("replica-0")
    assert lag.bytes == 100 and lag.seconds < 1
    assert not sampler.stale("replica-0")


def test_a_replica_behind_since_the_sampler_started_lags_by_its_last_commit(servers,
                                                                            sampler):
    servers.primary, servers.replayed = 100 + 5 * MB, Replayed(100, 42.5)
    sampler.sample()
    assert sampler.of("replica-0") == Lag(42.5, 5 * MB)
    assert sampler.stale("replica-0")


def test_without_the_primary_s_position_the_lag_is_unknown_not_stale(servers, sampler):
    servers.primary, servers.replayed = 100 + MB, Replayed(100, 42.5)
    sampler.sample()
    assert sampler.stale("replica-0")
    servers.primary_fails = True
    sampler.sample()
    assert sampler.of("replica-0") == Lag(None, None)
    assert not sampler.stale("replica-0")


# --------------------------------------------------------------------------- the real cluster


def _wait(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_metrics_and_readyz_show_each_replica_s_lag(pg_cluster, make_app):
    app = make_app(DB_REPLICA_LAG_SAMPLE_SECONDS="0.2")
    client = app.test_client()
    pg_cluster.wait_for_replay(0)
    assert app.extensions["webstack"].database.lag.wait_sampled(5)
    time.sleep(0.5)  # a sample after the replay
    ready = client.get("/readyz").get_json()
    assert ready["replicas"]["replica-0"]["lag"] == {"seconds": 0.0, "bytes": 0, "stale": False}
    body = client.get("/metrics").get_data(as_text=True)
    assert 'webstack_db_replica_lag_seconds{replica="replica-0"} 0.0' in body
    assert 'webstack_db_replica_lag_bytes{replica="replica-0"} 0.0' in body
    assert "webstack_db_replica_max_lag_seconds 30.0" in body
    replication = client.get("/readyz/replication")
    assert replication.status_code == 200
    assert replication.get_json() == {"status": "ok", "max_lag_seconds": 30.0, "replicas": {
        "replica-0": {"seconds": 0.0, "bytes": 0, "stale": False}}}


def test_a_replica_lagging_past_the_bound_serves_no_read_until_it_caught_up(cluster,
                                                                             make_app):
    app = make_app(DB_REPLICA_MAX_LAG_SECONDS="1", DB_REPLICA_LAG_SAMPLE_SECONDS="0.2")
    writer, reader = app.test_client(), app.test_client()
    lag = app.extensions["webstack"].database.lag
    cluster.wait_for_replay(0)
    assert reader.get("/api/notes").headers["X-Served-By"] == "replica-0"

    cluster.set_apply_delay(0, 8)
    assert writer.post("/api/notes", json={"text": "held back"}).status_code == 201
    _wait(lambda: lag.stale("replica-0"), "the sampler never saw the replica past 1 s")
    replication = reader.get("/readyz/replication")
    assert replication.status_code == 503
    state = replication.get_json()["replicas"]["replica-0"]
    assert state["stale"] and state["seconds"] > 1 and state["bytes"] > 0
    before = _metric(reader.get("/metrics").get_data(as_text=True),
                     "webstack_db_replica_fallbacks_total", reason="lagging")
    for _ in range(3):  # a client without a session would have read the replica
        listed = reader.get("/api/notes")
        assert (listed.status_code, listed.headers["X-Served-By"]) == (200, "primary")
    body = reader.get("/metrics").get_data(as_text=True)
    assert _metric(body, "webstack_db_replica_fallbacks_total", reason="lagging") == before + 3
    assert _metric(body, "webstack_db_replica_lag_seconds", replica="replica-0") > 1

    cluster.set_apply_delay(0, 0)
    cluster.wait_for_replay(0)
    _wait(lambda: reader.get("/api/notes").headers["X-Served-By"] == "replica-0",
          "reads did not return to the replica once it caught up")
    assert reader.get("/readyz/replication").status_code == 200
