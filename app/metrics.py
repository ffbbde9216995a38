"""Prometheus metrics on ``GET /metrics``.

Each app has its own ``CollectorRegistry``, so several apps can live in one process (tests).

Several gunicorn workers: set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory writable by
the workers (e.g. systemd's ``RuntimeDirectory=``, emptied on every start) in the workers'
environment. Request counters, latencies and fallbacks are then summed over all workers,
past and present. The pool and replication-lag gauges always describe the worker that
answered the scrape.
Without it, every metric describes a single worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.db import Database

bp = Blueprint("metrics", __name__)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods counted under their own name; any other is counted as "other" (a client can send
any token as a method, and each label value is a series kept for the process's life)."""


class PoolCollector(Collector):
    """Connection pool usage of each server (label `engine`), read at scrape time."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def collect(self) -> Iterator[Metric]:
        checked_out = GaugeMetricFamily(
            "webstack_db_pool_checked_out",
            "Connections currently checked out of the pool",
            labels=["engine"],
        )
        size = GaugeMetricFamily(
            "webstack_db_pool_size", "Connections the pool keeps (overflow excluded)",
            labels=["engine"],
        )
        for node in self._database.nodes:
            checked_out.add_metric([node.name], node.pool.checkedout())
            size.add_metric([node.name], node.pool.size())
        yield checked_out
        yield size


class LagCollector(Collector):
    """Each replica's replication lag, from the lag sampler's last sample (``app.lag``); a
    replica whose lag is unknown has no sample."""

    def __init__(self, database: Database) -> None:
        self._lag = database.lag

    def collect(self) -> Iterator[Metric]:
        self._lag.start()
        seconds = GaugeMetricFamily(
            "webstack_db_replica_lag_seconds",
            "How far the replica's replay is behind the primary, in seconds (an upper bound)",
            labels=["replica"],
        )
        size = GaugeMetricFamily(
            "webstack_db_replica_lag_bytes",
            "WAL the primary had written that the replica had not replayed, in bytes",
            labels=["replica"],
        )
        for name in self._lag.replicas:
            lag = self._lag.of(name)
            if lag.seconds is not None:
                seconds.add_metric([name], lag.seconds)
            if lag.bytes is not None:
                size.add_metric([name], lag.bytes)
        yield seconds
        yield size
        yield GaugeMetricFamily(
            "webstack_db_replica_max_lag_seconds",
            "Lag past which a replica is skipped for reads (DB_REPLICA_MAX_LAG_SECONDS)",
            value=self._lag.max_seconds,
        )


class Metrics:
    """The app's metrics and the hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "webstack_http_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "webstack_http_request_duration_seconds",
            "HTTP request latency by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.replica_fallbacks = Counter(
            "webstack_db_replica_fallbacks",
            "Reads served by the primary because no replica could (lagging or unavailable)",
            ["reason"],
            registry=self.registry,
        )
        self._collectors: list[Collector] = []

    def count_fallback(self, reason: str) -> None:
        self.replica_fallbacks.labels(reason=reason).inc()

    def watch(self, database: Database) -> None:
        """Report the pools and the replication lag of ``database``."""
        self._collectors = [PoolCollector(database), LagCollector(database)]
        for collector in self._collectors:
            self.registry.register(collector)

    def instrument(self, app: Flask) -> None:
        """Time and count every request of ``app``."""
        app.before_request(_start_timer)
        app.after_request(self._observe)

    def exposition(self) -> bytes:
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry)

    def _observe(self, response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        method = request.method if request.method in METHODS else "other"
        labels = (endpoint, method, str(response.status_code))
        self.requests.labels(*labels).inc()
        started = g.get("request_started")
        if started is not None:
            self.latency.labels(*labels).observe(time.perf_counter() - started)
        return response


def _start_timer() -> None:
    g.request_started = time.perf_counter()


@bp.get("/metrics")
def metrics() -> Response:
    body = current_app.extensions["webstack"].metrics.exposition()
    return Response(body, content_type=CONTENT_TYPE_LATEST)
