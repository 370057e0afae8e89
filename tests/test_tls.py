"""TLS and mutual TLS on the orchestrator's port and to the upstreams, with trustme certificates.

Real servers on free ports; the certificates are issued into the test's
temporary directory and named by path, as a deployment's config names them.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator import healthcheck
from orchestrator.config import (
    AccessSettings,
    ClientCertificateSettings,
    ServerTlsSettings,
    Settings,
    load_settings,
)
from orchestrator.errors import ConfigError
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from pb import booking_pb2, booking_pb2_grpc
from tests.support.app_fixtures import Upstreams, app_settings
from tests.support.processes import ROOT, free_port, main_env
from tests.support.security import BOUND, Pki, bearer, client_credentials, make_pki, served

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Every certificate these tests use."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls(pki: Pki, *, mutual: bool = False) -> ServerTlsSettings:
    return ServerTlsSettings(
        cert_file=pki.server.cert,
        key_file=pki.server.key,
        client_ca_file=pki.ca if mutual else None,
    )


async def list_sagas(
    port: int,
    credentials: grpc.ChannelCredentials,
    *,
    host: str = "localhost",
    metadata: Any = None,
    options: Any = None,
) -> grpc.StatusCode:
    """How ListSagas over TLS to `host:port` ends."""
    async with grpc.aio.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        try:
            await saga_pb2_grpc.SagaServiceStub(channel).ListSagas(
                saga_pb2.ListSagasRequest(), metadata=metadata, timeout=BOUND
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def retry_saga(port: int, credentials: grpc.ChannelCredentials) -> grpc.StatusCode:
    """How RetrySaga over TLS ends."""
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            await saga_pb2_grpc.SagaAdminStub(channel).RetrySaga(
                saga_pb2.RetrySagaRequest(request_id="r"), timeout=BOUND
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


# Server TLS


async def test_a_tls_server_answers_a_client_that_trusts_its_ca(pki: Pki) -> None:
    async with served(tls=tls(pki)) as port:
        assert await list_sagas(port, client_credentials(pki.ca)) == grpc.StatusCode.OK


async def test_a_client_trusting_another_ca_is_refused(pki: Pki) -> None:
    async with served(tls=tls(pki)) as port:
        code = await list_sagas(port, client_credentials(pki.other_ca))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_a_client_expecting_another_host_name_is_refused(pki: Pki) -> None:
    override = [("grpc.ssl_target_name_override", "elsewhere.example")]
    async with served(tls=tls(pki)) as port:
        code = await list_sagas(port, client_credentials(pki.ca), options=override)
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_a_plaintext_client_gets_no_answer_from_a_tls_server(pki: Pki) -> None:
    async with served(tls=tls(pki)) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await saga_pb2_grpc.SagaServiceStub(ch).ListSagas(
                saga_pb2.ListSagasRequest(), timeout=BOUND
            )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tokens_work_over_tls(pki: Pki) -> None:
    token = secrets.token_urlsafe(24)
    access = AccessSettings.model_validate(
        {"tokens": [{"name": "t", "role": "read", "token": token}]}
    )
    async with served(tls=tls(pki), access=access) as port:
        code = await list_sagas(port, client_credentials(pki.ca), metadata=bearer(token))
    assert code == grpc.StatusCode.OK


# Mutual TLS


async def test_mutual_tls_admits_a_client_certificate_of_the_client_ca(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True)) as port:
        code = await list_sagas(port, client_credentials(pki.ca, pki.reader))
    assert code == grpc.StatusCode.OK


async def test_mutual_tls_refuses_a_client_without_a_certificate(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True)) as port:
        code = await list_sagas(port, client_credentials(pki.ca))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_refuses_a_client_certificate_of_another_ca(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True)) as port:
        code = await list_sagas(port, client_credentials(pki.ca, pki.foreign))
    assert code == grpc.StatusCode.UNAVAILABLE


def certificate_access() -> AccessSettings:
    return AccessSettings(
        client_certificates=[
            ClientCertificateSettings(name="reader.example", role="read"),
            ClientCertificateSettings(name="operator.example", role="operate"),
        ]
    )


async def test_a_read_certificate_reads_sagas(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True), access=certificate_access()) as port:
        code = await list_sagas(port, client_credentials(pki.ca, pki.reader))
    assert code == grpc.StatusCode.OK


async def test_a_read_certificate_on_an_operate_method_is_permission_denied(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True), access=certificate_access()) as port:
        code = await retry_saga(port, client_credentials(pki.ca, pki.reader))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_an_operate_certificate_passes_an_operate_method(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True), access=certificate_access()) as port:
        code = await retry_saga(port, client_credentials(pki.ca, pki.operator))
    assert code == grpc.StatusCode.NOT_FOUND  # authorized: the saga is looked up, and absent


async def test_a_certificate_no_rule_names_is_unauthenticated(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True), access=certificate_access()) as port:
        code = await list_sagas(port, client_credentials(pki.ca, pki.stranger))
    assert code == grpc.StatusCode.UNAUTHENTICATED


# The health probe


async def test_the_health_probe_checks_a_tls_server(pki: Pki) -> None:
    async with served(tls=tls(pki)) as port:
        argv = [f"localhost:{port}", "--service", "liveness", "--ca-file", str(pki.ca)]
        assert await asyncio.to_thread(healthcheck.main, argv) == 0


async def test_the_health_probe_presents_a_client_certificate_for_mutual_tls(pki: Pki) -> None:
    async with served(tls=tls(pki, mutual=True)) as port:
        argv = [f"localhost:{port}", "--service", "liveness", "--ca-file", str(pki.ca)]
        argv += ["--cert-file", str(pki.reader.cert), "--key-file", str(pki.reader.key)]
        assert await asyncio.to_thread(healthcheck.main, argv) == 0


async def test_the_health_probe_without_a_client_certificate_fails_on_mutual_tls(
    pki: Pki,
) -> None:
    async with served(tls=tls(pki, mutual=True)) as port:
        argv = [f"localhost:{port}", "--service", "liveness", "--ca-file", str(pki.ca)]
        assert await asyncio.to_thread(healthcheck.main, argv) == 1


# Configuration errors


def test_a_missing_certificate_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    key = tmp_path / "k.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    config.write_text(f"grpc:\n  tls: {{cert_file: {tmp_path}/nope.pem, key_file: {key}}}\n")
    with pytest.raises(ConfigError, match=r"grpc.tls.cert_file: .*cannot read .*nope.pem"):
        load_settings(Settings, config, environ={})


def test_a_file_without_pem_data_is_a_config_error(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "app.yaml"
    (tmp_path / "junk").write_text("not a key")
    config.write_text(
        f"grpc:\n  tls: {{cert_file: {pki.server.cert}, key_file: {tmp_path / 'junk'}}}\n"
    )
    with pytest.raises(ConfigError, match=r"grpc.tls.key_file: .*no PEM data"):
        load_settings(Settings, config, environ={})


async def test_main_exits_2_before_serving_when_a_tls_file_is_unreadable(tmp_path: Path) -> None:
    env = main_env(ROOT / "app.yaml")
    env.update(
        ORCH_GRPC_PORT=str(free_port()),
        ORCH_GRPC_TLS_CERT=str(tmp_path / "missing.pem"),
        ORCH_GRPC_TLS_KEY=str(tmp_path / "missing.key"),
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "main.py"),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    lines = stderr.decode().strip().splitlines()
    assert process.returncode == 2
    assert len(lines) == 1 and "grpc.tls.cert_file" in lines[0], lines
    assert stdout == b""


# Upstreams over TLS


@pytest.fixture
async def tls_upstreams(pki: Pki) -> AsyncIterator[Upstreams]:
    """Order and Payment served over mutual TLS (client certificates of `pki.ca`)."""
    from upstream.server import serve_upstream

    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    order = await serve_upstream("order", host="localhost", port=0, credentials=credentials)
    payment = await serve_upstream("payment", host="localhost", port=0, credentials=credentials)
    try:
        yield Upstreams(order, payment, None, None)  # type: ignore[arg-type]
    finally:
        await order.stop(None)
        await payment.stop(None)


async def book(settings: Any) -> grpc.StatusCode:
    from main import running_app

    async with (
        running_app(settings) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel,
    ):
        try:
            await booking_pb2_grpc.BookingServiceStub(channel).HandleSyncBooking(
                booking_pb2.BookingRequest(ProductID=1), timeout=BOUND
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def with_upstream_tls(upstreams: Upstreams, tls_section: dict[str, Any]) -> Any:
    settings = app_settings(upstreams)
    data = settings.model_dump()
    data["upstreams"]["tls"] = tls_section
    return type(settings).model_validate(data)


async def test_a_booking_calls_upstreams_over_mutual_tls(
    pki: Pki, tls_upstreams: Upstreams
) -> None:
    settings = with_upstream_tls(
        tls_upstreams,
        {"ca_file": pki.ca, "cert_file": pki.operator.cert, "key_file": pki.operator.key},
    )
    assert await book(settings) == grpc.StatusCode.OK


async def test_upstreams_refuse_a_booking_service_without_a_client_certificate(
    pki: Pki, tls_upstreams: Upstreams
) -> None:
    settings = with_upstream_tls(tls_upstreams, {"ca_file": pki.ca})
    assert await book(settings) == grpc.StatusCode.UNAVAILABLE


async def test_upstreams_of_an_untrusted_ca_are_refused(pki: Pki, tls_upstreams: Upstreams) -> None:
    settings = with_upstream_tls(
        tls_upstreams,
        {"ca_file": pki.other_ca, "cert_file": pki.operator.cert, "key_file": pki.operator.key},
    )
    assert await book(settings) == grpc.StatusCode.UNAVAILABLE
