"""Errors a saga can end with, and how each maps onto a gRPC status.

Nodes raise whatever they like: returning means next, raising means rollback.
The framework classifies what was raised so the caller gets a status that fits
the cause: a declined payment is FAILED_PRECONDITION, bad input is
INVALID_ARGUMENT, an upstream that is down is UNAVAILABLE, a bug is INTERNAL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
import pydantic

__all__ = [
    "AlreadyExists",
    "BrokerUnavailable",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Failure",
    "InvalidArgument",
    "ResourceExhausted",
    "SagaError",
    "SagaFailed",
    "StartupError",
    "StoreUnavailable",
    "Unavailable",
    "classify",
]


class SagaError(Exception):
    """An error a node raises on purpose; `code` is the gRPC status the caller gets."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(SagaError):
    """The request itself is wrong; retrying it cannot help."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(SagaError):
    """The request is well formed but the system refuses it (a declined payment)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(SagaError):
    """The request id was already used for a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unavailable(SagaError):
    """A transient failure: the same request may succeed later."""

    code = grpc.StatusCode.UNAVAILABLE


class BrokerUnavailable(Unavailable):
    """The broker did not accept or confirm a message in time."""


class ResourceExhausted(SagaError):
    """Admission refused the call: this replica or a queue is full; nothing was started.

    `retry_after` (seconds) is how long the caller should wait before trying
    again; `@endpoint` sends it as the `grpc-retry-pushback-ms` trailer.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(SagaError):
    """A caller's wait for a saga's end ran out; the saga goes on without it."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StoreUnavailable(Unavailable):
    """The saga store's database cannot be reached or opened."""


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and the key."""


class StartupError(ConfigError):
    """A setting's value cannot be used here (a port already in use, a store that cannot
    be reached); the message names the setting and its value, passwords masked."""


# Upstream statuses that describe the caller's request: pass them through.
_CALLER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ABORTED,
    }
)
# Upstream statuses that mean "try again later".
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a step failed: the status the caller gets and a reason safe to show them."""

    code: grpc.StatusCode
    reason: str
    bug: bool = False


def classify(exc: BaseException) -> Failure:
    """Map an exception raised by a node onto the status the caller should get."""
    if isinstance(exc, SagaError):
        return Failure(exc.code, str(exc) or type(exc).__name__)
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        details = exc.details() or code.name
        if code in _CALLER_CODES:
            return Failure(code, details)
        if code in _TRANSIENT_CODES:
            return Failure(grpc.StatusCode.UNAVAILABLE, f"upstream unavailable: {details}")
        return Failure(grpc.StatusCode.INTERNAL, f"upstream failed with {code.name}", bug=True)
    if isinstance(exc, pydantic.ValidationError):
        return Failure(grpc.StatusCode.INVALID_ARGUMENT, _first_validation_error(exc))
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Failure(grpc.StatusCode.UNAVAILABLE, "step timed out")
    if isinstance(exc, asyncio.CancelledError):
        return Failure(grpc.StatusCode.CANCELLED, "cancelled before it finished")
    # A bug: the details stay in the log, the caller learns only its kind.
    return Failure(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})", bug=True)


def _first_validation_error(exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "value"
    return f"{where}: {first['msg']}"


class SagaFailed(Exception):
    """A facade run that stopped at a step; its rollback has been handed to the broker."""

    def __init__(self, *, request_id: str, facade: str, step: str, failure: Failure) -> None:
        self.request_id = request_id
        self.facade = facade
        self.step = step
        self.failure = failure
        super().__init__(self.describe(facade, step, failure.reason, request_id))

    @staticmethod
    def describe(facade: str, step: str, reason: str, request_id: str) -> str:
        """The message a caller reads: the same for a run and for its replay."""
        return f"{facade} failed at {step}: {reason} (request_id={request_id})"

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status the caller gets."""
        return self.failure.code
