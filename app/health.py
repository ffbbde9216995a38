"""Liveness, readiness and replication lag.

``/healthz`` is the load balancer's check: it answers from the process alone, so a database
outage or failover cannot mark every droplet down at once, and it gets a thread even while
every database request is stuck (``app.db``, "Bounded database work"). It fails when gunicorn
cannot serve. ``/readyz`` reports each database server for monitoring and deploy checks: 503
when the primary does not answer or cannot take writes (in recovery), with the reason, and
each replica's replication lag as last sampled (unknown: null). ``/readyz/replication`` is
the uptime check's: 503 while a replica lags past ``DB_REPLICA_MAX_LAG_SECONDS``, 200
otherwise. It sends nothing to the
database: it reads the lag sampler's last sample (``app.lag``), so a public URL cannot load
the database, and waits for a first sample only in a process that has none yet.
"""

from flask import Blueprint, Response, current_app, jsonify

bp = Blueprint("health", __name__)

FIRST_SAMPLE_WAIT = 5.0
"""Seconds a fresh process waits for its first lag sample before answering with what it has."""


@bp.get("/healthz")
def healthz() -> Response:
    return Response("ok", mimetype="text/plain")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    database = current_app.extensions["webstack"].database
    lag = database.lag
    lag.start()
    primary = database.probe(database.primary)
    replicas = {node.name: {**database.probe(node), "lag": lag.as_json(node.name)}
                for node in database.replicas}
    ready = bool(primary["ok"])
    body = {"status": "ready" if ready else "unavailable", "primary": primary, "replicas": replicas}
    return jsonify(body), 200 if ready else 503


@bp.get("/readyz/replication")
def replication() -> tuple[Response, int]:
    lag = current_app.extensions["webstack"].database.lag
    lag.wait_sampled(FIRST_SAMPLE_WAIT)
    replicas = {name: lag.as_json(name) for name in lag.replicas}
    stale = sorted(name for name, state in replicas.items() if state["stale"])
    body = {"status": "lagging" if stale else "ok", "max_lag_seconds": lag.max_seconds,
            "replicas": replicas}
    return jsonify(body), 503 if stale else 200
