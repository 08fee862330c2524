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


def decode_image(frame: Frame, spec: InputSpec) -> np.ndarray:
    """The frame's pixels as the model's uint8 [size,size] input, by the card's geometry; FrameError if unusable."""
    if frame.encoding is Encoding.GRAY8:
        img: np.ndarray = np.frombuffer(frame.payload, np.uint8).reshape(frame.height, frame.width)
    else:
        # The pixels as stored: the SOF/IHDR size the header was checked against (SPEC 4.1). OpenCV would apply an
        # EXIF Orientation tag, turning a valid frame into bad_dims (90/270) or silently rotating it (180).
        img = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:
            raise FrameError(Reason.UNDECODABLE, f"{frame.encoding} payload does not decode")
        if img.shape != (frame.height, frame.width):
            raise FrameError(Reason.BAD_DIMS, f"decoded {img.shape[1]}x{img.shape[0]}, header says "
                                              f"{frame.width}x{frame.height}")
    return to_input(img, spec)


def admit(parts: Sequence[Any], line: Line, spec: InputSpec, max_frame_bytes: int) -> list[Verdict]:
    """One received multipart message into the line: accepted, or refused with the fields it could read."""
    size = sum(len(p) for p in parts)
    if size > max_frame_bytes:
        camera_id, seq, fields = peek_context(parts)
        return line.reject(Reason.OVERSIZED, camera_id, seq, detail=f"{size} B > max_frame_bytes {max_frame_bytes}",
                           **fields)
    try:
        frame = decode_frame(parts)
    except ProtocolError as exc:
        _, _, fields = peek_context(parts)
        return line.reject(exc.reason, exc.camera_id, exc.seq, detail=exc.detail, **fields)
    try:
        image = decode_image(frame, spec)
    except FrameError as exc:
        return line.reject(exc.reason, frame.camera_id, frame.seq, capture_ns=frame.capture_ns,
                           part_id=frame.part_id, label=frame.label, detail=str(exc))
    return line.accept(frame.camera_id, frame.seq, capture_ns=frame.capture_ns, part_id=frame.part_id,
                       label=frame.label, image=image)
