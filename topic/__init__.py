"""Topic names of the example booking service (the Go original's `topic` package)."""

# Sync
CANCEL_SYNC_BOOKING = "cancel_sync_booking"

# Async
CREATE_ORDER = "create_order"
CREATE_PAYMENT = "create_payment"
CANCEL_ASYNC_BOOKING = "cancel_async_booking"
