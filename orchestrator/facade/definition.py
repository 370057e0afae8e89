"""Saga definitions: what a facade is made of, fixed and checked when it is registered.

A facade is built with `use()` and `consume_rollback()`; registering it with
an Orchestrator freezes what was built into a `SagaDefinition`, which the
engine runs. Every check that can be made before a request arrives is made
here: node shapes, names, topics, and whether the rollback has a topic to
survive a crash on.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from orchestrator.dto import Rollback
from orchestrator.retry import RetryPolicy

__all__ = [
    "DEFAULT_COMPENSATION_RETRY",
    "DEFAULT_RETRY",
    "NAME_PATTERN",
    "RollbackNode",
    "SagaDefinition",
    "StepDefinition",
    "check_callable",
    "check_name",
]

RollbackNode = Callable[[Rollback], Awaitable[None]]
"""`async def node(rollback)`: undoes a failed saga after its steps' compensations."""

DEFAULT_RETRY: Final = RetryPolicy()
"""A node's retry policy unless `use(retry=...)` says otherwise."""
DEFAULT_COMPENSATION_RETRY: Final = RetryPolicy(
    attempts=5, initial_backoff=0.1, max_backoff=2.0, any_error=True
)
"""Compensations and rollback nodes must succeed: every failure is retried, up to five
attempts in about 3 s, before the saga is COMPENSATION_FAILED."""

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
"""Facade and step names: letters, digits, `_`, `.` and `-`. They become parts of
idempotency keys and store keys, so they hold no separator (`:`, `/`) or space."""


def check_name(name: str, what: str) -> str:
    """`name`, or ValueError when it is not a valid facade or step name."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be 1 to 128 letters, digits, '_', '.' or '-'")
    return name


def check_callable(fn: object, what: str, name: str, params: tuple[str, ...]) -> None:
    """Refuse anything but an `async def` taking exactly `params` positionally.

    A plain `def` would return a value where the engine awaits one, and a
    wrong signature would fail only when a request reaches it: both are
    caught here, naming the callable.
    """
    if not callable(fn):
        raise TypeError(f"{what} {name!r} is not callable: {fn!r}")
    if not _is_async(fn):
        raise TypeError(
            f"{what} {name!r} must be an async def (a coroutine function) taking "
            f"({', '.join(params)}); it is a plain callable"
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    try:
        signature.bind(*params)
    except TypeError:
        raise TypeError(
            f"{what} {name!r} must take ({', '.join(params)}); its signature is {name}{signature}"
        ) from None


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose __call__ is an async def.
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


@dataclass(frozen=True, slots=True)
class StepDefinition:
    """One step of a saga: its node, how it is retried and bounded, and how it is undone."""

    index: int
    name: str
    action: Callable[..., Awaitable[Any]]
    """The node (sync: `(request_id, ctx)`; async: `(dto) -> dto`)."""
    retry: RetryPolicy = DEFAULT_RETRY
    timeout: float | None = None
    """Bound of each attempt, in seconds (the caller's deadline may cut it shorter)."""
    compensation: Callable[..., Awaitable[None]] | None = None
    """Undoes the step once it may have taken effect (same arguments as the node)."""
    compensate_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    topic: str = ""
    """The topic an async step's message travels on ("" for a sync step)."""


@dataclass(frozen=True, slots=True)
class SagaDefinition:
    """A facade's steps and rollback, as registered: immutable, checked when made."""

    kind: Literal["sync", "async", "throttling", "inline"]
    """How its sagas run (see `FacadeKindName`); every kind but `sync` hops by topic."""
    steps: tuple[StepDefinition, ...]
    rollback_topic: str = ""
    rollback_node: RollbackNode | None = None
    rollback_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a facade needs at least one node: call use()")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"step names must be unique: {names}")
        if [step.index for step in self.steps] != list(range(len(self.steps))):
            raise ValueError("steps must be indexed 0, 1, ... in order")
        if self.kind != "sync":
            topics = [step.topic for step in self.steps]
            if not all(topics) or len(set(topics)) != len(topics):
                raise ValueError(f"every async step needs a topic of its own: {topics}")
            if self.rollback_topic in topics:
                raise ValueError(f"the rollback topic {self.rollback_topic!r} is a step's topic")
        if self.undoes and not self.rollback_topic:
            raise ValueError(
                "compensations and a rollback node need a rollback topic to survive a crash: "
                "call consume_rollback(topic)"
            )

    @property
    def undoes(self) -> bool:
        """Whether a rollback has anything to run (a rollback node or a compensation)."""
        return self.rollback_node is not None or any(s.compensation for s in self.steps)

    @property
    def topics(self) -> tuple[str, ...]:
        """Every topic the facade consumes: its steps' (async) and its rollback topic."""
        return tuple(t for t in (*(s.topic for s in self.steps), self.rollback_topic) if t)

    def undoing(self, indexes: tuple[int, ...]) -> bool:
        """Whether undoing the steps `indexes` runs anything."""
        return self.rollback_node is not None or any(
            self.steps[index].compensation is not None for index in indexes
        )
