"""Facades of the example booking service: each module registers one with an Orchestrator."""

ASYNC_BOOKING = "AsyncBooking"
SYNC_BOOKING = "SyncBooking"
THROTTLING_BOOKING = "ThrottlingBooking"
