"""The bridge's one result model: every verdict and fail-safe as a Result, per-camera state, and the fan-out."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from protocol import Heartbeat, Status, Verdict

# How long a camera stays FailSafe after its latest fail-safed part, so a PLC sampling every 100 ms sees it.
FAIL_SAFE_HOLD_S = 1.0


class Decision(StrEnum):
    """What the line does with a part."""

    PASS = "pass"
    DIVERT = "divert"
    REVIEW = "review"
    FAIL_SAFE = "fail_safe"


# Wire codes for fieldbus outputs (Modbus decision register, OPC UA ResultState); 0 means no result yet.
DECISION_CODES: dict[Decision, int] = {Decision.PASS: 1, Decision.DIVERT: 2, Decision.REVIEW: 3, Decision.FAIL_SAFE: 4}


class FailSafeKind(StrEnum):
    """Why parts or cameras are failed safe by the bridge itself."""

    GAP = "gap"  # a part's verdict never came in time
    AGENT_LOST = "agent_lost"  # no heartbeat within the timeout
    AGENT_RESTART = "agent_restart"  # frames in flight before the restart will never get verdicts
    STARTUP = "startup"  # the bridge has just started and no agent has spoken yet


def decision_of(v: Verdict) -> Decision:
    """The part's decision: the agent's own `decision` when it sends one (protocol v1.1), else from `defect`."""
    if v.status is not Status.OK:
        return Decision.DIVERT  # shed/rejected: not inspected, so never passed
    own = getattr(v, "decision", None)
    if own:
        try:
            return Decision(own)
        except ValueError:
            return Decision.DIVERT  # an unknown word from a newer agent must not pass a part
    return Decision.DIVERT if v.defect else Decision.PASS


@dataclass(frozen=True, slots=True)
class Result:
    """One part's outcome as every output presents it: a verdict, or a fail-safe made by the bridge."""

    camera_id: str
    seq: int
    decision: Decision
    counter: int  # this camera's ResultCounter after this result (1 for the first)
    part_id: str | None = None
    class_name: str | None = None
    class_index: int | None = None
    confidence: float | None = None
    model_id: str = ""
    agent_id: str = ""
    epoch: int = 0
    status: str = "fail_safe"  # the verdict's status (ok/shed/rejected), or fail_safe
    reason: str | None = None  # why shed/rejected/fail-safed
    capture_ns: int | None = None
    published_ns: int | None = None  # when the agent published the verdict
    bridge_ns: int = 0  # wall clock when the bridge made this result

    @property
    def code(self) -> int:
        """The decision's wire code."""
        return DECISION_CODES[self.decision]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (MQTT payload)."""
        return {
            "camera_id": self.camera_id,
            "seq": self.seq,
            "part_id": self.part_id,
            "decision": self.decision.value,
            "class_name": self.class_name,
            "class_index": self.class_index,
            "confidence": self.confidence,
            "model_id": self.model_id,
            "agent_id": self.agent_id,
            "epoch": self.epoch,
            "status": self.status,
            "reason": self.reason,
            "counter": self.counter,
            "capture_ns": self.capture_ns,
            "published_ns": self.published_ns,
            "bridge_ns": self.bridge_ns,
        }


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """A snapshot of one camera's state, handed to outputs (immutable: they run in other threads)."""

    camera_id: str
    index: int  # position in the documented camera order (--camera flags, else first seen)
    counter: int = 0
    by_decision: tuple[tuple[str, int], ...] = tuple((d.value, 0) for d in Decision)
    late: int = 0
    fail_safe: bool = False
    reasons: tuple[str, ...] = ()  # why it is fail-safe now: startup, agent_lost, gap or agent_restart
    agent_lost: bool = False
    agent_id: str = ""
    last: Result | None = None

    def count(self, decision: Decision) -> int:
        """Results of this camera with that decision."""
        return dict(self.by_decision)[decision.value]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (MQTT camera status)."""
        return {
            "camera_id": self.camera_id,
            "index": self.index,
            "fail_safe": self.fail_safe,
            "reasons": list(self.reasons),
            "agent_lost": self.agent_lost,
            "agent_id": self.agent_id,
            "counter": self.counter,
            "by_decision": dict(self.by_decision),
            "late": self.late,
            "last_seq": self.last.seq if self.last else None,
        }


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of one agent: its state word, epoch, model and liveness."""

    agent_id: str
    epoch: int
    state: str  # starting | ready | draining from its heartbeat, "unknown" before one, "lost"
    model_id: str
    last_heartbeat: float  # time.monotonic() of the last heartbeat (age = now - this)
    lost: bool
    cameras: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FailSafeEvent:
    """A fail-safe event every output announces: gap, agent lost/back, restart, bridge start-up."""

    kind: str  # FailSafeKind value, or "agent_back" / "agent_seen" when it clears
    subject: str  # camera id for gaps, agent id otherwise, "bridge" for start-up
    detail: str
    cameras: tuple[str, ...]  # cameras it touches
    monotonic: float  # when the bridge detected it (time.monotonic())
    time_ns: int


@dataclass(frozen=True, slots=True)
class BridgeStatus:
    """Bridge-wide figures: ready when an agent is up, fail-safe when any camera is or no agent is."""

    total: int
    cameras: int
    agents_up: int
    agents: int
    fail_safe: bool
    starting: bool

    @property
    def ready(self) -> bool:
        """At least one agent up and past start-up."""
        return self.agents_up > 0 and not self.starting

    @property
    def state(self) -> str:
        """One word for status displays."""
        if self.starting:
            return "starting"
        return "fail_safe" if self.fail_safe else "ready"


@dataclass(frozen=True, slots=True)
class Update:
    """What changed since the previous flush: every new result, and snapshots of what they touched."""

    results: tuple[Result, ...]
    cameras: tuple[CameraStatus, ...]  # changed cameras
    agents: tuple[AgentStatus, ...]  # changed agents
    events: tuple[FailSafeEvent, ...]
    bridge: BridgeStatus


class Output(Protocol):
    """A result consumer (OPC UA, Modbus, MQTT): started once, fed Updates from the bridge thread, stopped."""

    name: str

    def start(self) -> None: ...

    def deliver(self, update: Update) -> None:
        """Take an update; must not block the bridge (hand it to the output's own thread)."""

    def stop(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass
class _Camera:
    index: int
    counter: int = 0
    by_decision: dict[str, int] = field(default_factory=lambda: {d.value: 0 for d in Decision})
    late: int = 0
    agent_id: str = ""
    agent_lost: bool = False
    startup: bool = False
    last_gap: float = -1e18
    hold_reason: str = "gap"  # gap or agent_restart: why the latest part was failed safe
    last: Result | None = None
    snapshot: CameraStatus | None = None


class ResultModel:
    """Turns the tracker's verdicts and events into Results and state snapshots; flush() fans them out."""

    def __init__(
        self,
        cameras: Iterable[str] = (),
        *,
        outputs: Iterable[Output] = (),
        hold_s: float = FAIL_SAFE_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hold_s = hold_s
        self.clock = clock
        self.outputs: list[Output] = list(outputs)
        self.cameras: dict[str, _Camera] = {}
        self.agents: dict[str, AgentStatus] = {}
        self.total = 0
        self._results: list[Result] = []
        self._events: list[FailSafeEvent] = []
        self._dirty_cams: set[str] = set()
        self._dirty_agents: set[str] = set()
        self._starting = True
        self._lock = threading.Lock()  # the bench reads status() from another thread
        self.recent_events: deque[FailSafeEvent] = deque(maxlen=100)
        for camera_id in cameras:
            cam = self._camera(camera_id)
            cam.startup = True  # a configured camera is uninspected until its first verdict
        self._event(FailSafeKind.STARTUP, "bridge", "bridge started; no agent heard yet", tuple(self.cameras))

    # -- input (bridge thread) --

    def _camera(self, camera_id: str) -> _Camera:
        cam = self.cameras.get(camera_id)
        if cam is None:
            cam = self.cameras[camera_id] = _Camera(index=len(self.cameras))
            self._dirty_cams.add(camera_id)
        return cam

    def _event(self, kind: str, subject: str, detail: str, cameras: tuple[str, ...]) -> None:
        event = FailSafeEvent(kind, subject, detail, cameras, self.clock(), time.time_ns())
        self._events.append(event)
        self.recent_events.append(event)

    def _add(self, cam: _Camera, result: Result) -> Result:
        """Count a result made with counter=cam.counter + 1 (built whole: dataclasses.replace costs ~5 us)."""
        cam.counter = result.counter
        cam.by_decision[result.decision.value] += 1
        self.total += 1
        cam.last = result
        self._results.append(result)
        self._dirty_cams.add(result.camera_id)
        return result

    def on_verdict(self, v: Verdict, outcome: str) -> Result | None:
        """A verdict the tracker classified as new/late/reused/duplicate; a Result for new and reused ones.

        A reused seq's rejected verdict is the second part's: it gets its own (divert) result.
        """
        cam = self._camera(v.camera_id)
        if outcome == "late":
            cam.late += 1  # the part was already failed safe; its late verdict does not un-reject it
            self._dirty_cams.add(v.camera_id)
            return None
        if outcome not in ("new", "reused"):
            return None
        if cam.startup or cam.agent_id != v.agent_id:
            cam.startup = False
            cam.agent_id = v.agent_id
            self._dirty_cams.add(v.camera_id)
        self._starting = False
        agent = self.agents.get(v.agent_id)
        if cam.agent_lost and not (agent and agent.lost):
            cam.agent_lost = False
        return self._add(cam, Result(
            camera_id=v.camera_id, seq=v.seq, decision=decision_of(v), counter=cam.counter + 1, part_id=v.part_id,
            class_name=v.class_name, class_index=v.class_index, confidence=v.confidence, model_id=v.model_id,
            agent_id=v.agent_id, epoch=v.epoch, status=v.status.value, reason=v.reason,
            capture_ns=v.capture_ns, published_ns=v.published_ns, bridge_ns=time.time_ns(),
        ))

    def on_fail_safe_part(self, camera_id: str, seq: int, why: str) -> Result:
        """The tracker failed a part safe (gap timeout, agent lost or restarted): a fail_safe Result."""
        cam = self._camera(camera_id)
        kind = FailSafeKind.GAP if why == "verdict_timeout" else why
        if kind != FailSafeKind.AGENT_LOST:  # agent_lost is its own reason, held while the agent is away
            cam.last_gap, cam.hold_reason = self.clock(), str(kind)
        return self._add(cam, Result(
            camera_id=camera_id, seq=seq, decision=Decision.FAIL_SAFE, counter=cam.counter + 1, agent_id=cam.agent_id,
            model_id=cam.last.model_id if cam.last else "", epoch=cam.last.epoch if cam.last else 0,
            status="fail_safe", reason=str(kind), bridge_ns=time.time_ns(),
        ))

    def on_heartbeat(self, hb: Heartbeat) -> None:
        """Agent state, epoch and model from a heartbeat; clears agent-lost."""
        old = self.agents.get(hb.agent_id)
        cams = old.cameras if old else ()
        self.agents[hb.agent_id] = AgentStatus(hb.agent_id, hb.epoch, hb.state.value, hb.model_id, self.clock(),
                                               False, cams)
        self._starting = False
        if old is None or old.lost or old.epoch != hb.epoch or old.state != hb.state.value:
            self._dirty_agents.add(hb.agent_id)
        if old is not None and old.lost:
            for camera_id in cams:
                self.cameras[camera_id].agent_lost = False
                self._dirty_cams.add(camera_id)

    def on_tracker_event(self, kind: str, subject: str, detail: str, cameras: Iterable[str]) -> None:
        """An agent-level tracker event (agent_seen, agent_restart, agent_lost, agent_back)."""
        cams = tuple(sorted(cameras))
        if kind == "agent_lost":
            agent = self.agents.get(subject)
            if agent is None:
                agent = AgentStatus(subject, 0, "unknown", "", self.clock(), True, cams)
            self.agents[subject] = replace(agent, lost=True, state="lost", cameras=cams)
            self._dirty_agents.add(subject)
            for camera_id in cams:
                self._camera(camera_id).agent_lost = True
                self._dirty_cams.add(camera_id)
        elif kind == "agent_restart":
            for camera_id in cams:
                cam = self._camera(camera_id)
                cam.last_gap, cam.hold_reason = self.clock(), FailSafeKind.AGENT_RESTART.value
                self._dirty_cams.add(camera_id)
        elif kind in ("agent_seen", "agent_back"):
            agent = self.agents.get(subject)
            if agent is not None:
                self.agents[subject] = replace(agent, lost=False, cameras=cams)
                self._dirty_agents.add(subject)
        if kind in ("agent_lost", "agent_restart", "agent_back", "agent_seen", "gap"):
            self._event(kind, subject, detail, cams)

    def note_cameras(self, agent_id: str, cameras: Iterable[str]) -> None:
        """Which cameras an agent serves (from the tracker), so agent objects can list them."""
        agent = self.agents.get(agent_id)
        cams = tuple(sorted(cameras))
        if agent is not None and agent.cameras != cams:
            self.agents[agent_id] = replace(agent, cameras=cams)
            self._dirty_agents.add(agent_id)

    # -- state --

    def _status(self, camera_id: str, cam: _Camera, now: float) -> CameraStatus:
        reasons = []
        if cam.startup:
            reasons.append(FailSafeKind.STARTUP.value)
        if cam.agent_lost:
            reasons.append(FailSafeKind.AGENT_LOST.value)
        if now - cam.last_gap < self.hold_s:
            reasons.append(cam.hold_reason)
        return CameraStatus(
            camera_id=camera_id, index=cam.index, counter=cam.counter,
            by_decision=tuple(cam.by_decision.items()), late=cam.late, fail_safe=bool(reasons),
            reasons=tuple(reasons), agent_lost=cam.agent_lost, agent_id=cam.agent_id, last=cam.last,
        )

    def bridge_status(self) -> BridgeStatus:
        """Bridge-wide figures now."""
        up = sum(not a.lost for a in self.agents.values())
        cam_fs = any(c.snapshot is not None and c.snapshot.fail_safe for c in self.cameras.values())
        return BridgeStatus(total=self.total, cameras=len(self.cameras), agents_up=up, agents=len(self.agents),
                            fail_safe=cam_fs or up == 0, starting=self._starting)

    @property
    def pending(self) -> int:
        """Results made since the last flush."""
        return len(self._results)

    def flush(self) -> Update:
        """Collect what changed (including gap holds that expired), deliver it to every output, return it."""
        now = self.clock()
        for camera_id, cam in self.cameras.items():
            snap = cam.snapshot
            holding = now - cam.last_gap < self.hold_s
            if snap is None or (cam.hold_reason in snap.reasons) != holding:
                self._dirty_cams.add(camera_id)
        cams = []
        for camera_id in sorted(self._dirty_cams, key=lambda c: self.cameras[c].index):
            cam = self.cameras[camera_id]
            cam.snapshot = self._status(camera_id, cam, now)
            cams.append(cam.snapshot)
        agents = tuple(self.agents[a] for a in sorted(self._dirty_agents))
        with self._lock:
            update = Update(tuple(self._results), tuple(cams), agents, tuple(self._events), self.bridge_status())
        self._results, self._events = [], []
        self._dirty_cams.clear()
        self._dirty_agents.clear()
        if update.results or update.cameras or update.agents or update.events:
            for out in self.outputs:
                out.deliver(update)
        return update

    def snapshot(self) -> tuple[tuple[CameraStatus, ...], tuple[AgentStatus, ...], BridgeStatus]:
        """Every camera and agent as of the last flush (outputs start from this)."""
        cams = tuple(c.snapshot for c in sorted(self.cameras.values(), key=lambda c: c.index) if c.snapshot)
        return cams, tuple(self.agents.values()), self.bridge_status()


class FlushPacer:
    """When the bridge hands its results to the outputs: soon at a low rate, in bigger batches at a high one.

    Each update costs every output a fixed overhead (a thread wake-up, a write of each changed camera variable), so
    at 5,000 results/s they are batched every 5 ms; at 1,000/s that wait would be a quarter of the OPC UA event
    latency budget (20 ms p99), so the period follows the result rate: `per_result_s` x results/s, within
    [min_s, max_s] (2 ms at 1,000/s, 5 ms from 2,500/s). Idle, it is max_s (expiring fail-safe holds need flushes).
    """

    def __init__(self, *, min_s: float = 0.001, max_s: float = 0.005, per_result_s: float = 2e-6,
                 smoothing: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError("need 0 < min_s <= max_s")
        self.min_s, self.max_s, self.per_result_s, self.smoothing = min_s, max_s, per_result_s, smoothing
        self.clock = clock
        self.rate = 0.0  # results/s, smoothed over flushes
        self.last = clock()

    @property
    def period(self) -> float:
        """Seconds between flushes at the current rate."""
        return min(self.max_s, max(self.min_s, self.rate * self.per_result_s))

    def wait(self, pending: int) -> float:
        """Seconds until a flush is due with `pending` results waiting (0: now)."""
        return max(0.0, self.last + (self.period if pending else self.max_s) - self.clock())

    def due(self, pending: int) -> bool:
        """Whether to flush now, with `pending` results waiting."""
        return self.wait(pending) <= 0

    def flushed(self, results: int) -> None:
        """A flush of `results` results happened now."""
        now = self.clock()
        dt = now - self.last
        if dt > 0:
            self.rate += self.smoothing * (results / dt - self.rate)
        self.last = now


class AckQueue:
    """A bounded queue of results a PLC must acknowledge (the smart-camera handshake); full is a fail-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.items: deque[Result] = deque()
        self.overflowed = 0  # results that found the queue full (their parts must be treated as rejects)
        self.acknowledged = 0

    @property
    def full(self) -> bool:
        """No room: the camera is fail-safe until the PLC acknowledges."""
        return len(self.items) >= self.capacity

    def push(self, result: Result) -> bool:
        """Queue a result; False (and counted) when the queue is full."""
        if self.full:
            self.overflowed += 1
            return False
        self.items.append(result)
        return True

    def acknowledge(self, seq: int) -> int:
        """Remove the result with this seq and every older one; how many were removed (0: seq not queued)."""
        for pos, item in enumerate(self.items):
            if item.seq == seq:
                for _ in range(pos + 1):
                    self.items.popleft()
                self.acknowledged += pos + 1
                return pos + 1
        return 0

    def oldest(self) -> Result | None:
        """The result the PLC should take next."""
        return self.items[0] if self.items else None


class ServerThread:
    """An output's server in its own thread and asyncio loop: start() waits until it listens, or re-raises why not.

    The subclass's _main() coroutine sets _ready once listening; if it raises before that, start() re-raises it.
    """

    name = "server"
    label = "server"

    def __init__(self) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"tdn-{self.name}", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    async def _main(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() or logged; the bridge must not die
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                logging.getLogger(f"tdn.plc.{self.name}").exception("%s server failed", self.label)
        finally:
            self.loop.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server; raises what the server raised if it could not listen."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.label} server did not start in time")
        if self._error is not None:
            raise self._error
