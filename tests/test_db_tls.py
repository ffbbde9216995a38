"""Database TLS, verified (issue 13): the lab's PostgreSQL and pgbouncer present a certificate
of the cluster's own CA (lab/pgcluster.py), every URL says `sslmode=verify-full` with it, as
the droplets' URLs do with DigitalOcean's CA. The app connects; a server whose certificate
does not match the URL's host name, or was issued by another CA, is refused."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy.engine import make_url

from lab.pgcluster import make_ca

WRONG_HOST = "db.wrong.example"


def _with(url: str, **query: str) -> str:
    parsed = make_url(url)
    return parsed.set(query={**parsed.query, **query}).render_as_string(hide_password=False)


def test_every_url_verifies_the_server_and_every_connection_is_tls(pg_cluster):
    urls = pg_cluster.urls
    for url in (urls.primary, urls.pool, *urls.replicas):
        query = make_url(url).query
        assert (query["sslmode"], query["sslrootcert"]) == ("verify-full", str(pg_cluster.ca_file))
        with psycopg.connect(url, prepare_threshold=None) as conn:
            assert conn.pgconn.ssl_in_use
    # Behind the pool too: pgbouncer reaches PostgreSQL over TLS, having verified it.
    with psycopg.connect(urls.pool, prepare_threshold=None) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                            ).fetchone() == (True,)
    log = (pg_cluster.base_dir / "pgbouncer" / "pgbouncer.log").read_text()
    assert "SSL established" in log


def test_the_app_works_over_verified_tls(client):
    assert client.get("/readyz").get_json()["status"] == "ready"
    created = client.post("/api/notes", json={"text": "over verify-full"})
    assert created.status_code == 201
    assert client.get(created.headers["Location"]).get_json()["text"] == "over verify-full"


def test_a_certificate_for_another_host_name_is_refused(pg_cluster, make_app):
    """The right address, a host name the certificate does not name: as if the URL's host
    resolved to some other server that holds a certificate of the same CA."""
    for url in (pg_cluster.urls.primary, pg_cluster.urls.pool):
        wrong = _with(url, host=WRONG_HOST, hostaddr="127.0.0.1")
        mismatch = f'does not match host name "{WRONG_HOST}"'
        with pytest.raises(psycopg.OperationalError, match=mismatch):
            psycopg.connect(wrong, connect_timeout=5).close()
    app = make_app(DATABASE_URL=_with(pg_cluster.urls.pool, host=WRONG_HOST,
                                      hostaddr="127.0.0.1"), DATABASE_REPLICA_URLS="")
    response = app.test_client().post("/api/notes", json={"text": "never written"})
    assert response.status_code == 503


def test_a_server_of_another_ca_is_refused(pg_cluster, tmp_path, make_app):
    other_ca, _ = make_ca(tmp_path, "some other CA")
    for url in (pg_cluster.urls.primary, pg_cluster.urls.pool, *pg_cluster.urls.replicas):
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(_with(url, sslrootcert=str(other_ca)), connect_timeout=5).close()
    app = make_app(DATABASE_URL=_with(pg_cluster.urls.pool, sslrootcert=str(other_ca)),
                   DATABASE_REPLICA_URLS="")
    assert app.test_client().get("/readyz").status_code == 503
