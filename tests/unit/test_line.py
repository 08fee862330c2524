"""The line core without sockets or threads: every accepted frame ends in exactly one verdict, in camera order."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.batcher import BatchPolicy
from agent.decision import DecisionRule
from agent.line import Job, Line, OutputError, ServingModel, check_output
from protocol import Decision, Status, Verdict

MS = 1_000_000
CLASSES = ("good", "scratch", "dent")


class FakeClock:
    """Monotonic and wall clocks that move only when told to (the wall one may also jump)."""

    def __init__(self) -> None:
        self.mono = 10_000 * MS
        self.wall = 1_700_000_000_000 * MS

    def monotonic_ns(self) -> int:
        return self.mono

    def wall_ns(self) -> int:
        return self.wall


def model(name: str = "m1", passes: tuple[str, ...] = ("good",)) -> ServingModel:
    """A model whose rule passes a pass class at >= 0.6, diverts a defect class at >= 0.6, else review."""
    rule = DecisionRule(CLASSES, passes, pass_threshold=0.6, min_confidence=0.6)
    return ServingModel(name, CLASSES, passes, rule)


def policy(**kw: object) -> BatchPolicy:
    args: dict[str, object] = dict(max_batch_size=4, max_queue_delay_us=2000, shed_deadline_ms=100.0, queue_cap=8,
                                   batch_sizes=(1, 2, 4))
    args.update(kw)
    return BatchPolicy(**args)  # type: ignore[arg-type]


def make_line(clock: FakeClock, lanes: int = 1, **kw: object) -> tuple[Line, list[tuple[str, str | None, int]]]:
    events: list[tuple[str, str | None, int]] = []
    line = Line(policy(**kw), model(), agent_id="a1", epoch=7, monotonic_ns=clock.monotonic_ns,
                wall_ns=clock.wall_ns, sink=lambda e, r, n: events.append((e, r, n)), lanes=lanes)
    return line, events


IMG = np.zeros((8, 8), np.uint8)


def onehot(n: int, cls: int, p: float = 0.9) -> np.ndarray:
    rest = (1 - p) / (len(CLASSES) - 1)
    out = np.full((n, len(CLASSES)), rest, np.float32)
    out[:, cls] = p
    return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestLineVerdicts:
    """Each way a frame can end, and what its verdict says."""

    def test_ok_verdict_carries_decision_and_model(self, clock: FakeClock) -> None:
        """A full batch is dispatched, and its rows become ok verdicts with the rule's decision."""
        line, _ = make_line(clock)
        for seq in range(4):
            assert line.accept("c1", seq, capture_ns=1, part_id=f"P{seq}", label=None, image=IMG) == []
        job, shed = line.poll()
        assert job is not None and shed == [] and len(job.items) == 4
        probs = np.concatenate([onehot(2, 0), onehot(1, 1), onehot(1, 2, 0.5)])
        out = line.complete(job, probs)
        assert [v.seq for v in out] == [0, 1, 2, 3]
        assert [v.decision for v in out] == [Decision.PASS, Decision.PASS, Decision.DIVERT, Decision.REVIEW]
        assert [v.defect for v in out] == [False, False, True, True]
        assert out[2].class_name == "scratch" and out[2].part_id == "P2" and out[0].model_id == "m1"

    def test_shed_uses_the_agents_clock_not_the_cameras(self, clock: FakeClock) -> None:
        """A frame stamped an hour in the past is inferred; one that waited past the deadline here is shed."""
        line, _ = make_line(clock)
        line.accept("c1", 0, capture_ns=clock.wall - 3600_000 * MS, part_id=None, label=None, image=IMG)
        clock.mono += 3 * MS
        job, shed = line.poll()
        assert job is not None and shed == []
        line.accept("c1", 1, capture_ns=0, part_id=None, label=None, image=IMG)
        clock.mono += 101 * MS
        out = line.expire()
        assert [(v.seq, v.status, v.reason, v.decision) for v in out] == []  # held behind seq 0
        released = line.complete(job, onehot(1, 0))
        assert [(v.seq, v.status) for v in released] == [(0, Status.OK), (1, Status.SHED)]
        assert released[1].reason == "deadline" and released[1].decision is Decision.DIVERT

    def test_refused_frame_echoes_its_fields(self, clock: FakeClock) -> None:
        """A readable refused frame gets a rejected verdict with capture time, part id and label."""
        line, _ = make_line(clock)
        [v] = line.reject("undecodable", "c1", 5, capture_ns=123, part_id="P5", label="scratch")
        assert (v.status, v.reason, v.capture_ns, v.part_id, v.label) == (Status.REJECTED, "undecodable", 123,
                                                                          "P5", "scratch")

    def test_unattributed_rejection_is_counted_only(self, clock: FakeClock) -> None:
        """Without a camera and seq there is nobody to answer: a counter, no verdict."""
        line, events = make_line(clock)
        assert line.reject("bad_msgpack", None, None) == []
        assert line.counters()["rejected_unattributed"] == 1 and line.counters()["rejected_bad_msgpack"] == 1
        assert ("rejected_unattributed", "bad_msgpack", 1) in events

    @pytest.mark.parametrize("gap_ms", [0, 50, 1000])
    def test_reused_seq_is_rejected_whatever_the_timing(self, clock: FakeClock, gap_ms: int) -> None:
        """A seq the camera sent lately gets a duplicate_seq verdict, after the original's, at any spacing."""
        line, _ = make_line(clock)
        line.accept("c1", 3, capture_ns=1, part_id="first", label=None, image=IMG)
        job, _ = line.poll(flush=True)
        assert job is not None
        done = line.complete(job, onehot(1, 0)) if gap_ms else []
        clock.mono += gap_ms * MS
        dup = line.accept("c1", 3, capture_ns=2, part_id="second", label=None, image=IMG)
        if not gap_ms:
            assert dup == []  # held behind the original, still in flight
            done = line.complete(job, onehot(1, 0))
        released = done + dup
        assert [(v.part_id, v.status, v.reason) for v in released] == [
            ("first", Status.OK, None), ("second", Status.REJECTED, "duplicate_seq")]

    def test_inference_error_rejects_the_batch(self, clock: FakeClock) -> None:
        """A failed or misshapen backend output rejects exactly its batch."""
        line, _ = make_line(clock)
        for seq in range(4):
            line.accept("c1", seq, capture_ns=1, part_id=None, label=None, image=IMG)
        job, _ = line.poll()
        assert job is not None
        out = line.complete(job, np.zeros((4, 5), np.float32))  # 5 columns for a 3-class model
        assert {(v.status, v.reason) for v in out} == {(Status.REJECTED, "inference_error")}
        assert line.outstanding == 0

    def test_swap_between_batches(self, clock: FakeClock) -> None:
        """A batch dispatched before a swap is decided by the old model, the next by the new one."""
        line, _ = make_line(clock)
        for seq in range(4):
            line.accept("c1", seq, capture_ns=1, part_id=None, label=None, image=IMG)
        first, _ = line.poll()
        line.swap(model("m2", passes=()))
        for seq in range(4, 8):
            line.accept("c1", seq, capture_ns=1, part_id=None, label=None, image=IMG)
        second, _ = line.poll()
        assert first is not None and second is not None
        out = line.complete(first, onehot(4, 0)) + line.complete(second, onehot(4, 0))
        assert [v.model_id for v in out] == ["m1"] * 4 + ["m2"] * 4
        assert [v.decision for v in out] == [Decision.PASS] * 4 + [Decision.DIVERT] * 4

    def test_abandon_sheds_queued_and_in_flight(self, clock: FakeClock) -> None:
        """At the shutdown bound every owed frame is shed; a late completion of an abandoned batch is ignored."""
        line, _ = make_line(clock)
        for seq in range(6):
            line.accept("c1", seq, capture_ns=1, part_id=None, label=None, image=IMG)
        job, _ = line.poll()
        assert job is not None
        out = line.abandon()
        assert [(v.seq, v.reason) for v in out] == [(s, "shutdown") for s in range(6)]
        assert line.complete(job, onehot(4, 0)) == []
        assert line.outstanding == 0

    def test_every_review_verdict_is_queued_for_explanation(self, clock: FakeClock) -> None:
        """Review verdicts wait for their explanation in order; other verdicts compete for the periodic one."""
        line, _ = make_line(clock)
        for seq in range(4):
            line.accept("c1", seq, capture_ns=1, part_id=None, label=None, image=IMG)
        job, _ = line.poll()
        assert job is not None
        line.complete(job, np.concatenate([onehot(1, 1, 0.5), onehot(1, 1), onehot(2, 2, 0.4)]))
        reviews = [line.take_review(), line.take_review(), line.take_review()]
        assert [r[1].seq if r else None for r in reviews] == [0, 2, 3]
        candidate = line.take_candidate()
        assert candidate is not None and candidate[1].seq == 1 and candidate[0].image is IMG

    def test_counts_feed_the_sink(self, clock: FakeClock) -> None:
        """The heartbeat counters and the sink see the same events."""
        line, events = make_line(clock)
        line.accept("c1", 0, capture_ns=1, part_id=None, label=None, image=IMG)
        job, _ = line.poll(flush=True)
        assert job is not None
        line.complete(job, onehot(1, 1))
        totals: dict[str, int] = defaultdict(int)
        for e, _, n in events:
            totals[e] += n
        assert {k: v for k, v in line.counts.items() if v} == dict(totals)
        assert totals == {"received": 1, "accepted": 1, "batches": 1, "inferred": 1, "published": 1}


class TestLanes:
    """Several inference workers: when a partial batch may start, and the order verdicts leave in."""

    def partial(self, clock: FakeClock, line: Line, start: int, n: int) -> Job | None:
        for seq in range(start, start + n):
            line.accept("c1", seq, capture_ns=1, part_id=None, label=None, image=IMG)
        clock.mono += 3 * MS  # past the 2 ms batch timer
        job, _ = line.poll()
        return job

    def test_a_free_worker_takes_a_partial_batch(self, clock: FakeClock) -> None:
        """With two workers and one batch running, a partial batch starts on the batch timer."""
        line, _ = make_line(clock, lanes=2)
        assert self.partial(clock, line, 0, 2) is not None
        second = self.partial(clock, line, 2, 2)
        assert second is not None and [p.seq for p in second.items] == [2, 3] and line.in_flight == 2
        assert self.partial(clock, line, 4, 2) is None  # both workers busy: only a full batch may start now
        assert line.next_deadline_ns() == clock.mono - 3 * MS + 100 * MS + 1  # the shed deadline, not the timer

    def test_one_worker_waits_for_a_full_batch(self, clock: FakeClock) -> None:
        """With one worker busy, the same partial batch waits (the single-worker behaviour is unchanged)."""
        line, _ = make_line(clock, lanes=1)
        assert self.partial(clock, line, 0, 2) is not None
        assert self.partial(clock, line, 2, 2) is None

    def test_out_of_order_completion_keeps_camera_order(self, clock: FakeClock) -> None:
        """The second worker finishing first holds its verdicts until the first worker's batch is in."""
        line, _ = make_line(clock, lanes=2)
        first, second = self.partial(clock, line, 0, 2), self.partial(clock, line, 2, 2)
        assert first is not None and second is not None
        assert line.complete(second, onehot(2, 1)) == []
        assert [v.seq for v in line.complete(first, onehot(2, 0))] == [0, 1, 2, 3]
        assert line.outstanding == 0


class LineMachine(RuleBasedStateMachine):
    """Random interleavings of arrivals, refusals, batches, completions, failures, swaps, clock jumps, shutdown."""

    @initialize()
    def setup(self) -> None:
        self.clock = FakeClock()
        self.line, self.events = make_line(self.clock)
        self.jobs: list[Job] = []
        self.accepted: dict[str, list[int]] = defaultdict(list)  # per camera: tickets in acceptance order
        self.released: list[Verdict] = []
        self.seq = 0
        self.stopped = False

    def _take(self, out: list[Verdict]) -> None:
        self.released.extend(out)

    @precondition(lambda self: not self.stopped and self.line.batcher.space > 0)
    @rule(camera=st.sampled_from(["c1", "c2", "c3"]), reuse=st.booleans())
    def arrive(self, camera: str, reuse: bool) -> None:
        seq = self.seq - 1 if reuse and self.seq else self.seq
        self.seq += 1
        # The part id numbers arrivals (not seqs, which may repeat), so release order can be checked against it.
        self._take(self.line.accept(camera, seq, capture_ns=None, part_id=f"{camera}-{self.seq}", label=None,
                                    image=IMG))

    @precondition(lambda self: not self.stopped)
    @rule(attributed=st.booleans())
    def refuse(self, attributed: bool) -> None:
        if attributed:
            self.seq += 1
            self._take(self.line.reject("undecodable", "c1", self.seq, part_id=f"c1-{self.seq}"))
        else:
            self._take(self.line.reject("bad_msgpack", None, None))

    @rule(ms=st.integers(0, 150), wall_jump_s=st.integers(-30, 30))
    def time_passes(self, ms: int, wall_jump_s: int) -> None:
        self.clock.mono += ms * MS
        self.clock.wall += wall_jump_s * 1_000_000_000

    @precondition(lambda self: not self.stopped)
    @rule(flush=st.booleans())
    def dispatch(self, flush: bool) -> None:
        job, shed = self.line.poll(flush=flush)
        self._take(shed)
        if job is not None:
            self.jobs.append(job)

    @precondition(lambda self: bool(self.jobs))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "error", "short", "nan"]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        job = self.jobs.pop(data.draw(st.integers(0, len(self.jobs) - 1)))
        n = len(job.items)
        probs = onehot(n, data.draw(st.integers(0, 2)), data.draw(st.floats(0.34, 1.0)))
        if outcome == "short":
            probs = probs[: n - 1]
        elif outcome == "nan":
            probs[0, 0] = np.nan
        self._take(self.line.complete(job, probs, error="boom" if outcome == "error" else None))

    @precondition(lambda self: not self.stopped)
    @rule()
    def swap(self) -> None:
        self.line.swap(model(f"m{self.line.counts['model_swaps'] + 2}"))

    @precondition(lambda self: not self.stopped)
    @rule()
    def shutdown(self) -> None:
        self._take(self.line.abandon())
        self.stopped = True

    @invariant()
    def every_accepted_frame_once(self) -> None:
        c = self.line.counts
        assert c["accepted"] == c["inferred"] + c["shed"] + c["rejected"] + self.line.undecided
        assert c["accepted"] == c["published"] + self.line.outstanding
        assert c["published"] == len(self.released)
        assert c["received"] == c["accepted"] + c["rejected_unattributed"]
        if self.stopped:
            assert self.line.outstanding == 0

    @invariant()
    def released_in_acceptance_order(self) -> None:
        # Each camera's verdicts leave in the order of its seqs' arrival, which is the order of part ids here.
        by_cam: dict[str, list[int]] = defaultdict(list)
        for v in self.released:
            by_cam[v.camera_id].append(int((v.part_id or "x-0").rsplit("-", 1)[1]))
        for seqs in by_cam.values():
            assert seqs == sorted(seqs)

    @invariant()
    def ok_verdicts_name_their_model(self) -> None:
        for v in self.released[-10:]:
            # Built without validation on the hot path: the full validator must accept every one.
            assert Verdict(**{f: getattr(v, f) for f in Verdict.__dataclass_fields__}) == v
        for v in self.released:
            if v.status is Status.OK:
                assert v.model_id.startswith("m") and v.decision is not None
            else:
                assert v.decision is Decision.DIVERT and v.defect


TestLineInvariant = LineMachine.TestCase
TestLineInvariant.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class TestCheckOutput:
    """check_output turns a runtime's misbehaviour into an error for the batch, never lost frames."""

    def test_trims_padding_rows(self) -> None:
        """A padded batch's extra rows are dropped; the real rows come back unchanged."""
        probs = np.full((8, 6), 1 / 6, np.float32)
        assert check_output(probs, 5, 6).shape == (5, 6)

    @pytest.mark.parametrize(
        ("probs", "match"),
        [
            (np.full((3, 6), 1 / 6), "shape"),  # fewer rows than frames: some would get no verdict
            (np.full((4, 5), 0.2), "shape"),
            (np.full((4,), 0.2), "shape"),
            (np.array([[np.nan, 0, 0, 0, 0, 1]] * 4), "non-finite"),
            (np.array([[np.inf, 0, 0, 0, 0, 1]] * 4), "non-finite"),
        ],
    )
    def test_bad_output_is_an_error(self, probs: np.ndarray, match: str) -> None:
        """Short, misshapen or non-finite output raises OutputError naming the problem."""
        with pytest.raises(OutputError, match=match):
            check_output(probs, 4, 6)


class _LongReason:
    """A runner whose identity carries auto's reason, longer than the SPEC's text bound."""

    name = "openvino"

    def identity(self) -> dict[str, str]:
        return {"backend": "openvino", "selected_by": "probe: " + ", ".join(f"variant{i} 5000" for i in range(40))}


class TestHeartbeat:
    def test_long_identity_text_is_cut_not_fatal(self, clock: FakeClock, tmp_path: Path) -> None:
        """A backend value over MAX_TEXT_LEN is cut to fit, so the heartbeat still encodes (it once killed the loop)."""
        from dataclasses import replace

        from agent.config import AgentSettings
        from agent.serving import heartbeat
        from protocol import MAX_TEXT_LEN, AgentState, decode_heartbeat, encode_heartbeat

        line, _ = make_line(clock)
        m = replace(model(), runner=_LongReason())
        hb = heartbeat(AgentSettings(state_dir=tmp_path), 1, 0, 1.0, AgentState.READY, line, m, m.runner)
        assert len(hb.backend["selected_by"]) == MAX_TEXT_LEN
        assert hb.backend["selected_by"].startswith("probe: variant0 5000")
        back = decode_heartbeat(encode_heartbeat(hb))
        assert back.backend == hb.backend
