"""Facades: a named chain of nodes, run in process (sync) or through broker topics (async)."""

from orchestrator.facade.async_ import AsyncFacade, AsyncNode, SagaEndListener
from orchestrator.facade.base import RollbackNode
from orchestrator.facade.sync import SyncFacade, SyncNode

__all__ = ["AsyncFacade", "AsyncNode", "RollbackNode", "SagaEndListener", "SyncFacade", "SyncNode"]
