"""What a node runs in: the sync facade's Context, and the step the engine is running.

The engine knows which saga and which step a node, a compensation or a
rollback node is running for, so nodes never retype step names: they ask for
the step's upstream metadata, which carries the request id and an
idempotency key unique to that saga's step.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from google.protobuf.message import Message

from orchestrator import tracing

__all__ = [
    "IDEMPOTENCY_KEY_HEADER",
    "Context",
    "StepScope",
    "current_step",
    "idempotency_key",
    "step_metadata",
]

IDEMPOTENCY_KEY_HEADER = "x-idempotency-key"
"""The gRPC metadata key an upstream dedupes on."""

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)

Phase = Literal["action", "compensation", "rollback"]


@dataclass(frozen=True, slots=True)
class StepScope:
    """The saga and step the engine is running now (a node, a compensation, a rollback node)."""

    facade: str
    request_id: str
    step: str
    """The step's name; `rollback` for the facade's rollback node."""
    phase: Phase

    def key_of(self, step: str) -> str:
        """The idempotency key the action of `step` uses in this saga.

        `<facade>:<request id>:<step>`: facade and step names hold no `:`, so two
        sagas (another facade, or another request id) never share a key.
        """
        return f"{self.facade}:{self.request_id}:{step}"

    @property
    def action_key(self) -> str:
        """The idempotency key of this step's action: what its compensation undoes by."""
        return self.key_of(self.step)

    @property
    def key(self) -> str:
        """The idempotency key of what runs now: a step's action, its compensation
        (`...:<step>:compensation`) or the rollback node (`...:rollback`)."""
        if self.phase == "action":
            return self.key_of(self.step)
        if self.phase == "compensation":
            return f"{self.key_of(self.step)}:compensation"
        return self.key_of("rollback")


_scope: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar(
    "orchestrator_step_scope", default=None
)


def current_step() -> StepScope:
    """The step running now; RuntimeError outside a node, compensation or rollback node."""
    scope = _scope.get()
    if scope is None:
        raise RuntimeError(
            "no saga step is running: step_metadata() and idempotency_key() work inside a "
            "node, a compensation or a rollback node"
        )
    return scope


def enter_step(scope: StepScope) -> contextvars.Token[StepScope | None]:
    """Make `scope` the running step (the engine's; reset with `leave_step`)."""
    return _scope.set(scope)


def leave_step(token: contextvars.Token[StepScope | None]) -> None:
    """Undo `enter_step`."""
    _scope.reset(token)


def idempotency_key(step: str | None = None) -> str:
    """The idempotency key of what runs now, or of the action of `step` in the same saga.

    A compensation or rollback node that undoes a create by its key (so it
    undoes exactly that create, even when its answer was lost) asks for the
    key of the step that created it: `idempotency_key("create_order")`.
    """
    scope = current_step()
    return scope.key if step is None else scope.key_of(step)


def step_metadata() -> tuple[tuple[str, str], ...]:
    """gRPC metadata for an upstream call made by the step running now.

    The request id, and the idempotency key of this saga's step, stable across
    retries and redeliveries, so an upstream that honours it applies the call
    once. With tracing on, the trace context rides along (`traceparent`).
    """
    scope = current_step()
    metadata = (("x-request-id", scope.request_id), (IDEMPOTENCY_KEY_HEADER, scope.key))
    trace_context = tracing.inject()
    return metadata + tuple(trace_context.items()) if trace_context else metadata


class Context(Generic[RequestT, ResponseT]):
    """The protobuf request and the response being built, shared by a sync facade's nodes.

    It replaces the Go original's `LoadPbReq`/`SetPbResp`: nodes read
    `ctx.request` and write `ctx.response` directly, typed.
    """

    __slots__ = ("facade", "request", "request_id", "response")

    def __init__(
        self, request_id: str, request: RequestT, response: ResponseT, facade: str = ""
    ) -> None:
        self.request_id = request_id
        self.request = request
        self.response = response
        self.facade = facade
