"""Facades: a named chain of nodes, run in process (sync) or through broker topics (async, and
throttling: its caller waits for the outcome)."""

from orchestrator.facade.async_ import AsyncCompensation, AsyncFacade, AsyncNode
from orchestrator.facade.definition import (
    DEFAULT_COMPENSATION_RETRY,
    RollbackNode,
    SagaDefinition,
    StepDefinition,
)
from orchestrator.facade.sync import SyncCompensation, SyncFacade, SyncNode
from orchestrator.facade.throttling import ThrottlingFacade

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
    "ThrottlingFacade",
]
