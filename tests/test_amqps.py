"""amqps:// to a private RabbitMQ node that serves only TLS, with trustme certificates.

The node (own name, ports, data and log directories) is started once for the
module and always removed. Its certificate names `localhost` only, so the
same node serves the wrong-host-name case through `127.0.0.1`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from orchestrator.broker import Delivery
from orchestrator.broker.rabbitmq import RabbitMQBroker
from orchestrator.config import BrokerSettings, BrokerTlsSettings
from orchestrator.errors import BrokerUnavailable
from tests.support.broker_fixtures import skip_or_fail
from tests.support.processes import ROOT, free_port, main_env
from tests.support.rabbitmq import RabbitMQNode, _free_port

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]

FAIL_FAST = 10.0
"""A certificate that does not verify must fail well within this, not at connect_timeout."""


class TlsNode:
    """Where the TLS node listens and the CAs to trust."""

    def __init__(self, port: int, ca: Path, other_ca: Path) -> None:
        self.port = port
        self.ca = ca
        self.other_ca = other_ca

    def url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.port}/"


@pytest.fixture(scope="module")
def tls_node() -> Iterator[TlsNode]:
    """A private RabbitMQ node with a TLS listener on 127.0.0.1 only."""
    if not RabbitMQNode.available():
        skip_or_fail("private RabbitMQ node", ["no RabbitMQ install under /usr/lib/rabbitmq/bin"])
    node = RabbitMQNode()
    try:
        tls_dir = node.root / "tls"
        tls_dir.mkdir()
        ca, other = trustme.CA(), trustme.CA()
        ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
        other.cert_pem.write_to_path(str(tls_dir / "other-ca.pem"))
        server = ca.issue_cert("localhost")
        server.cert_chain_pems[0].write_to_path(str(tls_dir / "server.pem"))
        server.private_key_pem.write_to_path(str(tls_dir / "server.key"))
        port = _free_port({node.port, node.dist_port})
        (node.root / "config" / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    "loopback_users = none",
                    f"listeners.ssl.1 = 127.0.0.1:{port}",
                    f"ssl_options.cacertfile = {tls_dir / 'ca.pem'}",
                    f"ssl_options.certfile = {tls_dir / 'server.pem'}",
                    f"ssl_options.keyfile = {tls_dir / 'server.key'}",
                    "ssl_options.verify = verify_none",
                    "ssl_options.fail_if_no_peer_cert = false",
                ]
            )
            + "\n"
        )
        node.start()
        yield TlsNode(port, tls_dir / "ca.pem", tls_dir / "other-ca.pem")
    finally:
        node.cleanup()


def settings(url: str, ca: Path) -> BrokerSettings:
    return BrokerSettings.model_validate(
        {
            "url": url,
            "tls": BrokerTlsSettings(ca_file=ca),
            "connect_timeout_seconds": 30,
            "topic_prefix": f"amqps-{time.monotonic_ns()}.",
        }
    )


async def test_amqps_with_the_brokers_ca_round_trips_a_message(tls_node: TlsNode) -> None:
    broker = RabbitMQBroker(settings(tls_node.url(), tls_node.ca))
    await broker.start()
    try:
        received: asyncio.Queue[Delivery] = asyncio.Queue()

        async def handler(delivery: Delivery) -> None:
            await received.put(delivery)

        await broker.declare("ping")
        await broker.subscribe("ping", handler)
        await broker.publish("ping", b"{}", message_id="over-tls")
        delivery = await asyncio.wait_for(received.get(), 10)
    finally:
        await broker.close()
    assert delivery.message_id == "over-tls"


async def test_amqps_with_a_wrong_ca_fails_at_once_with_a_clear_error(tls_node: TlsNode) -> None:
    broker = RabbitMQBroker(settings(tls_node.url(), tls_node.other_ca))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"TLS handshake failed: CERTIFICATE_VERIFY_FAILED"):
        await broker.start()
    assert time.monotonic() - started < FAIL_FAST


async def test_amqps_to_a_host_name_the_certificate_does_not_name_fails_closed(
    tls_node: TlsNode,
) -> None:
    broker = RabbitMQBroker(settings(tls_node.url("127.0.0.1"), tls_node.ca))
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"TLS handshake failed: .*mismatch"):
        await broker.start()
    assert time.monotonic() - started < FAIL_FAST


async def test_amqps_without_a_ca_file_does_not_trust_a_private_ca(tls_node: TlsNode) -> None:
    broker = RabbitMQBroker(BrokerSettings.model_validate({"url": tls_node.url()}))
    with pytest.raises(BrokerUnavailable, match="TLS handshake failed"):
        await broker.start()


async def test_main_with_a_wrong_broker_ca_exits_1_with_one_clear_line(
    tls_node: TlsNode, tmp_path: Path
) -> None:
    env = main_env(ROOT / "app.yaml")
    env.update(
        ORCH_GRPC_PORT=str(free_port()),
        ORCH_BROKER_URL=tls_node.url(),
        ORCH_BROKER_TLS_CA=str(tls_node.other_ca),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "main.py"),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    text = output.decode()
    assert process.returncode == 1, text
    assert "TLS handshake failed" in text
    assert "Traceback" not in text
    assert "guest:guest" not in text
