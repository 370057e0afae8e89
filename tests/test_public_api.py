"""The public API, pinned: the names each public namespace exports, exactly.

A change to any of these lists is a change to what users import, made on
purpose: edit the list here in the same change, and say so in the README.
The top level holds what a service is written against (about 20 names); the
rest lives in its namespace.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_API: dict[str, list[str]] = {
    "orchestrator": [
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
    ],
    "orchestrator.config": [
        "ENVIRONMENT_VARIABLES",
        "AccessSettings",
        "BrokerSettings",
        "BrokerTlsSettings",
        "ClientCertificateSettings",
        "ConfigError",
        "DeadLetterSettings",
        "FacadeKindName",
        "FacadeSagaSettings",
        "GrpcSettings",
        "MetricsSettings",
        "PemFile",
        "SagaSettings",
        "ServerTlsSettings",
        "Settings",
        "StoreSettings",
        "StrictModel",
        "TokenSettings",
        "TopicSettings",
        "TracingSettings",
        "UiSettings",
        "UiTlsSettings",
        "config_reference",
        "load_settings",
        "redact_url",
    ],
    "orchestrator.broker": [
        "Broker",
        "BrokerUnavailable",
        "DeadLetter",
        "DeadLetteredMessage",
        "Delivery",
        "InMemoryBroker",
        "MessageHandler",
        "QueueFull",
        "UnroutableError",
        "broker_from_settings",
    ],
    "orchestrator.store": [
        "CLAIM_BATCH",
        "FINAL_STATES",
        "IN_PROCESS_KINDS",
        "MAX_PAGE_SIZE",
        "RESOLVABLE",
        "ActionRecord",
        "Change",
        "CompensationEnded",
        "CompensationRetried",
        "CompensationState",
        "DeadLetterPage",
        "DeadLetterRecord",
        "DeadLetterState",
        "InMemorySagaStore",
        "NewDeadLetter",
        "NewSaga",
        "OperatorChange",
        "Position",
        "Resolved",
        "Retried",
        "SagaPage",
        "SagaRecord",
        "SagaState",
        "SagaStore",
        "SqlSagaStore",
        "Stalled",
        "StepEnded",
        "StepFailed",
        "StepPending",
        "StepRecord",
        "StepRestarted",
        "StepState",
        "store_from_url",
    ],
    "orchestrator.store.sql": ["PgChangeFeed", "SqlSagaStore", "WriterStats"],
    "orchestrator.facade": [
        "DEFAULT_COMPENSATION_RETRY",
        "AsyncCompensation",
        "AsyncFacade",
        "AsyncNode",
        "RollbackNode",
        "SagaDefinition",
        "StepDefinition",
        "SyncCompensation",
        "SyncFacade",
        "SyncNode",
        "ThrottlingFacade",
    ],
    "orchestrator.errors": [
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
    ],
    "orchestrator.context": [
        "IDEMPOTENCY_KEY_HEADER",
        "Context",
        "StepScope",
        "current_step",
        "idempotency_key",
        "step_metadata",
    ],
    "orchestrator.retry": [
        "DEFAULT_RETRYABLE",
        "NO_RETRY",
        "RetryPolicy",
        "caller_deadline",
        "step_timeout",
    ],
    "orchestrator.server": [
        "ADMISSION_SERVICE",
        "LIVENESS_SERVICE",
        "GrpcService",
        "OrchestratorServer",
        "run",
    ],
    "orchestrator.workers": [
        "CONFIG_ERROR_STATUS",
        "METRICS_DIR_ENV",
        "WORKER_ENV",
        "WORKER_METADATA",
        "Supervisor",
        "Worker",
        "current_worker",
        "metrics_directory",
        "worker_count",
    ],
    "orchestrator.console": ["ConsoleServer"],
    "orchestrator.testing": [
        "Fault",
        "FaultKind",
        "Faults",
        "Registration",
        "SagaKit",
        "SagaRun",
        "SimulatedCrash",
        "assert_saga",
        "describe",
    ],
}


@pytest.mark.parametrize("namespace", sorted(PUBLIC_API))
def test_a_public_namespace_exports_exactly_its_pinned_names(namespace: str) -> None:
    pinned = PUBLIC_API[namespace]
    module = importlib.import_module(namespace)

    assert sorted(module.__all__) == sorted(pinned)
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("namespace", sorted(PUBLIC_API))
def test_every_pinned_name_is_there_and_every_class_and_function_says_what_it_is(
    namespace: str,
) -> None:
    module = importlib.import_module(namespace)

    for name in PUBLIC_API[namespace]:
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{namespace}.{name} has no docstring"
