"""The line core: the life of every frame the agent accepts, socket-free and thread-free, on an injected clock.

Every accepted frame ends in exactly one verdict, ok, shed or rejected, released in its camera's acceptance
order. The service moves bytes and runs threads; everything it publishes comes from here.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agent.batcher import BatchPolicy, MicroBatcher
from agent.explain import AGENT_METHOD
from agent.logging import RateLimited
from agent.sequencer import Sequencer
from protocol import Decision, Reason, Status, Verdict

Clock = Callable[[], int]
# Called once per counted event: (event, reason or None, how many). Metrics and heartbeat counters both come
# from Line.counts, which only _record writes, so the two cannot disagree.
Sink = Callable[[str, str | None, int], None]

EVENTS = ("received", "accepted", "inferred", "shed", "rejected", "rejected_unattributed", "published", "batches",
          "explained", "explain_dropped", "auth_denied", "model_swaps", "model_refused", "commands",
          "commands_refused", "thresholds_changed")
# Review verdicts waiting for their explanation: every one is explained (an operator must see why), bounded.
REVIEW_EXPLAIN_CAP = 64
# Seqs remembered per camera for duplicate detection, and cameras remembered: both bounded, so a peer spraying
# ids or seqs cannot grow the agent's memory.
SEQ_WINDOW = 4096
MAX_CAMERAS = 4096


# agent/decision.py's codes, in order.
DECISIONS = (Decision.PASS, Decision.DIVERT, Decision.REVIEW)


class Rule(Protocol):
    """Turns a batch of softmax rows into decisions: the model card's calibrated rule (agent/decision.py)."""

    def decide(self, probs: np.ndarray, pooled: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """(decision codes [N], class index [N], calibrated confidence [N], OOD score [N])."""
        ...


@dataclass(frozen=True)
class ServingModel:
    """The model that decides: its id (model and variant), class list, pass classes and decision rule."""

    model_id: str
    classes: tuple[str, ...]
    pass_classes: tuple[str, ...]
    rule: Rule
    thresholds: dict[str, float] = field(default_factory=dict)
    needs_pooled: bool = False  # the rule's OOD score needs the pooled features, not only the probabilities
    runner: Any = field(default=None, compare=False)  # the backend that runs it; the line never calls it
    input: Any = None  # its input geometry (agent.geometry.InputSpec), for intake
    # The rule before run-time commands (card, then settings): what a control command's thresholds apply to.
    base_rule: Any = field(default=None, compare=False)
    # How its verdicts are explained (agent.explain.GRADIENT_FREE; the card's, see card.ModelCard.explain_method).
    explain_method: str = AGENT_METHOD


@dataclass(slots=True, eq=False)
class InFlight:
    """One accepted frame from intake to verdict: the one shape it has while the agent holds it."""

    ticket: int
    camera_id: str
    seq: int
    capture_ns: int | None  # camera's wall clock: latency statistics only
    received_ns: int  # agent's monotonic clock: the batch timer and shedding
    received_wall_ns: int  # agent's wall clock, as published in the verdict
    part_id: str | None
    label: str | None
    image: np.ndarray | None  # the model input, uint8 [size,size]; None for a refused frame


@dataclass(slots=True, eq=False)
class Job:
    """One batch handed to inference; it remembers the model it was dispatched to (a swap never splits it)."""

    number: int
    items: list[InFlight]
    padded_size: int
    model: ServingModel
    dispatched_ns: int


@dataclass(slots=True)
class Inferred:
    """What inference hands back for one job: probabilities (and pooled features), or the error."""

    job: Job
    probs: np.ndarray | None
    pooled: np.ndarray | None
    error: str | None
    inferred_ns: int  # wall clock, as published
    infer_s: float  # backend time alone, without the hand-over
    lane: int = 0  # the inference worker that ran it


class OutputError(ValueError):
    """The backend's output for a batch is unusable (short, misshapen, not finite)."""


def check_output(probs: Any, rows: int, n_classes: int) -> np.ndarray:
    """The backend's [N,C] probabilities for the first `rows` rows, or OutputError.

    A runtime bug must end as rejected verdicts for its batch, not as an exception in the I/O loop.
    """
    out = np.asarray(probs)
    if out.ndim != 2 or out.shape[0] < rows or out.shape[1] != n_classes:
        raise OutputError(f"backend returned shape {out.shape} for {rows} frames of {n_classes} classes")
    out = out[:rows]
    if not np.isfinite(out).all():
        raise OutputError("backend returned non-finite probabilities")
    return out


class Line:
    """Owns every accepted frame until its verdict is released. Methods return the verdicts to publish now."""

    def __init__(self, policy: BatchPolicy, model: ServingModel, *, agent_id: str, epoch: int,
                 monotonic_ns: Clock = time.monotonic_ns, wall_ns: Clock = time.time_ns,
                 sink: Sink | None = None, seq_window: int = SEQ_WINDOW, log: RateLimited | None = None,
                 lanes: int = 1) -> None:
        self.model = model
        # Inference workers: while one is free, a partial batch may start; once all are busy, only a full one.
        self.lanes = lanes
        self.agent_id = agent_id
        self.epoch = epoch
        self._mono = monotonic_ns
        self._wall = wall_ns
        self._sink = sink
        self._log = log
        self._window = seq_window
        self.batcher: MicroBatcher[InFlight] = MicroBatcher(policy, monotonic_ns)
        self._order: Sequencer[Verdict] = Sequencer()
        self._seen: OrderedDict[str, tuple[deque[int], set[int]]] = OrderedDict()
        self._jobs: dict[int, Job] = {}
        self._job_no = 0
        self.counts: dict[str, int] = dict.fromkeys(EVENTS, 0)
        self.by_reason: dict[str, int] = {}
        self.batch_sizes: dict[int, int] = {}
        self.candidate: tuple[tuple[bool, float], InFlight, Verdict] | None = None
        self.to_review: deque[tuple[InFlight, Verdict]] = deque()

    # --- accounting: the one path ---

    def record(self, event: str, reason: str | None = None, n: int = 1) -> None:
        """Count `n` of `event` (one of EVENTS), by reason for rejections, and tell the sink."""
        self.counts[event] += n
        if reason is not None and event in ("rejected", "rejected_unattributed"):
            self.by_reason[reason] = self.by_reason.get(reason, 0) + n
        if self._sink is not None:
            self._sink(event, reason, n)

    def counters(self) -> dict[str, int]:
        """What the heartbeat reports: every event, and rejections by reason as rejected_<reason>."""
        out = dict(self.counts)
        out.update({f"rejected_{k}": v for k, v in self.by_reason.items()})
        return out

    @property
    def outstanding(self) -> int:
        """Accepted frames not yet released: queued, in flight, or held behind an earlier one."""
        return self._order.outstanding

    @property
    def undecided(self) -> int:
        """Accepted frames without a verdict yet: queued, or in a batch being inferred."""
        return len(self.batcher) + sum(len(j.items) for j in self._jobs.values())

    @property
    def in_flight(self) -> int:
        """Batches handed to inference and not yet completed."""
        return len(self._jobs)

    @property
    def _all_busy(self) -> bool:
        """Every inference worker has a batch: only a full batch may start now."""
        return len(self._jobs) >= self.lanes

    def stalled(self, limit_s: float) -> bool:
        """Whether the oldest batch in flight has run longer than limit_s (the watchdog stops pinging then)."""
        oldest = min((j.dispatched_ns for j in self._jobs.values()), default=None)
        return oldest is not None and self._mono() - oldest > limit_s * 1e9

    # --- intake ---

    def accept(self, camera_id: str, seq: int, *, capture_ns: int | None, part_id: str | None, label: str | None,
               image: np.ndarray, beyond_cap: bool = False) -> list[Verdict]:
        """A decoded frame. Queued for inference, or rejected `duplicate_seq` if its seq was accepted lately.

        beyond_cap: one of the images of a message that carries several, read while the queue had space.
        """
        self.record("received")
        if self._remember(camera_id, seq):
            self._warn(Reason.DUPLICATE_SEQ, camera_id, seq, "seq sent lately by this camera")
            return self._refuse(Reason.DUPLICATE_SEQ, camera_id, seq, capture_ns, part_id, label)
        item = self._admit(camera_id, seq, capture_ns, part_id, label, image)
        if not self.batcher.offer(item, beyond_cap=beyond_cap):
            # The service reads at most batcher.space frames, so this is a bug; still, nothing is lost.
            return self._finish([item], Status.SHED, Reason.DEADLINE)
        return []

    def reject(self, reason: str, camera_id: str | None, seq: int | None, *, capture_ns: int | None = None,
               part_id: str | None = None, label: str | None = None, detail: str = "") -> list[Verdict]:
        """A frame refused at intake: a rejected verdict when its camera and seq were readable, else a count."""
        self.record("received")
        self._warn(str(reason), camera_id, seq, detail)
        if camera_id is None or seq is None:
            self.record("rejected_unattributed", str(reason))
            return []
        self._remember(camera_id, seq)
        return self._refuse(str(reason), camera_id, seq, capture_ns, part_id, label)

    def _warn(self, reason: str, camera_id: str | None, seq: int | None, detail: str) -> None:
        if self._log is not None:
            self._log.warning("rejected frame", str(reason), reason=str(reason), camera_id=camera_id, seq=seq,
                              detail=detail[:200])

    def _refuse(self, reason: str, camera_id: str, seq: int, capture_ns: int | None, part_id: str | None,
                label: str | None) -> list[Verdict]:
        item = self._admit(camera_id, seq, capture_ns, part_id, label, None)
        return self._finish([item], Status.REJECTED, reason)

    def _admit(self, camera_id: str, seq: int, capture_ns: int | None, part_id: str | None, label: str | None,
               image: np.ndarray | None) -> InFlight:
        self.record("accepted")
        ticket = self._order.admit(camera_id)
        return InFlight(ticket, camera_id, seq, capture_ns, self._mono(), self._wall(), part_id, label, image)

    def _remember(self, camera_id: str, seq: int) -> bool:
        """Note the seq; True if this camera sent it within the last seq_window frames."""
        entry = self._seen.get(camera_id)
        if entry is None:
            if len(self._seen) >= MAX_CAMERAS:
                self._seen.popitem(last=False)
            entry = self._seen[camera_id] = (deque(), set())
        else:
            self._seen.move_to_end(camera_id)
        recent, members = entry
        if seq in members:
            return True
        recent.append(seq)
        members.add(seq)
        if len(recent) > self._window:
            members.discard(recent.popleft())
        return False

    # --- batching ---

    def next_deadline_ns(self) -> int | None:
        """Monotonic time by which poll() should run next, None when nothing waits."""
        return self.batcher.next_deadline_ns(busy=self._all_busy)

    def poll(self, *, flush: bool = False) -> tuple[Job | None, list[Verdict]]:
        """A batch to infer if one is due (any waiting batch with flush=True), and the verdicts of stale frames."""
        batch = next(iter(self.batcher.flush()), None) if flush else self.batcher.poll(busy=self._all_busy)
        if batch is None:
            return None, []
        shed = self._finish(batch.shed, Status.SHED, Reason.DEADLINE)
        if not batch.run:
            return None, shed
        self._job_no += 1
        job = Job(self._job_no, batch.run, batch.padded_size, self.model, self._mono())
        self._jobs[job.number] = job
        self.record("batches")
        self.batch_sizes[len(batch.run)] = self.batch_sizes.get(len(batch.run), 0) + 1
        return job, shed

    def expire(self) -> list[Verdict]:
        """Shed verdicts for every queued frame over the deadline now."""
        return self._finish(self.batcher.expire(), Status.SHED, Reason.DEADLINE)

    def complete(self, job: Job, probs: Any, pooled: np.ndarray | None = None, error: str | None = None,
                 inferred_ns: int | None = None) -> list[Verdict]:
        """A batch came back: ok verdicts decided by the job's model, or rejected ones if inference failed."""
        if self._jobs.pop(job.number, None) is None:
            return []  # abandoned at the shutdown bound: already shed
        n = len(job.items)
        if error is None:
            try:
                rows = check_output(probs, n, len(job.model.classes))
                decided = job.model.rule.decide(rows, None if pooled is None else np.asarray(pooled)[:n])
            except (OutputError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            self._warn(Reason.INFERENCE_ERROR, None, None, f"{error} (batch of {n})")
            return self._finish(job.items, Status.REJECTED, Reason.INFERENCE_ERROR)
        return self._decide(job, rows, decided, inferred_ns if inferred_ns is not None else self._wall())

    def _decide(self, job: Job, rows: np.ndarray, decided: tuple[np.ndarray, ...], inferred_ns: int
                ) -> list[Verdict]:
        m = job.model
        codes, index_a, conf_a = decided[0], decided[1], decided[2]
        # One vectorised clip + tolist per batch: per-row numpy scalar calls cost ~50 us a frame.
        probs = np.clip(rows.astype(np.float64), 0.0, 1.0).tolist()
        index = index_a.tolist()
        conf = np.clip(conf_a.astype(np.float64), 0.0, 1.0).tolist()
        decisions = [DECISIONS[c] for c in codes.tolist()]
        out: list[Verdict] = []
        self.record("inferred", n=len(job.items))
        for item, row, idx, c, decision in zip(job.items, probs, index, conf, decisions, strict=True):
            # Every value comes from a validated frame or the checked backend output: built without re-validation
            # (tests/unit/test_line.py holds these verdicts to the full validator).
            v = Verdict.unchecked(
                item.camera_id, item.seq, Status.OK, None, m.classes[idx], idx, c, tuple(row),
                decision is not Decision.PASS, m.model_id, self.agent_id, self.epoch, item.capture_ns,
                item.received_wall_ns, inferred_ns, 0, item.part_id, item.label, decision,
            )
            self._consider(item, v)
            out.extend(self._release(item, v))
        return out

    def abandon(self, reason: str = Reason.SHUTDOWN) -> list[Verdict]:
        """The shutdown bound ran out: every frame still queued or in flight is shed, so none is lost silently."""
        items = [p for b in self.batcher.flush() for p in (*b.shed, *b.run)]
        for job in sorted(self._jobs.values(), key=lambda j: j.number):
            items.extend(job.items)
        self._jobs.clear()
        return self._finish(items, Status.SHED, reason)

    def swap(self, model: ServingModel) -> None:
        """Serve `model` from the next batch on; batches already dispatched finish on the model they started."""
        self.model = model
        self.record("model_swaps")

    def retune(self, model: ServingModel) -> None:
        """Decide with `model`'s new thresholds from the next batch on (same model, same model_id)."""
        self.model = model
        self.record("thresholds_changed")

    # --- verdicts ---

    def _finish(self, items: Sequence[InFlight], status: Status, reason: str) -> list[Verdict]:
        """Non-ok verdicts: no inference fields, and fail-safe (defect, divert)."""
        if not items:
            return []
        self.record("shed" if status is Status.SHED else "rejected", str(reason), len(items))
        reason = str(reason)
        out: list[Verdict] = []
        for item in items:
            v = Verdict.unchecked(
                item.camera_id, item.seq, status, reason, None, None, None, None, True, self.model.model_id,
                self.agent_id, self.epoch, item.capture_ns, item.received_wall_ns, None, 0, item.part_id, item.label,
                Decision.DIVERT,
            )
            out.extend(self._release(item, v))
        return out

    def _release(self, item: InFlight, v: Verdict) -> list[Verdict]:
        ready = self._order.complete(item.camera_id, item.ticket, v)
        if ready:
            self.record("published", n=len(ready))
        return ready

    # --- explanation candidates ---

    def _consider(self, item: InFlight, v: Verdict) -> None:
        if v.decision is Decision.REVIEW:
            if len(self.to_review) >= REVIEW_EXPLAIN_CAP:
                self.to_review.popleft()
                self.record("explain_dropped")
            self.to_review.append((item, v))
            return
        # Prefer a defect verdict, then the least confident one: those are what an operator wants to see.
        score = (v.defect, -(v.confidence or 0.0))
        if self.candidate is None or score > self.candidate[0]:
            self.candidate = (score, item, v)

    def reviews_waiting(self) -> int:
        """How many review verdicts wait for an explanation."""
        return len(self.to_review)

    def take_review(self) -> tuple[InFlight, Verdict] | None:
        """The oldest review verdict not yet explained: these go before the periodic snapshots."""
        return self.to_review.popleft() if self.to_review else None

    def take_candidate(self) -> tuple[InFlight, Verdict] | None:
        """The most interesting ok verdict since the last call, to explain off the hot path."""
        if self.candidate is None:
            return None
        _, item, v = self.candidate
        self.candidate = None
        return item, v
