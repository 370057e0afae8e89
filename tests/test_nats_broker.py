"""What is JetStream's own in NatsBroker: duplicates, give-ups, ack waits, logins, limits.

The broker contract itself is specified once for every broker in
`test_broker_contract.py`. Tests on the shared server use a unique topic
prefix (so a stream) each and delete it; those needing a login, a small store
or a server to stop run a private `nats-server`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest

from orchestrator.broker import broker_from_settings
from orchestrator.broker.base import BrokerUnavailable, Delivery
from orchestrator.broker.nats import NatsBroker
from orchestrator.config import BrokerSettings
from tests.support.broker_checks import (
    assert_not_logged,
    collect_dead_letters,
    health_changes,
    next_change,
    receive,
    recorder,
)
from tests.support.broker_fixtures import make_settings, skip_or_fail
from tests.support.brokers import delete_nats_stream
from tests.support.nats import NatsServer
from tests.support.processes import ROOT, free_port, start_main, wait_for_serving

pytestmark = pytest.mark.broker

TOPIC = "orders"


@asynccontextmanager
async def running(settings: BrokerSettings) -> AsyncIterator[NatsBroker]:
    broker = NatsBroker(settings)
    await broker.start()
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def settings(nats_url: str) -> AsyncIterator[BrokerSettings]:
    """Settings with a prefix (a stream) of the test's own, deleted afterwards."""
    own = make_settings(nats_url)
    yield own
    await delete_nats_stream(own)


@pytest.fixture
def auth_nats() -> Iterator[NatsServer]:
    """A private server that wants a login."""
    if not NatsServer.available():
        skip_or_fail("private NATS server", ["no nats-server binary"])
    with NatsServer(auth=True) as server:
        yield server


@asynccontextmanager
async def raw_client(settings: BrokerSettings) -> AsyncIterator[nats.js.JetStreamContext]:
    """A plain nats-py JetStream client of the same server, as another program would be."""
    client = await nats.connect(settings.url.get_secret_value(), connect_timeout=5)
    try:
        yield client.jetstream()
    finally:
        await client.close()


def test_broker_from_settings_picks_jetstream_for_nats() -> None:
    settings = BrokerSettings.model_validate({"url": "nats://127.0.0.1:4222"})
    assert isinstance(broker_from_settings(settings), NatsBroker)


# -- one message, once -------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_publish_repeated_while_the_first_copy_waits_is_stored_once(
    settings: BrokerSettings,
) -> None:
    async with running(settings) as broker:
        await broker.declare(TOPIC)
        await broker.publish(TOPIC, b"{}", message_id="m-1")
        await broker.publish(TOPIC, b"{}", message_id="m-1")  # a retry after a lost PubAck

        assert await broker.depth(TOPIC) == 1


@pytest.mark.timeout(30)
async def test_a_message_id_published_again_after_its_first_copy_was_consumed_is_delivered(
    settings: BrokerSettings,
) -> None:
    # An operator's replay reuses the message's id within the duplicate window.
    async with running(settings) as broker:
        await broker.declare(TOPIC)
        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        await broker.publish(TOPIC, b'{"n": 1}', message_id="m-1")
        first = await receive(received)
        await asyncio.sleep(0.2)  # acknowledged meanwhile

        await broker.publish(TOPIC, b'{"n": 2}', message_id="m-1")

        again = await receive(received)
        assert (first.message_id, again.message_id, again.body) == ("m-1", "m-1", b'{"n": 2}')
        assert again.headers == {}


# -- deliveries that never finished ------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_message_whose_handlers_never_finished_is_dead_lettered_without_its_handler(
    settings: BrokerSettings,
) -> None:
    limit = 2
    own = settings.model_copy(update={"delivery_limit": limit})
    called: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        called.append(delivery)

    async with running(own) as broker, raw_client(own) as js:
        await broker.declare(TOPIC)
        await broker.publish(TOPIC, b"{}", message_id="crashy")
        # Another consumer takes its `limit` deliveries and never finishes one.
        pull = await js.pull_subscribe_bind(f"t-{TOPIC}", broker.stream)
        for _ in range(limit):
            [msg] = await pull.fetch(1, timeout=5)
            await msg.nak()
        await pull.unsubscribe()

        await broker.subscribe(TOPIC, handler)
        [dead] = await collect_dead_letters(broker, TOPIC, 1)

    assert called == []
    assert (dead.message_id, dead.delivery_count) == ("crashy", limit + 1)
    assert dead.reason == f"delivery limit {limit} reached: its handler never finished"


@pytest.mark.timeout(30)
async def test_a_message_jetstream_gave_up_on_is_dead_lettered_with_the_reason(
    settings: BrokerSettings,
) -> None:
    own = settings.model_copy(update={"delivery_limit": 1})
    async with running(own) as broker, raw_client(own) as js:
        await broker.declare(TOPIC)
        await broker.publish(TOPIC, b"{}", message_id="stuck")
        # A consumer that always gives the message back, past max_deliver (limit + 1).
        pull = await js.pull_subscribe_bind(f"t-{TOPIC}", broker.stream)
        for _ in range(2):
            [msg] = await pull.fetch(1, timeout=5)
            await msg.nak()
        with pytest.raises(TimeoutError):  # JetStream delivers it no more
            await pull.fetch(1, timeout=1)

        [dead] = await collect_dead_letters(broker, TOPIC, 1)
        assert dead.message_id == "stuck"
        assert "max_deliver" in dead.reason
        assert await broker.stored(TOPIC) == 0  # gone from the topic, not stuck in it


@pytest.mark.timeout(30)
async def test_a_handler_outliving_the_ack_wait_keeps_its_message_to_itself(
    settings: BrokerSettings,
) -> None:
    own = settings.model_copy(update={"ack_wait_seconds": 1.0})
    received: list[Delivery] = []
    done = asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        received.append(delivery)
        await asyncio.sleep(2.5)
        done.set()

    async with running(own) as broker:
        await broker.declare(TOPIC)
        await broker.subscribe(TOPIC, slow)
        await broker.publish(TOPIC, b"{}", message_id="slow")
        async with asyncio.timeout(10):
            await done.wait()
        await asyncio.sleep(1.5)  # past another ack wait: nothing comes back

    assert [d.message_id for d in received] == ["slow"]


# -- topology deleted behind the broker's back ---------------------------------------


@pytest.mark.timeout(30)
async def test_a_publish_after_the_stream_was_deleted_declares_it_again(
    settings: BrokerSettings,
) -> None:
    async with running(settings) as broker:
        await broker.declare(TOPIC)
        await delete_nats_stream(settings)

        await broker.publish(TOPIC, b"{}", message_id="after-delete", timeout=5)

        assert await broker.depth(TOPIC) == 1
        assert await broker.dead_letters(TOPIC) == []


@pytest.mark.timeout(30)
async def test_a_consumer_deleted_while_consumed_comes_back(settings: BrokerSettings) -> None:
    async with running(settings) as broker, raw_client(settings) as js:
        await broker.declare(TOPIC)
        received, handler = recorder()
        await broker.subscribe(TOPIC, handler)
        await js.delete_consumer(broker.stream, f"t-{TOPIC}")
        # Kept by the stream meanwhile; consumed once the consumer is declared again.
        await js.publish(f"{settings.topic_prefix}orchestrator.t.{TOPIC}", b"{}")

        delivery = await receive(received, within=15)
        assert delivery.body == b"{}"


# -- a store with no room --------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_full_store_turns_health_off_and_fails_publishes_fast_naming_why() -> None:
    if not NatsServer.available():
        skip_or_fail("private NATS server", ["no nats-server binary"])
    with NatsServer(max_file_store=256 * 1024) as server:
        own = make_settings(server.url)
        async with running(own) as broker:
            changes = health_changes(broker)
            await broker.declare(TOPIC)
            published = 0
            with pytest.raises(BrokerUnavailable, match="insufficient resources"):
                for published in range(1000):
                    await broker.publish(TOPIC, b"x" * 2000, message_id=f"m{published}")
            await next_change(changes, False, within=2)

            began = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="refuses publishes"):
                await broker.publish(TOPIC, b"{}", message_id="refused")
            assert time.monotonic() - began < 0.1

            received, handler = recorder()
            await broker.subscribe(TOPIC, handler)
            for _ in range(published):
                await receive(received)
            await next_change(changes, True, within=10)
            await broker.publish(TOPIC, b"{}", message_id="room-again")


# -- secrets -------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_neither_a_password_nor_a_token_appears_in_logs_or_errors(
    auth_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password, token = secrets.token_hex(16), secrets.token_hex(16)
    urls = {
        "unreachable password": f"nats://orchestrator:{password}@127.0.0.1:{free_port()}",
        "unreachable token": f"nats://{token}@127.0.0.1:{free_port()}",
        "wrong password": f"nats://orchestrator:{password}@127.0.0.1:{auth_nats.port}",
        "wrong token": f"nats://{token}@127.0.0.1:{auth_nats.port}",
    }
    errors: dict[str, BrokerUnavailable] = {}
    for name, url in urls.items():
        broker = NatsBroker(make_settings(url, connect_timeout_seconds=1.5))
        with pytest.raises(BrokerUnavailable) as raised:
            await broker.start()
        errors[name] = raised.value
        await broker.close()

    assert "orchestrator:***@127.0.0.1" in str(errors["unreachable password"])
    assert "nats://***@127.0.0.1" in str(errors["unreachable token"])
    assert "refused the login" in str(errors["wrong password"])
    assert "refused the login" in str(errors["wrong token"])
    for error in errors.values():
        chain: BaseException | None = error
        while chain is not None:
            assert password not in repr(chain) and token not in repr(chain)
            chain = chain.__cause__ or chain.__context__
    assert caplog.records, "expected the failed attempts to be logged"
    assert_not_logged(password, caplog)
    assert_not_logged(token, caplog)


@pytest.mark.timeout(60)
def test_the_nats_password_never_reaches_a_debug_run_of_the_service(
    auth_nats: NatsServer, tmp_path: Path
) -> None:
    password = secrets.token_hex(16)
    url = auth_nats.add_user("svc", password)
    port = free_port()
    config = tmp_path / "app.yaml"
    config.write_text(
        json.dumps(
            {
                "grpc": {"host": "127.0.0.1", "port": port},
                "broker": {"url": url, "topic_prefix": f"p{secrets.token_hex(4)}."},
                "embedded_upstreams": {},
                "log_level": "DEBUG",
            }
        )
    )
    with start_main(config=config) as process:
        wait_for_serving(f"127.0.0.1:{port}", process)
        assert process.stop() == 0
        output = process.output()

    assert "connected to broker" in output, output
    assert "svc:***@127.0.0.1" in output
    assert password not in output


def test_a_nats_url_without_the_nats_extra_fails_at_startup_with_one_line() -> None:
    # Runs main.py in an interpreter that cannot import nats, as without the extra.
    script = (
        "import runpy, sys\n"
        "class NoNats:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'nats' or name.startswith('nats.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoNats())\n"
        "sys.path.insert(0, '.')\n"
        "sys.argv = ['main.py']\n"
        "runpy.run_path('main.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={"ORCH_BROKER_URL": "nats://127.0.0.1:4222", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "broker.url" in line and "pip install 'saga-orchestrator[nats]'" in line
