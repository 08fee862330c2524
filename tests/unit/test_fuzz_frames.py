"""10,000+ SPEC-valid frames through the agent's per-frame path, socket-free; malformed ones refused and counted.

The path is exactly what the agent runs on every message it takes off its PULL socket: agent.intake.admit
(the max_frame_bytes check, protocol.decode_frame, the JPEG/PNG decode and the card's input geometry), then the
line core (agent/line.py) to a verdict; only the backend is replaced by fixed probabilities. Frames come from a
seeded generator (deterministic; every width and every height in 1..4096 occurs, and every edge size in every
encoding) and from a hypothesis property, which shrinks a failure to the smallest frame that shows it.
"""

from __future__ import annotations

import functools
import math
import os
import random
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import card as cards
from agent.batcher import BatchPolicy
from agent.config import MAX_FRAME_MESSAGE
from agent.decision import DecisionRule
from agent.geometry import InputSpec, to_input
from agent.intake import admit
from agent.line import Line, ServingModel
from protocol import (
    MAX_DIM,
    MAX_HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    Decision,
    Encoding,
    Reason,
    Status,
    Verdict,
    decode_verdict,
    encode_verdict,
)
from protocol.messages import INT64_MAX, UINT64_MAX
from tests.conftest import MODEL

SEED = 20_251_201
N_FRAMES = 10_240  # the seeded run; the two sweeps alone are 8,192
SWEEP_SMALL_SIDE = (1, 2, 3, 5, 7, 8, 11, 13, 16)
EDGES = (1, 2, 3, 4095, 4096)
# Both sides >= 4095: 16 MiB of pixels, ~0.3 s each to encode, decode and resize. Rare on purpose.
BIG = ((4096, 4096, Encoding.GRAY8), (4096, 4096, Encoding.JPEG), (4096, 4096, Encoding.PNG),
       (4095, 4093, Encoding.GRAY8), (4093, 4095, Encoding.PNG))
RANDOM_MAX_AREA = 1 << 20
CHEAP_AREA = 1 << 14  # below this, the slow encoder options too (PNG zlib level 9, optimised JPEG Huffman tables)
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
TEXT_CHARS = "abcXYZ019 _-/:#é中ß\u00a0\x00\n🙂"  # str is UTF-8: any code point, 1..256 of them
KNOWN_KEYS = ("v", "kind", "camera_id", "seq", "capture_ns", "width", "height", "encoding", "part_id", "label")
BATCH = 16
MALFORMED = 3_000
# CPU seconds, not wall time (a shared CI machine stretches wall time several-fold): ~20 s here, half of it the
# generator's encoding. The bound catches a regression by an order of magnitude, such as big frames made common.
CPU_BUDGET_S = 60.0

ABSENT = object()  # an optional header key left out altogether (not the same as nil)


# --- MessagePack written by hand, so every integer/str/map width the SPEC lets producers choose occurs ---


def _int_formats(n: int) -> list[bytes]:
    """Every MessagePack encoding of the integer n (consumers MUST accept every width, SPEC 3)."""
    out: list[bytes] = []
    if 0 <= n <= 0x7F:
        out.append(bytes([n]))
    if -32 <= n < 0:
        out.append(struct.pack(">b", n))
    for code, fmt, lo, hi in ((0xCC, ">B", 0, 2**8 - 1), (0xCD, ">H", 0, 2**16 - 1), (0xCE, ">I", 0, 2**32 - 1),
                              (0xCF, ">Q", 0, 2**64 - 1), (0xD0, ">b", -(2**7), 2**7 - 1),
                              (0xD1, ">h", -(2**15), 2**15 - 1), (0xD2, ">i", -(2**31), 2**31 - 1),
                              (0xD3, ">q", -(2**63), 2**63 - 1)):
        if lo <= n <= hi:
            out.append(bytes([code]) + struct.pack(fmt, n))
    return out


def _sized(rng: random.Random, n: int, fix: tuple[int, int] | None, codes: tuple[int, int, int]) -> bytes:
    """A length prefix: the fix form when it fits, or any wider one (8-bit only where the type has it)."""
    options: list[bytes] = []
    if fix is not None and n < fix[1]:
        options.append(bytes([fix[0] | n]))
    for code, fmt, hi in zip(codes, (">B", ">H", ">I"), (2**8, 2**16, 2**32), strict=True):
        if code and n < hi:
            options.append(bytes([code]) + struct.pack(fmt, n))
    return rng.choice(options)


def pack(obj: Any, rng: random.Random) -> bytes:
    """MessagePack of obj with a random valid width for every int, str, bin, array and map."""
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        return rng.choice(_int_formats(obj))
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _sized(rng, len(data), (0xA0, 32), (0xD9, 0xDA, 0xDB)) + data
    if isinstance(obj, bytes):
        return _sized(rng, len(obj), None, (0xC4, 0xC5, 0xC6)) + obj
    if isinstance(obj, list):
        return _sized(rng, len(obj), (0x90, 16), (0, 0xDC, 0xDD)) + b"".join(pack(x, rng) for x in obj)
    if isinstance(obj, dict):
        body = b"".join(pack(k, rng) + pack(v, rng) for k, v in obj.items())
        return _sized(rng, len(obj), (0x80, 16), (0, 0xDE, 0xDF)) + body
    raise TypeError(f"cannot pack {type(obj).__name__}")


# --- images: every encoding the SPEC lists, in the variants real cameras write ---


@functools.cache
def _noise() -> np.ndarray:
    """Sensor-like noise (0..5) to cut every frame's noise from: drawn once, not per frame."""
    return np.random.default_rng(SEED).integers(0, 6, (MAX_DIM + 16, MAX_DIM + 16), dtype=np.uint8)


def gradient(w: int, h: int, rng: random.Random, noise: bool) -> np.ndarray:
    """A smooth, asymmetric gray image (a transposed or rotated decode shows), with noise when small."""
    x = np.arange(w, dtype=np.int32)[None, :] * 190 // max(w - 1, 1)
    y = np.arange(h, dtype=np.int32)[:, None] * 50 // max(h - 1, 1)
    img = (x + y + rng.randrange(0, 10)).astype(np.uint8)  # at most 249: no overflow
    if noise:
        oy, ox = rng.randrange(16), rng.randrange(16)
        img += _noise()[oy : oy + h, ox : ox + w]  # at most 254
    return img


def _exif(orientation: int) -> bytes:
    """A big-endian TIFF block with one tag, Orientation (0x0112): what cameras put in APP1 / eXIf."""
    return b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">HHHIHHI", 1, 0x0112, 3, 1, orientation, 0, 0)


def _jpeg_segment(marker: int, data: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def encode_jpeg(gray: np.ndarray, rng: random.Random, variant: str) -> tuple[bytes, np.ndarray]:
    """(JPEG file, the gray image it should decode to) for variant gray, color, progressive, segments or exif."""
    img, ref = gray, gray
    if variant == "color":
        img = np.dstack([gray, 255 - gray, np.roll(gray, 1, axis=1)])
        ref = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    optimize = gray.size <= CHEAP_AREA and rng.random() < 0.5
    params = [cv2.IMWRITE_JPEG_QUALITY, rng.randrange(70, 101), cv2.IMWRITE_JPEG_OPTIMIZE, int(optimize),
              cv2.IMWRITE_JPEG_PROGRESSIVE, int(variant == "progressive" or rng.random() < 0.1)]
    if variant == "color":
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, rng.choice([cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
                   cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                   cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])]
    ok, buf = cv2.imencode(".jpg", img, params)
    assert ok
    data = buf.tobytes()
    extra = b""
    if variant == "segments":  # APPn and COM segments before the SOF, and fill bytes before a marker
        for _ in range(rng.randrange(1, 5)):
            marker = rng.choice([0xE1, 0xE2, 0xEE, 0xEF, 0xFE])
            extra += b"\xff" * rng.randrange(0, 3) + _jpeg_segment(marker, rng.randbytes(rng.randrange(0, 300)))
    elif variant == "exif":
        extra = _jpeg_segment(0xE1, b"Exif\x00\x00" + _exif(rng.choice([3, 5, 6, 7, 8])))
    return data[:2] + extra + data[2:], ref


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _scanlines(img: np.ndarray, depth: int) -> bytes:
    """PNG scanlines of one-sample-per-pixel img at this bit depth, each with filter type 0."""
    h, w = img.shape
    if h == 0 or w == 0:
        return b""  # an empty Adam7 pass has no scanlines at all
    if depth == 16:
        rows = img.astype(">u2").view(np.uint8).reshape(h, 2 * w)
    elif depth == 8:
        rows = img
    else:
        bits = np.unpackbits(img.astype(np.uint8)[..., None], axis=2)[..., 8 - depth :].reshape(h, w * depth)
        rows = np.packbits(bits, axis=1)
    return np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()


def handmade_png(gray: np.ndarray, rng: random.Random) -> tuple[bytes, np.ndarray]:
    """A PNG OpenCV cannot write: gray at 1, 2, 4, 8 or 16 bits, or a palette, Adam7-interlaced or not."""
    h, w = gray.shape
    depth = rng.choice([1, 2, 4, 8, 16])
    palette = depth <= 8 and rng.random() < 0.4
    interlace = rng.randrange(2)
    levels = 2**depth - 1
    if depth == 16:
        samples, ref = gray.astype(np.uint16) * 257, gray
    else:
        samples = gray >> (8 - depth)
        ref = (samples.astype(np.uint16) * 255 // levels).astype(np.uint8)  # how a decoder scales low bit depths
    chunks = b""
    if palette:  # index i is the gray i * 255 / (2^depth - 1), the same pixels as the gray image
        shades = (np.arange(levels + 1, dtype=np.uint16) * 255 // levels).astype(np.uint8)
        chunks = _png_chunk(b"PLTE", np.repeat(shades, 3).tobytes())
    if interlace:
        raw = b"".join(_scanlines(samples[y0::dy, x0::dx], depth) for x0, y0, dx, dy in ADAM7)
    else:
        raw = _scanlines(samples, depth)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, 3 if palette else 0, 0, 0, interlace)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + chunks
            + _png_chunk(b"IDAT", zlib.compress(raw, rng.randrange(1, 10))) + _png_chunk(b"IEND", b""))
    return data, ref


def encode_png(gray: np.ndarray, rng: random.Random, variant: str) -> tuple[bytes, np.ndarray, bool]:
    """(PNG file, the gray image it should decode to, exact) for gray, color, alpha, 16-bit, exif or handmade."""
    if variant == "handmade":
        data, ref = handmade_png(gray, rng)
        return data, ref, True
    img, ref, exact = gray, gray, True
    if variant in ("color", "alpha"):
        img = np.dstack([gray, 255 - gray, np.roll(gray, 1, axis=1)])
        ref, exact = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), False
        if variant == "alpha":
            img = np.dstack([img, np.full_like(gray, 255)])
    elif variant == "16bit":
        img, exact = gray.astype(np.uint16) * 257, False
    # Any zlib level is valid; the high ones take 50x longer on a noisy megapixel, so they are kept for small images.
    # Level 0 (stored) of a 16-megapixel frame would be over MAX_PAYLOAD_BYTES: not a valid frame.
    level = rng.randrange(0, 10) if gray.size <= CHEAP_AREA else rng.randrange(int(gray.size > RANDOM_MAX_AREA), 3)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, level])
    assert ok
    data = buf.tobytes()
    if variant == "exif":  # eXIf right after IHDR (8 magic + 25 IHDR bytes)
        data = data[:33] + _png_chunk(b"eXIf", _exif(rng.choice([3, 6, 8]))) + data[33:]
    return data, ref, exact


JPEG_VARIANTS = ("gray", "gray", "gray", "color", "progressive", "segments", "exif")
PNG_VARIANTS = ("gray", "gray", "gray", "color", "alpha", "16bit", "exif", "handmade")


# --- frames ---


@dataclass
class Sample:
    """One generated frame message and what the agent must make of it."""

    parts: list[Any]
    header: dict[str, Any]  # what was packed (ABSENT keys left out)
    width: int
    height: int
    encoding: Encoding
    variant: str
    reference: np.ndarray  # the gray pixels the payload holds
    exact: bool  # lossless: the model input must equal to_input(reference)

    @property
    def key(self) -> tuple[str, int]:
        return self.header["camera_id"], self.header["seq"]


def _text(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.choice([lo, hi, rng.randint(lo, hi), rng.randint(lo, min(hi, 12))])
    return "".join(rng.choices(TEXT_CHARS, k=n))


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A value a newer producer might put under a key this agent does not know (NaN included, SPEC 6)."""
    kind = rng.randrange(9 if depth < 2 else 7)
    scalars = (None, rng.choice([True, False]), rng.randint(-(2**63), 2**64 - 1), math.nan,
               rng.uniform(-1e9, 1e9), _text(rng, 0, 20), rng.randbytes(rng.randrange(0, 20)))
    if kind < 7:
        return scalars[kind]
    items = [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return items if kind == 7 else {_text(rng, 1, 8): v for v in items}


def _optional(rng: random.Random, lo: int, hi: int) -> Any:
    r = rng.random()
    return ABSENT if r < 0.35 else None if r < 0.5 else _text(rng, lo, hi)


def make_header(rng: random.Random, camera_id: str, seq: int, w: int, h: int, enc: Encoding) -> dict[str, Any]:
    """A SPEC-valid frame header: v and kind first, the rest in any order, optional and unknown keys or not."""
    capture = rng.choice([0, INT64_MAX, time.time_ns(), rng.randint(0, INT64_MAX)])
    rest: dict[str, Any] = {"camera_id": camera_id, "seq": seq, "capture_ns": capture, "width": w, "height": h,
                            "encoding": enc.value, "part_id": _optional(rng, 1, 256), "label": _optional(rng, 1, 64)}
    for _ in range(rng.choice([0, 0, 0, 1, 3])):
        name = rng.choice(["payload", "exposure_us", "Width", "gain", "v2", _text(rng, 1, 16)])
        if name not in KNOWN_KEYS:
            rest[name] = _junk(rng)
    keys = list(rest)
    rng.shuffle(keys)
    return {"v": 1, "kind": "frame", **{k: rest[k] for k in keys if rest[k] is not ABSENT}}


def _wrap(rng: random.Random, data: bytes) -> Any:
    # The agent hands admit() the zmq frames' memoryviews; a decoder must take bytes as well.
    return memoryview(data) if rng.random() < 0.7 else data


def make_sample(rng: random.Random, camera_id: str, seq: int, w: int, h: int, enc: Encoding) -> Sample:
    """A SPEC-valid frame of w x h in this encoding, as the three parts the agent would receive."""
    small = w * h <= RANDOM_MAX_AREA
    gray = gradient(w, h, rng, noise=small)
    variant, exact, ref = "raw", True, gray
    if enc is Encoding.GRAY8:
        payload = gray.tobytes()
    elif enc is Encoding.JPEG:
        variant = rng.choice(JPEG_VARIANTS) if small else "gray"
        payload, ref = encode_jpeg(gray, rng, variant)
        exact = False
    else:
        variant = rng.choice(PNG_VARIANTS) if small else "gray"
        payload, ref, exact = encode_png(gray, rng, variant)
    assert 0 < len(payload) <= MAX_PAYLOAD_BYTES, (w, h, enc, variant, len(payload))
    header = make_header(rng, camera_id, seq, w, h, enc)
    packed = pack(header, rng)
    assert len(packed) <= MAX_HEADER_BYTES
    parts = [_wrap(rng, f"frame/{camera_id}/".encode()), _wrap(rng, packed), _wrap(rng, payload)]
    return Sample(parts, header, w, h, enc, variant, ref, exact)


def random_side(rng: random.Random) -> int:
    side = min(MAX_DIM, max(1, round(math.exp(rng.uniform(0, math.log(MAX_DIM))))))
    return side | 1 if rng.random() < 0.5 else side  # odd sizes half the time


def size_plan(rng: random.Random, total: int) -> list[tuple[int, int, Encoding]]:
    """Every width and every height 1..4096, every edge pair in every encoding, a few big ones, then random."""
    encs = list(Encoding)
    plan = [(i, rng.choice(SWEEP_SMALL_SIDE), encs[i % 3]) for i in range(1, MAX_DIM + 1)]
    plan += [(rng.choice(SWEEP_SMALL_SIDE), i, encs[(i + 1) % 3]) for i in range(1, MAX_DIM + 1)]
    plan += [(w, h, e) for w in EDGES for h in EDGES for e in encs if min(w, h) < 4095]
    plan += list(BIG)
    while len(plan) < total:
        w, h = random_side(rng), random_side(rng)
        if w * h <= RANDOM_MAX_AREA:
            plan.append((w, h, rng.choice(encs)))
    rng.shuffle(plan)
    return plan


class Cameras:
    """Camera ids of every valid length, each with its own seq run (one starts at 0, one ends at 2^64-1)."""

    def __init__(self, rng: random.Random, total: int) -> None:
        ids = ["c", "".join(rng.choice(ID_CHARS) for _ in range(64)), "cam1", "Line-3.cam_07", "0", "a.b-c_d"]
        starts = [0, UINT64_MAX - total, 2**32 - total // 2, 2**63 - 7, rng.randrange(2**40), 1]
        self.next = dict(zip(ids, starts, strict=True))
        self.rng = rng

    def take(self) -> tuple[str, int]:
        camera_id = self.rng.choice(list(self.next))
        seq = self.next[camera_id]
        self.next[camera_id] = seq + 1
        return camera_id, seq


# --- the agent's per-frame path, with fixed probabilities for a backend ---


@functools.cache
def shipped_card() -> cards.ModelCard:
    """The served model's card (the shipped one, or TDN_MODEL_PATH's): its classes and the input geometry."""
    return cards.read(Path(os.environ.get("TDN_MODEL_PATH", MODEL)))


@pytest.fixture
def card() -> cards.ModelCard:
    """The shipped card, read once per session."""
    return shipped_card()


class Intake:
    """admit() into a Line on a frozen clock; the backend is a fixed softmax, so every accepted frame is ok."""

    def __init__(self, card: cards.ModelCard, max_frame_bytes: int = MAX_FRAME_MESSAGE) -> None:
        self.spec: InputSpec = card.input
        self.classes = card.classes
        self.max_frame_bytes = max_frame_bytes
        model = ServingModel("fuzz-model/fixed-fp32", card.classes, (), DecisionRule(card.classes), input=card.input)
        # A frozen monotonic clock: no frame is ever shed, however slow the machine (shedding is not tested here).
        self.line = Line(BatchPolicy(BATCH, 2000, 60_000.0, 4 * BATCH, (1, 2, 4, 8, 16)), model, agent_id="fuzz",
                         epoch=1, monotonic_ns=lambda: 1_000_000_000)
        self.probs = np.full((BATCH, len(card.classes)), 0.5 / (len(card.classes) - 1), np.float32)
        self.probs[:, len(card.classes) - 1] = 0.5

    def admit(self, parts: list[Any], max_frame_bytes: int | None = None) -> list[Verdict]:
        """What the agent publishes at once for this message (rejections); accepted frames wait for infer()."""
        limit = self.max_frame_bytes if max_frame_bytes is None else max_frame_bytes
        return admit(parts, self.line, self.spec, limit)

    def infer(self) -> Iterator[tuple[Any, Verdict]]:
        """Run every queued frame: (its in-flight item with the model input, its verdict)."""
        while True:
            job, shed = self.line.poll(flush=True)
            assert shed == []
            if job is None:
                return
            items = list(job.items)
            verdicts = self.line.complete(job, self.probs[: len(items)])
            by_key = {(v.camera_id, v.seq): v for v in verdicts}
            assert len(by_key) == len(items) == len(verdicts)
            for item in items:
                yield item, by_key[(item.camera_id, item.seq)]

    @property
    def queued(self) -> int:
        return len(self.line.batcher)


def _check_input(sample: Sample, image: np.ndarray, spec: InputSpec) -> None:
    """The model input is the card's geometry applied to the frame's pixels (exactly, for lossless encodings)."""
    assert image.shape == (spec.size, spec.size) and image.dtype == np.uint8, (sample.width, sample.height)
    want = to_input(sample.reference, spec)
    if sample.exact:
        assert np.array_equal(image, want), (sample.width, sample.height, sample.encoding, sample.variant)
        return
    # Lossy or converted: close to the source. A transposed or EXIF-rotated decode of the gradient is ~50 off.
    err = float(np.abs(image.astype(np.int16) - want.astype(np.int16)).mean())
    assert err < 8.0, (sample.width, sample.height, sample.encoding, sample.variant, err)


def check_ok(sample: Sample, v: Verdict, classes: tuple[str, ...]) -> None:
    """An ok verdict for this frame, echoing its fields, that a bridge decodes as valid."""
    h = sample.header
    assert (v.status, v.reason) == (Status.OK, None), (sample.width, sample.height, sample.encoding, v.reason)
    assert (v.camera_id, v.seq, v.capture_ns) == (h["camera_id"], h["seq"], h["capture_ns"])
    assert (v.part_id, v.label) == (h.get("part_id"), h.get("label"))
    assert v.class_name in classes and v.decision is not None
    assert decode_verdict(encode_verdict(v)) == v


@dataclass
class Tally:
    """What a run covered, for the coverage assertions and the printed summary."""

    ok: int = 0
    widths: set[int] = field(default_factory=set)
    heights: set[int] = field(default_factory=set)
    kinds: Counter[tuple[str, str]] = field(default_factory=Counter)
    optional: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, s: Sample) -> None:
        self.ok += 1
        self.widths.add(s.width)
        self.heights.add(s.height)
        self.kinds[(s.encoding.value, s.variant)] += 1
        for name in ("part_id", "label"):
            value = s.header.get(name, ABSENT)
            self.optional[(name, "absent" if value is ABSENT else "nil" if value is None else "set")] += 1


def run_valid(intake: Intake, samples: Iterator[Sample]) -> Tally:
    """Feed every sample; each must be accepted silently and then answered ok with the right model input."""
    tally = Tally()
    waiting: dict[tuple[str, int], Sample] = {}

    def drain() -> None:
        for item, v in intake.infer():
            sample = waiting.pop((item.camera_id, item.seq))
            _check_input(sample, item.image, intake.spec)
            check_ok(sample, v, intake.classes)
            tally.add(sample)

    for sample in samples:
        out = intake.admit(sample.parts)
        assert out == [], (sample.width, sample.height, sample.encoding, sample.variant,
                           [(v.reason, v.status) for v in out])
        waiting[sample.key] = sample
        if intake.queued >= BATCH:
            drain()
    drain()
    assert waiting == {}
    return tally


def _assert_counters(line: Line, ok: int, attributed: int, unattributed: int, by_reason: Counter[str]) -> None:
    """SPEC 4.4's required counters and invariants, after every frame has its verdict."""
    c = line.counters()
    assert c["received"] == ok + attributed + unattributed
    assert c["accepted"] == ok + attributed and c["received"] == c["accepted"] + c["rejected_unattributed"]
    assert (c["inferred"], c["rejected"], c["rejected_unattributed"], c["shed"]) == (ok, attributed,
                                                                                     unattributed, 0)
    assert c["published"] == c["accepted"] and line.outstanding == 0
    assert {k: v for k, v in c.items() if k.startswith("rejected_") and k != "rejected_unattributed"} == {
        f"rejected_{r}": n for r, n in by_reason.items()}


class TestSpecValidFrames:
    """Every frame the SPEC allows, of any size and encoding, is answered ok by the agent's real intake path."""

    def test_ten_thousand_frames_every_size_and_encoding(self, card: cards.ModelCard) -> None:
        """10,240 seeded frames (every width and height 1..4096, every edge, gray8/JPEG/PNG variants) are all ok."""
        rng = random.Random(SEED)
        cams = Cameras(rng, N_FRAMES)
        intake = Intake(card)
        t0, cpu0 = time.perf_counter(), time.process_time()
        samples = (make_sample(rng, *cams.take(), w, h, e) for w, h, e in size_plan(rng, N_FRAMES))
        tally = run_valid(intake, samples)
        took, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(f"\n{tally.ok} SPEC-valid frames ok in {took:.1f} s ({cpu:.1f} CPU s); by encoding/variant: "
              f"{dict(tally.kinds)}; optional fields: {dict(tally.optional)}")
        assert tally.ok == N_FRAMES
        assert tally.widths == tally.heights == set(range(1, MAX_DIM + 1))
        every = {(e.value, v) for e, vs in ((Encoding.JPEG, JPEG_VARIANTS), (Encoding.PNG, PNG_VARIANTS))
                 for v in vs} | {("gray8", "raw")}
        assert set(tally.kinds) == every
        assert all(tally.optional[(f, k)] > 100 for f in ("part_id", "label") for k in ("absent", "nil", "set"))
        _assert_counters(intake.line, N_FRAMES, 0, 0, Counter())
        assert cpu < CPU_BUDGET_S, f"{cpu:.1f} CPU s"

    @pytest.mark.parametrize("encoding", list(Encoding))
    @pytest.mark.parametrize(("w", "h"), [(1, 1), (1, 4096), (4096, 1), (4096, 4096), (4095, 1), (3, 4093)])
    def test_edge_sizes(self, card: cards.ModelCard, w: int, h: int, encoding: Encoding) -> None:
        """Each corner of the size range is ok in each encoding, named so a failure says which one."""
        rng = random.Random(f"{w}x{h}-{encoding}")
        assert run_valid(Intake(card), iter([make_sample(rng, "edge", UINT64_MAX, w, h, encoding)])).ok == 1

    @pytest.mark.parametrize("encoding", [Encoding.JPEG, Encoding.PNG])
    @pytest.mark.parametrize("orientation", [3, 6, 8])
    def test_exif_orientation_is_not_applied(self, card: cards.ModelCard, encoding: Encoding,
                                             orientation: int) -> None:
        """A 50x30 JPEG/PNG whose SOF/IHDR says 50x30 but whose EXIF says "rotate" is ok, pixels as stored."""
        rng = random.Random(orientation)
        gray = gradient(50, 30, rng, noise=False)
        if encoding is Encoding.JPEG:
            payload, ref = encode_jpeg(gray, rng, "gray")
            payload = payload[:2] + _jpeg_segment(0xE1, b"Exif\x00\x00" + _exif(orientation)) + payload[2:]
        else:
            payload, ref, _ = encode_png(gray, rng, "gray")
            payload = payload[:33] + _png_chunk(b"eXIf", _exif(orientation)) + payload[33:]
        header = make_header(rng, "exif", orientation, 50, 30, encoding)
        parts = [b"frame/exif/", pack(header, rng), payload]
        sample = Sample(parts, header, 50, 30, encoding, "exif", ref, encoding is Encoding.PNG)
        assert run_valid(Intake(card), iter([sample])).ok == 1

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(w=st.one_of(st.integers(1, 64), st.integers(1, MAX_DIM)), h=st.one_of(st.integers(1, 64),
           st.integers(1, MAX_DIM)), encoding=st.sampled_from(list(Encoding)), seed=st.integers(0, 2**32 - 1))
    def test_property_any_size_any_encoding(self, w: int, h: int, encoding: Encoding, seed: int) -> None:
        """Hypothesis: any w x h up to a megapixel in any encoding and header variant is ok (shrinks failures)."""
        if w * h > RANDOM_MAX_AREA:
            w = max(1, RANDOM_MAX_AREA // h)
        rng = random.Random(seed)
        assert run_valid(Intake(shipped_card()), iter([make_sample(rng, "prop", seed, w, h, encoding)])).ok == 1


# --- malformed variants: each refused with its reason code, counted, never an exception ---

OVERSIZE_PAYLOAD = bytes(MAX_PAYLOAD_BYTES + 1)  # shared by every oversized variant: one allocation
BAD_VERSIONS: tuple[Any, ...] = (0, 2, -1, 255, 2**32, 2**64 - 1, -(2**63), "1", 1.0, True, None, [1], {"v": 1},
                                 b"\x01", ABSENT)


@dataclass
class Malformed:
    """A broken message, the reason the agent must give, and whether it can be attributed (camera and seq)."""

    parts: list[Any]
    reason: Reason
    attributed: bool
    base: Sample
    max_frame_bytes: int | None = None


def _repack(s: Sample, rng: random.Random, **changes: Any) -> bytes:
    header = dict(s.header)
    for k, v in changes.items():
        if v is ABSENT:
            header.pop(k, None)
        else:
            header[k] = v
    return pack(header, rng)


def _with_raw_value(s: Sample, rng: random.Random, raw: bytes) -> bytes:
    """The sample's header plus an unknown key "x" whose value is written as these raw bytes."""
    body = b"".join(pack(k, rng) + pack(v, rng) for k, v in s.header.items())
    return _sized(rng, len(s.header) + 1, (0x80, 16), (0, 0xDE, 0xDF)) + body + pack("x", rng) + raw


def _bad_msgpack(s: Sample, rng: random.Random) -> Malformed:
    raw = bytes(s.parts[1])
    choice = rng.randrange(6)
    if choice == 0:
        header = raw[: rng.randrange(0, len(raw))]  # truncated: the map promises more than there is
    elif choice == 1:
        header = raw + rng.choice([b"\xc0", b"\x00", pack({"v": 1}, rng)])  # trailing bytes after the map
    elif choice == 2:
        header = b"\xc1" + raw[1:]  # 0xc1 is never used by MessagePack
    elif choice == 3:  # an extension type, even under a key the agent does not know (SPEC 3)
        ext = rng.choice([b"\xd4\x05\x00", b"\xd6\xff" + struct.pack(">I", 1_700_000_000), b"\xc7\x00\x01"])
        header = _with_raw_value(s, rng, ext)
    elif choice == 4:
        header = _with_raw_value(s, rng, b"\xa2\xff\xfe")  # a str that is not UTF-8
    else:
        header = _with_raw_value(s, rng, b"\x91" * 5000 + b"\xc0")  # nested deeper than the decoder goes
    return Malformed([s.parts[0], header, s.parts[2]], Reason.BAD_MSGPACK, False, s)


def _frame_count(s: Sample, rng: random.Random) -> Malformed:
    topic, header, payload = s.parts
    choice = rng.randrange(5)
    if choice < 2:
        return Malformed([topic] if choice else [], Reason.FRAME_COUNT, False, s)
    parts = [[topic, header], [topic, header, payload, payload], [topic, header, payload, b"", b"", b"", b""]][
        choice - 2]
    return Malformed(parts, Reason.FRAME_COUNT, True, s)


def _payload_size(s: Sample, rng: random.Random) -> Malformed:
    topic, header, payload = s.parts
    if s.encoding is not Encoding.GRAY8:
        return Malformed([topic, header, b""], Reason.PAYLOAD_SIZE, True, s)  # an empty image
    data = bytes(payload)
    n = len(data)
    choice = rng.randrange(4)
    if choice == 0:
        body = data[:-1] if n > 1 else b""
    elif choice == 1:
        body = data + b"\x00" * rng.randint(1, 3)
    elif choice == 2:
        body = data[: rng.randrange(0, n)]
    else:  # the header's dims disagree with the bytes: one more (or fewer) column
        w = s.width + 1 if s.width < MAX_DIM else s.width - 1
        return Malformed([topic, _repack(s, rng, width=w), payload], Reason.PAYLOAD_SIZE, True, s)
    return Malformed([topic, header, body], Reason.PAYLOAD_SIZE, True, s)


def _bad_version(s: Sample, rng: random.Random) -> Malformed:
    packed = _repack(s, rng, v=rng.choice(BAD_VERSIONS))
    return Malformed([s.parts[0], packed, s.parts[2]], Reason.BAD_VERSION, True, s)


def _oversized(s: Sample, rng: random.Random) -> Malformed:
    topic, header, payload = s.parts
    choice = rng.randrange(3)
    if choice == 0:  # a payload part one byte over MAX_PAYLOAD_BYTES (16 MiB)
        return Malformed([topic, header, OVERSIZE_PAYLOAD], Reason.OVERSIZED, True, s)
    if choice == 1:  # a header over MAX_HEADER_BYTES: unreadable, so unattributed (SPEC 6)
        big = _repack(s, rng, pad="p" * (MAX_HEADER_BYTES + rng.randrange(0, 100)))
        return Malformed([topic, big, payload], Reason.OVERSIZED, False, s)
    size = sum(len(p) for p in s.parts)  # the whole message one byte over the agent's declared max_frame_bytes
    return Malformed(list(s.parts), Reason.OVERSIZED, True, s, max_frame_bytes=size - 1)


MUTATIONS: tuple[Callable[[Sample, random.Random], Malformed], ...] = (
    _bad_msgpack, _frame_count, _payload_size, _bad_version, _oversized)


def _check_refusal(m: Malformed, out: list[Verdict]) -> None:
    """An attributed refusal is one rejected verdict echoing the readable fields; an unattributed one, none."""
    if not m.attributed:
        assert out == [], (m.reason, [(v.reason, v.seq) for v in out])
        return
    h = m.base.header
    assert len(out) == 1, (m.reason, len(m.parts))
    v = out[0]
    assert (v.status, v.reason, v.camera_id, v.seq) == (Status.REJECTED, m.reason, h["camera_id"], h["seq"])
    assert v.defect and v.decision is Decision.DIVERT and v.class_name is None and v.probs is None
    assert (v.capture_ns, v.part_id, v.label) == (h["capture_ns"], h.get("part_id"), h.get("label"))
    assert decode_verdict(encode_verdict(v)) == v


class TestMalformedFrames:
    """Broken variants of valid frames are refused with SPEC 9's reason, counted by reason, never raised."""

    def test_each_malformed_kind_is_refused_and_counted(self, card: cards.ModelCard) -> None:
        """3,000 malformed messages (5 kinds) among valid ones: the right reason each, and exact counters."""
        rng = random.Random(SEED + 1)
        cams = Cameras(rng, MALFORMED * 2)
        intake = Intake(card)
        expected: Counter[str] = Counter()
        attributed = unattributed = ok = 0
        t0 = time.perf_counter()
        for i in range(MALFORMED):
            w, h = (random_side(rng), random_side(rng)) if i % 10 else (rng.randint(1, 64), rng.randint(1, 64))
            while w * h > 1 << 16:
                w, h = max(1, w // 2), max(1, h // 2)
            base = make_sample(rng, *cams.take(), w, h, rng.choice(list(Encoding)))
            m = MUTATIONS[i % len(MUTATIONS)](base, rng)
            _check_refusal(m, intake.admit(m.parts, m.max_frame_bytes))
            expected[m.reason.value] += 1
            attributed += m.attributed
            unattributed += not m.attributed
            if i % 10 == 0:  # the line still answers good frames between the bad ones
                ok += run_valid(intake, iter([make_sample(rng, *cams.take(), w, h, base.encoding)])).ok
        took = time.perf_counter() - t0
        print(f"\n{MALFORMED} malformed refused ({dict(expected)}; {unattributed} unattributed), {ok} ok between, "
              f"in {took:.1f} s")
        assert set(expected) == {"bad_msgpack", "frame_count", "payload_size", "bad_version", "oversized"}
        assert min(expected.values()) == MALFORMED // len(MUTATIONS)
        _assert_counters(intake.line, ok, attributed, unattributed, expected)

    @pytest.mark.parametrize("version", BAD_VERSIONS, ids=repr)
    def test_every_unknown_version(self, card: cards.ModelCard, version: Any) -> None:
        """Each non-1 (or missing, or non-int) v is answered rejected/bad_version with the frame's fields."""
        rng = random.Random(7)
        base = make_sample(rng, "ver", 3, 8, 8, Encoding.GRAY8)
        m = Malformed([base.parts[0], _repack(base, rng, v=version), base.parts[2]], Reason.BAD_VERSION, True, base)
        _check_refusal(m, Intake(card).admit(m.parts))

    def test_big_valid_frame_over_a_lowered_limit(self, card: cards.ModelCard) -> None:
        """A valid 4096x4096 gray8 frame over a 1 MiB max_frame_bytes is rejected/oversized, not decoded."""
        rng = random.Random(11)
        base = make_sample(rng, "lim", 9, 4096, 4096, Encoding.GRAY8)
        intake = Intake(card, max_frame_bytes=1 << 20)
        _check_refusal(Malformed(base.parts, Reason.OVERSIZED, True, base), intake.admit(base.parts))
        assert intake.line.counters()["rejected_oversized"] == 1
