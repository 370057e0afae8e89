"""Payloads the framework itself defines: the async routing slip and the rollback message."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AsyncFacadeContext", "Rollback"]


class AsyncFacadeContext(BaseModel):
    """The routing slip every async DTO extends.

    It travels with the DTO as JSON (the Go original's field names), so any
    orchestrator replica can take the next hop: `topics` lists the facade's
    node topics in order and `current_index` says which one the message is for.
    """

    model_config = ConfigDict(validate_assignment=False)

    request_id: str = Field(min_length=1, max_length=128)
    current_index: int = Field(default=0, ge=0)
    topics: list[str] = Field(default_factory=list)
    rollback_topic: str = ""


class Rollback(BaseModel):
    """What a rollback node receives: which saga failed, where, why, and its data.

    `data` is the saga's state when it failed: for an async facade the DTO as
    JSON, for a sync facade the protobuf request and partial response as JSON.
    """

    request_id: str
    facade: str
    kind: Literal["sync", "async"]
    failed_step: str
    code: str
    """The gRPC status name the saga failed with."""
    reason: str
    data: dict[str, Any] = Field(default_factory=dict)
    completed_steps: list[str] = Field(default_factory=list)
    """The steps that finished before the failure, in order; their compensations run in reverse."""
