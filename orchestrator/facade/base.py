"""What every facade shares: building its definition, its rollback, and its registered runtime.

A facade is a builder until it is registered: `use()` appends steps,
`consume_rollback()` names the rollback topic and node. Registering it with an
Orchestrator freezes that into a `SagaDefinition` and gives the facade the
`SagaRuntime` that runs its sagas; from then on its definition cannot change.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Literal, Self

from orchestrator.config import FacadeKindName
from orchestrator.dto import Rollback
from orchestrator.facade._runtime import SagaRuntime
from orchestrator.facade.definition import (
    DEFAULT_COMPENSATION_RETRY,
    RollbackNode,
    SagaDefinition,
    StepDefinition,
    check_callable,
    check_name,
)
from orchestrator.retry import RetryPolicy
from orchestrator.store import SagaRecord

__all__ = ["FacadeBase"]


class FacadeBase(abc.ABC):
    """A facade before and after it is registered with an Orchestrator."""

    kind: ClassVar[Literal["sync", "async", "throttling"]]
    """The kind it is built as: how its sagas run unless configured otherwise."""
    runs_as: ClassVar[frozenset[FacadeKindName]]
    """The kinds its sagas may be configured to run as (`sagas.facades.<name>.run_as`)."""

    def __init__(self) -> None:
        self._steps: list[StepDefinition] = []
        self._rollback_topic = ""
        self._rollback_node: RollbackNode | None = None
        self._rollback_retry = DEFAULT_COMPENSATION_RETRY
        self._rollback_consumed = False
        self._runtime: SagaRuntime | None = None
        self._definition: SagaDefinition | None = None

    # --- building ------------------------------------------------------------------------

    def _append(
        self,
        node: Callable[..., Awaitable[Any]],
        *,
        name: str | None,
        params: tuple[str, ...],
        retry: RetryPolicy,
        timeout: float | None,
        compensate: Callable[..., Awaitable[None]] | None,
        compensate_params: tuple[str, ...],
        compensate_retry: RetryPolicy,
        topic: str = "",
    ) -> None:
        """Check a node (and its compensation) and append it as the next step."""
        self._check_open()
        step_name = check_name(
            name or str(getattr(node, "__name__", "") or f"step{len(self._steps) + 1}"), "step"
        )
        check_callable(node, "node", step_name, params)
        if compensate is not None:
            check_callable(compensate, "compensation of", step_name, compensate_params)
        if any(step.name == step_name for step in self._steps):
            raise ValueError(f"a step named {step_name!r} is already used; pass name=")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout of step {step_name!r} must be positive")
        self._steps.append(
            StepDefinition(
                index=len(self._steps),
                name=step_name,
                action=node,
                retry=retry,
                timeout=timeout,
                compensation=compensate,
                compensate_retry=compensate_retry,
                topic=topic,
            )
        )

    def consume_rollback(
        self,
        topic: str,
        node: RollbackNode | None = None,
        *,
        retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY,
    ) -> Self:
        """On failure, publish the saga's rollback to `topic` and consume it here.

        The consumer (on any replica) runs the compensations of the steps that
        may have taken effect, in reverse order, then `node` (the Go original's
        facade-level rollback node), each under its retry policy (`retry` for
        the node). Rolling back through a durable topic is what lets a crash
        after the failure lose nothing.
        """
        self._check_open()
        if not topic:
            raise ValueError("the rollback topic must not be empty")
        self._check_rollback_topic(topic)
        if self._rollback_consumed:
            raise ValueError(f"rollback is already consumed from {self._rollback_topic!r}")
        if node is not None:
            check_callable(node, "rollback node", getattr(node, "__name__", "node"), ("rollback",))
        self._rollback_consumed = True
        self._rollback_topic = topic
        self._rollback_node = node
        self._rollback_retry = retry
        return self

    def _check_rollback_topic(self, topic: str) -> None:  # noqa: B027 (kinds may add checks)
        """Refuse a rollback topic this kind of facade cannot use (a step's topic, say)."""

    def _check_open(self) -> None:
        if self._runtime is not None:
            raise RuntimeError(
                f"facade {self._runtime.name!r} is registered: its definition is fixed"
            )

    @property
    def definition(self) -> SagaDefinition:
        """The steps and rollback as built so far, checked (fixed once registered)."""
        if self._definition is not None:
            return self._definition
        return self.definition_as(self.kind)

    def definition_as(self, kind: FacadeKindName) -> SagaDefinition:
        """The definition as built so far, run as `kind`; ValueError naming the kinds it may
        run as when it cannot."""
        if kind not in self.runs_as:
            allowed = ", ".join(sorted(self.runs_as))
            raise ValueError(
                f"a {type(self).__name__} cannot run as {kind!r}: only as {allowed}"
                + (" (its nodes take a protobuf Context, not a DTO)" if self.kind == "sync" else "")
            )
        return SagaDefinition(
            kind=kind,
            steps=tuple(self._steps),
            rollback_topic=self._rollback_topic,
            rollback_node=self._rollback_node,
            rollback_retry=self._rollback_retry,
        )

    @property
    def steps(self) -> list[str]:
        """The step names, in order."""
        return [step.name for step in self._steps]

    @property
    def rollback_topic(self) -> str:
        """The topic its rollback messages go to; empty when it has none."""
        return self._rollback_topic

    # --- registered ----------------------------------------------------------------------

    def attach(self, runtime: SagaRuntime) -> None:
        """Called by Orchestrator registration: the definition is fixed, `runtime` runs it."""
        if self._runtime is not None:
            raise ValueError(f"facade is already registered as {self._runtime.name!r}")
        self._definition = runtime.definition
        self._runtime = runtime

    @property
    def runtime(self) -> SagaRuntime:
        """The engine running this facade's sagas (once registered)."""
        if self._runtime is None:
            raise RuntimeError(f"{type(self).__name__} is not registered with an Orchestrator")
        return self._runtime

    @property
    def name(self) -> str:
        """The name it was registered under ("" before)."""
        return "" if self._runtime is None else self._runtime.name

    async def start(self) -> None:
        """Declare the facade's topics, then consume them (the broker is started)."""
        runtime = self.runtime
        topic = self._rollback_topic
        if topic and runtime.definition.undoes:
            await runtime.broker.declare(topic)
            await runtime.broker.subscribe(topic, runtime.compensation.on_rollback)

    async def wait_for(self, request_id: str) -> SagaRecord:
        """The saga of `request_id` once it has reached a final state (COMPLETED,
        COMPENSATED or COMPENSATION_FAILED); bound the wait with `asyncio.timeout`.
        KeyError when there is no such saga."""
        return await self.runtime.wait_until(
            request_id, lambda saga: saga.finished, past_running=True
        )

    # --- what the engine asks of each kind (see FacadeKind) -------------------------------

    @abc.abstractmethod
    def rollback_data(self, saga: SagaRecord) -> dict[str, Any]:
        """The saga's data as a `Rollback` carries it, rebuilt from the journal."""

    @abc.abstractmethod
    async def compensate(self, step: StepDefinition, rollback: Rollback) -> None:
        """Call `step`'s compensation with the arguments its kind gives it."""

    @abc.abstractmethod
    async def resume(self, saga: SagaRecord, index: int) -> None:
        """Run step `index` of a RUNNING saga again, from the journal (an operator's retry)."""
