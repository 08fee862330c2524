"""A faster binary encoder for the event field lists the bridge's OPC UA server publishes, byte for byte asyncua's."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

from asyncua import ua
from asyncua.ua import ua_binary
from asyncua.ua.ua_binary import Primitives, variant_to_binary

# asyncua 2.1.0 (the [plc] pin) encodes every event through its generic dataclass and Variant encoders: 24 us an
# event of the ResultReady type's 14 fields here, a fifth of the bridge's OPC UA cost per result at line rate.
# Events are the one message the server sends per result, so this one type gets a direct encoder; every other
# type, and any field it does not know, keeps asyncua's.

_V = ua.VariantType
_u32 = struct.Struct("<I").pack
_i32 = struct.Struct("<i").pack
_NULL_ARRAY = _i32(-1)

Packer = Callable[[Any], bytes]


def _prefixed(vt: ua.VariantType, pack: Packer) -> Packer:
    prefix = bytes([vt.value])  # a scalar's encoding byte: the type id, no array bits

    def packed(value: Any) -> bytes:
        return prefix + pack(value)

    return packed


# The scalar types of the result events' fields (and BaseEventType's plain ones), each with asyncua's own packer.
_SCALARS: dict[ua.VariantType, Packer] = {
    vt: _prefixed(vt, getattr(Primitives, vt.name).pack)
    for vt in (_V.Boolean, _V.Int32, _V.UInt32, _V.Int64, _V.UInt64, _V.UInt16, _V.Double, _V.Float, _V.String,
               _V.ByteString, _V.DateTime)
}  # fmt: skip
_SCALARS[_V.Null] = lambda value: b"\x00"


def variant_bytes(v: ua.Variant) -> bytes:
    """asyncua's variant_to_binary, without its generic dispatch for a scalar of a listed type."""
    pack = _SCALARS.get(v.VariantType)
    if pack is not None and not v.is_array and not isinstance(v.Value, (list, tuple)):
        try:
            return pack(v.Value)
        except (struct.error, TypeError, AttributeError, OverflowError):
            pass  # a value that does not fit its type: asyncua's encoder raises its own, clearer error
    return variant_to_binary(v)


def event_field_list(fields: ua.EventFieldList) -> bytes:
    """An EventFieldList (ClientHandle: UInt32, EventFields: Variant array) as asyncua encodes it."""
    values = fields.EventFields
    if values is None:
        return _u32(fields.ClientHandle) + _NULL_ARRAY
    return b"".join([_u32(fields.ClientHandle), _i32(len(values)), *map(variant_bytes, values)])


def install() -> None:
    """Make asyncua encode EventFieldList with event_field_list, in this process; idempotent.

    asyncua's list encoders look their element encoder up through the module's create_type_serializer on first
    use, so this must run before the server publishes its first event (OpcUaOutput calls it before it starts one).
    """
    original = ua_binary.create_type_serializer
    if getattr(original, "tdn_fast", False):
        return

    @functools.cache
    def create_type_serializer(uatype: type) -> Packer:
        return event_field_list if uatype is ua.EventFieldList else original(uatype)

    create_type_serializer.tdn_fast = True  # type: ignore[attr-defined]
    ua_binary.create_type_serializer = create_type_serializer
