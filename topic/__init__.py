"""Topic names of the example booking service (the Go original's `topic` package)."""

# Sync
CANCEL_SYNC_BOOKING = "cancel_sync_booking"

# Async
CREATE_ORDER = "create_order"
CREATE_PAYMENT = "create_payment"
CANCEL_ASYNC_BOOKING = "cancel_async_booking"

# Throttling: its own topics, so their concurrency paces this facade alone
THROTTLING_CREATE_ORDER = "throttling_create_order"
THROTTLING_CREATE_PAYMENT = "throttling_create_payment"
CANCEL_THROTTLING_BOOKING = "cancel_throttling_booking"
