"""Settings from the environment, and an app that starts without touching the database."""

import pytest

from app import create_app
from app.config import ConfigError, Settings, sqlalchemy_url

URL = "postgresql://u:p@127.0.0.1:1/db"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://doadmin:s3cr%40t@db.example:25060/defaultdb?sslmode=require",
        "postgresql://doadmin:s3cr%40t@db.example:25060/defaultdb?sslmode=require",
        "postgresql+psycopg://doadmin:s3cr%40t@db.example:25060/defaultdb?sslmode=require",
    ],
)
def test_digitalocean_urls_are_converted_for_psycopg(url):
    converted = sqlalchemy_url(url, "DATABASE_URL")
    assert converted.drivername == "postgresql+psycopg"
    assert converted.password == "s3cr@t"
    assert (converted.host, converted.port) == ("db.example", 25060)
    assert converted.database == "defaultdb"
    assert converted.query == {"sslmode": "require"}


@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "not a url"])
def test_other_urls_are_rejected_naming_the_key(url):
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        sqlalchemy_url(url, "DATABASE_URL")


def test_secret_key_is_required_outside_tests():
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        Settings.from_mapping({"DATABASE_URL": URL})
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        create_app({"DATABASE_URL": URL, "SECRET_KEY": ""})


def test_tests_get_a_random_secret_key():
    first = Settings.from_mapping({"DATABASE_URL": URL}, testing=True)
    second = Settings.from_mapping({"DATABASE_URL": URL}, testing=True)
    assert len(first.secret_key) >= 32
    assert first.secret_key != second.secret_key


def test_database_url_is_required():
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings.from_mapping({"SECRET_KEY": "x" * 32, "DATABASE_URL": ""})


def test_defaults_and_overrides():
    settings = Settings.from_mapping({"SECRET_KEY": "k", "DATABASE_URL": URL})
    assert settings.replica_urls == ()
    assert (settings.pool_size, settings.max_overflow, settings.pool_timeout) == (2, 2, 2.0)
    assert (settings.connect_timeout, settings.statement_timeout_ms) == (2, 3000)
    settings = Settings.from_mapping(
        {
            "SECRET_KEY": "k",
            "DATABASE_URL": URL,
            "DATABASE_REPLICA_URLS": " postgres://r0@h0/db , ,postgresql://r1@h1/db,",
            "DB_POOL_SIZE": "7",
            "DB_POOL_TIMEOUT": "0.5",
            "DB_STATEMENT_TIMEOUT_MS": "250",
        }
    )
    assert [url.host for url in settings.replica_urls] == ["h0", "h1"]
    assert {url.drivername for url in settings.replica_urls} == {"postgresql+psycopg"}
    assert (settings.pool_size, settings.pool_timeout, settings.statement_timeout_ms) == (
        7,
        0.5,
        250,
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("DB_POOL_SIZE", "many"), ("DB_POOL_SIZE", "0"), ("DB_MAX_OVERFLOW", "-1"),
     ("DB_POOL_TIMEOUT", "soon"), ("DB_STATEMENT_TIMEOUT_MS", "10"), ("MAX_BODY_MB", "0")],
)
def test_bad_numbers_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        Settings.from_mapping({"SECRET_KEY": "k", "DATABASE_URL": URL, key: value})


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", URL)
    monkeypatch.setenv("SECRET_KEY", "from-the-environment")
    monkeypatch.setenv("DB_POOL_SIZE", "3")
    app = create_app()
    settings = app.extensions["webstack"].settings
    assert app.config["SECRET_KEY"] == "from-the-environment"
    assert settings.pool_size == 3
    assert app.extensions["webstack"].database.primary.pool.size() == 3


def test_app_starts_and_is_live_without_a_database():
    """Nothing connects at creation; /healthz answers while no database listens at all."""
    app = create_app({"TESTING": True, "DATABASE_URL": URL})
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert app.extensions["webstack"].database.primary.pool.checkedin() == 0


def test_body_limit_is_max_body_mb():
    """MAX_BODY_MB (the stack's app.maxBodyMb, nginx's limit too) is the app's limit: a body of
    exactly that size is read (and refused for what it holds), one byte more is 413."""
    client = create_app({"TESTING": True, "DATABASE_URL": URL, "MAX_BODY_MB": "2"}).test_client()
    limit = 2 * 1024 * 1024
    for size, status in [(limit, 400), (limit + 1, 413)]:
        resp = client.post("/api/notes", data=b"x" * size, content_type="application/json")
        assert resp.status_code == status, (size, resp.get_json())


@pytest.mark.parametrize(("proto", "secure"), [("https", True), ("http", False), (None, False)])
def test_session_cookie_is_httponly_lax_and_secure_over_https(proto, secure):
    """Issue 13: the cookie had no `Secure` flag even when the request came over HTTPS."""
    app = create_app({"TESTING": True, "DATABASE_URL": URL})

    @app.get("/set-session")
    def set_session():
        from flask import session
        session["lsn"] = 1
        return ""

    headers = {"X-Forwarded-Proto": proto} if proto else {}
    cookie = app.test_client().get("/set-session", headers=headers).headers["Set-Cookie"]
    flags = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")[1:]}
    assert "httponly" in flags and flags["samesite"].strip() == "SameSite=Lax"
    assert ("secure" in flags) is secure


def test_a_request_without_the_cookie_gets_an_empty_session_and_one_with_it_its_own():
    """The session of a request without the cookie is made without a signing serializer;
    a signed cookie is still read, and one signed with another key is not."""
    app = create_app({"TESTING": True, "DATABASE_URL": URL})

    @app.get("/lsn")
    def lsn():
        from flask import session
        session["lsn"] = session.get("lsn", 0) + 1
        return str(session["lsn"])

    interface = app.session_interface
    built = []
    real = interface.get_signing_serializer
    interface.get_signing_serializer = lambda a: built.append(1) or real(a)
    client = app.test_client()
    assert client.get("/healthz").status_code == 200 and not built
    assert client.get("/lsn").text == "1" and len(built) == 1  # to sign the new cookie
    assert client.get("/lsn").text == "2"  # the cookie read back
    forged = create_app({"TESTING": True, "DATABASE_URL": URL, "SECRET_KEY": "another key"})
    forged.get("/lsn")(lsn)
    cookie = forged.test_client().get("/lsn").headers["Set-Cookie"].split(";")[0]
    stranger = app.test_client(use_cookies=False)
    assert stranger.get("/lsn", headers={"Cookie": cookie}).text == "1"  # not trusted
