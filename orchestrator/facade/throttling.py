"""The throttling facade: an async saga whose caller waits for its outcome.

The Go original's throttling flow (`NewThrottlingFlow`, topics marked
`is_throttling`): load levelling for a synchronous API. The caller's request
goes through the broker hop by hop like an async saga, at the pace its
topics' `concurrency` allows on every replica, and the caller gets the saga's
outcome as a normal answer. Everything but the waiting is the async facade's:
the DTO and its routing slip, the topics, the journal's verdict on each hop,
the rollback topic.

The wait does not poll: it reads the saga again only when a write to it is
announced (at once for this replica's writes, and through the store's change
feed for other replicas', which on PostgreSQL is LISTEN/NOTIFY), so a saga
finished by another replica wakes its caller here. It is bounded by the
caller's deadline and `sagas.max_wait_seconds`; when it runs out the caller
gets DEADLINE_EXCEEDED and the saga goes on, bounded by its own deadline.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from orchestrator.config import FacadeKindName
from orchestrator.facade.async_ import AsyncFacade, DtoT

__all__ = ["ThrottlingFacade"]


class ThrottlingFacade(AsyncFacade[DtoT]):
    """Chains nodes through broker topics, like an async facade, and answers with the outcome.

        flow = ThrottlingFacade(dto=BookingMsgDTO)
        flow.use(topic.THROTTLING_CREATE_ORDER, create_order)
        flow.use(topic.THROTTLING_CREATE_PAYMENT, create_payment)
        flow.consume_rollback(topic.CANCEL_THROTTLING_BOOKING, cancel_booking)
        orchestrator.register_throttling_facade("ThrottlingBooking", flow)
        ...
        booked = await flow.run(request_id, dto)  # the final DTO

    Its topics' `concurrency` (per replica) is the pace; `max_length` on its
    first topic and `max_in_flight` bound what is accepted. It may be
    configured to run `inline` (in the caller's task, without the broker),
    never as a plain async facade: its callers need the outcome.
    """

    kind: ClassVar[Literal["sync", "async", "throttling"]] = "throttling"
    runs_as: ClassVar[frozenset[FacadeKindName]] = frozenset({"throttling", "inline"})

    async def run(self, request_id: str, dto: DtoT) -> DtoT:
        """Publish the first hop, record the saga, and wait for its end: the final DTO.

        A failed saga raises SagaFailed with the status it failed with (a
        declined payment is FAILED_PRECONDITION), once its compensation has
        run. A wait that outlives the caller's deadline or
        `sagas.max_wait_seconds` raises DeadlineExceeded; the saga goes on. A
        request id seen before waits on its saga (or answers with its
        outcome at once when it has ended); the same request id with another
        DTO is ALREADY_EXISTS. RESOURCE_EXHAUSTED (`max_in_flight` calls in
        progress here, or the first topic at its `max_length`) and UNAVAILABLE
        (the broker down) refuse the call before anything is recorded.
        """
        return await self._run_to_end(request_id, dto)
