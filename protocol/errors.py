"""The one exception family the protocol raises for any bad message, with stable reason codes."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Every reason code a shed or rejected verdict (or a rejection counter) can carry: SPEC.md section 9."""

    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    BAD_TOPIC = "bad_topic"
    BAD_ID = "bad_id"
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"
    BAD_VALUE = "bad_value"
    BAD_DIMS = "bad_dims"
    BAD_ENCODING = "bad_encoding"
    PAYLOAD_SIZE = "payload_size"
    OVERSIZED = "oversized"
    BAD_MSGPACK = "bad_msgpack"
    FRAME_COUNT = "frame_count"
    # Refused by the agent after the message itself decoded.
    UNDECODABLE = "undecodable"  # the JPEG/PNG payload does not decode to an image
    DUPLICATE_SEQ = "duplicate_seq"  # this camera's seq was already accepted within the seq window
    INFERENCE_ERROR = "inference_error"  # the backend failed or returned unusable output for the batch
    # Shed: accepted, then answered without inference.
    DEADLINE = "deadline"  # waited longer than the shed deadline before its batch formed
    SHUTDOWN = "shutdown"  # still queued or in flight when the shutdown bound ran out


class ProtocolError(ValueError):
    """A message could not be encoded or decoded; `reason` says why in one stable code."""

    def __init__(
        self,
        reason: str,
        camera_id: str | None = None,
        seq: int | None = None,
        *,
        detail: str = "",
    ) -> None:
        self.reason = str(reason)
        self.camera_id = camera_id
        self.seq = seq
        self.detail = detail
        super().__init__(reason, camera_id, seq, detail)

    def with_context(self, camera_id: str | None, seq: int | None) -> ProtocolError:
        """Fill in the camera and seq the failing message belonged to, when not already known."""
        if self.camera_id is None:
            self.camera_id = camera_id
        if self.seq is None:
            self.seq = seq
        return self

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only detail breaks the default exception pickling (multiprocessing, logging queues).
        return (_restore, (type(self), self.reason, self.camera_id, self.seq, self.detail))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={self.reason!r}, camera_id={self.camera_id!r}, "
            f"seq={self.seq!r}, detail={self.detail!r})"
        )

    def __str__(self) -> str:
        where = ""
        if self.camera_id is not None or self.seq is not None:
            where = f" [camera_id={self.camera_id} seq={self.seq}]"
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.reason}{detail}{where}"


class VersionError(ProtocolError):
    """The header's protocol version is missing or not one this code speaks."""

    def __init__(self, camera_id: str | None = None, seq: int | None = None, *, detail: str = "") -> None:
        super().__init__(Reason.BAD_VERSION, camera_id, seq, detail=detail)


class OversizedError(ProtocolError):
    """A header, topic or payload frame is larger than the protocol limits allow."""

    def __init__(self, camera_id: str | None = None, seq: int | None = None, *, detail: str = "") -> None:
        super().__init__(Reason.OVERSIZED, camera_id, seq, detail=detail)


class PayloadError(ProtocolError):
    """A payload frame disagrees with its header: size, dimensions or image format."""


def _restore(
    cls: type[ProtocolError], reason: str, camera_id: str | None, seq: int | None, detail: str
) -> ProtocolError:
    err = ProtocolError.__new__(cls)
    ProtocolError.__init__(err, reason, camera_id, seq, detail=detail)
    return err
