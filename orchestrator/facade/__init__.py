"""Facades: a named chain of nodes, run in process (sync) or through broker topics (async)."""

from orchestrator.facade.async_ import AsyncCompensation, AsyncFacade, AsyncNode
from orchestrator.facade.definition import (
    DEFAULT_COMPENSATION_RETRY,
    RollbackNode,
    SagaDefinition,
    StepDefinition,
)
from orchestrator.facade.sync import SyncCompensation, SyncFacade, SyncNode

__all__ = [
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
]
