"""The console's calls of SagaService and SagaAdmin: the servicers themselves, in this process.

A page reads and acts through the very methods a gRPC client reaches
(`SagaStatusService.GetSaga`, `SagaAdminService.RetrySaga`, ...), so it gets
their checks, their answers, their refusals (a status code and the message a
client would read), their records, logs and metrics. Only the transport is
left out: a call runs on the console's request, with a context that turns the
servicer's `abort` into `CallFailed`, and an action runs as the signed-in
principal (`bound_principal`), which its record names as the actor.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc

from orchestrator.access import Principal, bound_principal
from orchestrator.proto import saga_pb2

if TYPE_CHECKING:
    from orchestrator.admin import SagaAdminService
    from orchestrator.status import SagaStatusService

__all__ = ["CallFailed", "Calls"]

_Context = grpc.aio.ServicerContext[Any, Any]


class CallFailed(Exception):
    """A call the servicer refused: its status code and its message, as a client reads them."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class _InProcess:
    """The part of `grpc.aio.ServicerContext` the servicers use, for a call made in this
    process: aborting raises `CallFailed`; there is no metadata and no peer."""

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str]] = (),
    ) -> NoReturn:
        raise CallFailed(code, details)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "console"


def _context() -> _Context:
    return cast(_Context, _InProcess())


class Calls:
    """Each SagaService and SagaAdmin method the console uses, as a coroutine."""

    def __init__(self, status: SagaStatusService, admin: SagaAdminService) -> None:
        self._status = status
        self._admin = admin

    # --- reading: SagaService and ListDeadLetters ---------------------------------------

    async def get_saga(self, facade: str, request_id: str) -> saga_pb2.Saga:
        """`GetSaga`."""
        request = saga_pb2.GetSagaRequest(facade=facade, request_id=request_id)
        return await self._status.GetSaga(request, _context())

    async def list_sagas(self, request: saga_pb2.ListSagasRequest) -> saga_pb2.ListSagasResponse:
        """`ListSagas`."""
        return await self._status.ListSagas(request, _context())

    @contextlib.asynccontextmanager
    async def watch_saga(
        self, facade: str, request_id: str
    ) -> AsyncIterator[AsyncIterator[saga_pb2.Saga]]:
        """`WatchSaga`: the saga now, then after each change until it ends. Leaving the
        block ends the watch (its waker is dropped at once)."""
        request = saga_pb2.WatchSagaRequest(facade=facade, request_id=request_id)
        watch = self._status.WatchSaga(request, _context())
        try:
            yield watch
        finally:
            await watch.aclose()  # type: ignore[attr-defined]  # an async generator

    async def list_dead_letters(
        self, request: saga_pb2.ListDeadLettersRequest
    ) -> saga_pb2.ListDeadLettersResponse:
        """`ListDeadLetters`."""
        return await self._admin.ListDeadLetters(request, _context())

    # --- acting: SagaAdmin, as the principal ---------------------------------------------

    async def retry(
        self, principal: Principal, facade: str, request_id: str, note: str
    ) -> saga_pb2.Saga:
        """`RetrySaga` as `principal`."""
        request = saga_pb2.RetrySagaRequest(facade=facade, request_id=request_id, note=note)
        with bound_principal(principal):
            return await self._admin.RetrySaga(request, _context())

    async def compensate(
        self, principal: Principal, facade: str, request_id: str, reason: str
    ) -> saga_pb2.Saga:
        """`CompensateSaga` as `principal`."""
        request = saga_pb2.CompensateSagaRequest(
            facade=facade, request_id=request_id, reason=reason
        )
        with bound_principal(principal):
            return await self._admin.CompensateSaga(request, _context())

    async def resolve(
        self, principal: Principal, facade: str, request_id: str, note: str
    ) -> saga_pb2.Saga:
        """`ResolveSaga` as `principal`."""
        request = saga_pb2.ResolveSagaRequest(facade=facade, request_id=request_id, note=note)
        with bound_principal(principal):
            return await self._admin.ResolveSaga(request, _context())

    async def replay(self, principal: Principal, letter_id: str, note: str) -> saga_pb2.DeadLetter:
        """`ReplayDeadLetter` as `principal`."""
        request = saga_pb2.ReplayDeadLetterRequest(id=letter_id, note=note)
        with bound_principal(principal):
            return await self._admin.ReplayDeadLetter(request, _context())

    async def discard(self, principal: Principal, letter_id: str, note: str) -> saga_pb2.DeadLetter:
        """`DiscardDeadLetter` as `principal`."""
        request = saga_pb2.DiscardDeadLetterRequest(id=letter_id, note=note)
        with bound_principal(principal):
            return await self._admin.DiscardDeadLetter(request, _context())
