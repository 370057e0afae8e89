"""The fault-injecting TCP proxy of tests/support, against a local echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(20)

SILENCE = 0.3  # long enough for a forwarded byte to come back on loopback


class Echo:
    """An echo server that also records every byte it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Echo:
        self._server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                self.received += data
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[Echo]:
    async with Echo() as server:
        yield server


@pytest_asyncio.fixture
async def proxy(echo: Echo) -> AsyncIterator[TcpProxy]:
    async with TcpProxy("127.0.0.1", echo.port) as running:
        yield running


async def connect(proxy: TcpProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 5)


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def assert_silent(reader: asyncio.StreamReader) -> None:
    """Nothing arrives, and the connection is not closed either."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), SILENCE)


async def assert_closed(reader: asyncio.StreamReader) -> None:
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionResetError:
        return
    assert data == b""


async def test_forward_passes_bytes_both_ways(proxy: TcpProxy, echo: Echo) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"ping") == b"ping"
    assert bytes(echo.received) == b"ping"
    writer.close()


async def test_blackhole_keeps_open_connections_silent_in_both_directions(
    proxy: TcpProxy, echo: Echo
) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"a") == b"a"

    proxy.blackhole()
    writer.write(b"lost")
    await writer.drain()

    await assert_silent(reader)
    assert bytes(echo.received) == b"a"  # the target never saw the bytes either
    assert proxy.connections == 1
    writer.close()


async def test_blackhole_accepts_new_connections_but_never_answers(
    proxy: TcpProxy, echo: Echo
) -> None:
    proxy.blackhole()
    reader, writer = await connect(proxy)
    writer.write(b"hello?")
    await writer.drain()

    await assert_silent(reader)
    assert bytes(echo.received) == b""
    writer.close()


async def test_restore_forwards_new_connections_and_closes_the_blackholed_ones(
    proxy: TcpProxy,
) -> None:
    old_reader, old_writer = await connect(proxy)
    proxy.blackhole()
    proxy.restore()

    await assert_closed(old_reader)
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"back") == b"back"
    old_writer.close()
    writer.close()


async def test_reset_closes_every_connection_at_once(proxy: TcpProxy) -> None:
    links = [await connect(proxy) for _ in range(3)]
    for reader, writer in links:
        assert await round_trip(reader, writer, b"x") == b"x"

    proxy.reset()

    for reader, writer in links:
        await assert_closed(reader)
        writer.close()
    reader, writer = await connect(proxy)  # and it still forwards new ones
    assert await round_trip(reader, writer, b"y") == b"y"
    writer.close()


async def test_leaving_the_context_closes_connections_and_stops_listening(echo: Echo) -> None:
    async with TcpProxy("127.0.0.1", echo.port) as proxy:
        reader, writer = await connect(proxy)
        proxy.blackhole()  # a silent link must not keep the proxy from stopping
        port = proxy.port

    await assert_closed(reader)
    assert proxy.connections == 0
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.close()


def test_url_points_an_amqp_url_at_the_proxy() -> None:
    proxy = TcpProxy("127.0.0.1", 5672)
    proxy.port = 40000
    assert proxy.url("amqp://guest:p%40ss@127.0.0.1:5672/vhost") == (
        "amqp://guest:p%40ss@127.0.0.1:40000/vhost"
    )
