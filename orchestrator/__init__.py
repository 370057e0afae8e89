"""orchestrator: saga orchestration of microservices over gRPC and RabbitMQ.

Facades chain nodes. A sync facade runs its nodes in the caller's request,
passing the protobuf request and response in a Context; an async facade
publishes a JSON DTO from topic to topic through the broker and consumes it
itself; a throttling facade does the same and answers its caller with the
saga's outcome. A node that raises rolls the saga back through the facade's
rollback topic.
"""

from orchestrator.broker import (
    Broker,
    BrokerUnavailable,
    DeadLetter,
    DeadLetteredMessage,
    Delivery,
    InMemoryBroker,
    UnroutableError,
    broker_from_settings,
)
from orchestrator.config import (
    BrokerSettings,
    GrpcSettings,
    MetricsSettings,
    SagaSettings,
    Settings,
    StoreSettings,
    StrictModel,
    TopicSettings,
    TracingSettings,
    load_settings,
    redact_url,
)
from orchestrator.context import (
    IDEMPOTENCY_KEY_HEADER,
    Context,
    StepScope,
    current_step,
    idempotency_key,
    step_metadata,
)
from orchestrator.dto import AsyncFacadeContext, Rollback
from orchestrator.endpoint import endpoint
from orchestrator.errors import (
    ConfigError,
    FailedPrecondition,
    Failure,
    InvalidArgument,
    SagaError,
    SagaFailed,
    Unavailable,
    classify,
)
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
from orchestrator.logs import configure_logging
from orchestrator.metrics import Metrics
from orchestrator.registry import Orchestrator, UnknownFacadeError
from orchestrator.request_id import REQUEST_ID_HEADER, new_request_id, resolve_request_id
from orchestrator.retry import DEFAULT_RETRYABLE, NO_RETRY, RetryPolicy, step_timeout
from orchestrator.server import GrpcService, OrchestratorServer, run
from orchestrator.tracing import configure_tracing

__all__ = [
    "DEFAULT_RETRYABLE",
    "IDEMPOTENCY_KEY_HEADER",
    "NO_RETRY",
    "REQUEST_ID_HEADER",
    "AsyncCompensation",
    "AsyncFacade",
    "AsyncFacadeContext",
    "AsyncNode",
    "Broker",
    "BrokerSettings",
    "BrokerUnavailable",
    "ConfigError",
    "Context",
    "DeadLetter",
    "DeadLetteredMessage",
    "Delivery",
    "FailedPrecondition",
    "Failure",
    "GrpcService",
    "GrpcSettings",
    "InMemoryBroker",
    "InvalidArgument",
    "Metrics",
    "MetricsSettings",
    "Orchestrator",
    "OrchestratorServer",
    "RetryPolicy",
    "Rollback",
    "RollbackNode",
    "SagaError",
    "SagaFailed",
    "SagaSettings",
    "Settings",
    "StepScope",
    "StoreSettings",
    "StrictModel",
    "SyncCompensation",
    "SyncFacade",
    "SyncNode",
    "ThrottlingFacade",
    "TopicSettings",
    "TracingSettings",
    "Unavailable",
    "UnknownFacadeError",
    "UnroutableError",
    "broker_from_settings",
    "classify",
    "configure_logging",
    "configure_tracing",
    "current_step",
    "endpoint",
    "idempotency_key",
    "load_settings",
    "new_request_id",
    "redact_url",
    "resolve_request_id",
    "run",
    "step_metadata",
    "step_timeout",
]
