"""The journal's JSON of a protobuf message is protobuf's own JSON mapping, whatever the path."""

from __future__ import annotations

import json

import pytest
from google.protobuf import struct_pb2, timestamp_pb2, wrappers_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from orchestrator._proto_json import message_dict, message_json
from orchestrator.proto import saga_pb2
from pb.booking_pb2 import BookingRequest, BookingSyncResponse


def reference(message: Message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True), sort_keys=True)


PLAIN = [
    BookingRequest(),
    BookingRequest(ProductID=1),
    BookingRequest(ProductID=-(2**63), Count=2**63 - 1, FaultInject=True),
    BookingSyncResponse(RequestID="req-1", OrderID=7, PaymentID=9),
    BookingSyncResponse(RequestID='é "quoted" \\ \n ✓', OrderID=0, PaymentID=-1),
]


@pytest.mark.parametrize("message", PLAIN, ids=lambda m: type(m).__name__)
def test_a_message_of_plain_scalars_is_written_as_protobuf_writes_it(message: Message) -> None:
    assert message_json(message) == reference(message)
    assert message_dict(message) == MessageToDict(message, preserving_proto_field_name=True)


def test_sixty_four_bit_integers_are_strings_as_in_protobufs_json_mapping() -> None:
    assert message_dict(BookingSyncResponse(OrderID=7)) == {"OrderID": "7"}


def test_fields_at_their_default_are_left_out() -> None:
    assert message_json(BookingSyncResponse(RequestID="", OrderID=0)) == "{}"


OTHERS = [
    timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5),  # an RFC 3339 string
    wrappers_pb2.Int64Value(value=3),  # the bare value
    struct_pb2.Struct(fields={"a": struct_pb2.Value(number_value=1.5)}),
]


@pytest.mark.parametrize("message", OTHERS, ids=lambda m: type(m).__name__)
def test_a_well_known_type_keeps_its_own_json_form(message: Message) -> None:
    assert message_json(message) == reference(message)


def test_a_message_with_nested_repeated_or_enum_fields_is_written_as_protobuf_writes_it() -> None:
    saga = saga_pb2.Saga(
        facade="SyncBooking",
        request_id="req-1",
        state=saga_pb2.COMPENSATED,
        steps=[saga_pb2.Step(name="create_order"), saga_pb2.Step(name="create_payment")],
    )
    assert message_json(saga) == reference(saga)
    assert '"state": "COMPENSATED"' in message_json(saga)
