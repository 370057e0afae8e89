"""Faults at saga boundaries: a step that fails, an answer lost after its effect, a crash.

A test arms a fault on a step by name (`kit.faults.fail("pay")`); the kit
runs every facade with each node and compensation wrapped by `Faults`, which
consults what is armed on every call. A fault fires where a real one would:

- `fail`: the node is not called, the step raises (the upstream refused);
- `lose_answer`: the node runs (its effect happened), then the step raises as
  if the answer never came back (UNAVAILABLE, a timeout);
- `crash_after`: the node runs, then the orchestrator dies before it records
  the step's end; the kit's `recover()` starts another on the same store;
- `fail_compensation`: a compensation raises instead of undoing its step.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.context import StepScope, current_step
from orchestrator.errors import FailedPrecondition, Unavailable
from orchestrator.facade.definition import SagaDefinition, StepDefinition
from orchestrator.store.records import IN_PROCESS_KINDS

__all__ = ["Fault", "FaultKind", "Faults", "SimulatedCrash"]

FaultKind = Literal["fail", "lose_answer", "crash_after", "fail_compensation"]
"""What an armed fault does: see the `Faults` method of each name."""


class SimulatedCrash(BaseException):
    """The orchestrator running a sync saga died right after a step (`crash_after`).

    Raised through the saga's caller as the process' death would end it: a
    BaseException, so the engine's handlers (which roll back on errors and on
    cancellation) let it pass and the journal stays as the crash left it.
    `SagaKit.run` catches it; a test running a sync facade by itself sees it.
    """

    def __init__(self, scope: StepScope) -> None:
        super().__init__(
            f"the orchestrator crashed after {scope.step} of {scope.facade}/{scope.request_id}"
        )
        self.scope = scope


@dataclass(slots=True)
class Fault:
    """One armed fault: where it applies, what it raises, and how often it fired."""

    kind: FaultKind
    step: str
    """The step's name, as registered."""
    facade: str | None = None
    """Only this facade's step of that name (None: any facade)."""
    request_id: str | None = None
    """Only this saga's (None: every saga)."""
    times: int | None = None
    """It fires on the first `times` calls it matches, then no more (None: on every one)."""
    error: Exception | None = None
    """What the step raises (None: the kind's default, naming the step)."""
    hits: int = 0
    """How many calls it fired on so far."""

    @property
    def spent(self) -> bool:
        """Whether it has fired as often as it may."""
        return self.times is not None and self.hits >= self.times

    def applies_to(self, scope: StepScope) -> bool:
        """Whether it fires on a call of `scope` (and is not spent)."""
        return (
            not self.spent
            and scope.step == self.step
            and self.facade in (None, scope.facade)
            and self.request_id in (None, scope.request_id)
        )

    def raised(self) -> Exception:
        """The exception the step raises when it fires."""
        if self.error is not None:
            return self.error
        if self.kind == "fail":
            return FailedPrecondition(f"fault injected: {self.step} failed")
        if self.kind == "lose_answer":
            return Unavailable(f"fault injected: the answer of {self.step} was lost")
        return Unavailable(f"fault injected: the compensation of {self.step} failed")


class Faults:
    """The faults armed on a kit's facades; they hold across `SagaKit.recover()`.

    Arm them before or after the kit starts: each call of a node or
    compensation looks at what is armed then. A step name is checked against
    the registered facades when the kit starts, or at once once it has.
    """

    def __init__(self, on_crash: Callable[[StepScope], None]) -> None:
        self._on_crash = on_crash
        self._armed: list[Fault] = []
        self._steps: Mapping[str, Sequence[str]] | None = None

    @property
    def armed(self) -> list[Fault]:
        """Every fault armed so far (spent ones included), oldest first."""
        return list(self._armed)

    def fail(
        self,
        step: str,
        *,
        error: Exception | None = None,
        times: int | None = None,
        facade: str | None = None,
        request_id: str | None = None,
    ) -> Fault:
        """Make `step` raise `error` without calling its node: the upstream refused.

        By default a `FailedPrecondition` (a business refusal: not retried, the
        saga rolls back, the step is not compensated). An error the step's retry
        policy retries (`Unavailable`, say) with `times` below its attempts
        makes the step succeed on a later attempt.
        """
        return self._arm(Fault("fail", step, facade, request_id, times, error))

    def lose_answer(
        self,
        step: str,
        *,
        error: Exception | None = None,
        times: int | None = None,
        facade: str | None = None,
        request_id: str | None = None,
    ) -> Fault:
        """Call `step`'s node, then raise `error` as if its answer was lost on the way back.

        The effect happened; the engine sees an `Unavailable` by default (pass
        `TimeoutError()` for a timeout). Both are retried by the default policy,
        so the node is called again (it must be idempotent); with `times=1` the
        retry gets its answer and the saga goes on, without it every attempt
        loses its answer and the saga rolls back, compensating this step too.
        """
        return self._arm(Fault("lose_answer", step, facade, request_id, times, error))

    def crash_after(
        self, step: str, *, facade: str | None = None, request_id: str | None = None
    ) -> Fault:
        """Let `step`'s node run, then kill the orchestrator before it records the step's end.

        It fires once. The journal shows the step still running; the broker
        keeps what it held (the hop being handled goes back to its topic).
        `SagaKit.recover()` starts a new orchestrator on the same store and
        broker, which drives the saga to an end: a sync saga is rolled back
        (the step included), an async hop is delivered again and run again.
        """
        return self._arm(Fault("crash_after", step, facade, request_id, 1, None))

    def fail_compensation(
        self,
        step: str,
        *,
        error: Exception | None = None,
        times: int | None = None,
        facade: str | None = None,
        request_id: str | None = None,
    ) -> Fault:
        """Make `step`'s compensation raise `error` (an `Unavailable` by default) instead of
        running; `rollback` names the facade's rollback node. Both are retried whatever the
        error (`compensate_retry`, `consume_rollback(retry=)`): fewer `times` than their
        attempts still compensates; more ends COMPENSATION_FAILED."""
        return self._arm(Fault("fail_compensation", step, facade, request_id, times, error))

    def clear(self) -> None:
        """Disarm every fault."""
        self._armed.clear()

    def _arm(self, fault: Fault) -> Fault:
        if fault.times is not None and fault.times < 1:
            raise ValueError(f"times must be at least 1 (or None for every call): {fault.times}")
        if self._steps is not None:
            self._check(fault, self._steps)
        self._armed.append(fault)
        return fault

    # --- the kit's side ------------------------------------------------------------------

    def registered(self, steps: Mapping[str, Sequence[str]]) -> None:
        """The kit started with these facades and their step names: check what is armed."""
        for fault in self._armed:
            self._check(fault, steps)
        self._steps = steps

    @staticmethod
    def _check(fault: Fault, steps: Mapping[str, Sequence[str]]) -> None:
        if fault.facade is not None and fault.facade not in steps:
            raise ValueError(f"no facade named {fault.facade!r} (registered: {sorted(steps)})")
        facades = [fault.facade] if fault.facade is not None else list(steps)
        if not any(fault.step in steps[name] for name in facades):
            known = sorted({step for name in facades for step in steps[name]})
            raise ValueError(f"no step named {fault.step!r} to {fault.kind} (steps: {known})")

    def instrument(self, definition: SagaDefinition) -> SagaDefinition:
        """`definition` with every node and compensation going through the armed faults."""
        steps = tuple(
            dataclasses.replace(
                step,
                action=self._action(step, definition.kind),
                compensation=None if step.compensation is None else self._compensation(step),
            )
            for step in definition.steps
        )
        node = definition.rollback_node
        return dataclasses.replace(
            definition,
            steps=steps,
            rollback_node=None if node is None else self._undo(node),
        )

    def _fire(self, kind: FaultKind, scope: StepScope) -> Fault | None:
        for fault in self._armed:
            if fault.kind == kind and fault.applies_to(scope):
                fault.hits += 1
                return fault
        return None

    def _action(self, step: StepDefinition, kind: str) -> Callable[..., Awaitable[Any]]:
        action = step.action

        async def node(*args: Any) -> Any:
            scope = current_step()
            failed = self._fire("fail", scope)
            if failed is not None:
                raise failed.raised()
            result = await action(*args)
            lost = self._fire("lose_answer", scope)
            if lost is not None:
                raise lost.raised()
            if self._fire("crash_after", scope) is not None:
                self._on_crash(scope)
                if kind in IN_PROCESS_KINDS:  # sync, inline: in the caller's task
                    raise SimulatedCrash(scope)
                # An async (or throttling) hop runs in a broker consumer, which `on_crash`
                # cancelled: the delivery goes back to its topic unacknowledged, nothing is
                # recorded.
                await asyncio.get_running_loop().create_future()
            return result

        return node

    def _compensation(self, step: StepDefinition) -> Callable[..., Awaitable[None]]:
        assert step.compensation is not None
        return self._undo(step.compensation)

    def _undo(self, undo: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """A compensation, or the rollback node (its step is named `rollback`), with faults."""

        async def faulty(*args: Any) -> None:
            fault = self._fire("fail_compensation", current_step())
            if fault is not None:
                raise fault.raised()
            await undo(*args)

        return faulty
