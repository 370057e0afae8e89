"""A short-lived gRPC client of a running orchestrator's SagaService and SagaAdmin.

Every call carries the bearer token (when there is one) and a deadline; a call
that fails raises :class:`CallFailed` with one line that names the gRPC status
and never the token.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from orchestrator.cli.errors import CallFailed
from orchestrator.proto import saga_pb2, saga_pb2_grpc

__all__ = ["MAX_PAGE_SIZE", "Connection", "OrchestratorClient"]

MAX_PAGE_SIZE = 500
"""The largest page the server hands out; longer listings take several calls."""

_SAGA_SERVICE = "orchestrator.v1.SagaService"
_SAGA_ADMIN = "orchestrator.v1.SagaAdmin"
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Connection:
    """Where the orchestrator is and how to reach it."""

    target: str
    """`host:port` of its gRPC server."""
    timeout: float
    """Seconds each call may take (for a watch: the first answer)."""
    token: str | None = None
    """Sent as `authorization: Bearer <token>`; never shown."""
    tls: bool = False
    """Use TLS even without any of the files below (the system's root certificates)."""
    tls_ca: Path | None = None
    """PEM root certificates that the server's certificate must chain to."""
    tls_cert: Path | None = None
    """PEM client certificate, for mutual TLS (with `tls_key`)."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_server_name: str | None = None
    """The name the server's certificate must carry, when it is not the target's host."""

    @property
    def uses_tls(self) -> bool:
        """True when the channel is a TLS one."""
        return bool(self.tls or self.tls_ca or self.tls_cert or self.tls_server_name)

    def channel(self) -> grpc.Channel:
        """A new channel to the target (TLS or plaintext, as configured)."""
        if not self.uses_tls:
            return grpc.insecure_channel(self.target)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )
        options = []
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.secure_channel(self.target, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata every call sends: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class OrchestratorClient:
    """The SagaService and SagaAdmin methods, each one blocking call (a context manager)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._channel = connection.channel()
        self._sagas = saga_pb2_grpc.SagaServiceStub(self._channel)
        self._admin = saga_pb2_grpc.SagaAdminStub(self._channel)
        self._metadata = connection.metadata()
        self._timeout = connection.timeout

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # SagaService

    def get_saga(self, request_id: str, facade: str = "") -> saga_pb2.Saga:
        """The saga of `request_id` (in `facade`, when several facades hold it)."""
        request = saga_pb2.GetSagaRequest(request_id=request_id, facade=facade)
        with self._calling(_SAGA_SERVICE, "GetSaga"):
            return self._sagas.GetSaga(request, metadata=self._metadata, timeout=self._timeout)

    def list_sagas(
        self, *, facade: str = "", state: int = 0, limit: int = 50, request_id_prefix: str = ""
    ) -> saga_pb2.ListSagasResponse:
        """Up to `limit` sagas, newest first, gathered over as many pages as it takes.

        The answer's `next_page_token` continues the listing past `limit`.
        """
        found = saga_pb2.ListSagasResponse()
        token = ""
        while len(found.sagas) < limit:
            request = saga_pb2.ListSagasRequest(
                facade=facade,
                state=saga_pb2.SagaState.ValueType(state),
                page_size=min(limit - len(found.sagas), MAX_PAGE_SIZE),
                page_token=token,
                request_id_prefix=request_id_prefix,
            )
            with self._calling(_SAGA_SERVICE, "ListSagas"):
                page = self._sagas.ListSagas(
                    request, metadata=self._metadata, timeout=self._timeout
                )
            found.sagas.extend(page.sagas[: limit - len(found.sagas)])
            token = page.next_page_token
            if not token:
                break
        found.next_page_token = token
        return found

    def watch_saga(self, request_id: str, facade: str = "") -> Iterator[saga_pb2.Saga]:
        """The saga now and after each change, until it ends.

        The saga is first read with a deadline (so an unreachable server or an
        unknown saga fails within the timeout); the stream itself has none.
        """
        self.get_saga(request_id, facade)
        request = saga_pb2.WatchSagaRequest(request_id=request_id, facade=facade)
        with self._calling(_SAGA_SERVICE, "WatchSaga"):
            stream = self._sagas.WatchSaga(request, metadata=self._metadata)
            try:
                yield from stream
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

    # SagaAdmin

    def retry_saga(self, request_id: str, note: str, facade: str = "") -> saga_pb2.Saga:
        """Run the saga again from where it stopped."""
        request = saga_pb2.RetrySagaRequest(facade=facade, request_id=request_id, note=note)
        with self._calling(_SAGA_ADMIN, "RetrySaga"):
            return self._admin.RetrySaga(request, metadata=self._metadata, timeout=self._timeout)

    def compensate_saga(self, request_id: str, reason: str, facade: str = "") -> saga_pb2.Saga:
        """Roll a running saga back now."""
        request = saga_pb2.CompensateSagaRequest(
            facade=facade, request_id=request_id, reason=reason
        )
        with self._calling(_SAGA_ADMIN, "CompensateSaga"):
            return self._admin.CompensateSaga(
                request, metadata=self._metadata, timeout=self._timeout
            )

    def resolve_saga(self, request_id: str, note: str, facade: str = "") -> saga_pb2.Saga:
        """Record that the saga was settled by hand."""
        request = saga_pb2.ResolveSagaRequest(facade=facade, request_id=request_id, note=note)
        with self._calling(_SAGA_ADMIN, "ResolveSaga"):
            return self._admin.ResolveSaga(request, metadata=self._metadata, timeout=self._timeout)

    def list_dead_letters(
        self, *, topic: str = "", facade: str = "", state: int = 0, limit: int = 50
    ) -> saga_pb2.ListDeadLettersResponse:
        """Up to `limit` dead letters, newest first, over as many pages as it takes."""
        found = saga_pb2.ListDeadLettersResponse()
        token = ""
        while len(found.dead_letters) < limit:
            request = saga_pb2.ListDeadLettersRequest(
                topic=topic,
                facade=facade,
                state=saga_pb2.DeadLetterState.ValueType(state),
                page_size=min(limit - len(found.dead_letters), MAX_PAGE_SIZE),
                page_token=token,
            )
            with self._calling(_SAGA_ADMIN, "ListDeadLetters"):
                page = self._admin.ListDeadLetters(
                    request, metadata=self._metadata, timeout=self._timeout
                )
            found.dead_letters.extend(page.dead_letters[: limit - len(found.dead_letters)])
            token = page.next_page_token
            if not token:
                break
        found.next_page_token = token
        return found

    def replay_dead_letter(self, dead_letter_id: str, note: str = "") -> saga_pb2.DeadLetter:
        """Put a dead-lettered message back on its topic."""
        request = saga_pb2.ReplayDeadLetterRequest(id=dead_letter_id, note=note)
        with self._calling(_SAGA_ADMIN, "ReplayDeadLetter"):
            return self._admin.ReplayDeadLetter(
                request, metadata=self._metadata, timeout=self._timeout
            )

    def discard_dead_letter(self, dead_letter_id: str, note: str) -> saga_pb2.DeadLetter:
        """Drop a dead-lettered message."""
        request = saga_pb2.DiscardDeadLetterRequest(id=dead_letter_id, note=note)
        with self._calling(_SAGA_ADMIN, "DiscardDeadLetter"):
            return self._admin.DiscardDeadLetter(
                request, metadata=self._metadata, timeout=self._timeout
            )

    # internals

    @contextlib.contextmanager
    def _calling(self, service: str, method: str) -> Iterator[None]:
        """Turn a failed call of `service`/`method` into CallFailed with a one-line message."""
        try:
            yield
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise CallFailed(code, self._message(code, details or "", service, method)) from None

    def _message(self, code: grpc.StatusCode, details: str, service: str, method: str) -> str:
        target = self._connection.target
        if code == grpc.StatusCode.UNIMPLEMENTED:
            text = f"{target} does not serve {service}/{method} ({details})"
        elif code == grpc.StatusCode.UNAVAILABLE:
            text = f"cannot reach {target}: {details}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            text = f"{target} did not answer within {self._connection.timeout:g}s"
        else:
            text = details
        if self._connection.token:
            text = text.replace(self._connection.token, "***")
        return f"{code.name}: {_WHITESPACE.sub(' ', text).strip()}"
