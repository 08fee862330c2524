"""Unit tests for the bridge's one result model: decisions, counters, fail-safe states, fan-out and the ack queue."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from protocol import AgentState, Heartbeat, Status, Verdict
from simulators.plc.results import AckQueue, Decision, FlushPacer, ResultModel, Update, decision_of
from simulators.plc.synthetic import make_verdict
from simulators.plc_bridge import LineTracker


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Sink:
    """An output that keeps what it is given."""

    name = "sink"

    def __init__(self) -> None:
        self.updates: list[Update] = []

    def start(self) -> None:
        pass

    def deliver(self, update: Update) -> None:
        self.updates.append(update)

    def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {}


def shed(camera: str, seq: int) -> Verdict:
    now = time.time_ns()
    return Verdict(camera_id=camera, seq=seq, status=Status.SHED, reason="too_old", class_name=None,
                   class_index=None, confidence=None, probs=None, defect=True, model_id="m", agent_id="a1", epoch=1,
                   capture_ns=now, received_ns=now, inferred_ns=None, published_ns=now)


def hb(agent: str = "a1", epoch: int = 1) -> Heartbeat:
    return Heartbeat(agent_id=agent, epoch=epoch, hb_seq=0, time_ns=time.time_ns(), uptime_s=1.0,
                     state=AgentState.READY, queue_depth=0, counters={}, batch_sizes={}, backend={}, model_id="m")


class TestDecisionOf:
    """decision_of maps verdicts to pass/divert/review."""

    def test_defect_flag_without_agent_decision(self) -> None:
        """A v1 verdict: defect -> divert, no defect -> pass."""
        assert decision_of(make_verdict("c", 1, defect=True)) is Decision.DIVERT
        assert decision_of(make_verdict("c", 1, defect=False)) is Decision.PASS

    def test_agent_decision_wins(self) -> None:
        """A v1.1 verdict's own decision (review) is used as sent."""
        v = make_verdict("c", 1, defect=True)
        v2 = replace(v, decision="review") if hasattr(v, "decision") else v
        if hasattr(v, "decision"):
            assert decision_of(v2) is Decision.REVIEW
        else:
            pytest.skip("protocol Verdict has no decision field yet")

    def test_shed_is_divert(self) -> None:
        """A shed (uninspected) part is never passed."""
        assert decision_of(shed("c", 1)) is Decision.DIVERT


class TestResultModel:
    """ResultModel turns verdicts and tracker events into Results and camera snapshots."""

    def test_counters_and_fan_out(self) -> None:
        """Each new verdict is one result with a per-camera counter; duplicates and late ones are not."""
        sink = Sink()
        model = ResultModel(outputs=[sink])
        for seq in range(3):
            model.on_verdict(make_verdict("c1", seq), "new")
        model.on_verdict(make_verdict("c1", 1), "duplicate")
        model.on_verdict(make_verdict("c2", 0, defect=False), "new")
        model.on_verdict(make_verdict("c2", 7), "late")
        update = model.flush()
        assert [r.counter for r in update.results if r.camera_id == "c1"] == [1, 2, 3]
        assert model.total == 4
        cams = {c.camera_id: c for c in update.cameras}
        assert cams["c1"].counter == 3 and cams["c1"].count(Decision.DIVERT) == 3
        assert cams["c2"].count(Decision.PASS) == 1 and cams["c2"].late == 1
        assert (cams["c1"].index, cams["c2"].index) == (0, 1)  # first-seen order
        assert sink.updates == [update]

    def test_startup_is_fail_safe_until_first_verdict(self) -> None:
        """A configured camera starts fail-safe (startup) and clears on its first verdict."""
        model = ResultModel(["c1"])
        first = model.flush()
        assert first.events[0].kind == "startup"
        assert first.cameras[0].fail_safe and first.cameras[0].reasons == ("startup",)
        assert first.bridge.starting and first.bridge.state == "starting"
        model.on_heartbeat(hb())
        model.on_verdict(make_verdict("c1", 0, agent_id="a1"), "new")
        cam = model.flush().cameras[0]
        assert not cam.fail_safe and cam.agent_id == "a1"

    def test_gap_holds_fail_safe_then_clears(self) -> None:
        """A fail-safed part is a fail_safe result; the camera is FailSafe for hold_s, then not."""
        clock = FakeClock()
        model = ResultModel(hold_s=1.0, clock=clock)
        model.on_heartbeat(hb())
        model.on_verdict(make_verdict("c1", 0, agent_id="a1"), "new")
        model.flush()
        r = model.on_fail_safe_part("c1", 1, "verdict_timeout")
        assert r.decision is Decision.FAIL_SAFE and r.reason == "gap" and r.counter == 2
        snap = model.flush().cameras[0]
        assert snap.fail_safe and snap.reasons == ("gap",)
        clock.t += 0.5
        assert model.flush().cameras == ()  # still holding: nothing changed
        clock.t += 0.6
        cleared = model.flush().cameras
        assert len(cleared) == 1 and not cleared[0].fail_safe

    def test_agent_lost_and_back(self) -> None:
        """agent_lost marks its cameras fail-safe and the bridge without agents; a heartbeat clears it."""
        model = ResultModel()
        model.on_heartbeat(hb())
        model.on_verdict(make_verdict("c1", 0, agent_id="a1"), "new")
        model.flush()
        model.on_tracker_event("agent_lost", "a1", "no heartbeat", ["c1"])
        lost = model.flush()
        assert lost.cameras[0].agent_lost and "agent_lost" in lost.cameras[0].reasons
        assert lost.agents[0].lost and lost.agents[0].state == "lost"
        assert lost.bridge.fail_safe and lost.bridge.agents_up == 0 and not lost.bridge.ready
        assert lost.events[0].kind == "agent_lost" and lost.events[0].cameras == ("c1",)
        model.on_heartbeat(hb())
        back = model.flush()
        assert not back.cameras[0].fail_safe and back.bridge.ready

    def test_restart_holds_with_its_own_reason(self) -> None:
        """An agent restart fails its cameras safe for hold_s with reason agent_restart."""
        clock = FakeClock()
        model = ResultModel(hold_s=1.0, clock=clock)
        model.on_verdict(make_verdict("c1", 0, agent_id="a1"), "new")
        model.flush()
        model.on_tracker_event("agent_restart", "a1", "epoch 2", ["c1"])
        snap = model.flush().cameras[0]
        assert snap.fail_safe and snap.reasons == ("agent_restart",)
        clock.t += 1.1
        assert not model.flush().cameras[0].fail_safe

    def test_with_the_real_tracker(self) -> None:
        """Wired to LineTracker: a gap timeout becomes one fail_safe result through on_fail_safe."""
        clock = FakeClock()
        tracker = LineTracker(verdict_timeout_s=2.0, clock=clock)
        model = ResultModel(clock=clock)
        tracker.on_fail_safe = model.on_fail_safe_part
        for seq in (0, 2):
            v = make_verdict("c1", seq, agent_id="a1")
            model.on_verdict(v, tracker.on_verdict(v))
        clock.t += 2.5
        tracker.tick()
        update = model.flush()
        assert [(r.seq, r.decision.value) for r in update.results] == [(0, "divert"), (2, "divert"), (1, "fail_safe")]


class TestAckQueue:
    """AckQueue is bounded, overflows are counted and Acknowledge(seq) is cumulative."""

    def test_fill_overflow_ack(self) -> None:
        """Full after capacity; a push then is refused and counted; acking seq 1 removes 0 and 1."""
        model = ResultModel()
        q = AckQueue(3)
        results = [model.on_verdict(make_verdict("c", s), "new") for s in range(4)]
        assert [q.push(r) for r in results if r] == [True, True, True, False]
        assert q.full and q.overflowed == 1
        assert q.acknowledge(99) == 0
        assert q.acknowledge(1) == 2
        assert not q.full and q.oldest() is not None and q.oldest().seq == 2  # type: ignore[union-attr]

    def test_capacity_must_be_positive(self) -> None:
        """A zero-length queue is a configuration error."""
        with pytest.raises(ValueError):
            AckQueue(0)


class TestFlushPacer:
    """Results reach the outputs within ~1-2 ms at a low rate and in 5 ms batches at a high one."""

    def _run(self, pacer: FlushPacer, clock: FakeClock, rate: float, seconds: float) -> list[int]:
        """Results arriving every 1/rate s, flushed whenever the pacer says so; the batch sizes it made."""
        batches, pending, step = [], 0, 1.0 / rate
        end = clock.t + seconds
        while clock.t < end:
            clock.t += step
            pending += 1
            if pacer.due(pending):
                pacer.flushed(pending)
                batches.append(pending)
                pending = 0
        return batches

    def test_period_follows_the_rate_within_bounds(self) -> None:
        """1,000 results/s are flushed every ~2 ms, 5,000/s and more every 5 ms, and never faster than 1 ms."""
        clock = FakeClock()
        pacer = FlushPacer(clock=clock)
        self._run(pacer, clock, 1000, 2.0)
        assert pacer.period == pytest.approx(0.002, rel=0.1)
        batches = self._run(pacer, clock, 1000, 1.0)
        assert 1 <= max(batches) <= 3  # a result waits ~2 ms at most
        self._run(pacer, clock, 20_000, 2.0)
        assert pacer.period == 0.005
        assert max(self._run(pacer, clock, 20_000, 1.0)) <= 101
        quiet = FlushPacer(clock=clock)
        assert quiet.period == 0.001  # no rate yet: the first results go out soon

    def test_idle_flushes_at_the_longest_period(self) -> None:
        """With nothing pending a flush is due only every max_s (fail-safe holds expire through flushes)."""
        clock = FakeClock()
        pacer = FlushPacer(clock=clock)
        clock.t += 0.002
        assert not pacer.due(0) and pacer.due(1)
        assert pacer.wait(0) == pytest.approx(0.003)
        clock.t += 0.003
        assert pacer.due(0) and pacer.wait(5) == 0.0

    def test_bad_bounds_refused(self) -> None:
        """A minimum above the maximum is a programming error, said at once."""
        with pytest.raises(ValueError):
            FlushPacer(min_s=0.01, max_s=0.005)
