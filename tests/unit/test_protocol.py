"""Unit tests for the wire protocol: round trips, every rejection reason, and a decoder fuzz test."""

from __future__ import annotations

import json
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    HEARTBEAT_PREFIX,
    MAX_DIM,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    NEU_CLASSES,
    PROTOCOL_VERSION,
    VERDICT_PREFIX,
    AgentState,
    Decision,
    Encoding,
    Explanation,
    Frame,
    Heartbeat,
    Kind,
    OversizedError,
    ProtocolError,
    Reason,
    Status,
    Verdict,
    VersionError,
    decision_of,
    decode,
    decode_explanation,
    decode_frame,
    decode_heartbeat,
    decode_verdict,
    encode,
    encode_explanation,
    encode_frame,
    encode_heartbeat,
    encode_verdict,
    is_valid_id,
    parse_topic,
    topic_for,
)

DROP = object()  # marks a header key to delete in _patch
NOW = 1_750_000_000_000_000_000


def _png(width: int = 4, height: int = 3) -> bytes:
    """A real, minimal grayscale PNG (stdlib only, so the protocol tests need no OpenCV)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + bytes(width) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _jpeg(width: int = 4, height: int = 3) -> bytes:
    """JPEG markers up to SOF0, which is all the protocol inspects."""
    app0 = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = b"\xff\xc0\x00\x0b\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


def make_frame(**kw: Any) -> Frame:
    base: dict[str, Any] = dict(
        camera_id="cam1",
        seq=7,
        capture_ns=NOW,
        width=4,
        height=3,
        encoding=Encoding.GRAY8,
        payload=bytes(range(12)),
        part_id="P-0001",
        label="scratches",
    )
    base.update(kw)
    return Frame(**base)


def make_verdict(**kw: Any) -> Verdict:
    base: dict[str, Any] = dict(
        camera_id="cam1",
        seq=7,
        status=Status.OK,
        reason=None,
        class_name="scratches",
        class_index=5,
        confidence=0.875,
        probs=(0.025, 0.025, 0.025, 0.025, 0.025, 0.875),
        defect=True,
        model_id="tdn-1.0",
        agent_id="agent-a",
        epoch=42,
        capture_ns=NOW,
        received_ns=NOW + 1_000_000,
        inferred_ns=NOW + 5_000_000,
        published_ns=NOW + 6_000_000,
        part_id="P-0001",
        label="scratches",
    )
    base.update(kw)
    return Verdict(**base)


def make_shed(**kw: Any) -> Verdict:
    base: dict[str, Any] = dict(
        status=Status.SHED,
        reason="too_old",
        class_name=None,
        class_index=None,
        confidence=None,
        probs=None,
        inferred_ns=None,
        defect=True,
    )
    base.update(kw)
    return make_verdict(**base)


def make_explanation(**kw: Any) -> Explanation:
    base: dict[str, Any] = dict(
        camera_id="cam1",
        seq=7,
        class_name="patches",
        class_index=2,
        confidence=0.5,
        method="gradcam",
        capture_ns=NOW,
        agent_id="agent-a",
        epoch=42,
        heatmap_png=_png(),
        overlay_png=_png(8, 8),
    )
    base.update(kw)
    return Explanation(**base)


def make_heartbeat(**kw: Any) -> Heartbeat:
    base: dict[str, Any] = dict(
        agent_id="agent-a",
        epoch=42,
        hb_seq=3,
        time_ns=NOW,
        uptime_s=3.25,
        state=AgentState.READY,
        queue_depth=2,
        counters={"frames": 10, "verdicts": 10},
        batch_sizes={"1": 4, "8": 1},
        backend={"name": "tflite", "threads": "2"},
        model_id="tdn-1.0",
    )
    base.update(kw)
    return Heartbeat(**base)


def _patch(parts: list[Any], **changes: Any) -> list[Any]:
    """The same message with header keys replaced (or removed with DROP), packed as a producer would."""
    header = msgpack.unpackb(parts[1])
    for key, value in changes.items():
        if value is DROP:
            header.pop(key, None)
        else:
            header[key] = value
    return [parts[0], msgpack.packb(header, use_bin_type=True), *parts[2:]]


def _reason(parts: Any, decoder: Any = decode) -> str:
    with pytest.raises(ProtocolError) as info:
        decoder(parts)
    return info.value.reason


# The last commit whose protocol/ is revision 1.0: a 1.0 peer, for the compatibility test.
V1_RELEASE = "c2aabac"


class TestIdsAndTopics:
    """Ids, topics and prefix subscriptions."""

    @pytest.mark.parametrize("ident", ["cam1", "a", "Line_3.cam-2", "x" * 64])
    def test_valid_ids(self, ident: str) -> None:
        """Ids of 1..64 chars from [A-Za-z0-9_.-] are accepted."""
        assert is_valid_id(ident)

    @pytest.mark.parametrize("ident", ["", "x" * 65, "cam 1", "cam/1", "cäm", "cam1\n", 7, None, b"cam1"])
    def test_invalid_ids(self, ident: object) -> None:
        """Empty, too long, non-ASCII, slash, newline and non-string ids are refused."""
        assert not is_valid_id(ident)

    def test_topic_layout(self) -> None:
        """Topics are <kind>/<id>/ in ASCII."""
        assert topic_for(Kind.VERDICT, "cam1") == b"verdict/cam1/"
        assert topic_for("frame", "cam1") == b"frame/cam1/"
        assert topic_for(Kind.EXPLAIN, "cam1") == b"explain/cam1/"
        assert topic_for(Kind.HEARTBEAT, "agent-a") == b"heartbeat/agent-a/"
        assert topic_for(Kind.VERDICT, "cam1").startswith(VERDICT_PREFIX)
        assert topic_for(Kind.HEARTBEAT, "a").startswith(HEARTBEAT_PREFIX)

    def test_trailing_slash_makes_prefix_exact(self) -> None:
        """A subscription to verdict/cam1/ does not match cam10's topic."""
        assert not topic_for(Kind.VERDICT, "cam10").startswith(topic_for(Kind.VERDICT, "cam1"))

    def test_topic_for_refuses_bad_kind_and_id(self) -> None:
        """Unknown kinds and invalid ids cannot make a topic."""
        assert _reason(None, lambda _: topic_for("nope", "cam1")) == "bad_kind"
        assert _reason(None, lambda _: topic_for(Kind.FRAME, "cam/1")) == "bad_id"

    def test_parse_topic(self) -> None:
        """parse_topic inverts topic_for and refuses malformed topics."""
        assert parse_topic(b"verdict/cam1/") == (Kind.VERDICT, "cam1")
        for bad in (b"verdict/cam1", b"verdict//", b"nope/cam1/", b"verdict/c m/", b"\xff/cam1/", b"x" * 200):
            assert _reason(bad, parse_topic) == "bad_topic"


class TestFrame:
    """Frame construction, encoding and decoding."""

    def test_round_trip_gray8(self) -> None:
        """A gray8 frame survives encode/decode unchanged."""
        frame = make_frame()
        parts = encode_frame(frame)
        assert parts[0] == b"frame/cam1/"
        assert decode_frame(parts) == frame
        assert decode(parts) == frame

    @pytest.mark.parametrize(("encoding", "payload"), [(Encoding.JPEG, _jpeg()), (Encoding.PNG, _png())])
    def test_round_trip_compressed(self, encoding: Encoding, payload: bytes) -> None:
        """JPEG and PNG frames with matching dimensions round-trip."""
        frame = make_frame(encoding=encoding, payload=payload)
        assert decode_frame(encode_frame(frame)) == frame

    def test_real_opencv_images_round_trip(self) -> None:
        """Images encoded by OpenCV pass the magic and dimension checks."""
        cv2 = pytest.importorskip("cv2")
        np = pytest.importorskip("numpy")
        img = np.arange(200 * 120, dtype=np.uint32).reshape(120, 200).astype(np.uint8)
        for encoding, ext in ((Encoding.JPEG, ".jpg"), (Encoding.PNG, ".png")):
            payload = cv2.imencode(ext, img)[1].tobytes()
            frame = make_frame(width=200, height=120, encoding=encoding, payload=payload)
            assert decode_frame(encode_frame(frame)).payload == payload

    def test_memoryview_payload_is_sent_without_copy(self) -> None:
        """A memoryview payload (e.g. of a numpy image) is passed through as the payload frame."""
        buf = bytearray(range(12))
        parts = encode_frame(make_frame(payload=memoryview(buf)))
        assert isinstance(parts[2], memoryview)
        assert parts[2].obj is buf

    def test_numpy_buffer_payload(self) -> None:
        """A 2-D numpy image's memoryview is flattened into bytes without copying."""
        np = pytest.importorskip("numpy")
        img = np.arange(12, dtype=np.uint8).reshape(3, 4)
        frame = make_frame(payload=memoryview(img))
        assert bytes(decode_frame([bytes(p) for p in encode_frame(frame)]).payload) == img.tobytes()

    def test_optional_fields_may_be_omitted(self) -> None:
        """A producer may leave out part_id and label; they decode as None."""
        parts = _patch(encode_frame(make_frame()), part_id=DROP, label=DROP)
        frame = decode_frame(parts)
        assert frame.part_id is None and frame.label is None

    def test_header_starts_with_version_and_kind(self) -> None:
        """The first two header keys are v and kind, so a peek needs no full decode."""
        keys = list(msgpack.unpackb(encode_frame(make_frame())[1]))
        assert keys[:2] == ["v", "kind"]

    def test_decoder_accepts_bytearray_and_memoryview_parts(self) -> None:
        """Any bytes-like frame type is accepted by the decoder."""
        parts = encode_frame(make_frame())
        assert decode_frame([bytearray(parts[0]), memoryview(parts[1]), bytes(parts[2])]) == make_frame()

    def test_decoder_accepts_zmq_frames(self) -> None:
        """zmq.Frame parts (recv_multipart(copy=False)) and .bytes-only wrappers decode too."""
        zmq = pytest.importorskip("zmq")

        class BytesOnly:
            def __init__(self, data: bytes) -> None:
                self.bytes = data

        parts = [bytes(p) for p in encode_frame(make_frame())]
        assert decode_frame([zmq.Frame(p) for p in parts]) == make_frame()
        assert decode_frame([BytesOnly(p) for p in parts]) == make_frame()

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"width": 0}, "bad_dims"),
            ({"height": MAX_DIM + 1}, "bad_dims"),
            ({"width": True}, "bad_type"),
            ({"seq": -1}, "bad_value"),
            ({"seq": 2**64}, "bad_value"),
            ({"seq": 1.0}, "bad_type"),
            ({"label": ""}, "bad_value"),
            ({"label": "x" * 65}, "bad_value"),
            ({"encoding": "bmp"}, "bad_encoding"),
            ({"payload": bytes(11)}, "payload_size"),
            ({"payload": "text"}, "bad_type"),
            ({"encoding": Encoding.PNG, "payload": b""}, "payload_size"),
            ({"encoding": Encoding.PNG, "payload": _jpeg()}, "bad_encoding"),
            ({"encoding": Encoding.JPEG, "payload": _png()}, "bad_encoding"),
            ({"encoding": Encoding.JPEG, "payload": _jpeg()[:8]}, "bad_encoding"),
            ({"encoding": Encoding.PNG, "payload": _png(5, 3)}, "bad_dims"),
            ({"encoding": Encoding.JPEG, "payload": _jpeg(4, 4)}, "bad_dims"),
            ({"camera_id": "cam 1"}, "bad_id"),
        ],
    )
    def test_constructor_validates(self, changes: dict[str, Any], reason: str) -> None:
        """Building an invalid Frame raises ProtocolError with the matching reason."""
        with pytest.raises(ProtocolError) as info:
            make_frame(**changes)
        assert info.value.reason == reason

    def test_oversized_payload(self) -> None:
        """A compressed payload above MAX_PAYLOAD_BYTES is refused on build and on decode."""
        big = _png() + bytes(MAX_PAYLOAD_BYTES)
        with pytest.raises(OversizedError):
            make_frame(encoding=Encoding.PNG, payload=big)
        parts = encode_frame(make_frame(encoding=Encoding.PNG, payload=_png()))
        assert _reason([parts[0], parts[1], big]) == "oversized"


class TestVerdict:
    """Verdict construction, invariants, encoding and decoding."""

    @pytest.mark.parametrize(
        "verdict",
        [
            make_verdict(),
            make_verdict(probs=None, defect=False, part_id=None, label=None, reason="note"),
            make_shed(),
            make_shed(status=Status.REJECTED, reason="bad_dims", capture_ns=None, label=None),
        ],
        ids=["ok", "ok-minimal", "shed", "rejected"],
    )
    def test_round_trip(self, verdict: Verdict) -> None:
        """Every status round-trips unchanged and has no payload frame."""
        parts = encode_verdict(verdict)
        assert len(parts) == 2 and parts[0] == b"verdict/cam1/"
        assert decode_verdict(parts) == verdict
        assert decode(parts) == verdict

    def test_to_dict_is_json_ready(self) -> None:
        """to_dict gives plain JSON types with the status as a string."""
        data = json.loads(json.dumps(make_verdict().to_dict()))
        assert data["status"] == "ok" and data["probs"][5] == 0.875 and data["seq"] == 7

    def test_strings_become_enums(self) -> None:
        """A status given as a plain string is stored as the Status enum."""
        assert make_verdict(status="ok").status is Status.OK

    def test_numpy_scalars_are_coerced(self) -> None:
        """numpy ints and float32s (which msgpack cannot pack) are converted to Python numbers."""
        np = pytest.importorskip("numpy")
        probs = tuple(np.float32(p) for p in (0.1, 0.1, 0.1, 0.1, 0.1, 0.5))
        verdict = make_verdict(class_index=np.int64(5), confidence=np.float32(0.5), probs=probs)
        assert type(verdict.class_index) is int and type(verdict.confidence) is float
        assert decode_verdict(encode_verdict(verdict)) == verdict

    def test_float32_overshoot_is_clamped(self) -> None:
        """A probability one float32 ulp above 1 is clamped to 1 instead of refused."""
        assert make_verdict(confidence=1.0000001).confidence == 1.0

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"class_index": -1}, "bad_value"),
            ({"class_index": 6}, "bad_value"),
            ({"class_name": ""}, "bad_value"),
            ({"class_index": None}, "bad_type"),
            ({"decision": "maybe"}, "bad_value"),
            ({"decision": "pass"}, "bad_value"),  # contradicts defect=true
            ({"confidence": None}, "bad_value"),
            ({"confidence": math.nan}, "bad_value"),
            ({"confidence": 1.5}, "bad_value"),
            ({"confidence": "0.5"}, "bad_type"),
            ({"probs": (0.5,) * 5}, "bad_value"),
            ({"probs": (0.5, 0.5, 0.5, 0.5, 0.5, math.inf)}, "bad_value"),
            ({"probs": "abcdef"}, "bad_type"),
            ({"defect": 1}, "bad_type"),
            ({"status": "maybe"}, "bad_value"),
            ({"inferred_ns": None}, "bad_value"),
            ({"agent_id": ""}, "bad_id"),
            ({"model_id": ""}, "bad_value"),
            ({"epoch": -1}, "bad_value"),
        ],
    )
    def test_ok_verdict_validates(self, changes: dict[str, Any], reason: str) -> None:
        """Inconsistent or mistyped ok verdicts are refused with the matching reason."""
        with pytest.raises(ProtocolError) as info:
            make_verdict(**changes)
        assert info.value.reason == reason

    @pytest.mark.parametrize(
        "changes",
        [{"defect": False}, {"class_index": 1, "class_name": "inclusion"}, {"confidence": 0.5}, {"reason": None}],
    )
    def test_unverdicted_parts_fail_safe(self, changes: dict[str, Any]) -> None:
        """Shed/rejected verdicts must be defects, carry a reason and no inference fields."""
        with pytest.raises(ProtocolError) as info:
            make_shed(**changes)
        assert info.value.reason == "bad_value"


class TestModelClasses:
    """A line's own class list travels in the heartbeat; verdicts range over it (revision 1.1)."""

    def test_seven_class_round_trip(self) -> None:
        """A seven-class model's verdict and heartbeat survive encode/decode unchanged."""
        classes = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Free", "MT_Uneven", "other")
        probs = (0.01, 0.01, 0.01, 0.01, 0.9, 0.03, 0.03)
        v = make_verdict(class_name="MT_Free", class_index=4, confidence=0.9, probs=probs, defect=False,
                         decision=Decision.PASS, label="MT_Free", model_id="magnetic-tile-3f2a/litert-int8")
        assert decode(encode(v)) == v
        hb = make_heartbeat(classes=classes, pass_classes=("MT_Free",), thresholds={"pass_threshold": 0.97},
                            max_frame_bytes=16 << 20)
        assert decode(encode(hb)) == hb

    def test_six_class_verdict_means_what_it_did(self) -> None:
        """For the six-class model the v1 keys keep their meaning; decision only adds to them."""
        v = make_verdict(decision=Decision.DIVERT)
        d = msgpack.unpackb(encode(v)[1])
        assert (d["class_name"], d["class_index"], d["defect"], d["decision"]) == ("scratches", 5, True, "divert")
        assert decision_of(make_verdict(decision=None)) is Decision.DIVERT
        assert decision_of(make_verdict(decision=None, defect=False)) is Decision.PASS

    @pytest.mark.parametrize("bad", [{"classes": ("a", "a")}, {"classes": ("a",), "pass_classes": ("b",)},
                                     {"thresholds": {"t": math.nan}}, {"max_frame_bytes": 0}])
    def test_bad_heartbeat_model_fields(self, bad: dict[str, Any]) -> None:
        """Duplicate classes, a pass class outside the list, a NaN threshold or a zero limit are refused."""
        with pytest.raises(ProtocolError):
            make_heartbeat(**bad)

    def test_a_v1_decoder_reads_the_new_messages(self, tmp_path: Path) -> None:
        """The protocol package as released (v1.0, from git history) decodes a 1.1 verdict and heartbeat."""
        import subprocess
        import sys

        old = tmp_path / "protocol"
        old.mkdir()
        root = Path(protocol.__file__).resolve().parent.parent
        for name in ("__init__.py", "codec.py", "errors.py", "messages.py"):
            out = subprocess.run(["git", "show", f"{V1_RELEASE}:protocol/{name}"], cwd=root, capture_output=True,
                                 check=True)
            (old / name).write_bytes(out.stdout)
        v = make_verdict(decision=Decision.DIVERT, model_id="tinydefectnet-eedcc6cf52b5/zendnn-fp32")
        hb = make_heartbeat(classes=NEU_CLASSES, pass_classes=(), thresholds={"min_confidence": 0.5},
                            max_frame_bytes=1 << 24)
        (tmp_path / "msgs.bin").write_bytes(msgpack.packb([[bytes(p) for p in encode(m)] for m in (v, hb)]))
        code = ("import msgpack, protocol, sys; msgs = msgpack.unpackb(open(sys.argv[1], 'rb').read()); "
                "v = protocol.decode_verdict(msgs[0]); h = protocol.decode_heartbeat(msgs[1]); "
                "print(v.class_name, v.defect, v.model_id, h.model_id, 'decision' in v.__dataclass_fields__)")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "msgs.bin")], cwd=tmp_path,
                             capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["scratches", "True", "tinydefectnet-eedcc6cf52b5/zendnn-fp32", hb.model_id,
                                      "False"]


class TestExplanation:
    """Explanation snapshots with their two PNG frames."""

    def test_round_trip(self) -> None:
        """An explanation round-trips with both PNGs as separate frames."""
        explanation = make_explanation()
        parts = encode_explanation(explanation)
        assert len(parts) == 4 and parts[0] == b"explain/cam1/"
        assert decode_explanation(parts) == explanation
        assert decode(parts) == explanation

    def test_to_dict_summarises_images(self) -> None:
        """to_dict replaces the PNG bytes by their sizes."""
        data = make_explanation().to_dict()
        assert data["heatmap_png"] == len(_png()) and data["method"] == "gradcam"

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"heatmap_png": _jpeg()}, "bad_encoding"),
            ({"overlay_png": b""}, "payload_size"),
            ({"class_index": 256}, "bad_value"),
            ({"method": ""}, "bad_value"),
        ],
    )
    def test_validates(self, changes: dict[str, Any], reason: str) -> None:
        """Non-PNG images and inconsistent classes are refused."""
        with pytest.raises(ProtocolError) as info:
            make_explanation(**changes)
        assert info.value.reason == reason

    def test_missing_image_frame(self) -> None:
        """An explanation with one image frame is a frame_count error."""
        assert _reason(encode_explanation(make_explanation())[:3]) == "frame_count"


class TestHeartbeat:
    """Heartbeat encoding and validation."""

    def test_round_trip(self) -> None:
        """A heartbeat round-trips on heartbeat/<agent_id>/."""
        heartbeat = make_heartbeat()
        parts = encode_heartbeat(heartbeat)
        assert parts[0] == b"heartbeat/agent-a/"
        assert decode_heartbeat(parts) == heartbeat
        assert decode(parts) == heartbeat

    def test_starting_heartbeat_may_lack_model(self) -> None:
        """While starting, model_id may be empty and the maps empty."""
        heartbeat = make_heartbeat(state="starting", model_id="", counters={}, batch_sizes={}, backend={})
        assert decode_heartbeat(encode_heartbeat(heartbeat)) == heartbeat

    def test_to_dict_is_json_ready(self) -> None:
        """to_dict gives JSON-ready data with the state as a string."""
        data = json.loads(json.dumps(make_heartbeat().to_dict()))
        assert data["state"] == "ready" and data["counters"]["frames"] == 10

    def test_int_accepted_for_float_field(self) -> None:
        """An integer on the wire where a float is expected is accepted and converted."""
        heartbeat = decode_heartbeat(_patch(encode_heartbeat(make_heartbeat()), uptime_s=3))
        assert heartbeat.uptime_s == 3.0 and type(heartbeat.uptime_s) is float

    @pytest.mark.parametrize(
        ("changes", "reason"),
        [
            ({"state": "sleeping"}, "bad_value"),
            ({"counters": {"frames": -1}}, "bad_value"),
            ({"counters": {"frames": 1.5}}, "bad_type"),
            ({"counters": [1, 2]}, "bad_type"),
            ({"batch_sizes": {"": 1}}, "bad_value"),
            ({"backend": {"name": 3}}, "bad_type"),
            ({"uptime_s": -1.0}, "bad_value"),
            ({"uptime_s": math.inf}, "bad_value"),
            ({"queue_depth": None}, "bad_type"),
        ],
    )
    def test_validates(self, changes: dict[str, Any], reason: str) -> None:
        """Bad states, counters and numbers are refused."""
        with pytest.raises(ProtocolError) as info:
            make_heartbeat(**changes)
        assert info.value.reason == reason

    def test_oversized_header_refused_on_encode(self) -> None:
        """A heartbeat whose header would exceed MAX_HEADER_BYTES cannot be encoded."""
        heartbeat = make_heartbeat(backend={f"k{i}": "x" * 200 for i in range(400)})
        with pytest.raises(OversizedError):
            encode_heartbeat(heartbeat)


class TestDecodeRejections:
    """Every way a received message can be refused, each with its reason code."""

    @pytest.mark.parametrize("version", [DROP, 2, 0, "1", 1.0, True, None])
    def test_bad_version(self, version: object) -> None:
        """A missing or other-than-1 integer v is a VersionError."""
        parts = _patch(encode_verdict(make_verdict()), v=version)
        with pytest.raises(VersionError) as info:
            decode(parts)
        assert info.value.reason == "bad_version"

    @pytest.mark.parametrize("kind", [DROP, "ping", 3, None, "Verdict"])
    def test_bad_kind(self, kind: object) -> None:
        """A missing or unknown kind is refused."""
        assert _reason(_patch(encode_verdict(make_verdict()), kind=kind)) == "bad_kind"

    def test_kind_mismatch_with_decoder(self) -> None:
        """A typed decoder refuses a message of another kind."""
        parts = encode_verdict(make_verdict())
        assert _reason(parts, decode_frame) == "bad_kind"
        assert _reason(encode_frame(make_frame()), decode_verdict) == "bad_kind"

    @pytest.mark.parametrize(
        "topic", [b"verdict/cam2/", b"frame/cam1/", b"verdict/cam1", b"", b"verdict/cam1/x/", b"v" * 10_000]
    )
    def test_bad_topic(self, topic: bytes) -> None:
        """A topic that is not exactly <kind>/<id>/ for the header is refused."""
        parts = encode_verdict(make_verdict())
        assert _reason([topic, parts[1]]) == "bad_topic"

    @pytest.mark.parametrize("field", ["seq", "status", "defect", "received_ns", "probs", "model_id"])
    def test_missing_field(self, field: str) -> None:
        """Leaving out a required key (even a nullable one) is missing_field."""
        assert _reason(_patch(encode_verdict(make_verdict()), **{field: DROP})) == "missing_field"

    def test_missing_id_field(self) -> None:
        """A header without its id key is missing_field."""
        assert _reason(_patch(encode_heartbeat(make_heartbeat()), agent_id=DROP)) == "missing_field"

    @pytest.mark.parametrize(
        ("field", "value"),
        [("seq", True), ("seq", "7"), ("defect", 0), ("epoch", 4.0), ("probs", {"a": 1}), ("capture_ns", [])],
    )
    def test_bad_type(self, field: str, value: object) -> None:
        """Mistyped values are bad_type; a bool is never an integer."""
        assert _reason(_patch(encode_verdict(make_verdict()), **{field: value})) == "bad_type"

    @pytest.mark.parametrize("header", [[1, 2], 5, "verdict", None, b"\x00"])
    def test_header_not_a_map(self, header: object) -> None:
        """A header that is valid msgpack but not a map is bad_type."""
        assert _reason([b"verdict/cam1/", msgpack.packb(header)]) == "bad_type"

    @pytest.mark.parametrize("parts", [b"verdict/cam1/", "text", [b"topic", 5], [b"x", None], 42, None])
    def test_non_bytes_input(self, parts: object) -> None:
        """Inputs that are not sequences of bytes-like frames are bad_type."""
        assert _reason(parts) == "bad_type"

    def test_bad_id(self) -> None:
        """An invalid camera id in the header is bad_id."""
        parts = encode_verdict(make_verdict())
        assert _reason([b"verdict/cam 1/", _patch(parts, camera_id="cam 1")[1]]) == "bad_id"

    @pytest.mark.parametrize(("width", "height"), [(0, 3), (4, 0), (MAX_DIM + 1, 1), (-5, 3), (1, 10**9)])
    def test_bad_dims(self, width: int, height: int) -> None:
        """Dimensions outside 1..MAX_DIM are bad_dims without looking at the payload."""
        assert _reason(_patch(encode_frame(make_frame()), width=width, height=height)) == "bad_dims"

    @pytest.mark.parametrize("size", [0, 11, 13, 12 * 1000])
    def test_payload_size(self, size: int) -> None:
        """A gray8 payload whose length is not width*height is payload_size."""
        parts = encode_frame(make_frame())
        assert _reason([parts[0], parts[1], bytes(size)]) == "payload_size"

    def test_payload_disagrees_with_png_dims(self) -> None:
        """A PNG whose IHDR size differs from the header's dims is bad_dims."""
        parts = encode_frame(make_frame(encoding=Encoding.PNG, payload=_png()))
        assert _reason([parts[0], parts[1], _png(4, 4)]) == "bad_dims"

    @pytest.mark.parametrize("encoding", ["bmp", "GRAY8", 1, None])
    def test_bad_encoding(self, encoding: object) -> None:
        """An unknown encoding value is bad_encoding (a non-string is bad_type)."""
        reason = _reason(_patch(encode_frame(make_frame()), encoding=encoding))
        assert reason == ("bad_encoding" if isinstance(encoding, str) else "bad_type")

    def test_wrong_magic(self) -> None:
        """A payload that does not start with its encoding's magic bytes is bad_encoding."""
        parts = encode_frame(make_frame(encoding=Encoding.PNG, payload=_png()))
        assert _reason([parts[0], parts[1], b"GIF89a" + bytes(100)]) == "bad_encoding"

    def test_oversized_header(self) -> None:
        """A header above MAX_HEADER_BYTES is refused before it is parsed."""
        parts = _patch(encode_verdict(make_verdict()), pad="x" * MAX_HEADER_BYTES)
        assert _reason(parts) == "oversized"

    @pytest.mark.parametrize(
        "header",
        [
            b"",
            b"\xc1",
            b"\x81\xa1v",
            msgpack.packb({"v": 1}) + b"\x00",
            b"\x81\xa1v\xa2\xff\xfe",
            msgpack.packb({"v": 1, "x": msgpack.ExtType(5, b"abc")}),
            b"\x81\xa1x\xc7\x00\x05",
            msgpack.packb({"v": 1, "t": msgpack.Timestamp(1, 0)}, datetime=False),
            msgpack.packb({1: 2}),
            b"\x91" * 5000 + b"\xc0",
        ],
        ids=["empty", "reserved", "truncated", "trailing", "utf8", "ext", "ext0", "timestamp", "intkey", "deep"],
    )
    def test_bad_msgpack(self, header: bytes) -> None:
        """Invalid msgpack, trailing bytes, ext types, non-string keys and deep nesting are bad_msgpack."""
        assert _reason([b"verdict/cam1/", header]) == "bad_msgpack"

    @pytest.mark.parametrize("count", [0, 1, 2, 4, 10_000])
    def test_frame_count(self, count: int) -> None:
        """A frame message needs exactly three frames; huge lists are refused cheaply."""
        parts = encode_frame(make_frame())
        frames = (list(parts) + [b""] * count)[:count]
        assert _reason(frames) == "frame_count"

    def test_unknown_keys_are_ignored(self) -> None:
        """New optional keys within version 1 are ignored, as the SPEC requires of consumers."""
        parts = _patch(encode_verdict(make_verdict()), future={"nested": [1, 2.5, None]}, zone="A")
        assert decode_verdict(parts) == make_verdict()


class TestErrorContext:
    """The camera and seq a refused frame belonged to, so the agent can publish a rejected verdict."""

    @pytest.mark.parametrize(
        "changes",
        [{"width": 5000}, {"encoding": "bmp"}, {"label": 3}, {"capture_ns": DROP}, {"v": 2}, {"kind": "x"}],
    )
    def test_bad_frame_carries_camera_and_seq(self, changes: dict[str, Any]) -> None:
        """A frame refused after its header was read reports camera_id and seq."""
        parts = _patch(encode_frame(make_frame(camera_id="cam9", seq=1234)), **changes)
        with pytest.raises(ProtocolError) as info:
            decode_frame(parts)
        assert (info.value.camera_id, info.value.seq) == ("cam9", 1234)

    def test_bad_payload_carries_camera_and_seq(self) -> None:
        """A payload that disagrees with the dims still names camera and seq."""
        parts = encode_frame(make_frame(camera_id="cam9", seq=55))
        with pytest.raises(ProtocolError) as info:
            decode_frame([parts[0], parts[1], b"short"])
        assert (info.value.reason, info.value.camera_id, info.value.seq) == ("payload_size", "cam9", 55)

    def test_wrong_frame_count_carries_camera_and_seq(self) -> None:
        """Even a missing payload frame names the camera and seq."""
        parts = encode_frame(make_frame(camera_id="cam9", seq=56))
        with pytest.raises(ProtocolError) as info:
            decode_frame(parts[:2])
        assert (info.value.reason, info.value.camera_id, info.value.seq) == ("frame_count", "cam9", 56)

    @pytest.mark.parametrize(("camera_id", "seq"), [("cam 9", 5), ("cam9", -1), ("cam9", True), (None, None)])
    def test_invalid_context_is_not_reported(self, camera_id: object, seq: object) -> None:
        """Invalid camera ids or seqs are never passed on as context."""
        parts = _patch(encode_frame(make_frame()), camera_id=camera_id, seq=seq)
        with pytest.raises(ProtocolError) as info:
            decode_frame(parts)
        assert info.value.camera_id == (camera_id if camera_id == "cam9" else None)
        assert info.value.seq == (seq if seq == 5 else None)

    def test_unreadable_header_has_no_context(self) -> None:
        """Garbage headers give no camera or seq."""
        with pytest.raises(ProtocolError) as info:
            decode_frame([b"frame/cam1/", b"\xc1", b""])
        assert info.value.camera_id is None and info.value.seq is None

    def test_error_pickles_and_prints(self) -> None:
        """ProtocolError survives pickling (multiprocessing) and prints reason, detail and context."""
        err = ProtocolError("bad_dims", "cam1", 3, detail="width=0")
        copy = pickle.loads(pickle.dumps(err))
        assert (copy.reason, copy.camera_id, copy.seq, copy.detail) == ("bad_dims", "cam1", 3, "width=0")
        assert str(err) == "bad_dims: width=0 [camera_id=cam1 seq=3]"
        assert isinstance(pickle.loads(pickle.dumps(VersionError(detail="v=2"))), VersionError)


class TestConstants:
    """Protocol-wide constants."""

    def test_classes_order(self) -> None:
        """NEU_CLASSES is the six NEU classes in alphabetical (wire) order."""
        assert NEU_CLASSES == ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
        assert list(NEU_CLASSES) == sorted(NEU_CLASSES)

    def test_limits(self) -> None:
        """The limits match the SPEC."""
        assert (PROTOCOL_VERSION, MAX_DIM, MAX_PAYLOAD_BYTES, MAX_HEADER_BYTES) == (1, 4096, 2**24, 2**16)
        spec = (Path(protocol.__file__).parent / "SPEC.md").read_text(encoding="utf-8")
        assert f"| `MAX_IMAGES` (images in one frame message) | {protocol.MAX_IMAGES} " in spec

    def test_spec_worked_example_matches_encoder(self) -> None:
        """The hex dump in SPEC.md is exactly what the encoder produces for that verdict."""
        spec = (Path(protocol.__file__).parent / "SPEC.md").read_text(encoding="utf-8")
        block = spec.split("Part 1, header (343 bytes):\n\n```\n", 1)[1].split("```", 1)[0]
        documented = bytes.fromhex("".join(line[6:] for line in block.strip().splitlines()))
        example = Verdict(
            camera_id="cam1",
            seq=42,
            status=Status.OK,
            reason=None,
            class_name="scratches",
            class_index=5,
            confidence=0.75,
            probs=(0.0, 0.0, 0.125, 0.0, 0.125, 0.75),
            defect=True,
            model_id="tdn-1",
            agent_id="a1",
            epoch=1_700_000_000,
            capture_ns=1_700_000_000_000_000_000,
            received_ns=1_700_000_000_001_000_000,
            inferred_ns=1_700_000_000_004_000_000,
            published_ns=1_700_000_000_005_000_000,
            label="scratches",
            decision=Decision.DIVERT,
        )
        parts = encode_verdict(example)
        assert parts[0] == b"verdict/cam1/" and parts[1] == documented

    @pytest.mark.parametrize("v", [make_verdict(), make_verdict(decision=Decision.DIVERT), make_shed(),
                                   make_verdict(probs=None, part_id=None, label=None)])
    def test_fast_verdict_encoder_matches_the_generic_one(self, v: Verdict) -> None:
        """encode_verdict (the hot path) writes exactly the bytes encode() does, key order included."""
        assert [bytes(p) for p in encode_verdict(v)] == [bytes(p) for p in encode(v)]

    def test_encode_dispatches_on_type(self) -> None:
        """encode() picks the right encoder for each message type."""
        for msg in (make_frame(), make_verdict(), make_explanation(), make_heartbeat()):
            assert decode(encode(msg)) == msg


# --- fuzzing: decode must return a valid message or raise ProtocolError, whatever it is fed ---

_VALID_PARTS = [
    encode_frame(make_frame()),
    encode_frame(make_frame(encoding=Encoding.PNG, payload=_png(), label=None)),
    encode_frame(make_frame(encoding=Encoding.JPEG, payload=_jpeg(), part_id=None)),
    encode_verdict(make_verdict()),
    encode_verdict(make_shed()),
    encode_explanation(make_explanation()),
    encode_heartbeat(make_heartbeat()),
]
_VALID_HEADERS = [msgpack.unpackb(parts[1]) for parts in _VALID_PARTS]

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2, 6, 4096, 4097, 2**32, 2**63 - 1, 2**64 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["ok", "shed", "rejected", "gray8", "jpeg", "png", "ready", *NEU_CLASSES, "cam1", "", "frame"]),
    st.binary(max_size=20),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=12,
)


@st.composite
def _mutated_header(draw: st.DrawFn) -> list[Any]:
    """A valid message whose header had keys replaced by junk, removed or added."""
    index = draw(st.integers(0, len(_VALID_PARTS) - 1))
    header = dict(_VALID_HEADERS[index])
    keys = sorted(header)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*keys, "extra"]))
        if draw(st.booleans()):
            header[key] = draw(_junk)
        else:
            header.pop(key, None)
    parts = list(_VALID_PARTS[index])
    parts[1] = msgpack.packb(header, use_bin_type=True)
    return parts


@st.composite
def _dims_and_payload(draw: st.DrawFn) -> list[Any]:
    """A gray8 frame header with arbitrary (often huge) dims and a payload of arbitrary size."""
    header = dict(_VALID_HEADERS[0])
    header["width"] = draw(st.integers(-10, 2**40) | st.sampled_from([1, 4, MAX_DIM, MAX_DIM + 1]))
    header["height"] = draw(st.integers(-10, 2**40) | st.sampled_from([1, 3, MAX_DIM, MAX_DIM + 1]))
    header["encoding"] = draw(st.sampled_from(["gray8", "jpeg", "png"]))
    payload = draw(st.binary(max_size=64) | st.sampled_from([_png(), _jpeg(), bytes(12)]))
    return [b"frame/cam1/", msgpack.packb(header), payload]


@st.composite
def _damaged(draw: st.DrawFn) -> list[Any]:
    """A valid message truncated, with flipped bytes, or with frames dropped or duplicated."""
    parts = [bytes(p) for p in draw(st.sampled_from(_VALID_PARTS))]
    action = draw(st.sampled_from(["truncate", "flip", "drop", "dup"]))
    i = draw(st.integers(0, len(parts) - 1))
    if action == "truncate":
        parts[i] = parts[i][: draw(st.integers(0, max(len(parts[i]) - 1, 0)))]
    elif action == "flip" and parts[i]:
        pos = draw(st.integers(0, len(parts[i]) - 1))
        parts[i] = parts[i][:pos] + bytes([parts[i][pos] ^ draw(st.integers(1, 255))]) + parts[i][pos + 1 :]
    elif action == "drop":
        del parts[i]
    else:
        parts.insert(i, parts[i])
    return parts


_REASONS = {reason.value for reason in Reason}
_any_input = st.one_of(
    st.lists(st.binary(max_size=64), max_size=5),
    st.lists(st.binary(max_size=8), max_size=2).map(lambda p: [*p, msgpack.packb(None)]),
    _junk.map(lambda j: [b"frame/cam1/", msgpack.packb(j, use_bin_type=True), b"x"]),
    _mutated_header(),
    _dims_and_payload(),
    _damaged(),
    _junk,
)


class TestFuzz:
    """Property: decoding never raises anything but ProtocolError."""

    @settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_any_input)
    def test_decode_only_raises_protocol_error(self, parts: Any) -> None:
        """Random bytes, junk headers, damaged messages and wild dims decode or raise ProtocolError."""
        try:
            msg = decode(parts)
        except ProtocolError as err:
            assert err.reason in _REASONS
            return
        # Anything accepted is a valid message that re-encodes to an equal one.
        assert decode(encode(msg)) == msg


_ODD = st.one_of(st.none(), st.booleans(), st.integers(-3, 5),
                 st.sampled_from([0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 4096, 4097, -1]),
                 st.floats(allow_nan=True), st.text(max_size=70), st.binary(max_size=8),
                 st.sampled_from(["gray8", "jpeg", "png", "GRAY8", "cam1", "frame", "x" * 64, "x" * 65, ""]),
                 st.lists(st.integers(0, 3), max_size=2))
_KEYS = ("v", "kind", "camera_id", "seq", "capture_ns", "width", "height", "encoding", "part_id", "label", "images",
         "part_ids", "labels")


class TestSeveralImages:
    """A frame of several images (SPEC 4.1, revision 1.3): their count, ids and labels are checked as the SPEC says."""

    @staticmethod
    def strip(n: int = 3, h: int = 2, w: int = 4, **kw: Any) -> Frame:
        kw.setdefault("seq", 10)
        kw.setdefault("images", n)
        return Frame(camera_id="cam1", capture_ns=5, width=w, height=h * n, encoding=Encoding.GRAY8,
                     payload=bytes(range(w * h * n)), **kw)

    def test_round_trip(self) -> None:
        """images, part_ids and labels survive encode/decode, and each image's seq is seq + i."""
        f = self.strip(3, part_ids=["a", None, "c"], labels=["crazing", "scratches", None])
        g = protocol.decode_frame(protocol.encode_frame(f))
        assert (g.images, g.part_ids, g.labels) == (3, ("a", None, "c"), ("crazing", "scratches", None))
        assert [g.image(i) for i in range(3)] == [(10, "a", "crazing"), (11, None, "scratches"), (12, "c", None)]

    def test_a_single_image_header_is_unchanged(self) -> None:
        """A frame of one image is written without the new keys: revision 1.2 decoders read the same bytes."""
        f = Frame(camera_id="cam1", seq=1, capture_ns=5, width=2, height=2, encoding=Encoding.GRAY8,
                  payload=bytes(4), part_id="p", label="crazing")
        header = msgpack.unpackb(protocol.encode_frame(f)[1])
        assert list(header) == ["v", "kind", "camera_id", "seq", "capture_ns", "width", "height", "encoding",
                                "part_id", "label"]
        assert f.image(0) == (1, "p", "crazing")

    @pytest.mark.parametrize(("kw", "reason"), [
        ({"images": 0}, "bad_value"), ({"images": protocol.MAX_IMAGES + 1}, "bad_value"),
        ({"images": True}, "bad_type"), ({"images": 3.0}, "bad_type"),
        ({"part_ids": ["a", "b"]}, "bad_value"), ({"labels": "abc"}, "bad_type"), ({"labels": [1, 2, 3]}, "bad_type"),
        ({"part_id": "p"}, "bad_value"), ({"label": "crazing"}, "bad_value"),
        ({"seq": 2**64 - 2}, "bad_value"), ({"labels": ["x" * 65, None, None]}, "bad_value"),
    ])
    def test_refusals(self, kw: dict[str, Any], reason: str) -> None:
        """Each way a strip's header can be wrong is refused with its SPEC reason."""
        with pytest.raises(protocol.ProtocolError) as err:
            self.strip(3, **kw)
        assert err.value.reason == reason

    def test_height_must_be_a_multiple(self) -> None:
        """images that do not divide the height are bad_dims; part_ids on a one-image frame are bad_value."""
        with pytest.raises(protocol.ProtocolError) as err:
            Frame(camera_id="c", seq=0, capture_ns=0, width=2, height=5, encoding=Encoding.GRAY8, payload=bytes(10),
                  images=2)
        assert err.value.reason == "bad_dims"
        with pytest.raises(protocol.ProtocolError) as err:
            Frame(camera_id="c", seq=0, capture_ns=0, width=2, height=5, encoding=Encoding.GRAY8, payload=bytes(10),
                  part_ids=["a"])
        assert err.value.reason == "bad_value"

    def test_a_refusal_names_every_image(self) -> None:
        """peek_context gives one entry per image of a readable strip, each with its own echoable fields."""
        from protocol.codec import peek_context

        parts = protocol.encode_frame(self.strip(3, part_ids=["a", "b", "c"]))
        header = msgpack.unpackb(parts[1])
        header["v"] = 9
        parts[1] = msgpack.packb(header)
        assert peek_context(parts) == ("cam1", 10, [{"capture_ns": 5, "part_id": p} for p in "abc"])
        header["images"] = 0  # unreadable count: one answer, for the seq
        parts[1] = msgpack.packb(header)
        assert peek_context(parts) == ("cam1", 10, [{"capture_ns": 5}])


class TestFastFramePath:
    @settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(changes=st.dictionaries(st.sampled_from(_KEYS), _ODD, max_size=3),
           dropped=st.sets(st.sampled_from(_KEYS), max_size=2), w=st.integers(1, 6), h=st.integers(1, 6),
           extra=st.integers(-1, 1), topic=st.sampled_from([None, b"frame/cam1/", b"frame/cam2/", b"frame/cam1",
                                                            b"verdict/cam1/"]), jpeg=st.booleans())
    def test_fast_path_accepts_only_what_the_rule_by_rule_path_accepts(
            self, changes: dict[str, Any], dropped: set[str], w: int, h: int, extra: int, topic: bytes | None,
            jpeg: bool) -> None:
        """Whatever the header holds, the codec's fast path either defers, or gives what _build gives (same Frame or
        the same refusal)."""
        from protocol.codec import _build, _fast_frame

        enc = Encoding.JPEG if jpeg else Encoding.GRAY8
        payload = (bytes(cv2.imencode(".jpg", np.zeros((h, w), np.uint8))[1]) if jpeg
                   else bytes(max(0, w * h + extra)))
        header: dict[Any, Any] = {"v": 1, "kind": "frame", "camera_id": "cam1", "seq": 7, "capture_ns": 5,
                                  "width": w, "height": h, "encoding": enc.value, "part_id": None, "label": None}
        header.update(changes)
        for k in dropped:
            header.pop(k, None)
        items = [topic if topic is not None else b"frame/" + str(header.get("camera_id")).encode() + b"/",
                 b"", memoryview(payload)]

        def run(fn: Any) -> Any:
            try:
                return fn()
            except protocol.ProtocolError as exc:
                return ("refused", exc.reason)

        fast = run(lambda: _fast_frame(header, items, 3))
        if fast is None:
            return
        assert fast == run(lambda: _build(header, items, 3, protocol.Kind.FRAME))

    def test_every_single_odd_value_is_judged_alike(self) -> None:
        """Each header key set to each odd value (or left out), the rest valid: the fast path defers or agrees."""
        from protocol.codec import _build, _fast_frame

        odd = [None, True, False, -1, 0, 1, 2, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 4096, 4097, 1.0, math.nan, "",
               "gray8", "GRAY8", "jpeg", "frame", "cam1", "x" * 64, "x" * 65, "x" * 257, b"cam1", [1], np.int64(2)]
        base = {"v": 1, "kind": "frame", "camera_id": "cam1", "seq": 7, "capture_ns": 5, "width": 2, "height": 3,
                "encoding": "gray8", "part_id": None, "label": None}
        fast_built = 0
        for key in _KEYS:
            for value in [*odd, KeyError]:
                header: dict[Any, Any] = {**base, key: value}
                if value is KeyError:
                    del header[key]
                items = [b"frame/" + str(header.get("camera_id")).encode() + b"/", b"", memoryview(bytes(6))]
                try:
                    fast: Any = _fast_frame(header, items, 3)
                except protocol.ProtocolError as exc:
                    fast = ("refused", exc.reason)
                if fast is None:
                    continue
                try:
                    slow: Any = _build(header, items, 3, protocol.Kind.FRAME)
                except protocol.ProtocolError as exc:
                    slow = ("refused", exc.reason)
                assert fast == slow, (key, value)
                fast_built += 1
        assert fast_built >= 20  # the valid variants (part ids, labels, other sizes) really took the fast path

    def test_a_valid_frame_takes_the_fast_path(self) -> None:
        """A plain gray8 frame with a part id is built by the fast path, equal to the rule-by-rule build."""
        from protocol.codec import _build, _fast_frame

        header = {"v": 1, "kind": "frame", "camera_id": "cam1", "seq": 7, "capture_ns": 5, "width": 2, "height": 3,
                  "encoding": "gray8", "part_id": "p-1", "label": None}
        items = [b"frame/cam1/", b"", memoryview(bytes(6))]
        fast = _fast_frame(header, items, 3)
        assert fast is not None and fast == _build(header, items, 3, protocol.Kind.FRAME)


_VERDICT_KEYS = ("v", "kind", "camera_id", "seq", "status", "reason", "class_name", "class_index", "confidence",
                 "probs", "defect", "model_id", "agent_id", "epoch", "capture_ns", "received_ns", "inferred_ns",
                 "published_ns", "part_id", "label", "decision")
_VERDICT_ODD = st.one_of(_ODD, st.sampled_from(["ok", "shed", "rejected", "OK", "pass", "divert", "review", "deadline",
                                                "agent1", "crazing"]),
                         st.lists(st.floats(0, 1.5), min_size=0, max_size=3),
                         st.sampled_from([[0.5, 0.5], [1, 0], [0.2, 1.0000001], [1e-7], [0.3] * 257, (0.5, 0.5)]))


def _ok_verdict() -> dict[str, Any]:
    return {"v": 1, "kind": "verdict", "camera_id": "cam1", "seq": 7, "status": "ok", "reason": None,
            "class_name": "crazing", "class_index": 1, "confidence": 0.9, "probs": [0.05, 0.9, 0.05], "defect": True,
            "model_id": "tdn-x/litert-int8", "agent_id": "agent1", "epoch": 3, "capture_ns": 5, "received_ns": 6,
            "inferred_ns": 7, "published_ns": 8, "part_id": "P7", "label": None, "decision": "divert"}


def _shed_verdict() -> dict[str, Any]:
    return {**_ok_verdict(), "status": "shed", "reason": "deadline", "class_name": None, "class_index": None,
            "confidence": None, "probs": None, "inferred_ns": None}


class TestFastVerdictPath:
    """The codec's fast path for verdicts (every subscriber decodes one per frame) judges as the rule-by-rule one."""

    @staticmethod
    def judge(header: dict[Any, Any], topic: bytes | None = None, count: int = 2) -> tuple[Any, Any]:
        from protocol.codec import _build, _fast_verdict

        items = [topic if topic is not None else b"verdict/" + str(header.get("camera_id")).encode() + b"/", b""]

        def run(fn: Any) -> Any:
            try:
                return fn()
            except protocol.ProtocolError as exc:
                return ("refused", exc.reason)

        return (run(lambda: _fast_verdict(header, items, count)),
                run(lambda: _build(header, items, count, protocol.Kind.VERDICT)))

    @settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(changes=st.dictionaries(st.sampled_from(_VERDICT_KEYS), _VERDICT_ODD, max_size=3),
           dropped=st.sets(st.sampled_from(_VERDICT_KEYS), max_size=2), shed=st.booleans(),
           topic=st.sampled_from([None, b"verdict/cam1/", b"verdict/cam2/", b"verdict/cam1", b"frame/cam1/"]),
           count=st.sampled_from([2, 2, 2, 3]))
    def test_fast_path_accepts_only_what_the_rule_by_rule_path_accepts(
            self, changes: dict[str, Any], dropped: set[str], shed: bool, topic: bytes | None, count: int) -> None:
        """Whatever the header holds, the fast path either defers, or gives the Verdict _build gives."""
        header: dict[Any, Any] = _shed_verdict() if shed else _ok_verdict()
        header.update(changes)
        for k in dropped:
            header.pop(k, None)
        fast, slow = self.judge(header, topic, count)
        if fast is not None:
            assert fast == slow and isinstance(fast, protocol.Verdict)

    def test_every_single_odd_value_is_judged_alike(self) -> None:
        """Each key of an ok and a shed verdict set to each odd value (or left out): the fast path defers or
        agrees."""
        odd = [None, True, False, -1, 0, 1, 2, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 1.0, 0.5, 1.5, -0.0, math.nan,
               math.inf, "", "ok", "shed", "rejected", "pass", "divert", "review", "x" * 64, "x" * 65, "x" * 257,
               b"cam1", [0.5, 0.5], [1, 0], [], [0.3] * 257, np.float64(0.5), np.int64(1)]
        fast_built = 0
        for base in (_ok_verdict(), _shed_verdict()):
            for key in _VERDICT_KEYS:
                for value in [*odd, KeyError]:
                    header: dict[Any, Any] = {**base, key: value}
                    if value is KeyError:
                        del header[key]
                    fast, slow = self.judge(header)
                    if fast is None:
                        continue
                    assert fast == slow, (key, value)
                    fast_built += 1
        assert fast_built >= 40  # the valid variants really took the fast path

    @pytest.mark.parametrize("header", [_ok_verdict(), _shed_verdict(), {**_ok_verdict(), "decision": None},
                                        {**_ok_verdict(), "decision": "pass", "defect": False},
                                        {**_shed_verdict(), "status": "rejected", "reason": "undecodable",
                                         "capture_ns": None}])
    def test_valid_verdicts_take_the_fast_path(self, header: dict[str, Any]) -> None:
        """Ok, shed and rejected verdicts, with and without a decision, are built by the fast path as _build
        builds them, and decode() (what bridges call) returns that verdict."""
        fast, slow = self.judge(header)
        assert isinstance(fast, protocol.Verdict) and fast == slow
        packed = msgpack.packb(header)
        assert protocol.decode([b"verdict/cam1/", packed]) == fast == protocol.decode_verdict([b"verdict/cam1/",
                                                                                               packed])
