"""Per-node retry policies, step timeouts and the caller's deadline.

A node is retried only for failures that say "try again" (by default the
gRPC codes UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED, and a step
that timed out); business errors fail the step at once. Retrying is safe
because upstream calls carry a per-step idempotency key.

Each attempt runs under a deadline: the node's own timeout, cut to the share
of the caller's gRPC deadline left for this step. `step_timeout()` tells a
node how long its current attempt has, to pass on to its upstream calls.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

from orchestrator.errors import SagaError

__all__ = ["DEFAULT_RETRYABLE", "NO_RETRY", "RetryPolicy", "caller_deadline", "step_timeout"]

T = TypeVar("T")

DEFAULT_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""The gRPC codes retried by default: the upstream may succeed if asked again."""

# Loop-time deadlines, per task: asyncio copies the context into every task.
_step_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "orchestrator_step_deadline", default=None
)
caller_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "orchestrator_caller_deadline", default=None
)
"""The loop time by which the current gRPC caller wants its answer; set by `@endpoint`."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a node is retried.

    `attempts` counts the first call: 1 means no retry. The n-th retry waits
    `initial_backoff * multiplier**(n-1)`, capped at `max_backoff`, then
    spread by ±`jitter` (a fraction) so replicas do not retry in step.
    """

    attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retryable: frozenset[grpc.StatusCode] = field(default=DEFAULT_RETRYABLE)
    any_error: bool = False
    """Retry every failure, whatever it is (compensations must succeed)."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts counts the first call: at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must not be negative and the multiplier at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction from 0 to 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        return base * (1 + random.uniform(-self.jitter, self.jitter))

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether `exc` says the same call may succeed later."""
        if self.any_error:
            return True
        if isinstance(exc, grpc.aio.AioRpcError):
            return exc.code() in self.retryable
        if isinstance(exc, SagaError):
            return exc.code in self.retryable
        if isinstance(exc, TimeoutError):
            return grpc.StatusCode.DEADLINE_EXCEEDED in self.retryable
        return False


NO_RETRY = RetryPolicy(attempts=1)
"""Call once; for nodes whose effect must never be repeated."""


def step_timeout(default: float | None = None) -> float | None:
    """Seconds the current attempt has left, at most `default`; `default` outside any step.

    Pass it as the `timeout` of upstream calls, so a call never outlives its
    step nor the caller's deadline.
    """
    deadline = _step_deadline.get()
    if deadline is None:
        return default
    left = max(deadline - asyncio.get_running_loop().time(), 0.0)
    return left if default is None else min(left, default)


async def call_with_retry(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    attempt_timeout: float | None,
    deadline: float | None,
    on_retry: Callable[[BaseException, int], None],
) -> T:
    """Run `call` under `policy`: each attempt within `attempt_timeout`, all before `deadline`.

    `deadline` is a loop time (None: no limit). A retry that could not start
    before it is not made: the last failure is raised instead.
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        attempt += 1
        now = loop.time()
        ceiling = now + attempt_timeout if attempt_timeout else None
        limits = [limit for limit in (deadline, ceiling) if limit]
        attempt_deadline = min(limits) if limits else None
        token = _step_deadline.set(attempt_deadline)
        try:
            if attempt_deadline is None:  # no timer to arm: spare the context manager
                return await call()
            async with asyncio.timeout_at(attempt_deadline):
                return await call()
        except Exception as exc:
            if attempt >= policy.attempts or not policy.is_retryable(exc):
                raise
            delay = policy.backoff(attempt)
            if deadline is not None and loop.time() + delay >= deadline:
                raise
            on_retry(exc, attempt)
            await asyncio.sleep(delay)
        finally:
            _step_deadline.reset(token)
