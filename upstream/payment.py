"""The demo PaymentService: takes payments and refunds them."""

from __future__ import annotations

import grpc

from pb import payment_pb2, payment_pb2_grpc
from upstream.ledger import Ledger, PaymentRecord
from upstream.order import (
    FaultInjector,
    create_or_abort,
    find_one,
    for_request,
    idempotency_key,
)


def _to_proto(record: PaymentRecord) -> payment_pb2.Payment:
    return payment_pb2.Payment(
        PaymentID=record.id,
        RequestID=record.request_id,
        OrderID=record.order_id,
        Amount=record.amount,
        Status=payment_pb2.PaymentStatus.Value(record.status),
    )


class PaymentServicer(payment_pb2_grpc.PaymentServiceServicer):
    """``pb.PaymentService`` over a :class:`~upstream.ledger.Ledger`, for ``grpc.aio`` servers."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        latency_ms: float = 0,
        fail_rate: float = 0,
        fail_after_apply_rate: float = 0,
    ) -> None:
        self._ledger = ledger
        self._faults = FaultInjector(
            latency_ms=latency_ms, fail_rate=fail_rate, fail_after_apply_rate=fail_after_apply_rate
        )

    async def CreatePayment(
        self,
        request: payment_pb2.CreatePaymentRequest,
        context: grpc.aio.ServicerContext[payment_pb2.CreatePaymentRequest, payment_pb2.Payment],
    ) -> payment_pb2.Payment:
        """Take a PAID payment; the same ``x-idempotency-key`` returns the same payment.

        ``FaultInject`` declines with FAILED_PRECONDITION and records nothing,
        standing in for a business failure the saga must compensate. ABORTED,
        recording nothing, when RequestID or the key was already refunded and
        the key made no payment before.
        """
        rid = request.RequestID
        await self._faults.before_call(context, rid)
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "RequestID is required")
        if request.OrderID <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                for_request(f"OrderID must be > 0, got {request.OrderID}", rid),
            )
        if request.Amount < 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                for_request(f"Amount must be >= 0, got {request.Amount}", rid),
            )
        if request.FaultInject:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                for_request("payment declined (fault injected)", rid),
            )
        key = idempotency_key(context)
        record = await create_or_abort(
            context,
            lambda: self._ledger.create_payment(
                rid, request.OrderID, request.Amount, idempotency_key=key
            ),
        )
        await self._faults.after_apply(context, rid)
        return _to_proto(record)

    async def RefundPayment(
        self,
        request: payment_pb2.RefundPaymentRequest,
        context: grpc.aio.ServicerContext[payment_pb2.RefundPaymentRequest, payment_pb2.Payment],
    ) -> payment_pb2.Payment:
        """Refund the payment of IdempotencyKey, or else by PaymentID, or else all of RequestID.

        By IdempotencyKey it refunds only the payment that key's create made and
        tombstones the key (a key that made nothing gets an empty Payment: nothing
        to undo); by RequestID it refunds them all (returning the latest) and
        tombstones the request id, NOT_FOUND when there is none. Either tombstone
        is left whatever was found, so a payment arriving later is refused.
        """
        await self._faults.before_call(context, request.RequestID)
        if request.IdempotencyKey:
            record = self._ledger.refund_payment_by_key(request.IdempotencyKey)
            return payment_pb2.Payment() if record is None else _to_proto(record)
        record = await find_one(
            context,
            "payment",
            request.PaymentID,
            request.RequestID,
            by_id=self._ledger.refund_payment,
            by_request=self._ledger.refund_payments_of,
        )
        return _to_proto(record)

    async def GetPayment(
        self,
        request: payment_pb2.GetPaymentRequest,
        context: grpc.aio.ServicerContext[payment_pb2.GetPaymentRequest, payment_pb2.Payment],
    ) -> payment_pb2.Payment:
        """Find a payment by PaymentID, or else the latest of RequestID; NOT_FOUND when none."""
        await self._faults.before_call(context, request.RequestID)
        record = await find_one(
            context,
            "payment",
            request.PaymentID,
            request.RequestID,
            by_id=self._ledger.get_payment,
            by_request=self._ledger.latest_payment_of,
        )
        return _to_proto(record)
