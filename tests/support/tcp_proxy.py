"""An asyncio TCP proxy in front of one target, to put network faults between a client and it.

`TcpProxy(host, port)` listens on a free port of 127.0.0.1 (`proxy.port`) and
forwards every connection to the target. Its faults:

- `blackhole()`: a half-open link. Every socket stays open, but no byte is
  forwarded any more, in either direction, on the connections already made
  and on those made from now on (they are accepted and then left silent). The
  proxy stops reading from a blackholed socket, so a peer that keeps writing
  eventually fills its send buffer, as behind a link that drops packets.
- `restore()`: forward again, for connections made from now on; the
  blackholed ones are closed (their streams lost bytes: they cannot resume).
- `reset()`: close every connection at once, both sides, without flushing.

Use it as an async context manager: leaving it stops listening and closes
every connection, whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

__all__ = ["TcpProxy"]

_CHUNK = 65536


class _Link:
    """One client connection and, unless it was blackholed from the start, its upstream."""

    def __init__(self, client: asyncio.StreamWriter, *, blackholed: bool) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = blackholed
        self.closed = asyncio.Event()

    def abort(self) -> None:
        """Close both sockets now, dropping whatever is buffered."""
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()
        self.closed.set()


class TcpProxy:
    """A TCP proxy with `forward`, `blackhole` and `reset` faults; see the module docstring."""

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        """The port the proxy listens on, once started."""
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._blackholed = False

    @property
    def mode(self) -> str:
        """`forward` or `blackhole`."""
        return "blackhole" if self._blackholed else "forward"

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._links)

    def url(self, url: str) -> str:
        """`url` (`scheme://user:password@host:port/...`) pointed at the proxy instead."""
        scheme, rest = url.split("://", 1)
        authority, _, path = rest.partition("/")
        credentials, _, _ = authority.rpartition("@")
        prefix = f"{credentials}@" if credentials else ""
        return f"{scheme}://{prefix}{self.host}:{self.port}/{path}"

    async def start(self) -> None:
        """Listen on a free port; `port` tells which."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every connection; waits for the proxy's tasks to end."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=5)

    def blackhole(self) -> None:
        """Stop forwarding in both directions, keeping every socket open (a half-open link)."""
        self._blackholed = True
        for link in self._links:
            link.blackholed = True

    def restore(self) -> None:
        """Forward new connections again; close the blackholed ones."""
        self._blackholed = False
        for link in list(self._links):
            if link.blackholed:
                link.abort()

    def reset(self) -> None:
        """Close every connection at once, on both sides."""
        for link in list(self._links):
            link.abort()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(writer, blackholed=self._blackholed)
        self._links.add(link)
        try:
            if not link.blackholed:
                await self._forward(link, reader)
            if link.blackholed:
                # Blackholed, from the start or since: silent until aborted.
                await link.closed.wait()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            link.abort()
            self._links.discard(link)
            self._tasks.discard(task)

    async def _forward(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        try:
            upstream_reader, link.upstream = await asyncio.open_connection(*self.target)
        except OSError:
            return  # the client sees its connection closed, as with a refused one
        if link.blackholed:
            return
        pumps = [
            asyncio.create_task(self._pump(link, client_reader, link.upstream)),
            asyncio.create_task(self._pump(link, upstream_reader, link.client)),
        ]
        try:
            # Either side closing ends the link, unless it is blackholed by then.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    async def _pump(link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while not link.blackholed:
            data = await source.read(_CHUNK)
            if not data or link.blackholed:
                # EOF, or bytes that arrived once the link went silent: dropped.
                break
            sink.write(data)
            await sink.drain()
        if link.blackholed:
            await link.closed.wait()
