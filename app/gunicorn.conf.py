"""Gunicorn settings for the webstack app, read from the environment.

On a droplet the environment comes from the EnvironmentFile that `components/runtime.py`
renders (the timeouts there are the source of truth); without it the defaults below serve a
developer's machine. Check with `gunicorn --check-config -c app/gunicorn.conf.py app.wsgi:app`.

No `preload_app`: every worker imports the app and builds its own connection pools after the
fork, so no connection is ever shared between processes.
"""

import ipaddress
import os


def _loopback_only(bind: str) -> str:
    """Refuse to listen beyond loopback: nginx is the only client, and it is local."""
    host = bind.rpartition(":")[0].strip("[]")
    try:
        local = bind.startswith("unix:") or host == "localhost" or (
            ipaddress.ip_address(host).is_loopback
        )
    except ValueError:
        local = False
    if not local:
        raise ValueError(f"GUNICORN_BIND={bind!r}: gunicorn listens on loopback or unix: only")
    return bind


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


bind = [_loopback_only(os.environ.get("GUNICORN_BIND", "127.0.0.1:8000"))]
# With threads one worker per core, sync workers 2 x cores + 1 (components/settings.py,
# `AppSettings.workers`, renders GUNICORN_WORKERS for a droplet from its size).
threads = _int("GUNICORN_THREADS", 1)
_cores = len(os.sched_getaffinity(0))
workers = _int("GUNICORN_WORKERS", _cores if threads > 1 else 2 * _cores + 1)
worker_class = "gthread" if threads > 1 else "sync"
worker_tmp_dir = os.environ.get("GUNICORN_WORKER_TMP_DIR")  # None: the system's temp dir

timeout = _int("GUNICORN_TIMEOUT", 30)
graceful_timeout = _int("GUNICORN_GRACEFUL_TIMEOUT", 30)
keepalive = _int("GUNICORN_KEEPALIVE", 5)

# Recycle workers now and then, staggered, so a slow leak never takes a droplet down. Rarely:
# a new worker spends ~0.35 s of CPU importing the app and connecting its pools, the one vCPU's
# time, and a droplet with one worker queues requests meanwhile (1.2-1.4 s under load). At
# 1,000 the bench saw a worker replaced more than once a second under load; at 10,000 one
# every 10 s or so, 3-4% of the core (docs/benchmarks.md). 100,000 is about half an hour of a
# worker at 50 requests a second; a worker leaking 1 KB a request grows 100 MB at most.
max_requests = 100000
max_requests_jitter = 10000

# Only nginx on this host may set X-Forwarded-Proto/-For (the default, made explicit so a
# FORWARDED_ALLOW_IPS in the environment cannot widen it).
forwarded_allow_ips = "127.0.0.1,::1"

# Errors to stderr, i.e. the journal. No access log: nginx in front logs every request (its
# status, size and time); a second line per request costs gunicorn's CPU and journald's on the
# same vCPU (docs/benchmarks.md). The LB's health checks are logged by neither.
accesslog = None
errorlog = "-"

# systemd reloads (HUP) and stops (TERM) gunicorn; no control socket in a home directory the
# sandbox makes read-only anyway.
control_socket_disable = True
