"""The host's side of the booted droplets' VPC: what a droplet reaches on the private bridge.

- `proxy`: an HTTP proxy (absolute-URI GET for apt's http sources, CONNECT for pip's https)
  that forwards only to `REGISTRIES`: the droplets' apt and pip use it, as on a corporate
  network. Anything else gets 403, so a droplet reaches registries and the bridge, nothing else.
- `postgres_tls`: the droplets verify DigitalOcean's database endpoints (`sslmode=verify-full`).
  This forwarder listens where the user data's database host resolves to (an address on the
  bridge), answers PostgreSQL's SSLRequest with TLS (the certificate lab/boot.py signs for
  those host names with the CA the user data carries), and relays the plain protocol to the
  lab's server on loopback.

`Servers` runs them on an asyncio loop in a thread of the boot process; everything stops with it.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
import threading
from collections.abc import Iterable

REGISTRIES = frozenset({
    "deb.debian.org", "security.debian.org", "pypi.org", "files.pythonhosted.org",
})
"""Hosts the proxy forwards to: Debian's mirrors and PyPI."""

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
IO_TIMEOUT = 60.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _splice(a: tuple, b: tuple) -> None:
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]), return_exceptions=True)


async def _request_head(reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bytes | None:
    """An HTTP request's head, or None (connection closed) when none arrives in time."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        writer.close()
        return None


def _quiet_on_cancel(handler):
    """A connection handler that ends quietly when the loop shuts down."""
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            writer.close()
    return run


def allowed(host: str, registries: Iterable[str] = REGISTRIES) -> bool:
    return host.lower().rstrip(".") in set(registries)


async def _proxy_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await _request_head(reader, writer)
    if head is None:
        return
    method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        rest = b""
    else:  # GET http://host[:port]/path HTTP/1.1
        if not target.startswith("http://"):
            host, port = "", "0"
        else:
            hostport = target[len("http://"):].split("/", 1)[0]
            host, _, port = hostport.partition(":")
            port = port or "80"
        rest = head
    if not allowed(host) or port not in ("80", "443"):
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        return
    try:
        upstream = await asyncio.wait_for(asyncio.open_connection(host, int(port)), IO_TIMEOUT)
    except (OSError, TimeoutError):
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()
        return
    if method == "CONNECT":
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
    else:
        upstream[1].write(rest)  # apt sends absolute URIs; Debian's mirrors accept them
    await _splice((reader, writer), upstream)


async def _metadata_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await _request_head(reader, writer)
    if head is None:
        return
    body = head.split(b" ", 2)[1] + b"\n"
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


def _postgres_tls(target: tuple[str, int], context: ssl.SSLContext):
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await asyncio.wait_for(reader.readexactly(8), IO_TIMEOUT)
            length, code = struct.unpack("!II", first)
            if length == 8 and code == GSSENC_REQUEST:
                writer.write(b"N")
                await writer.drain()
                first = await asyncio.wait_for(reader.readexactly(8), IO_TIMEOUT)
                length, code = struct.unpack("!II", first)
            if length == 8 and code == SSL_REQUEST:
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(context)
                first = b""
            upstream = await asyncio.wait_for(asyncio.open_connection(*target), IO_TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            writer.close()
            return
        upstream[1].write(first)
        await _splice((reader, writer), upstream)
    return client


class Servers:
    """The proxy and the database forwarders, on an asyncio loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._servers: list[asyncio.AbstractServer] = []

    def _start(self, handler, host: str, port: int) -> None:
        async def start():
            return await asyncio.start_server(handler, host, port, reuse_address=True)
        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self._servers.append(server)

    def proxy(self, host: str, port: int) -> None:
        self._start(_quiet_on_cancel(_proxy_client), host, port)

    def metadata(self, host: str, port: int) -> None:
        """A stand-in for DigitalOcean's metadata service: 200 with the path asked."""
        self._start(_quiet_on_cancel(_metadata_client), host, port)

    def postgres_tls(self, host: str, port: int, target: tuple[str, int],
                     certificate: tuple[str, str]) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*certificate)
        self._start(_quiet_on_cancel(_postgres_tls(target, context)), host, port)

    def stop(self) -> None:
        async def close():
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
