"""Who is calling: the principal an authenticated admin or status call runs as.

The server's access interceptor authenticates each call (a bearer token, or
the client certificate of a mutual-TLS connection), checks its role against
the method, and runs the method with the caller bound here, so that what the
method records (an operator action's `actor`) names who did it. Methods called
where access is open run as `ANONYMOUS`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["ANONYMOUS", "Principal", "Role", "bound_principal", "current_principal"]


class Role(enum.IntEnum):
    """What a caller may do; each role includes the ones below it."""

    READ = 1
    """Read sagas and the dead-letter list."""
    OPERATE = 2
    """Act on sagas and dead letters (retry, compensate, resolve, replay, discard)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    name: str
    """Its identity as records and logs show it: a token's name, a certificate's subject.
    Never the secret that proved it."""
    role: Role

    def may(self, role: Role) -> bool:
        """True when this caller holds `role` (or a higher one)."""
        return self.role >= role


ANONYMOUS = Principal("anonymous", Role.OPERATE)
"""The caller of a method whose access is open (no credentials configured)."""

_current: ContextVar[Principal | None] = ContextVar("orchestrator_principal", default=None)


def current_principal() -> Principal:
    """The caller of the method running now; `ANONYMOUS` where access is open."""
    principal = _current.get()
    return ANONYMOUS if principal is None else principal


@contextlib.contextmanager
def bound_principal(principal: Principal) -> Iterator[None]:
    """Run the block as `principal` (the access interceptor wraps each call in this)."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)
