"""Access control on SagaService and SagaAdmin: bearer tokens, roles, open status, open access.

Each test serves a real OrchestratorServer on a free port and calls it through
a real channel: an authorized call gets the method's real answer (the server
has no facades, so a saga is NOT_FOUND and a malformed request
INVALID_ARGUMENT); a stand-in SagaAdmin servicer, registered ahead of the real
one, shows the principal a method runs as.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator import AsyncFacade, AsyncFacadeContext, Orchestrator
from orchestrator._access_policy import AccessPolicy
from orchestrator.broker import InMemoryBroker
from orchestrator.config import AccessSettings, Settings, TokenSettings, load_settings
from orchestrator.errors import ConfigError
from orchestrator.proto import saga_pb2, saga_pb2_grpc
from orchestrator.store import InMemorySagaStore, NewSaga
from tests.support.security import BOUND, bearer, served

pytestmark = pytest.mark.timeout(30)

READ_TOKEN = "read-" + secrets.token_hex(16)
OPERATE_TOKEN = "operate-" + secrets.token_hex(16)
AUTH_ERRORS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

ADMIN_CALLS: dict[str, Any] = {
    "RetrySaga": saga_pb2.RetrySagaRequest(request_id="r"),
    "CompensateSaga": saga_pb2.CompensateSagaRequest(request_id="r"),
    "ResolveSaga": saga_pb2.ResolveSagaRequest(request_id="r"),
    "ReplayDeadLetter": saga_pb2.ReplayDeadLetterRequest(),
    "DiscardDeadLetter": saga_pb2.DiscardDeadLetterRequest(),
}


REAL_ANSWERS = {
    "RetrySaga": grpc.StatusCode.NOT_FOUND,
    "CompensateSaga": grpc.StatusCode.NOT_FOUND,
    "ResolveSaga": grpc.StatusCode.INVALID_ARGUMENT,  # no note
    "ReplayDeadLetter": grpc.StatusCode.INVALID_ARGUMENT,  # no id
    "DiscardDeadLetter": grpc.StatusCode.INVALID_ARGUMENT,
    "ListDeadLetters": grpc.StatusCode.OK,
}
"""What each SagaAdmin method answers an authorized caller on a server with no sagas."""


def tokens_access(**extra: Any) -> AccessSettings:
    """A read token and an operate token."""
    return AccessSettings(
        tokens=[
            TokenSettings(name="dashboard", role="read", token=READ_TOKEN),  # type: ignore[arg-type]
            TokenSettings(name="oncall", role="operate", token=OPERATE_TOKEN),  # type: ignore[arg-type]
        ],
        **extra,
    )


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a server guarded by `tokens_access()`."""
    async with (
        served(access=tokens_access()) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield channel


async def status_code(call: Any) -> grpc.StatusCode:
    """The status a call ends with (OK when it answers)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def list_sagas(channel: grpc.aio.Channel, metadata: Any = None) -> Any:
    return saga_pb2_grpc.SagaServiceStub(channel).ListSagas(
        saga_pb2.ListSagasRequest(), metadata=metadata, timeout=BOUND
    )


def admin(channel: grpc.aio.Channel, method: str, metadata: Any = None) -> Any:
    stub = saga_pb2_grpc.SagaAdminStub(channel)
    request = ADMIN_CALLS.get(method, saga_pb2.ListDeadLettersRequest())
    return getattr(stub, method)(request, metadata=metadata, timeout=BOUND)


# SagaService


async def test_a_status_call_without_credentials_is_unauthenticated(
    channel: grpc.aio.Channel,
) -> None:
    assert await status_code(list_sagas(channel)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_status_call_with_a_wrong_token_is_unauthenticated(
    channel: grpc.aio.Channel,
) -> None:
    code = await status_code(list_sagas(channel, bearer("not-" + READ_TOKEN)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_without_the_bearer_scheme_is_unauthenticated(
    channel: grpc.aio.Channel,
) -> None:
    code = await status_code(list_sagas(channel, (("authorization", READ_TOKEN),)))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_read_token_lists_sagas(channel: grpc.aio.Channel) -> None:
    response = await list_sagas(channel, bearer(READ_TOKEN))
    assert list(response.sagas) == []


async def test_an_operate_token_lists_sagas(channel: grpc.aio.Channel) -> None:
    response = await list_sagas(channel, bearer(OPERATE_TOKEN))
    assert list(response.sagas) == []


async def test_a_read_token_gets_the_real_answer_of_get_saga(channel: grpc.aio.Channel) -> None:
    call = saga_pb2_grpc.SagaServiceStub(channel).GetSaga(
        saga_pb2.GetSagaRequest(request_id="nope"), metadata=bearer(READ_TOKEN), timeout=BOUND
    )
    assert await status_code(call) == grpc.StatusCode.NOT_FOUND


async def test_a_watch_without_credentials_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    call = saga_pb2_grpc.SagaServiceStub(channel).WatchSaga(
        saga_pb2.WatchSagaRequest(request_id="nope"), timeout=BOUND
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_watch_with_a_read_token_gets_the_real_answer(channel: grpc.aio.Channel) -> None:
    call = saga_pb2_grpc.SagaServiceStub(channel).WatchSaga(
        saga_pb2.WatchSagaRequest(request_id="nope"), metadata=bearer(READ_TOKEN), timeout=BOUND
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# SagaAdmin


@pytest.mark.parametrize("method", [*ADMIN_CALLS, "ListDeadLetters"])
async def test_an_admin_call_without_credentials_is_unauthenticated(
    channel: grpc.aio.Channel, method: str
) -> None:
    assert await status_code(admin(channel, method)) == grpc.StatusCode.UNAUTHENTICATED


async def test_an_admin_call_with_a_wrong_token_is_unauthenticated(
    channel: grpc.aio.Channel,
) -> None:
    code = await status_code(admin(channel, "RetrySaga", bearer(OPERATE_TOKEN + "x")))
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ADMIN_CALLS)
async def test_a_read_token_on_an_operate_method_is_permission_denied(
    channel: grpc.aio.Channel, method: str
) -> None:
    code = await status_code(admin(channel, method, bearer(READ_TOKEN)))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_read_token_passes_list_dead_letters(channel: grpc.aio.Channel) -> None:
    code = await status_code(admin(channel, "ListDeadLetters", bearer(READ_TOKEN)))
    assert code == grpc.StatusCode.OK


@pytest.mark.parametrize("method", [*ADMIN_CALLS, "ListDeadLetters"])
async def test_an_operate_token_passes_every_admin_method(
    channel: grpc.aio.Channel, method: str
) -> None:
    code = await status_code(admin(channel, method, bearer(OPERATE_TOKEN)))
    assert code == REAL_ANSWERS[method]


class Greeting(AsyncFacadeContext):
    """The DTO of a one-step facade, for sagas an operator acts on."""


async def greet(dto: Greeting) -> Greeting:
    return dto


async def with_a_running_saga(request_id: str) -> Orchestrator:
    """An Orchestrator with a one-step async facade and a RUNNING saga of it."""
    orchestrator = Orchestrator(InMemoryBroker(), store=InMemorySagaStore())
    orchestrator.register_async_facade("Greeter", AsyncFacade(dto=Greeting).use("greet", greet))
    await orchestrator.store.begin(
        NewSaga("Greeter", request_id, "async", "{}", "digest", "test", "greet", None)
    )
    return orchestrator


async def resolved_by(access: AccessSettings | None, metadata: Any) -> list[tuple[str, str]]:
    """Resolve a RUNNING saga with `metadata`'s credentials: the actions its record shows."""
    orchestrator = await with_a_running_saga("r-1")
    async with (
        served(access=access, orchestrator=orchestrator) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        saga = await saga_pb2_grpc.SagaAdminStub(channel).ResolveSaga(
            saga_pb2.ResolveSagaRequest(request_id="r-1", note="by hand"),
            metadata=metadata,
            timeout=BOUND,
        )
    return [(action.action, action.actor) for action in saga.actions]


async def test_an_admin_action_is_recorded_as_the_tokens_principal() -> None:
    assert await resolved_by(tokens_access(), bearer(OPERATE_TOKEN)) == [("resolve", "oncall")]


async def test_with_no_credentials_configured_an_action_is_recorded_as_anonymous() -> None:
    assert await resolved_by(None, None) == [("resolve", "anonymous")]


async def test_with_no_credentials_configured_startup_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator.server"):
        async with served():
            pass
    warnings = [r for r in caplog.records if "access control is off" in r.getMessage()]
    assert len(warnings) == 1


async def test_with_credentials_configured_startup_does_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="orchestrator.server"):
        async with served(access=tokens_access()):
            pass
    assert not [r for r in caplog.records if "access control is off" in r.getMessage()]


# open_status


async def test_open_status_lets_saga_service_be_read_without_credentials() -> None:
    async with (
        served(access=tokens_access(open_status=True)) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        response = await list_sagas(channel)
    assert list(response.sagas) == []


async def test_open_status_still_refuses_a_wrong_token() -> None:
    async with (
        served(access=tokens_access(open_status=True)) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        code = await status_code(list_sagas(channel, bearer("wrong-token-123456")))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_open_status_leaves_saga_admin_guarded() -> None:
    async with (
        served(access=tokens_access(open_status=True)) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        code = await status_code(admin(channel, "ListDeadLetters"))
    assert code == grpc.StatusCode.UNAUTHENTICATED


# What stays open


async def test_health_stays_open_under_access_control(channel: grpc.aio.Channel) -> None:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="liveness"), timeout=BOUND
    )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


# Tokens from a file, and secrets kept out of sight


async def test_a_token_from_the_tokens_file_authenticates(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(24)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"- name: from-file\n  role: read\n  token: {secret}\n")
    config = tmp_path / "app.yaml"
    config.write_text(f"access:\n  tokens_file: {tokens}\n")
    settings = load_settings(Settings, config, environ={})
    async with (
        served(access=settings.access) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        response = await list_sagas(channel, bearer(secret))
    assert list(response.sagas) == []


def test_a_bad_tokens_file_entry_is_named_without_its_secret(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(24)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"- name: bad\n  role: admin\n  token: {secret}\n")
    config = tmp_path / "app.yaml"
    config.write_text(f"access:\n  tokens_file: {tokens}\n")
    with pytest.raises(ConfigError, match=r"access: .*tokens_file .*entry 0: role") as caught:
        load_settings(Settings, config, environ={})
    assert secret not in str(caught.value)


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("access:\n  tokens: [{name: a, role: read, token: short}]\n")
    with pytest.raises(ConfigError, match=r"access.tokens.0.token: .*16"):
        load_settings(Settings, config, environ={})


def test_settings_and_policy_reprs_never_show_a_token() -> None:
    access = tokens_access()
    assert READ_TOKEN not in repr(access) and OPERATE_TOKEN not in repr(access)
    policy = repr(AccessPolicy(access))
    assert READ_TOKEN not in policy and OPERATE_TOKEN not in policy


def test_a_token_never_reaches_the_logs_or_the_callers(tmp_path: Path) -> None:
    from tests.support.processes import free_port, start_main, wait_for_serving

    secret = secrets.token_urlsafe(32)
    port = free_port()
    config = tmp_path / "app.yaml"
    config.write_text(
        "log_level: DEBUG\n"
        f"grpc: {{host: 127.0.0.1, port: {port}}}\n"
        "embedded_upstreams: {order: {port: 0}, payment: {port: 0}}\n"
        f"access:\n  tokens: [{{name: leak-test, role: read, token: {secret}}}]\n"
    )
    with start_main(config=config, cwd=tmp_path) as process:
        target = f"127.0.0.1:{port}"
        wait_for_serving(target, process)
        details = []
        with grpc.insecure_channel(target) as sync_channel:
            service = saga_pb2_grpc.SagaServiceStub(sync_channel)
            admin_stub = saga_pb2_grpc.SagaAdminStub(sync_channel)
            service.ListSagas(saga_pb2.ListSagasRequest(), metadata=bearer(secret), timeout=BOUND)
            calls = [
                lambda: service.GetSaga(
                    saga_pb2.GetSagaRequest(request_id="absent"), metadata=bearer(secret), timeout=5
                ),
                lambda: service.ListSagas(
                    saga_pb2.ListSagasRequest(), metadata=bearer(secret[:-1]), timeout=5
                ),
                lambda: service.ListSagas(
                    saga_pb2.ListSagasRequest(), metadata=bearer(secret + "x"), timeout=5
                ),
                lambda: admin_stub.RetrySaga(
                    saga_pb2.RetrySagaRequest(), metadata=bearer(secret), timeout=5
                ),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                details.append(f"{caught.value.code()} {caught.value.details()}")
        process.stop()
        output = process.output()
    assert "call refused" in output  # the bad calls were logged
    assert secret not in output
    assert secret[:-1] not in output
    assert all(secret[:-1] not in detail for detail in details), details
