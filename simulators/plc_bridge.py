"""PLC-bridge simulator: subscribes to verdicts and heartbeats and fails safe every part left without a verdict."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import zmq

from protocol import (
    HEARTBEAT_PREFIX,
    VERDICT_PREFIX,
    Decision,
    Heartbeat,
    Kind,
    ProtocolError,
    Reason,
    Status,
    Verdict,
    decision_of,
    decode,
    is_valid_id,
    topic_for,
)
from simulators.common import (
    DEFAULT_OUTPUT_ENDPOINT,
    add_curve_arguments,
    close_socket,
    curve_from_args,
    make_curve_client,
    stop_on_signals,
    write_report,
)
from simulators.plc.results import FlushPacer

VERDICT_TIMEOUT_S = 2.0
DRAIN_AT_STOP_S = 10.0  # at most this long handling what was already queued when the bridge is stopped
HEARTBEAT_TIMEOUT_S = 3.0
# Seqs tracked per camera below the highest one; older ones are forgotten so memory stays bounded.
SEQ_WINDOW = 100_000


@dataclass(frozen=True)
class Event:
    """Something the line operator must hear about: a fail-safed gap, or an agent seen, restarted or lost."""

    t: float  # seconds since the tracker started
    kind: str  # gap | seq_jump | agent_seen | agent_restart | agent_lost | agent_back
    subject: str  # camera_id for gap/seq_jump, agent_id otherwise
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"t": round(self.t, 3), "kind": self.kind, "subject": self.subject, "detail": self.detail}

    def __str__(self) -> str:
        return f"{self.kind} {self.subject} {self.detail}".rstrip()


@dataclass
class CameraTrack:
    """Per-camera bookkeeping: which seqs have verdicts, which are missing and since when."""

    seen: set[int] = field(default_factory=set)
    highest: int | None = None
    missing: dict[int, float] = field(default_factory=dict)  # seq -> when the gap was noticed (insertion order)
    failed: set[int] = field(default_factory=set)  # fail-safed seqs whose verdict has not (yet) come
    by_status: Counter[str] = field(default_factory=Counter)
    by_decision: Counter[str] = field(default_factory=Counter)  # pass / divert / review, of first verdicts
    verdicts: int = 0
    rejects: int = 0
    reused: int = 0  # second parts that carried an already-answered seq (duplicate_seq): failed safe
    gaps: int = 0
    duplicates: int = 0
    late: int = 0
    seq_jumps: int = 0
    labeled: int = 0
    correct: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures for the report."""
        return {
            "verdicts": self.verdicts,
            "by_status": {s.value: self.by_status[s.value] for s in Status},
            "by_decision": {d.value: self.by_decision[d.value] for d in Decision},
            "rejects": self.rejects,
            "reused": self.reused,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "late": self.late,
            "pending": len(self.missing),
            "seq_jumps": self.seq_jumps,
            "highest_seq": self.highest,
            "accuracy": _ratio(self.correct, self.labeled),
        }


@dataclass
class AgentTrack:
    """Per-agent liveness: its epochs, when it last sent a heartbeat, and which cameras it served."""

    epoch: int
    last_heartbeat: float
    epochs: set[int] = field(default_factory=set)
    cameras: set[str] = field(default_factory=set)
    lost: bool = False
    restarts: int = 0
    heartbeat: Heartbeat | None = None


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else round(num / den, 6)


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max (linear interpolation) and count; None values when empty."""
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = (len(ordered) - 1) * q
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {
        "p50": round(at(0.50), 3),
        "p95": round(at(0.95), 3),
        "p99": round(at(0.99), 3),
        "max": round(ordered[-1], 3),
        "count": len(ordered),
    }


class LineTracker:
    """The bridge's bookkeeping without sockets: feed it messages, call tick() often, read summary()."""

    def __init__(
        self,
        *,
        verdict_timeout_s: float = VERDICT_TIMEOUT_S,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        first_seq: int | None = None,
        seq_window: int = SEQ_WINDOW,
    ) -> None:
        self.verdict_timeout_s = verdict_timeout_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.first_seq = first_seq
        self.seq_window = seq_window
        self.cameras: dict[str, CameraTrack] = {}
        self.agents: dict[str, AgentTrack] = {}
        self.events: deque[Event] = deque(maxlen=200)
        self.latencies_ms: list[float] = []
        self.agent_latencies_ms: list[float] = []
        self.confusion: dict[str, Counter[str]] = {}
        self.protocol_errors: Counter[str] = Counter()
        self.heartbeats = 0
        self.agent_restarts = 0
        self.agent_lost = 0
        self._pending_events: list[Event] = []
        self._started = clock()
        # Called (camera_id, seq, why) for every part failed safe, so the PLC outputs can announce each one.
        self.on_fail_safe: Callable[[str, int, str], object] | None = None

    # -- totals --

    def _total(self, name: str) -> int:
        return sum(getattr(cam, name) for cam in self.cameras.values())

    # Distinct verdicts received (duplicates excluded); parts rejected (defect verdicts plus fail-safed gaps);
    # parts fail-safed because their verdict never came in time; verdicts ignored as a repeat of camera and seq.
    verdicts = property(lambda self: self._total("verdicts"))
    rejects = property(lambda self: self._total("rejects"))
    gaps = property(lambda self: self._total("gaps"))
    duplicates = property(lambda self: self._total("duplicates"))

    @property
    def agents_up(self) -> int:
        """Known agents not currently lost."""
        return sum(not agent.lost for agent in self.agents.values())

    # -- input --

    def _emit(self, kind: str, subject: str, detail: str = "") -> None:
        event = Event(self.clock() - self._started, kind, subject, detail)
        self.events.append(event)
        self._pending_events.append(event)

    def _agent(self, agent_id: str, epoch: int, now: float) -> AgentTrack:
        agent = self.agents.get(agent_id)
        if agent is None:
            # Known from now on: the heartbeat timeout runs from first sight, even if it never sends one.
            agent = self.agents[agent_id] = AgentTrack(epoch=epoch, last_heartbeat=now, epochs={epoch})
            self._emit("agent_seen", agent_id, f"epoch {epoch}")
        elif epoch not in agent.epochs:
            agent.epochs.add(epoch)
            agent.epoch = epoch
            agent.restarts += 1
            self.agent_restarts += 1
            self._emit("agent_restart", agent_id, f"epoch {epoch}")
            # Frames it held before the restart will never get verdicts: do not wait for the timeout.
            self._fail_safe_agent(agent, "agent_restart")
        return agent

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Record a heartbeat: refreshes liveness, detects restarts (new epoch) and recoveries."""
        now = self.clock()
        self.heartbeats += 1
        agent = self._agent(heartbeat.agent_id, heartbeat.epoch, now)
        agent.last_heartbeat = now
        agent.heartbeat = heartbeat
        if agent.lost:
            agent.lost = False
            self._emit("agent_back", heartbeat.agent_id, f"epoch {heartbeat.epoch}")

    def on_protocol_error(self, reason: str) -> None:
        """Count a message dropped as invalid (unknown version included), by reason."""
        self.protocol_errors[reason] += 1

    def on_verdict(self, verdict: Verdict, received_ns: int | None = None) -> str:
        """Record a verdict; returns "new", "late" (after its part was fail-safed), "reused" or "duplicate"."""
        now = self.clock()
        cam = self.cameras.setdefault(verdict.camera_id, CameraTrack())
        agent = self._agent(verdict.agent_id, verdict.epoch, now)
        agent.cameras.add(verdict.camera_id)
        seq = verdict.seq
        if verdict.status is Status.REJECTED and verdict.reason == Reason.DUPLICATE_SEQ:
            # A second part carried a seq already answered (SPEC 7): it is not a duplicate verdict of the first
            # part; the part that carried the repeat fails safe.
            cam.reused += 1
            cam.rejects += 1
            return "reused"
        late = seq in cam.failed
        stale = cam.highest is not None and seq < cam.highest - self.seq_window
        if seq in cam.seen or (stale and not late):
            cam.duplicates += 1
            return "duplicate"
        if late:
            cam.failed.discard(seq)
            cam.late += 1
        cam.seen.add(seq)
        cam.missing.pop(seq, None)
        self._advance(verdict.camera_id, cam, seq, now)

        cam.verdicts += 1
        cam.by_status[verdict.status.value] += 1
        cam.by_decision[decision_of(verdict).value] += 1
        if verdict.defect and not late:  # a late verdict's part was already rejected
            cam.rejects += 1
        if verdict.status is Status.OK and verdict.label is not None and verdict.class_name is not None:
            cam.labeled += 1
            cam.correct += verdict.class_name == verdict.label
            self.confusion.setdefault(verdict.label, Counter())[verdict.class_name] += 1
        if verdict.capture_ns is not None:
            if received_ns is not None:
                self.latencies_ms.append((received_ns - verdict.capture_ns) / 1e6)
            self.agent_latencies_ms.append((verdict.published_ns - verdict.capture_ns) / 1e6)
        return "late" if late else "new"

    def _advance(self, camera_id: str, cam: CameraTrack, seq: int, now: float) -> None:
        """Move the camera's highest seq up to `seq`, noting every seq skipped on the way as missing."""
        if cam.highest is None:
            cam.highest = seq
            if self.first_seq is not None and seq > self.first_seq:
                self._note_missing(camera_id, cam, self.first_seq, seq, now)
            return
        if seq > cam.highest:
            self._note_missing(camera_id, cam, cam.highest + 1, seq, now)
            cam.highest = seq
            if len(cam.seen) > 2 * self.seq_window:
                floor = seq - self.seq_window
                cam.seen = {s for s in cam.seen if s >= floor}
                cam.failed = {s for s in cam.failed if s >= floor}

    def _note_missing(self, camera_id: str, cam: CameraTrack, lo: int, hi: int, now: float) -> None:
        if hi - lo > self.seq_window:
            # Not loss in flight but a renumbered camera (restarted with a new --start-seq): rebase.
            cam.seq_jumps += 1
            self._emit("seq_jump", camera_id, f"{lo - 1} -> {hi}")
            return
        for seq in range(lo, hi):
            if seq not in cam.seen and seq not in cam.failed:
                cam.missing.setdefault(seq, now)

    def _fail(self, camera_id: str, cam: CameraTrack, seq: int, why: str) -> None:
        del cam.missing[seq]
        cam.failed.add(seq)
        cam.gaps += 1
        cam.rejects += 1
        self._emit("gap", camera_id, f"seq {seq} fail-safe rejected ({why})")
        if self.on_fail_safe is not None:
            self.on_fail_safe(camera_id, seq, why)

    def _fail_safe_agent(self, agent: AgentTrack, why: str) -> None:
        for camera_id in sorted(agent.cameras):
            if why == "agent_lost" and any(camera_id in a.cameras and not a.lost
                                           for a in self.agents.values() if a is not agent):
                continue  # another live agent serves this camera: its missing seqs keep the gap timer (SPEC 7)
            cam = self.cameras[camera_id]
            for seq in list(cam.missing):
                self._fail(camera_id, cam, seq, why)

    # -- time --

    def tick(self) -> list[Event]:
        """Apply the timeouts; returns the events raised since the previous tick."""
        now = self.clock()
        for camera_id, cam in self.cameras.items():
            # missing is in the order gaps were noticed, so the expired ones come first.
            for seq, noticed in list(cam.missing.items()):
                if now - noticed < self.verdict_timeout_s:
                    break
                self._fail(camera_id, cam, seq, "verdict_timeout")
        for agent_id, agent in self.agents.items():
            if not agent.lost and now - agent.last_heartbeat > self.heartbeat_timeout_s:
                agent.lost = True
                self.agent_lost += 1
                silent = now - agent.last_heartbeat
                self._emit("agent_lost", agent_id, f"no heartbeat for {silent:.1f} s")
                self._fail_safe_agent(agent, "agent_lost")
        events, self._pending_events = self._pending_events, []
        return events

    # -- output --

    def _by_status_and_decision(self) -> tuple[Counter[str], Counter[str]]:
        """Verdicts by status and by decision, summed over the cameras."""
        by_status: Counter[str] = Counter()
        by_decision: Counter[str] = Counter()
        for cam in self.cameras.values():
            by_status.update(cam.by_status)
            by_decision.update(cam.by_decision)
        return by_status, by_decision

    def status_line(self) -> str:
        """One-line live summary for the terminal."""
        by_status, by_decision = self._by_status_and_decision()
        labeled = self._total("labeled")
        accuracy = f"{self._total('correct') / labeled:.3f}" if labeled else "-"
        lat = percentiles(self.latencies_ms[-5000:])
        latency = "-" if lat["p50"] is None else f"p50 {lat['p50']:.1f} p99 {lat['p99']:.1f} ms"
        lost = [a for a, t in self.agents.items() if t.lost]
        agents = f"agents {self.agents_up}/{len(self.agents)} up" + (f" LOST {','.join(lost)}" if lost else "")
        if self.agents and not self.agents_up:
            agents += " NO AGENT: LINE UNINSPECTED"
        return (
            f"verdicts {self.verdicts} (ok {by_status['ok']} shed {by_status['shed']} "
            f"rejected {by_status['rejected']}) | pass {by_decision['pass']} divert {by_decision['divert']} "
            f"review {by_decision['review']} | parts diverted {self.rejects} | gaps {self.gaps} "
            f"dup {self.duplicates} | acc {accuracy} | {latency} | {agents}"
        )

    def summary(self) -> dict[str, Any]:
        """The JSON report: totals, accuracy, latency, agents and per-camera figures."""
        by_status, by_decision = self._by_status_and_decision()
        labeled = self._total("labeled")
        now = self.clock()
        return {
            "verdicts": self.verdicts,
            "by_status": {s.value: by_status[s.value] for s in Status},
            "by_decision": {d.value: by_decision[d.value] for d in Decision},
            "reused": self._total("reused"),
            "rejects": self.rejects,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "late": self._total("late"),
            "pending": sum(len(cam.missing) for cam in self.cameras.values()),
            "accuracy": _ratio(self._total("correct"), labeled),
            "labeled": labeled,
            "confusion": {
                label: {pred: n for pred, n in sorted(self.confusion[label].items()) if n}
                for label in sorted(self.confusion)
            },
            "latency_ms": percentiles(self.latencies_ms),
            "agent_latency_ms": percentiles(self.agent_latencies_ms),
            "heartbeats": self.heartbeats,
            "agent_restarts": self.agent_restarts,
            "agent_lost": self.agent_lost,
            "agents": {
                agent_id: {
                    "epoch": agent.epoch,
                    "restarts": agent.restarts,
                    "lost": agent.lost,
                    "heartbeat_age_s": round(now - agent.last_heartbeat, 3),
                    "state": agent.heartbeat.state.value if agent.heartbeat else None,
                    "queue_depth": agent.heartbeat.queue_depth if agent.heartbeat else None,
                    "model_id": agent.heartbeat.model_id if agent.heartbeat else None,
                    "cameras": sorted(agent.cameras),
                }
                for agent_id, agent in self.agents.items()
            },
            "per_camera": {camera_id: cam.to_dict() for camera_id, cam in sorted(self.cameras.items())},
            "protocol_errors": dict(self.protocol_errors),
            "events": [event.to_dict() for event in self.events],
        }


# --- terminal output ---


class StatusDisplay:
    """A live status line rewritten in place on a terminal, or a plain line every `interval` s otherwise."""

    def __init__(self, stream: TextIO, *, interval: float, enabled: bool = True) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if not self.tty else min(interval, 0.25)
        self.enabled = enabled
        self._last = -math.inf
        self._on_line = False

    def _clear(self) -> None:
        if self._on_line:
            self.stream.write("\r\x1b[K")
            self._on_line = False

    def event(self, text: str) -> None:
        """Print an event on its own line (above the live line on a terminal)."""
        if self.enabled:
            self._clear()
            self.stream.write(f"bridge: {text}\n")
            self.stream.flush()

    def due(self, now: float) -> bool:
        """Whether update() would print now (so callers can skip building the status text)."""
        return self.enabled and now - self._last >= self.interval

    def update(self, text: str, now: float, force: bool = False) -> None:
        """Show the status if the interval has passed (or force)."""
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        if self.tty:
            self.stream.write(f"\r\x1b[K{text}")
            self._on_line = True
        else:
            self.stream.write(f"{text}\n")
        self.stream.flush()

    def close(self) -> None:
        """End the live line so later output starts on a fresh line."""
        if self.enabled and self._on_line:
            self.stream.write("\n")
            self.stream.flush()
            self._on_line = False


# --- command line ---


def build_parser() -> argparse.ArgumentParser:
    """The bridge's command-line options."""
    parser = argparse.ArgumentParser(
        prog="tdn plc-bridge",
        description="Subscribe to agents' verdicts and heartbeats like a PLC bridge, and report on them.",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=None,
        help=f"agent PUB endpoint to connect; repeat for several agents (default {DEFAULT_OUTPUT_ENDPOINT})",
    )
    parser.add_argument("--camera", action="append", default=None, help="only this camera (repeatable)")
    parser.add_argument("--expect", type=int, default=None, help="exit once this many verdicts arrived")
    parser.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    parser.add_argument("--verdict-timeout", type=float, default=VERDICT_TIMEOUT_S, help="gap fail-safe, s")
    parser.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT_S, help="agent lost, s")
    parser.add_argument(
        "--first-seq", type=int, default=None, help="seqs start here (a missing first frame is then a gap)"
    )
    parser.add_argument("--rcvhwm", type=int, default=100_000, help="receive queue; the bridge must not drop")
    parser.add_argument("--interval", type=float, default=2.0, help="status period when stdout is not a TTY")
    parser.add_argument("--report", type=Path, default=None, help="write a JSON report here at exit")
    parser.add_argument("--ready-file", type=Path, default=None,
                        help="create this file once the first heartbeat arrived (the subscription is live)")
    parser.add_argument("--quiet", action="store_true", help="no live status or event lines")
    parser.add_argument("--log-level", default=_env("TDN_BRIDGE_LOG_LEVEL", "info"), type=str.lower,
                        choices=("debug", "info", "warning", "error"),
                        help="the outputs' log lines on stderr (refused writes, broker and client errors)")
    add_curve_arguments(parser)
    add_output_arguments(parser)
    return parser


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


def env_name(flag: str) -> str:
    """The TDN_BRIDGE_* setting that gives an output flag its default: --mqtt-url -> TDN_BRIDGE_MQTT_URL."""
    return "TDN_BRIDGE_" + flag.removeprefix("--").upper().replace("-", "_")


_FILE: dict[str, Any] = {"type": Path, "metavar": "FILE"}
# The outputs' flags: (flag, built-in default, argparse keywords, help). Each flag's default is its env_name()
# setting when set; defaults stay strings, so argparse converts them with `type` and a bad setting is a usage error.
OUTPUT_OPTIONS: tuple[tuple[str, str | None, dict[str, Any], str], ...] = (
    ("--opcua-endpoint", None, {"metavar": "opc.tcp://HOST:PORT"},
     "serve OPC UA here (security None only on loopback)"),
    ("--opcua-security", "auto", {"choices": ("auto", "none", "sign-encrypt")},
     "auto: sign-encrypt when --opcua-cert is given"),
    ("--opcua-cert", None, _FILE, "server certificate (PEM/DER) for Basic256Sha256 SignAndEncrypt"),
    ("--opcua-key", None, _FILE, "its private key (PEM)"),
    ("--opcua-trust-dir", None, {"type": Path, "metavar": "DIR"},
     "trusted client certificates (or their CAs); any other client is refused"),
    ("--opcua-users", None, _FILE,
     "users file, name:role:hash lines (mode 0600; python -m simulators.plc.opcua NAME ROLE)"),
    ("--opcua-ack-queue", "0", {"type": int, "metavar": "N"},
     "per-camera results queue the PLC must Acknowledge(seq); full is fail-safe (0: off)"),
    ("--modbus-endpoint", None, {"metavar": "HOST:PORT"}, "serve Modbus/TCP here (unit id 1, holding registers)"),
    ("--modbus-max-cameras", "16", {"type": int}, "camera blocks in the register map"),
    ("--mqtt-url", None, {"metavar": "mqtt[s]://HOST:PORT"}, "publish to this MQTT broker"),
    ("--line-id", "line1", {}, "MQTT topic tdn/<line-id>/..."),
    ("--mqtt-credentials", None, _FILE, "username line + password line (mode 0600)"),
    ("--mqtt-ca", None, _FILE, "CA bundle for mqtts://"),
    ("--mqtt-cert", None, _FILE, "client certificate for mqtts://"),
    ("--mqtt-key", None, _FILE, "its private key (mode 0600)"),
    ("--mqtt-buffer", "100000", {"type": int},
     "verdicts held unacknowledged across a broker outage; more are dropped and counted"),
)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The PLC/plant outputs: each on by its flag or its TDN_BRIDGE_* setting (systemd/plc-bridge.env.example)."""
    g = parser.add_argument_group("PLC and plant outputs (simulators/plc; each default comes from its TDN_BRIDGE_*)")
    for flag, default, kwargs, text in OUTPUT_OPTIONS:
        g.add_argument(flag, default=_env(env_name(flag), default), help=text, **kwargs)
    g.add_argument("--fail-safe-hold", type=float, default=1.0,
                   help="s a camera stays FailSafe after its latest fail-safed part")


def build_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Any]:
    """The outputs the options switch on (imported only then: their libraries are the [plc] extra)."""
    outputs: list[Any] = []
    try:
        if args.opcua_endpoint:
            from simulators.plc.opcua import OpcUaConfig, OpcUaOutput

            outputs.append(OpcUaOutput(OpcUaConfig(
                endpoint=args.opcua_endpoint, security=args.opcua_security, cert=args.opcua_cert,
                key=args.opcua_key, trust_dir=args.opcua_trust_dir, users=args.opcua_users,
                ack_queue=args.opcua_ack_queue)))
        if args.modbus_endpoint:
            from simulators.plc.modbus import ModbusOutput

            outputs.append(ModbusOutput(args.modbus_endpoint, args.camera, args.modbus_max_cameras))
        if args.mqtt_url:
            from simulators.plc.mqtt import MqttConfig, MqttOutput

            outputs.append(MqttOutput(MqttConfig(
                url=args.mqtt_url, line_id=args.line_id, credentials=args.mqtt_credentials, ca_file=args.mqtt_ca,
                cert_file=args.mqtt_cert, key_file=args.mqtt_key, buffer=args.mqtt_buffer)))
    except ImportError as exc:
        parser.error(f"{exc.name} is missing: pip install -e '.[plc]'")
    except Exception as exc:  # OpcUaConfigError, MqttConfigError, a bad endpoint: a message, not a traceback
        parser.error(str(exc))
    return outputs


def configure_logging(level: str) -> None:
    """The outputs' `tdn.plc.*` loggers at `level` on stderr, one line each; the libraries' own at warning.

    Without it the outputs' info lines (a PLC's refused write, an MQTT reconnect) were lost and warnings came out
    bare, without time or source. asyncua and pymodbus log every session at info, which would drown them.
    """
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tdn.plc").setLevel(level.upper())


def _subscriptions(cameras: list[str] | None) -> list[bytes]:
    verdicts = [topic_for(Kind.VERDICT, cam) for cam in cameras] if cameras else [VERDICT_PREFIX]
    return [*verdicts, HEARTBEAT_PREFIX]


def main(argv: list[str] | None = None) -> int:
    """Run the bridge; exit code 0, or 1 when --expect verdicts did not arrive before --timeout."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    if not args.camera and _env("TDN_BRIDGE_CAMERAS"):
        args.camera = [c.strip() for c in (_env("TDN_BRIDGE_CAMERAS") or "").split(",") if c.strip()]
    for cam in args.camera or []:
        if not is_valid_id(cam):
            parser.error(f"invalid --camera {cam!r}")
    endpoints = args.endpoint or [DEFAULT_OUTPUT_ENDPOINT]
    curve = curve_from_args(args, parser)
    outputs = build_outputs(args, parser)
    tracker = LineTracker(
        verdict_timeout_s=args.verdict_timeout,
        heartbeat_timeout_s=args.heartbeat_timeout,
        first_seq=args.first_seq,
    )
    model = _start_outputs(args, outputs, tracker) if outputs else None
    if outputs and model is None:
        return 2
    # What start-up built lives as long as the process: asyncua's address space alone is ~480K objects. A full
    # collection walked all of it, 213 ms at 4,000 results/s here, while every output waited; frozen, it is never
    # walked again (as in the agent).
    gc.collect()
    gc.freeze()
    display = StatusDisplay(sys.stdout, interval=args.interval, enabled=not args.quiet)
    started = time.monotonic()
    _run(args, endpoints, curve, tracker, model, display)
    for event in tracker.tick():
        display.event(str(event))
        _to_model(model, tracker, event)
    if model is not None:
        model.flush()
        for out in outputs:
            out.stop()
    display.update(tracker.status_line(), time.monotonic(), force=True)
    display.close()
    report = tracker.summary()
    report["seconds"] = round(time.monotonic() - started, 3)
    report["expected"] = args.expect
    report["endpoints"] = endpoints
    if outputs:
        report["outputs"] = {out.name: out.stats() for out in outputs}
    write_report(args.report, report)
    return 1 if args.expect is not None and tracker.verdicts < args.expect else 0


def _start_outputs(args: argparse.Namespace, outputs: list[Any], tracker: LineTracker) -> Any:
    """The result model feeding every output, with the outputs started; None (and a message) if one fails."""
    from simulators.plc.results import ResultModel

    model = ResultModel(args.camera or [], outputs=outputs, hold_s=args.fail_safe_hold)
    tracker.on_fail_safe = model.on_fail_safe_part
    started_outputs = []
    try:
        for out in outputs:
            out.start()
            started_outputs.append(out)
    except Exception as exc:
        for out in started_outputs:
            out.stop()
        print(f"bridge: {out.name} output failed to start: {exc}", file=sys.stderr)
        return None
    model.flush()  # the start-up fail-safe reaches every output before the first verdict
    return model


def _run(args: argparse.Namespace, endpoints: list[str], curve: Any, tracker: LineTracker, model: Any,
         display: StatusDisplay) -> None:
    """Subscribe and track until stopped, --expect verdicts arrived, or --timeout."""
    stop = threading.Event()
    context: zmq.Context[Any] = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, args.rcvhwm)
    make_curve_client(sock, curve)
    for topic in _subscriptions(args.camera):
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    for endpoint in endpoints:
        sock.connect(endpoint)
    pacer = FlushPacer()
    deadline = time.monotonic() + args.timeout if args.timeout is not None else math.inf
    try:
        with stop_on_signals(stop):
            while not stop.is_set():
                # With outputs, wake when the next flush is due: 1-2 ms at low rates, for the OPC UA event latency.
                timeout = 100 if model is None else math.ceil(1000 * pacer.wait(model.pending))
                if sock.poll(timeout, zmq.POLLIN):
                    _drain(sock, tracker, model=model)
                    if args.ready_file is not None and tracker.heartbeats and not args.ready_file.exists():
                        args.ready_file.touch()  # PUB keeps no history: from here on nothing is missed
                for event in tracker.tick():
                    display.event(str(event))
                    _to_model(model, tracker, event)
                now = time.monotonic()
                if model is not None and pacer.due(model.pending):
                    pacer.flushed(len(model.flush().results))
                if display.due(now):  # status_line() sorts thousands of latencies: not on every message
                    display.update(tracker.status_line(), now)
                if (args.expect is not None and tracker.verdicts >= args.expect) or now >= deadline:
                    break
            _drain_at_stop(sock, tracker, model)
    finally:
        close_socket(sock)
        context.term()


def _to_model(model: Any, tracker: LineTracker, event: Event) -> None:
    """Agent-level tracker events go to the result model (gap parts arrive through on_fail_safe)."""
    if model is None or event.kind in ("gap", "seq_jump"):
        return
    agent = tracker.agents.get(event.subject)
    model.on_tracker_event(event.kind, event.subject, event.detail, agent.cameras if agent else ())


def _drain_at_stop(sock: zmq.Socket[Any], tracker: LineTracker, model: Any) -> None:
    """Stopping (a signal, or the timeout): verdicts still queued here or in transit were published before the
    stop, so they are handled, until half a second passes without one, before the report is written."""
    end = time.monotonic() + DRAIN_AT_STOP_S
    while time.monotonic() < end and sock.poll(500, zmq.POLLIN):
        _drain(sock, tracker, model=model)


def _drain(sock: zmq.Socket[Any], tracker: LineTracker, limit: int = 1000, model: Any = None) -> int:
    """Handle every message already queued (up to `limit`, so timeouts still get checked); how many there were."""
    for n in range(limit):
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return n
        received_ns = time.time_ns()
        try:
            msg = decode(parts)
        except ProtocolError as err:
            tracker.on_protocol_error(err.reason)
            continue
        if isinstance(msg, Verdict):
            outcome = tracker.on_verdict(msg, received_ns)
            if model is not None:
                model.on_verdict(msg, outcome)
        elif isinstance(msg, Heartbeat):
            tracker.on_heartbeat(msg)
            if model is not None:
                model.on_heartbeat(msg)
    return limit


if __name__ == "__main__":
    sys.exit(main())
