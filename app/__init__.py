"""webstack's Flask app: a small notes API on a primary and read replicas.

``create_app()`` reads its settings from the environment (see ``app.config``); tests pass a
mapping that overrides it. Nothing connects to a database until a request needs it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from flask import Flask, Request, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from app import api, errors, health, metrics
from app.config import Settings
from app.db import Database


@dataclass(frozen=True)
class Services:
    """What the blueprints need, kept in ``app.extensions["webstack"]``."""

    settings: Settings
    database: Database
    metrics: metrics.Metrics


class _SessionInterface(SecureCookieSessionInterface):
    """The session cookie is `Secure` when the request came over HTTPS (the load balancer's
    X-Forwarded-Proto, through ProxyFix), so a site served over HTTPS never sends it in clear,
    while a domain-less staging (plain HTTP) still gets one."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or request.is_secure

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """A request without the cookie (an anonymous visitor, a health check) gets an empty
        session, as from Flask, but without the signing serializer Flask builds first on
        every request (an itsdangerous serializer, which encodes {} to learn its output type)."""
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def create_app(config: Mapping[str, object] | None = None) -> Flask:
    """Build the app. ``config`` overrides environment variables (and may set TESTING)."""
    overrides = dict(config or {})
    testing = bool(overrides.get("TESTING"))
    settings = Settings.from_mapping({**os.environ, **overrides}, testing=testing)

    app = Flask(__name__)
    app.config.update(
        TESTING=testing,
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_body_mb * 1024 * 1024,  # >= a note, JSON-escaped
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_HTTPONLY=True,
    )
    app.session_interface = _SessionInterface()
    # One proxy hop in front of gunicorn (nginx, which passes on the load balancer's
    # X-Forwarded-Proto): trust exactly one X-Forwarded-For/-Proto/-Host value.
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)
    app.url_map.converters["id"] = api.NoteIdConverter

    app_metrics = metrics.Metrics()
    database = Database(settings, on_fallback=app_metrics.count_fallback)
    app_metrics.watch(database)
    app.extensions["webstack"] = Services(settings, database, app_metrics)

    app_metrics.instrument(app)
    errors.register(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(metrics.bp)
    return app
