"""How the PostgreSQL store's hot sessions plan their statements: each execution anew while
its tables are small, and once made for all executions when they have filled.

asyncpg prepares each statement once per connection, and PostgreSQL may keep a
generic plan of it (made without the parameters' values) for the connection's
life. Made on small tables, such a plan is a trap: a table of a few pages is
read whole as cheaply as through an index, and a saga's key is found through
the listing index (facade, state, created_at, request_id) as cheaply as
through `uq_sagas_key`; kept, the same plan reads every saga ever recorded
once they pile up. So every session of the store starts planning each
execution (`PLANNED_PER_EXECUTION`), which costs the database about two thirds
of a point read's CPU and, per batch, more than the one statement's execution.

The writer and the point reads (the hot path) keep their plans once both
`sagas` and `saga_steps` hold `GENERIC_PLANS_FROM` bytes: past a hundred pages
or so every generic plan of theirs finds sagas by their key and steps by
their saga's number, whether or not the tables were ever analyzed (without
statistics the planner sizes a table by its pages), and the threshold keeps
a margin of more than twice that. The writer asks at most every
`CHECK_SECONDS`, between batches, on its own connection (`PlanGate`); tables
never shrink, so once they have filled it stops asking. The listing queries
and the migrations keep planning each execution: they run too seldom to
matter.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "CHECK_SECONDS",
    "GENERIC_PLANS_FROM",
    "PLANNED_PER_EXECUTION",
    "PLANS_KEPT",
    "PlanGate",
]

PLANNED_PER_EXECUTION: Final = {"plan_cache_mode": "force_custom_plan"}
"""A session's settings while the tables are small: each execution planned with its values."""
PLANS_KEPT: Final = {"plan_cache_mode": "auto"}
"""A hot session's settings once the tables have filled: PostgreSQL's default, which keeps
a statement's generic plan after its fifth execution unless planning each one is cheaper."""
GENERIC_PLANS_FROM: Final = 2 * 1024 * 1024
"""Bytes each of `sagas` and `saga_steps` holds before the hot sessions keep their plans
(256 pages; their generic plans turn to the keys' indexes at about 100)."""
CHECK_SECONDS: Final = 10.0
"""How often the writer asks whether the tables have filled, at most."""

_FILLED: Final = "SELECT pg_relation_size('sagas') >= $1 AND pg_relation_size('saga_steps') >= $1"


class PlanGate:
    """Whether the tables have filled (see the module): asked of the database at most every
    `CHECK_SECONDS`, and never again once they have."""

    __slots__ = ("_due", "filled")

    def __init__(self) -> None:
        self.filled = False
        """Whether the hot sessions keep their plans now."""
        self._due = 0.0

    def due(self, now: float) -> bool:
        """Whether to ask again at `now` (monotonic seconds)."""
        return not self.filled and now >= self._due

    async def ask(self, driver: Any, now: float) -> bool:
        """Ask on asyncpg connection `driver` (outside any transaction); whether the tables
        have filled only now."""
        self._due = now + CHECK_SECONDS
        self.filled = bool(await driver.fetchval(_FILLED, GENERIC_PLANS_FROM))
        return self.filled
