"""Unit tests for the bridge's faster wire paths: the OPC UA event encoder and the MQTT 3.1.1 PUBACK path."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from asyncua import ua
from asyncua.common.utils import Buffer
from asyncua.ua import ua_binary

from simulators.plc import uabinary
from simulators.plc.mqtt import ReadAheadClient
from simulators.plc.opcua import EVENT_FIELDS, _variant

V = ua.VariantType


def generic(fields: ua.EventFieldList) -> bytes:
    """asyncua's own encoding of an EventFieldList: its dataclass encoder (install() leaves that one alone)."""
    return ua_binary.create_dataclass_serializer(ua.EventFieldList)(fields)


def result_event(handle: int = 7) -> ua.EventFieldList:
    """A ResultReady event's fields as the bridge builds them, with EventId and Time."""
    values: dict[str, Any] = {
        "CameraId": "cam1", "ResultId": "cam1:3:41", "Seq": 41, "PartId": "p-41", "Decision": "divert",
        "ResultState": 2, "ClassName": "crazing", "Confidence": 0.9871, "ModelId": "tinydefectnet-3f2a/litert-int8",
        "AgentEpoch": 3, "ResultCounter": 2**40, "PublishedNs": 1_796_660_000_123_456_789,
    }  # fmt: skip
    fields = [_variant(values[name], vt) for name, vt in EVENT_FIELDS]
    fields += [_variant(b"\x01" * 16, V.ByteString), _variant(datetime(2026, 12, 7, 17, 0, 1, 250, UTC), V.DateTime)]
    return ua.EventFieldList(ClientHandle=handle, EventFields=fields)


class TestEventFieldListEncoder:
    def test_result_event_is_byte_for_byte_asyncuas(self) -> None:
        """The bridge's ResultReady event encodes to exactly asyncua's bytes, and decodes back to its values."""
        ev = result_event()
        data = uabinary.event_field_list(ev)
        assert data == generic(ev)
        back = ua_binary.struct_from_binary(ua.EventFieldList, Buffer(data))
        assert back.ClientHandle == 7 and [v.Value for v in back.EventFields] == [v.Value for v in ev.EventFields]

    @pytest.mark.parametrize("variant", [
        ua.Variant(None, V.Null), ua.Variant(None, V.String), ua.Variant("", V.String), ua.Variant("Zoë ✓", V.String),
        ua.Variant(None, V.ByteString), ua.Variant(True, V.Boolean), ua.Variant(-5, V.Int32),
        ua.Variant(2**32 - 1, V.UInt32), ua.Variant(-(2**63), V.Int64), ua.Variant(2**64 - 1, V.UInt64),
        ua.Variant(7, V.UInt16), ua.Variant(1.5, V.Float), ua.Variant(float("inf"), V.Double),
        ua.Variant(ua.LocalizedText("result"), V.LocalizedText), ua.Variant(ua.NodeId(2041, 0), V.NodeId),
        ua.Variant([1, 2, 3], V.UInt64), ua.Variant(["a", None], V.String), ua.Variant([[1, 2], [3, 4]], V.Int32),
        ua.Variant(ua.StatusCode(0), V.StatusCode), ua.Variant(500, V.UInt16),
    ], ids=lambda v: f"{v.VariantType.name}:{v.Value!r}"[:40])  # fmt: skip
    def test_every_field_kind_matches(self, variant: ua.Variant) -> None:
        """Scalars of the listed types, the types it leaves to asyncua, arrays and nulls: the same bytes."""
        ev = ua.EventFieldList(ClientHandle=1, EventFields=[variant, variant])
        assert uabinary.event_field_list(ev) == generic(ev)

    def test_no_fields_and_null_list(self) -> None:
        """An empty field list and a null one encode as asyncua encodes them (length 0, length -1)."""
        for fields in ([], None):
            ev = ua.EventFieldList(ClientHandle=3, EventFields=fields)  # type: ignore[arg-type]
            assert uabinary.event_field_list(ev) == generic(ev)

    def test_a_value_not_of_its_type_raises_asyncuas_error(self) -> None:
        """A float declared Int32 is asyncua's UaError naming the type, not a bare struct.error."""
        bad = _variant(1.5, V.Int32)
        with pytest.raises(ua.UaError, match="Int32"):
            uabinary.variant_bytes(bad)

    def test_install_routes_event_field_lists_and_is_idempotent(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """After install (twice), asyncua's type lookup gives event_field_list for EventFieldList, its own encoders
        for other types, and the events keep asyncua's bytes."""
        original = ua_binary.create_type_serializer
        monkeypatch.setattr(ua_binary, "create_type_serializer", original)  # restored after the test
        events = [result_event(1), result_event(2)]
        expected = b"".join(original(ua.EventFieldList)(e) for e in events)
        uabinary.install()
        first = ua_binary.create_type_serializer
        uabinary.install()
        assert ua_binary.create_type_serializer is first
        assert first(ua.EventFieldList) is uabinary.event_field_list
        assert first(ua.Variant) is original(ua.Variant)
        assert b"".join(first(ua.EventFieldList)(e) for e in events) == expected


class TestPubackFastPath:
    @pytest.fixture
    def client(self) -> Any:
        c = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id="unit", protocol=mqtt.MQTTv311)
        c.published = []
        c.on_publish = lambda _c, _u, mid, reason, props: c.published.append((mid, reason.value))
        return c

    @staticmethod
    def puback(client: Any, body: bytes) -> Any:
        client._in_packet = {"command": 0x40, "packet": body}
        return client._handle_pubackcomp("PUBACK")

    def test_known_mid_is_published_once(self, client: Any) -> None:
        """A 3.1.1 PUBACK of a message in flight calls on_publish with its mid and success, and frees it."""
        info = client.publish("tdn/line1/cam1/verdict", b"{}", qos=1)  # not connected: kept in flight
        assert info.mid in client._out_messages
        assert self.puback(client, info.mid.to_bytes(2, "big")) == 0
        assert client.published == [(info.mid, 0)] and info.mid not in client._out_messages
        assert self.puback(client, info.mid.to_bytes(2, "big")) == 0  # a duplicate: nothing more
        assert client.published == [(info.mid, 0)]

    def test_malformed_puback_takes_pahos_path(self, client: Any) -> None:
        """A PUBACK of 3 bytes is paho's MalformedPacket, as without the fast path."""
        with pytest.raises(mqtt.MalformedPacket):
            self.puback(client, b"\x00\x01\x02")
