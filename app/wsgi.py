"""WSGI entry point: ``gunicorn app.wsgi:app``.

Each worker imports this module and so builds its own app and connection pools. Do not turn
on gunicorn's ``preload_app``: pools created before the fork would share sockets between
workers (if preloading is ever needed, call
``app.extensions["webstack"].database.dispose()`` in a ``post_fork`` hook).
"""

from app import create_app

app = create_app()
