"""Intake, socket-free: a received message becomes the line's accept() or reject(), with the model's input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from agent.geometry import InputSpec, to_input
from agent.line import Line
from protocol import Encoding, Frame, ProtocolError, Reason, Verdict, decode_frame
from protocol.codec import peek_context

# libjpeg writes "Corrupt JPEG data: ..." to stderr for damaged files, which would break the JSON log stream;
# OpenCV's own log level does not reach it, so the agent's refusal counter and log line are the record.
cv2.setLogLevel(0)


class FrameError(ValueError):
    """The frame's pixels are unusable; `reason` is a protocol Reason code."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason


def decode_pixels(frame: Frame) -> np.ndarray:
    """The frame's whole payload as uint8 gray [height, width]; FrameError if unusable."""
    if frame.encoding is Encoding.GRAY8:
        return np.frombuffer(frame.payload, np.uint8).reshape(frame.height, frame.width)
    # The pixels as stored: the SOF/IHDR size the header was checked against (SPEC 4.1). OpenCV would apply an
    # EXIF Orientation tag, turning a valid frame into bad_dims (90/270) or silently rotating it (180).
    img = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise FrameError(Reason.UNDECODABLE, f"{frame.encoding} payload does not decode")
    if img.shape != (frame.height, frame.width):
        raise FrameError(Reason.BAD_DIMS, f"decoded {img.shape[1]}x{img.shape[0]}, header says "
                                          f"{frame.width}x{frame.height}")
    return img


def decode_image(frame: Frame, spec: InputSpec) -> np.ndarray:
    """The frame's pixels as the model's uint8 [size,size] input, by the card's geometry; FrameError if unusable."""
    return to_input(decode_pixels(frame), spec)


def decode_images(frame: Frame, spec: InputSpec) -> list[np.ndarray]:
    """Each image a frame carries (SPEC 4.1: `images` stacked top to bottom) as the model's input, in order."""
    pixels = decode_pixels(frame)
    if frame.images == 1:
        return [to_input(pixels, spec)]
    rows = frame.height // frame.images
    return [to_input(pixels[i * rows:(i + 1) * rows], spec) for i in range(frame.images)]


def admit(parts: Sequence[Any], line: Line, spec: InputSpec, max_frame_bytes: int) -> list[Verdict]:
    """One received multipart message into the line: accepted, or refused with the fields it could read.

    A message that carries several images (SPEC 4.1) is one frame per image, seq + i each: each one accepted,
    or each one refused, as separate messages would be.
    """
    size = sum(len(p) for p in parts)
    if size > max_frame_bytes:
        return _refuse_all(line, Reason.OVERSIZED, parts, f"{size} B > max_frame_bytes {max_frame_bytes}")
    try:
        frame = decode_frame(parts)
    except ProtocolError as exc:
        return _refuse_all(line, exc.reason, parts, exc.detail, exc.camera_id, exc.seq)
    try:
        images = decode_images(frame, spec)
    except FrameError as exc:
        out: list[Verdict] = []
        for i in range(frame.images):
            seq, part_id, label = frame.image(i)
            out += line.reject(exc.reason, frame.camera_id, seq, capture_ns=frame.capture_ns, part_id=part_id,
                               label=label, detail=str(exc))
        return out
    if len(images) == 1:
        return line.accept(frame.camera_id, frame.seq, capture_ns=frame.capture_ns, part_id=frame.part_id,
                           label=frame.label, image=images[0])
    out = []
    for i, image in enumerate(images):
        seq, part_id, label = frame.image(i)
        out += line.accept(frame.camera_id, seq, capture_ns=frame.capture_ns, part_id=part_id, label=label,
                           image=image, beyond_cap=True)
    return out


def _refuse_all(line: Line, reason: str, parts: Sequence[Any], detail: str, camera_id: str | None = None,
                seq: int | None = None) -> list[Verdict]:
    """A refused message: one rejection per image it says it carries, with every field that could be read."""
    peeked_camera, peeked_seq, per_image = peek_context(parts)
    camera_id = camera_id if camera_id is not None else peeked_camera
    seq = seq if seq is not None else peeked_seq
    out: list[Verdict] = []
    for i, fields in enumerate(per_image):
        out += line.reject(reason, camera_id, None if seq is None else seq + i, detail=detail, **fields)
    return out
