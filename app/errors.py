"""Every error leaves the app as JSON: ``{"error": "..."}``."""

from flask import Flask, Response, current_app, jsonify
from werkzeug.exceptions import HTTPException

from app.db import UNAVAILABLE, NotPrimary, Saturated

DATABASE_RETRY_AFTER = "5"
BUSY_RETRY_AFTER = "1"


def register(app: Flask) -> None:
    app.register_error_handler(HTTPException, _http_error)
    for error in (*UNAVAILABLE, NotPrimary):
        app.register_error_handler(error, _database_unavailable)
    app.register_error_handler(Saturated, _database_busy)
    app.register_error_handler(Exception, _unexpected)


def _http_error(error: HTTPException) -> Response:
    """404, 405, 413, 415, aborts... keep the status and headers (Allow), replace the body."""
    response = error.get_response()
    response.data = jsonify(error=error.description).get_data()
    response.content_type = "application/json"
    return response


def _database_unavailable(error: Exception) -> tuple[Response, int, dict[str, str]]:
    current_app.logger.warning("database unavailable: %s", getattr(error, "orig", None) or error)
    return jsonify(error="database unavailable"), 503, {"Retry-After": DATABASE_RETRY_AFTER}


def _database_busy(error: Saturated) -> tuple[Response, int, dict[str, str]]:
    current_app.logger.warning("database busy: %s", error)
    return jsonify(error="database busy"), 503, {"Retry-After": BUSY_RETRY_AFTER}


def _unexpected(error: Exception) -> tuple[Response, int]:
    current_app.logger.exception("unhandled error", exc_info=error)
    return jsonify(error="internal server error"), 500
