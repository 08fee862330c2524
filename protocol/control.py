"""The control channel (SPEC 12): an operator's authenticated command to an agent, and the agent's reply."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack

from protocol.codec import _UNPACK_LIMITS, _buffer
from protocol.errors import OversizedError, ProtocolError, Reason, VersionError
from protocol.messages import MAX_HEADER_BYTES, MAX_TEXT_LEN, PROTOCOL_VERSION, _text, check_id

COMMAND_TOPIC = b"command"
REPLY_TOPIC = b"command_reply"
MAX_TOKEN_LEN = 256
# The operating thresholds an operator may set at run time; the temperature is calibration, not a threshold.
SETTABLE = ("pass_threshold", "min_confidence", "ood_threshold")


class Command(StrEnum):
    GET_THRESHOLDS = "get_thresholds"
    SET_THRESHOLDS = "set_thresholds"
    RESET_THRESHOLDS = "reset_thresholds"


class Outcome(StrEnum):
    OK = "ok"
    UNAUTHORIZED = "unauthorized"  # missing or wrong token: nothing was read beyond the token
    BAD_REQUEST = "bad_request"  # not a command message of this SPEC (the detail says which rule)
    BAD_VALUE = "bad_value"  # a threshold out of range, or unknown: nothing was changed
    UNAVAILABLE = "unavailable"  # the agent is not serving a model yet, or is draining


def _threshold(name: str, value: object) -> float:
    if name not in SETTABLE:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"unknown threshold {name!r}; settable: {', '.join(SETTABLE)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(Reason.BAD_TYPE, detail=f"{name} must be a number")
    v = float(value)
    if math.isnan(v):
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name} must not be NaN")
    if name == "ood_threshold":
        if v < 0:
            raise ProtocolError(Reason.BAD_VALUE, detail=f"ood_threshold must be >= 0 (inf turns it off), got {v}")
    elif not 0.0 <= v <= 1.0:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"{name} must be in [0, 1], got {v}")
    return v


@dataclass(frozen=True, slots=True)
class Request:
    """One command from an operator tool (`tdn agent thresholds`, the console) to an agent's control socket."""

    command: Command
    token: str
    operator: str
    thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        put = object.__setattr__
        try:
            put(self, "command", Command(self.command))
        except ValueError:
            raise ProtocolError(Reason.BAD_VALUE, detail=f"unknown command {self.command!r}; expected one of "
                                f"{', '.join(c.value for c in Command)}") from None
        put(self, "token", _text("token", self.token, 1, MAX_TOKEN_LEN))
        put(self, "operator", check_id("operator", self.operator))
        if not isinstance(self.thresholds, dict):
            raise ProtocolError(Reason.BAD_TYPE, detail="thresholds must be a map")
        put(self, "thresholds", {str(k): _threshold(str(k), v) for k, v in self.thresholds.items()})
        if self.command is Command.SET_THRESHOLDS and not self.thresholds:
            raise ProtocolError(Reason.MISSING_FIELD, detail="set_thresholds needs at least one threshold")


@dataclass(frozen=True, slots=True)
class Reply:
    """The agent's answer: the outcome, a one-line detail when not ok, and the thresholds in force after it."""

    outcome: Outcome
    detail: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)
    overridden: tuple[str, ...] = ()  # which thresholds a command set (the rest are the card's or settings')
    agent_id: str = ""
    model_id: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


def _pack(topic: bytes, header: dict[str, Any]) -> list[bytes]:
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise OversizedError(detail=f"header is {len(packed)} B > {MAX_HEADER_BYTES}")
    return [topic, packed]


def _unpack(parts: Sequence[Any], topic: bytes) -> dict[str, Any]:
    if isinstance(parts, (bytes, bytearray, memoryview, str)) or not isinstance(parts, Sequence):
        raise ProtocolError(Reason.BAD_TYPE, detail="expected a sequence of frames")
    if len(parts) != 2:
        raise ProtocolError(Reason.FRAME_COUNT, detail=f"{len(parts)} frames, need topic and header")
    if bytes(_buffer(parts[0])) != topic:
        raise ProtocolError(Reason.BAD_TOPIC, detail=f"topic must be {topic.decode()!r}")
    view = _buffer(parts[1])
    if view.nbytes > MAX_HEADER_BYTES:
        raise OversizedError(detail=f"header is {view.nbytes} B > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same here
        raise ProtocolError(Reason.BAD_MSGPACK, detail=f"{type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(header, dict):
        raise ProtocolError(Reason.BAD_TYPE, detail="header must be a msgpack map")
    version = header.get("v")
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise VersionError(detail=f"v must be {PROTOCOL_VERSION}, got {version!r}")
    return header


def encode_request(req: Request) -> list[bytes]:
    """[b"command", header] for a control request."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "command": req.command.value, "token": req.token,
                              "operator": req.operator}
    if req.thresholds:
        header["thresholds"] = dict(req.thresholds)
    return _pack(COMMAND_TOPIC, header)


def decode_request(parts: Sequence[Any]) -> Request:
    """A Request from received frames, or ProtocolError naming the broken rule."""
    header = _unpack(parts, COMMAND_TOPIC)
    for name in ("command", "token", "operator"):
        if name not in header:
            raise ProtocolError(Reason.MISSING_FIELD, detail=f"command header has no {name}")
    return Request(header["command"], header["token"], header["operator"], header.get("thresholds") or {})


def peek_token(parts: Sequence[Any]) -> str | None:
    """The token a request carries, if its frames get that far: authentication comes before validation."""
    try:
        token = _unpack(parts, COMMAND_TOPIC).get("token")
    except ProtocolError:
        return None
    return token if isinstance(token, str) else None


def encode_reply(reply: Reply) -> list[bytes]:
    """[b"command_reply", header] for the agent's answer."""
    return _pack(REPLY_TOPIC, {
        "v": PROTOCOL_VERSION, "outcome": reply.outcome.value, "detail": reply.detail[:MAX_TEXT_LEN],
        "thresholds": dict(reply.thresholds), "overridden": list(reply.overridden), "agent_id": reply.agent_id,
        "model_id": reply.model_id,
    })


def decode_reply(parts: Sequence[Any]) -> Reply:
    """A Reply from received frames (what an operator tool reads), or ProtocolError."""
    h = _unpack(parts, REPLY_TOPIC)
    try:
        outcome = Outcome(str(h.get("outcome")))
    except ValueError:
        raise ProtocolError(Reason.BAD_VALUE, detail=f"unknown outcome {h.get('outcome')!r}") from None
    th = h.get("thresholds") or {}
    if not isinstance(th, dict) or not all(isinstance(v, (int, float)) for v in th.values()):
        raise ProtocolError(Reason.BAD_TYPE, detail="thresholds must be a map of numbers")
    return Reply(outcome, str(h.get("detail") or ""), {str(k): float(v) for k, v in th.items()},
                 tuple(str(x) for x in h.get("overridden") or ()), str(h.get("agent_id") or ""),
                 str(h.get("model_id") or ""))
