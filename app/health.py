"""Liveness and readiness.

``/healthz`` is the load balancer's check: it answers from the process alone, so a database
outage or failover cannot mark every droplet down at once, and it gets a thread even while
every database request is stuck (``app.db``, "Bounded database work"). It fails when gunicorn
cannot serve. ``/readyz`` reports each database server for monitoring and deploy checks: 503
when the primary does not answer or cannot take writes (in recovery), with the reason.
"""

from flask import Blueprint, Response, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return Response("ok", mimetype="text/plain")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    database = current_app.extensions["webstack"].database
    primary = database.probe(database.primary)
    replicas = {node.name: database.probe(node) for node in database.replicas}
    ready = bool(primary["ok"])
    body = {"status": "ready" if ready else "unavailable", "primary": primary, "replicas": replicas}
    return jsonify(body), 200 if ready else 503
