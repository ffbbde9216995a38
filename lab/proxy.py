"""A TCP proxy on loopback that can slow down or re-point the connections it carries.

    proxy = DelayProxy(("127.0.0.1", 5432)).start()
    proxy.port                         # connect here instead
    proxy.delay = 2.0                  # every chunk, either way, forwarded 2 s late
    proxy.retarget(("127.0.0.1", 5433))   # new connections go there (a fail-over's DNS)
    proxy.lose_commits = 0.3           # 30% of PostgreSQL's COMMIT replies never arrive
                                       # (only on a connection without TLS: `plain`)
    proxy.drop()                       # cut every open connection
    proxy.stop()

The chaos scenarios put one between the droplets and each database endpoint (a brown-out, a
write endpoint that turns into a node in recovery, a fault between a commit and its reply);
the tests do the same to one app.
Threads, not asyncio: a few dozen connections at most, and the code stays short.
"""

from __future__ import annotations

import random
import socket
import threading
import time

from sqlalchemy.engine import make_url

COMMIT_REPLY = b"C\x00\x00\x00\x0bCOMMIT\x00"
"""PostgreSQL's CommandComplete message for COMMIT (type C, length 11, tag "COMMIT")."""


def plain(url: str, port: int) -> str:
    """`url` through a proxy on 127.0.0.1:`port`, without TLS (`sslmode=disable`): a proxy that
    loses COMMIT replies must read PostgreSQL's messages, which TLS would hide. Everywhere else
    the lab's URLs verify the server (lab/pgcluster.py)."""
    parsed = make_url(url)
    query = {k: v for k, v in parsed.query.items() if k != "sslrootcert"}
    return parsed.set(host="127.0.0.1", port=port, query={**query, "sslmode": "disable"}
                      ).render_as_string(hide_password=False)


class DelayProxy:
    """Forwards 127.0.0.1:`port` to `target`; `delay` seconds added to every chunk."""

    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.delay = 0.0
        self.lose_commits = 0.0
        """Share of server chunks holding a COMMIT reply after which the connection is cut
        instead: the transaction is committed, the client never hears so."""
        self._listener = socket.create_server((host, 0))
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    def start(self) -> DelayProxy:
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def retarget(self, target: tuple[str, int]) -> None:
        """Send new connections to `target`; open ones stay where they are."""
        self.target = target

    def drop(self) -> None:
        """Close every open connection, both ends."""
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _close(sock)

    def stop(self) -> None:
        self._stopped.set()
        _close(self._listener)
        self.drop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, server}
            for source, sink, replies in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, replies),
                                 daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, replies: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if self.delay:
                    time.sleep(self.delay)
                if (replies and self.lose_commits and COMMIT_REPLY in chunk
                        and random.random() < self.lose_commits):
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        with self._lock:
            self._open -= {source, sink}
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
