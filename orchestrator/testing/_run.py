"""SagaRun: how one saga run by the kit ended, as its caller and its store saw it."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from orchestrator.errors import SagaFailed
from orchestrator.store.records import SagaRecord, SagaState

__all__ = ["SagaRun"]


@dataclass(frozen=True, slots=True)
class SagaRun:
    """How one saga run by `SagaKit.run` ended, as its caller and its store saw it."""

    record: SagaRecord
    """The saga as the store holds it: at its end, or where a crash left it."""
    response: Message | None = None
    """A sync facade's response, when the saga completed."""
    failure: SagaFailed | None = None
    """What a sync facade's caller got when the saga failed (its status and reason)."""
    crashed: bool = False
    """True when the orchestrator crashed before the saga ended (see `SagaKit.recover`)."""

    @property
    def state(self) -> SagaState:
        """The saga's state."""
        return self.record.state
