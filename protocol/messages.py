"""The protocol's message types, enums, limits and topics; every message validates itself when built."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from protocol.errors import OversizedError, PayloadError, ProtocolError, Reason

PROTOCOL_VERSION = 1

# The reference six-class model's classes (NEU-DET). A model's own class list comes from its card and reaches
# bridges in the heartbeat; this tuple stays for v1 peers, which knew no other list, and for the NEU test cameras.
NEU_CLASSES: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)
# The two-letter codes the NEU-CLS release names its files by (Cr_1.bmp); cameras and the loader share them.
NEU_CLS_PREFIXES: dict[str, str] = {
    "Cr": "crazing",
    "In": "inclusion",
    "Pa": "patches",
    "PS": "pitted_surface",
    "RS": "rolled-in_scale",
    "Sc": "scratches",
}
MAX_CLASSES = 256

MAX_DIM = 4096
# Images one frame message may carry (SPEC 4.1, revision 1.3), stacked as a strip, each answered by its own verdict.
MAX_IMAGES = 256
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_ID_LEN = 64
MAX_TEXT_LEN = 256
# Longest valid topic: "heartbeat/" + 64-char id + "/".
MAX_TOPIC_BYTES = 10 + MAX_ID_LEN + 1
UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Float32 softmax outputs can overshoot 1.0 by an ulp; such values are clamped rather than refused.
_UNIT_TOLERANCE = 1e-6


class Kind(StrEnum):
    """Message kind: the header's "kind" value and the topic's first segment."""

    FRAME = "frame"
    VERDICT = "verdict"
    EXPLAIN = "explain"
    HEARTBEAT = "heartbeat"


class Encoding(StrEnum):
    """How a frame's pixels are stored in its payload frame."""

    GRAY8 = "gray8"
    JPEG = "jpeg"
    PNG = "png"


# Wire value -> member: the codec's fast path looks an encoding up without EnumType.__call__.
ENCODING_OF: dict[str, Encoding] = {e.value: e for e in Encoding}


class Status(StrEnum):
    """Outcome of one accepted frame: inferred, shed unread because too old, or unreadable."""

    OK = "ok"
    SHED = "shed"
    REJECTED = "rejected"


class Decision(StrEnum):
    """What the line does with the part: pass it, divert it, or divert it for a person to review."""

    PASS = "pass"
    DIVERT = "divert"
    REVIEW = "review"


class AgentState(StrEnum):
    """Lifecycle state an agent reports in its heartbeat."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


FRAME_PREFIX = b"frame/"
VERDICT_PREFIX = b"verdict/"
EXPLAIN_PREFIX = b"explain/"
HEARTBEAT_PREFIX = b"heartbeat/"
_PREFIXES: dict[Kind, bytes] = {
    Kind.FRAME: FRAME_PREFIX,
    Kind.VERDICT: VERDICT_PREFIX,
    Kind.EXPLAIN: EXPLAIN_PREFIX,
    Kind.HEARTBEAT: HEARTBEAT_PREFIX,
}


def is_valid_id(value: object) -> bool:
    """Whether value is a camera/agent id: 1..64 chars of [A-Za-z0-9_.-]."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def topic_for(kind: Kind | str, ident: str) -> bytes:
    """The topic frame for a message of this kind about this camera (or agent, for heartbeats)."""
    try:
        prefix = _PREFIXES[Kind(kind)]
    except ValueError:
        raise ProtocolError(Reason.BAD_KIND, detail=f"unknown kind {kind!r}") from None
    check_id("id", ident)
    return prefix + ident.encode("ascii") + b"/"


def parse_topic(topic: bytes) -> tuple[Kind, str]:
    """Split a topic into its kind and camera/agent id; raises ProtocolError(bad_topic) if malformed."""
    if not isinstance(topic, bytes) or len(topic) > MAX_TOPIC_BYTES or not topic.endswith(b"/"):
        raise ProtocolError(Reason.BAD_TOPIC, detail="topic must be <kind>/<id>/")
    head, sep, rest = topic[:-1].partition(b"/")
    try:
        kind = Kind(head.decode("ascii"))
        ident = rest.decode("ascii")
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(Reason.BAD_TOPIC, detail=f"unknown topic {topic[:32]!r}") from None
    if not sep or not is_valid_id(ident):
        raise ProtocolError(Reason.BAD_TOPIC, detail=f"bad id in topic {topic[:32]!r}")
    return kind, ident


# --- field validators: they check, coerce wire/numpy scalars to plain Python, and name the field ---


def check_id(name: str, value: object) -> str:
    """Return value if it is a valid id, else raise ProtocolError(bad_id)."""
    if not is_valid_id(value):
        raise ProtocolError(Reason.BAD_ID, detail=f"{name} must be 1..64 chars of [A-Za-z0-9_.-]")
    assert isinstance(value, str)
    return value


def _int(name: str, value: object, lo: int, hi: int) -> int:
    # numbers.Integral admits numpy ints (which msgpack cannot pack) and excludes floats; bool is refused.
    # The exact-type test first: ABC checks are slow, and every verdict runs a dozen of these.
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be an integer")
    out = int(value)
    if not lo <= out <= hi:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name}={out} outside {lo}..{hi}")
    return out


def _opt_int(name: str, value: object, lo: int, hi: int) -> int | None:
    return None if value is None else _int(name, value, lo, hi)


def _float(name: str, value: object, lo: float, hi: float, tolerance: float = 0.0) -> float:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a number")
    out = float(value)
    if not (math.isfinite(out) and lo - tolerance <= out <= hi + tolerance):
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name}={out} outside {lo}..{hi}")
    return min(max(out, lo), hi)


def _unit(name: str, value: object) -> float:
    return _float(name, value, 0.0, 1.0, _UNIT_TOLERANCE)


def _opt_unit(name: str, value: object) -> float | None:
    return None if value is None else _unit(name, value)


def _text(name: str, value: object, min_len: int = 1, max_len: int = MAX_TEXT_LEN) -> str:
    if not isinstance(value, str):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a string")
    if not min_len <= len(value) <= max_len:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name} must be {min_len}..{max_len} chars")
    return value


def _opt_text(name: str, value: object) -> str | None:
    return None if value is None else _text(name, value)


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a boolean")
    return value


def _opt_label(name: str, value: object) -> str | None:
    # A class name of the line's own model: any 1..64 chars; the agent does not judge it against its classes.
    return None if value is None else _text(name, value, 1, MAX_ID_LEN)


_E = TypeVar("_E", bound=StrEnum)


def _enum(name: str, value: object, enum: type[_E], reason: Reason = Reason.BAD_VALUE) -> _E:
    if type(value) is enum:
        return value
    if not isinstance(value, str):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a string")
    # A dict lookup: EnumType.__call__ is slow, and every frame and verdict decodes two or three of these.
    member = enum._value2member_map_.get(value)
    if member is None:
        raise ProtocolError(reason, detail=f"unknown {name} {value[:32]!r}")
    return member  # type: ignore[return-value]


def _class(name_value: object, index_value: object, n_classes: int = MAX_CLASSES) -> tuple[str, int]:
    index = _int("class_index", index_value, 0, n_classes - 1)
    name = _text("class_name", name_value, 1, MAX_ID_LEN)
    return name, index


def _bytes(name: str, value: object) -> bytes | memoryview:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, memoryview):
        if value.ndim == 1 and value.format == "B" and value.c_contiguous:
            return value
        try:
            # A C-contiguous view of anything (a numpy image, say) becomes a flat byte view without a copy.
            return value.cast("B")
        except (TypeError, ValueError):
            raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a contiguous buffer") from None
    raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be bytes or memoryview")


def _str_map(name: str, value: object, value_kind: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a map")
    out: dict[str, Any] = {}
    for key, item in value.items():
        key_s = _text(f"{name} key", key, 1, MAX_ID_LEN)
        if value_kind is int:
            out[key_s] = _int(f"{name}[{key_s}]", item, 0, UINT64_MAX)
        elif value_kind is float:
            out[key_s] = _float(f"{name}[{key_s}]", item, -math.inf, math.inf)
        else:
            out[key_s] = _text(f"{name}[{key_s}]", item, 0, MAX_TEXT_LEN)
    return out


def _names(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be an array")
    if len(value) > MAX_CLASSES:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name} has more than {MAX_CLASSES} entries")
    out = tuple(_text(f"{name}[]", v, 1, MAX_ID_LEN) for v in value)
    if len(set(out)) != len(out):
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name} has duplicates")
    return out


def _jpeg_dims(data: memoryview) -> tuple[int, int] | None:
    """(width, height) from the first SOF marker, or None when no SOF comes before the scan."""
    pos = 2
    # Real JPEGs have a handful of segments before SOF; the cap bounds the work on hostile input.
    for _ in range(256):
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > len(data) or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2  # markers without a length
            continue
        if marker in (0xD9, 0xDA):
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data) or length < 7:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def _png_dims(data: memoryview) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, which PNG requires to come first."""
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_png(name: str, payload: bytes | memoryview) -> None:
    if len(payload) == 0:
        raise PayloadError(Reason.PAYLOAD_SIZE, detail=f"{name} is empty")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise OversizedError(detail=f"{name} exceeds {MAX_PAYLOAD_BYTES} bytes")
    if bytes(payload[: len(PNG_MAGIC)]) != PNG_MAGIC:
        raise PayloadError(Reason.BAD_ENCODING, detail=f"{name} is not a PNG")


def check_image(encoding: Encoding, width: int, height: int, payload: bytes | memoryview) -> None:
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise OversizedError(detail=f"payload exceeds {MAX_PAYLOAD_BYTES} bytes")
    if encoding is Encoding.GRAY8:
        if size != width * height:
            raise PayloadError(Reason.PAYLOAD_SIZE, detail=f"gray8 payload {size} B != {width}x{height}")
        return
    if size == 0:
        raise PayloadError(Reason.PAYLOAD_SIZE, detail=f"{encoding} payload is empty")
    view = memoryview(payload)
    if encoding is Encoding.JPEG:
        magic_ok = bytes(view[:3]) == JPEG_MAGIC
        dims = _jpeg_dims(view) if magic_ok else None
    else:
        magic_ok = bytes(view[:8]) == PNG_MAGIC
        dims = _png_dims(view) if magic_ok else None
    if dims is None:
        raise PayloadError(Reason.BAD_ENCODING, detail=f"payload is not a readable {encoding} image")
    if dims != (width, height):
        got = f"{dims[0]}x{dims[1]}"
        raise PayloadError(Reason.BAD_DIMS, detail=f"{encoding} image is {got}, header says {width}x{height}")


# --- messages ---


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera image, sent camera -> agent on topic frame/<camera_id>/ with one payload frame."""

    camera_id: str
    seq: int
    capture_ns: int
    width: int
    height: int
    encoding: Encoding
    payload: bytes | memoryview = field(repr=False)
    part_id: str | None = None
    label: str | None = None
    # Revision 1.3: several images stacked top to bottom in one payload (height / images rows each), image i
    # answered as seq + i with part_ids[i] and labels[i]. Written only when not the default (SPEC 4.1).
    images: int = 1
    part_ids: tuple[str | None, ...] | None = None
    labels: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        # frozen: the validators may normalise values (enums, numpy scalars), so they are put back.
        values = _frame_values(self.camera_id, self.seq, self.capture_ns, self.width, self.height, self.encoding,
                               self.payload, self.part_id, self.label, self.images, self.part_ids, self.labels)
        for put, value in zip(_FRAME_SETTERS, values, strict=True):
            put(self, value)

    @classmethod
    def checked(cls, camera_id: object, seq: object, capture_ns: object, width: object, height: object,
                encoding: object, payload: object, part_id: object = None, label: object = None,
                images: object = 1, part_ids: object = None, labels: object = None) -> Frame:
        """The same validation as Frame(...), without the dataclass __init__ that sets each field twice: the
        agent's decoder builds one per received frame."""
        return cls.from_checked(_frame_values(camera_id, seq, capture_ns, width, height, encoding, payload, part_id,
                                              label, images, part_ids, labels))

    def image(self, i: int) -> tuple[int, str | None, str | None]:
        """Image i's seq, part_id and label: what its verdict echoes (a single-image frame is image 0)."""
        if self.images == 1:
            return self.seq, self.part_id, self.label
        return (self.seq + i, self.part_ids[i] if self.part_ids is not None else None,
                self.labels[i] if self.labels is not None else None)

    @classmethod
    def from_checked(cls, values: tuple[Any, ...]) -> Frame:
        """A Frame from field values already checked and normalised, in field order (the codec's fast path)."""
        f = object.__new__(cls)
        for put, value in zip(_FRAME_SETTERS, values, strict=True):
            put(f, value)
        return f


def _slot_setters(cls: type) -> tuple[Callable[[Any, Any], None], ...]:
    """Each field's slot descriptor setter, in field order. It sets a field of a frozen slots dataclass without
    the frozen __setattr__ and its name lookup: half the cost of object.__setattr__, paid per field per frame."""
    return tuple(cls.__dict__[name].__set__ for name in cls.__dataclass_fields__)  # type: ignore[attr-defined]


_FRAME_SETTERS = _slot_setters(Frame)


def _dim(name: str, value: object) -> int:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be an integer")
    if not 1 <= int(value) <= MAX_DIM:
        raise ProtocolError(Reason.BAD_DIMS, detail=f"{name}={value} outside 1..{MAX_DIM}")
    return int(value)


def _frame_values(camera_id: object, seq: object, capture_ns: object, width: object, height: object,
                  encoding: object, payload: object, part_id: object, label: object, images: object = 1,
                  part_ids: object = None, labels: object = None) -> tuple[Any, ...]:
    """Every field of a Frame checked and normalised (SPEC 4.1), in field order; ProtocolError for the first bad one."""
    values = (check_id("camera_id", camera_id), _int("seq", seq, 0, UINT64_MAX),
              _int("capture_ns", capture_ns, 0, INT64_MAX), _dim("width", width), _dim("height", height),
              _enum("encoding", encoding, Encoding, Reason.BAD_ENCODING), _bytes("payload", payload),
              _opt_text("part_id", part_id), _opt_label("label", label))
    check_image(values[5], values[3], values[4], values[6])
    return (*values, *_strip(values[1], values[4], images, values[7], values[8], part_ids, labels))


def image_count(value: object) -> int | None:
    """A header's `images` if valid on its own (absent or nil: 1), else None: how many verdicts a refusal owes."""
    if value is None:
        return 1
    return value if type(value) is int and 1 <= value <= MAX_IMAGES else None


def _strip(seq: int, height: int, images: object, part_id: str | None, label: str | None, part_ids: object,
           labels: object) -> tuple[int, tuple[str | None, ...] | None, tuple[str | None, ...] | None]:
    """images, part_ids and labels of a frame (SPEC 4.1, revision 1.3), checked against its seq and height."""
    n = 1 if images is None else _int("images", images, 1, MAX_IMAGES)
    if n == 1:
        if part_ids is not None or labels is not None:
            raise ProtocolError(Reason.BAD_VALUE, detail="part_ids and labels belong to a frame of several images")
        return 1, None, None
    if height % n:
        raise ProtocolError(Reason.BAD_DIMS, detail=f"height={height} is not a multiple of images={n}")
    if seq > UINT64_MAX - (n - 1):
        raise ProtocolError(Reason.BAD_VALUE, detail=f"seqs {seq}..{seq}+{n - 1} pass the uint64 range")
    if part_id is not None or label is not None:
        raise ProtocolError(Reason.BAD_VALUE, detail="a frame of several images names them in part_ids and labels")
    return n, _per_image("part_ids", part_ids, n, _opt_text), _per_image("labels", labels, n, _opt_label)


def _per_image(name: str, value: object, n: int,
               check: Callable[[str, object], str | None]) -> tuple[str | None, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be an array")
    if len(value) != n:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name} has {len(value)} entries for {n} images")
    return tuple(check(f"{name}[{i}]", item) for i, item in enumerate(value))


@dataclass(frozen=True, slots=True)
class Verdict:
    """The agent's decision on one accepted frame, published on verdict/<camera_id>/ (no payload)."""

    camera_id: str
    seq: int
    status: Status
    reason: str | None
    class_name: str | None
    class_index: int | None
    confidence: float | None
    probs: tuple[float, ...] | None
    defect: bool
    model_id: str
    agent_id: str
    epoch: int
    capture_ns: int | None
    received_ns: int
    inferred_ns: int | None
    published_ns: int
    part_id: str | None = None
    label: str | None = None
    # Added in v1.1; None only from older agents (derive it with decision_of()).
    decision: Decision | None = None

    # Every consistency rule of SPEC 4.2 in one place, as the SPEC lists them.
    def __post_init__(self) -> None:  # noqa: C901
        put = object.__setattr__
        check_id("camera_id", self.camera_id)
        check_id("agent_id", self.agent_id)
        put(self, "seq", _int("seq", self.seq, 0, UINT64_MAX))
        put(self, "status", _enum("status", self.status, Status))
        put(self, "reason", _opt_text("reason", self.reason))
        put(self, "defect", _bool("defect", self.defect))
        put(self, "model_id", _text("model_id", self.model_id))
        put(self, "epoch", _int("epoch", self.epoch, 0, UINT64_MAX))
        put(self, "capture_ns", _opt_int("capture_ns", self.capture_ns, 0, INT64_MAX))
        put(self, "received_ns", _int("received_ns", self.received_ns, 0, INT64_MAX))
        put(self, "inferred_ns", _opt_int("inferred_ns", self.inferred_ns, 0, INT64_MAX))
        put(self, "published_ns", _int("published_ns", self.published_ns, 0, INT64_MAX))
        put(self, "part_id", _opt_text("part_id", self.part_id))
        put(self, "label", _opt_label("label", self.label))
        put(self, "confidence", _opt_unit("confidence", self.confidence))
        n_classes = MAX_CLASSES
        if self.probs is not None:
            if not isinstance(self.probs, (tuple, list)):
                raise ProtocolError(Reason.BAD_TYPE, detail="probs must be an array")
            if not 1 <= len(self.probs) <= MAX_CLASSES:
                raise ProtocolError(Reason.BAD_VALUE, detail=f"probs must have 1..{MAX_CLASSES} entries")
            put(self, "probs", tuple(_unit("probs[]", p) for p in self.probs))
            n_classes = len(self.probs)
        if self.decision is not None:
            decision = _enum("decision", self.decision, Decision)
            put(self, "decision", decision)
            # pass and defect=false are one fact said twice; a bridge that reads either must read the same.
            if (decision is Decision.PASS) == self.defect:
                raise ProtocolError(Reason.BAD_VALUE, detail=f"decision {decision} with defect={self.defect}")
            if self.status is not Status.OK and decision is not Decision.DIVERT:
                raise ProtocolError(Reason.BAD_VALUE, detail=f"status {self.status} must have decision divert")
        if self.status is Status.OK:
            name, index = _class(self.class_name, self.class_index, n_classes)
            put(self, "class_name", name)
            put(self, "class_index", index)
            if self.confidence is None or self.inferred_ns is None:
                raise ProtocolError(Reason.BAD_VALUE, detail="status ok needs confidence and inferred_ns")
        else:
            # No inference ran, so nothing may pretend it did; and an unverdicted part must fail safe.
            inferred = (self.class_name, self.class_index, self.confidence, self.probs, self.inferred_ns)
            if any(v is not None for v in inferred):
                raise ProtocolError(Reason.BAD_VALUE, detail=f"status {self.status} carries inference fields")
            if not self.defect:
                raise ProtocolError(Reason.BAD_VALUE, detail=f"status {self.status} must have defect=true")
            if self.reason is None:
                raise ProtocolError(Reason.BAD_VALUE, detail=f"status {self.status} needs a reason")

    @classmethod
    def unchecked(cls, *values: Any) -> Verdict:
        """A verdict from values in field order, without validation: for a producer that built them from
        validated parts (the agent, once per frame). Its tests hold such verdicts to the full validation."""
        v = object.__new__(cls)
        for put, value in zip(_VERDICT_SETTERS, values, strict=True):
            put(v, value)
        return v

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (enums as strings, probs as a list)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["status"] = self.status.value
        out["decision"] = None if self.decision is None else self.decision.value
        out["probs"] = None if self.probs is None else list(self.probs)
        return out


_VERDICT_FIELDS = tuple(Verdict.__dataclass_fields__)
_VERDICT_SETTERS = _slot_setters(Verdict)


@dataclass(frozen=True, slots=True)
class Explanation:
    """A heatmap snapshot for one verdict, on explain/<camera_id>/ with two PNG payload frames."""

    camera_id: str
    seq: int
    class_name: str
    class_index: int
    confidence: float
    method: str
    capture_ns: int | None
    agent_id: str
    epoch: int
    heatmap_png: bytes | memoryview = field(repr=False)
    overlay_png: bytes | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        put = object.__setattr__
        check_id("camera_id", self.camera_id)
        check_id("agent_id", self.agent_id)
        put(self, "seq", _int("seq", self.seq, 0, UINT64_MAX))
        name, index = _class(self.class_name, self.class_index)
        put(self, "class_name", name)
        put(self, "class_index", index)
        put(self, "confidence", _unit("confidence", self.confidence))
        put(self, "method", _text("method", self.method, 1, MAX_ID_LEN))
        put(self, "capture_ns", _opt_int("capture_ns", self.capture_ns, 0, INT64_MAX))
        put(self, "epoch", _int("epoch", self.epoch, 0, UINT64_MAX))
        for name in ("heatmap_png", "overlay_png"):
            payload = _bytes(name, getattr(self, name))
            _check_png(name, payload)
            put(self, name, payload)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metadata; the PNGs are summarised by their sizes."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["heatmap_png"] = len(self.heatmap_png)
        out["overlay_png"] = len(self.overlay_png)
        return out


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Agent liveness and health, published every second on heartbeat/<agent_id>/ (no payload)."""

    agent_id: str
    epoch: int
    hb_seq: int
    time_ns: int
    uptime_s: float
    state: AgentState
    queue_depth: int
    counters: dict[str, int]
    batch_sizes: dict[str, int]
    backend: dict[str, str]
    model_id: str
    # Added in v1.1 (empty from older agents): the serving model's class list (probs order), the classes that
    # pass, the decision thresholds in force, and the largest frame message this agent reads.
    classes: tuple[str, ...] = ()
    pass_classes: tuple[str, ...] = ()
    thresholds: dict[str, float] = field(default_factory=dict)
    max_frame_bytes: int | None = None
    # Added in v1.3 (None from older agents): the most images one frame message may carry to this agent (SPEC 4.1).
    max_images: int | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        check_id("agent_id", self.agent_id)
        put(self, "epoch", _int("epoch", self.epoch, 0, UINT64_MAX))
        put(self, "hb_seq", _int("hb_seq", self.hb_seq, 0, UINT64_MAX))
        put(self, "time_ns", _int("time_ns", self.time_ns, 0, INT64_MAX))
        put(self, "uptime_s", _float("uptime_s", self.uptime_s, 0.0, math.inf))
        put(self, "state", _enum("state", self.state, AgentState))
        put(self, "queue_depth", _int("queue_depth", self.queue_depth, 0, UINT64_MAX))
        put(self, "counters", _str_map("counters", self.counters, int))
        put(self, "batch_sizes", _str_map("batch_sizes", self.batch_sizes, int))
        put(self, "backend", _str_map("backend", self.backend, str))
        # Empty while the model is still loading (state "starting").
        put(self, "model_id", _text("model_id", self.model_id, 0))
        put(self, "classes", _names("classes", self.classes))
        put(self, "pass_classes", _names("pass_classes", self.pass_classes))
        if not set(self.pass_classes) <= set(self.classes):
            raise ProtocolError(Reason.BAD_VALUE, detail="pass_classes must be among classes")
        put(self, "thresholds", _str_map("thresholds", self.thresholds, float))
        put(self, "max_frame_bytes", _opt_int("max_frame_bytes", self.max_frame_bytes, 1, UINT64_MAX))
        put(self, "max_images", _opt_int("max_images", self.max_images, 1, UINT64_MAX))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (state as a string, maps copied)."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["state"] = self.state.value
        for name in ("counters", "batch_sizes", "backend", "thresholds"):
            out[name] = dict(out[name])
        out["classes"], out["pass_classes"] = list(self.classes), list(self.pass_classes)
        return out


Message = Frame | Verdict | Explanation | Heartbeat


def decision_of(v: Verdict) -> Decision:
    """The verdict's decision; for a v1 agent that sent none, divert what is a defect and pass the rest."""
    if v.decision is not None:
        return v.decision
    return Decision.DIVERT if v.defect else Decision.PASS
