"""orchestrator: saga orchestration of microservices over gRPC and a message broker.

Facades chain nodes. A sync facade runs its nodes in the caller's request,
passing the protobuf request and response in a Context; an async facade
publishes a JSON DTO from topic to topic through the broker and consumes it
itself; a throttling facade does the same and answers its caller with the
saga's outcome. A node that raises rolls the saga back through the facade's
rollback topic.

The top level holds what a service built on the framework writes against:
the `Orchestrator`, the facades, their nodes and compensations, what a node
runs in and calls upstreams with, the errors a node raises, `RetryPolicy`,
`endpoint` and `run`. The rest lives in namespaces: `orchestrator.config`
(settings), `orchestrator.broker` (brokers), `orchestrator.store` (saga
stores), `orchestrator.testing` (testing a service's own facades), and the
modules that define each name (`orchestrator.server`, `orchestrator.errors`...).
"""

from orchestrator.context import Context, current_step, idempotency_key, step_metadata
from orchestrator.dto import AsyncFacadeContext, Rollback
from orchestrator.endpoint import endpoint
from orchestrator.errors import FailedPrecondition, InvalidArgument, SagaError, Unavailable
from orchestrator.facade import (
    AsyncCompensation,
    AsyncFacade,
    AsyncNode,
    RollbackNode,
    SyncCompensation,
    SyncFacade,
    SyncNode,
    ThrottlingFacade,
)
from orchestrator.registry import Orchestrator
from orchestrator.retry import RetryPolicy, step_timeout
from orchestrator.server import run

__all__ = [
    "AsyncCompensation",
    "AsyncFacade",
    "AsyncFacadeContext",
    "AsyncNode",
    "Context",
    "FailedPrecondition",
    "InvalidArgument",
    "Orchestrator",
    "RetryPolicy",
    "Rollback",
    "RollbackNode",
    "SagaError",
    "SyncCompensation",
    "SyncFacade",
    "SyncNode",
    "ThrottlingFacade",
    "Unavailable",
    "current_step",
    "endpoint",
    "idempotency_key",
    "run",
    "step_metadata",
    "step_timeout",
]
