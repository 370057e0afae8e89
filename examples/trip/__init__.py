"""A trip booked as a saga: a seat, a room and a card charge, each with its own compensation.

`python -m examples.trip` books two trips on an embedded orchestrator (the
in-memory broker and store) and shows how each ended; `tests/test_example_trip.py`
tests the facade with the test kit (`orchestrator.testing`).
"""

from examples.trip.saga import ROLLBACK_TOPIC, STEPS, TOPICS, TRIP, TripDTO, register_trip
from examples.trip.services import DECLINED_CARD, TripServices

__all__ = [
    "DECLINED_CARD",
    "ROLLBACK_TOPIC",
    "STEPS",
    "TOPICS",
    "TRIP",
    "TripDTO",
    "TripServices",
    "register_trip",
]
