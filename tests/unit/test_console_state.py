"""The console's socket-free state: tiles, latency window, gallery caps, review store and labelled export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent import explain
from agent.console.state import (
    ConsoleState,
    LatencyWindow,
    ReviewStore,
    Snapshot,
    decision_of,
    reconstruct_frame,
    valid_label,
)
from protocol import AgentState, Explanation, Heartbeat, Status, Verdict

CLASSES = ["crack", "dent", "ok_surface"]  # a model's own class list, as the heartbeat will carry it
T0_NS = 1_700_000_000_000_000_000


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def verdict(seq: int, *, camera: str = "cam1", agent: str = "a1", epoch: int = 1, cls: int = 0,
            confidence: float = 0.9, defect: bool = True, decision: str | None = None,
            latency_ms: float = 10.0, status: str = "ok", part_id: str | None = None) -> Verdict:
    """A valid verdict; latency_ms sets published - capture."""
    capture = T0_NS + seq * 1_000_000
    published = capture + int(latency_ms * 1e6)
    if status != "ok":
        return Verdict(camera, seq, Status(status), "too_old", None, None, None, None, True, "m1", agent, epoch,
                       capture, capture, None, published, part_id, None, **_decision(decision))
    probs = [0.0] * len(CLASSES)
    probs[cls] = confidence
    probs[(cls + 1) % len(CLASSES)] = 1.0 - confidence
    return Verdict(camera, seq, Status.OK, None, CLASSES[cls], cls, confidence, tuple(probs), defect, "m1", agent,
                   epoch, capture, capture, published, published, part_id, None, **_decision(decision))


def _decision(decision: str | None) -> dict[str, Any]:
    return {} if decision is None else {"decision": decision}


def heartbeat(agent: str = "a1", epoch: int = 1, hb_seq: int = 0, **extra: Any) -> Heartbeat:
    """A ready heartbeat, with the v1.1 keys passed through."""
    return Heartbeat(agent, epoch, hb_seq, T0_NS, 1.0, AgentState.READY, 3, {"accepted": 5}, {"1": 2},
                     {"runtime": "test"}, "m1", **extra)


def frame_image() -> np.ndarray:
    """A deterministic grey test surface with texture."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (64, 64), dtype=np.uint8)


def explanation(seq: int, camera: str = "cam1", cls: int = 0) -> tuple[Explanation, np.ndarray]:
    """An explanation built with the agent's own overlay code, and the frame it was made from."""
    img = frame_image()
    heat = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    overlay = explain.png(explain.overlay(img, heat))
    e = Explanation(camera, seq, CLASSES[cls], cls, 0.6, "cam", None, "a1", 1, explain.heatmap_png(heat), overlay)
    return e, img


@pytest.fixture
def clock() -> Clock:
    return Clock()


class TestDecisionOf:
    """decision_of: the agent's decision when sent, else derived from defect."""

    def test_v1_defect_is_divert(self) -> None:
        """A v1 verdict with defect=true counts as divert."""
        assert decision_of(verdict(1, defect=True)) == "divert"

    def test_v1_clean_is_pass(self) -> None:
        """A v1 verdict with defect=false counts as pass."""
        assert decision_of(verdict(1, defect=False)) == "pass"

    def test_sent_decision_wins(self) -> None:
        """A v1.1 verdict's own decision is used as is."""
        assert decision_of(verdict(1, defect=True, decision="review")) == "review"


class TestLatencyWindow:
    """LatencyWindow: percentiles over a sliding, bounded window."""

    def test_percentiles(self, clock: Clock) -> None:
        """p50 and p99 of 1..100 ms are about 50.5 and 99 ms."""
        w = LatencyWindow(clock=clock)
        for ms in range(1, 101):
            w.add(float(ms))
        s = w.summary()
        assert s["count"] == 100
        assert s["p50_ms"] == pytest.approx(50.5)
        assert s["p99_ms"] == pytest.approx(99.01)

    def test_old_buckets_leave_the_window(self, clock: Clock) -> None:
        """Latencies older than the window no longer count."""
        w = LatencyWindow(window_s=60, bucket_s=5, clock=clock)
        w.add(500.0)
        clock.t += 120
        w.add(5.0)
        s = w.summary()
        assert s["count"] == 1
        assert s["p99_ms"] == 5.0
        assert len(s["series"]) == 1

    def test_summary_is_recomputed_at_most_every_second(self, clock: Clock) -> None:
        """Within max_age_s the cached summary is returned; after it, new latencies show."""
        w = LatencyWindow(clock=clock)
        w.add(10.0)
        assert w.summary()["count"] == 1
        w.add(20.0)
        clock.t += 0.5
        assert w.summary()["count"] == 1
        clock.t += 0.6
        assert w.summary()["count"] == 2

    def test_memory_is_bounded(self, clock: Clock) -> None:
        """A flood of latencies keeps at most samples_per_bucket values per bucket."""
        w = LatencyWindow(samples_per_bucket=64, clock=clock)
        for i in range(10_000):
            w.add(float(i % 100))
        assert len(w.buckets[-1].samples) == 64
        assert w.summary()["count"] == 10_000


class TestTiles:
    """ConsoleState's camera tiles and agent table."""

    def test_counts_decisions_and_last(self, clock: Clock) -> None:
        """Decisions are counted per camera and the tile shows the latest one."""
        st = ConsoleState(clock=clock)
        st.on_verdict(verdict(0, defect=False))
        st.on_verdict(verdict(1, defect=True))
        st.on_verdict(verdict(2, decision="review", confidence=0.55, part_id="P-2"))
        cam = st.summary()["cameras"]["cam1"]
        assert cam["verdicts"] == 3
        assert cam["decisions"] == {"pass": 1, "divert": 1, "review": 1}
        assert cam["last"]["seq"] == 2
        assert cam["last"]["decision"] == "review"
        assert cam["last"]["part_id"] == "P-2"

    def test_duplicates_are_not_counted(self, clock: Clock) -> None:
        """A second verdict for the same seq changes no count."""
        st = ConsoleState(clock=clock)
        st.on_verdict(verdict(0))
        st.on_verdict(verdict(0))
        cam = st.summary()["cameras"]["cam1"]
        assert cam["verdicts"] == 1
        assert cam["duplicates"] == 1

    def test_rate_per_second(self, clock: Clock) -> None:
        """Ten verdicts a second for five seconds read as 10/s."""
        st = ConsoleState(clock=clock)
        seq = 0
        for _ in range(6):
            for _ in range(10):
                st.on_verdict(verdict(seq))
                seq += 1
            clock.t += 1
        assert st.summary()["cameras"]["cam1"]["rate_per_s"] == pytest.approx(10.0)

    def test_gap_fails_safe(self, clock: Clock) -> None:
        """A seq missing past the verdict timeout is a gap and the tile shows fail-safe."""
        st = ConsoleState(clock=clock)
        st.on_heartbeat(heartbeat())
        st.on_verdict(verdict(0))
        st.on_verdict(verdict(2))
        st.tick()
        assert st.summary()["cameras"]["cam1"]["fail_safe"] is False
        clock.t += 2.5
        st.on_heartbeat(heartbeat(hb_seq=1))
        st.tick()
        cam = st.summary()["cameras"]["cam1"]
        assert cam["gaps"] == 1
        assert cam["fail_safe"] is True

    def test_lost_agent_fails_safe(self, clock: Clock) -> None:
        """A camera whose agent stopped sending heartbeats is shown failing safe, naming the agent."""
        st = ConsoleState(clock=clock)
        st.on_heartbeat(heartbeat())
        st.on_verdict(verdict(0))
        clock.t += 4
        st.tick()
        s = st.summary()
        assert s["agents"]["a1"]["lost"] is True
        assert s["cameras"]["cam1"]["fail_safe_reasons"] == ["agent a1 lost"]

    def test_agent_table_and_thresholds(self, clock: Clock) -> None:
        """The agent row carries state, backend, model, queue depth and the published thresholds."""
        st = ConsoleState(clock=clock)
        st.on_heartbeat(heartbeat(classes=tuple(CLASSES), thresholds={"min_confidence": 0.5}))
        a = st.summary()["agents"]["a1"]
        assert (a["state"], a["backend"], a["model_id"], a["queue_depth"]) == ("ready", {"runtime": "test"}, "m1", 3)
        assert a["thresholds"] == {"min_confidence": 0.5}
        assert a["classes"] == CLASSES

    def test_latency_is_publication_minus_capture(self, clock: Clock) -> None:
        """The latency window is fed published_ns - capture_ns of each verdict."""
        st = ConsoleState(clock=clock)
        for seq in range(10):
            st.on_verdict(verdict(seq, latency_ms=40.0))
        assert st.summary()["latency"]["p50_ms"] == pytest.approx(40.0)

    def test_malformed_and_dropped_are_counted(self, clock: Clock) -> None:
        """Refused and dropped messages show in the console counters."""
        st = ConsoleState(clock=clock)
        st.on_malformed("bad_msgpack")
        st.on_malformed("bad_msgpack")
        st.on_dropped("verdict", 3)
        c = st.summary()["console"]
        assert c["malformed"] == {"bad_msgpack": 2}
        assert c["dropped"] == {"verdict": 3}


class TestClasses:
    """Class names come from the heartbeat, else from the verdicts seen; never from a built-in list."""

    def test_top_classes_use_heartbeat_names(self, clock: Clock) -> None:
        """Top classes are named from the agent's heartbeat class list."""
        st = ConsoleState(clock=clock)
        st.on_heartbeat(heartbeat(classes=tuple(CLASSES)))
        assert st.top_classes(verdict(0, cls=2, confidence=0.7), k=2) == [["ok_surface", 0.7], ["crack", 0.3]]

    def test_learned_names_without_heartbeat_list(self, clock: Clock) -> None:
        """Without a heartbeat list, names learned from verdicts are used and unknown indices say so."""
        st = ConsoleState(clock=clock)
        st.on_verdict(verdict(0, cls=1, confidence=0.8))
        assert st.top_classes(verdict(1, cls=1, confidence=0.8)) == [["dent", 0.8], ["class 2", 0.2], ["class 0", 0]]
        assert st.known_labels() == {"dent"}


class TestGallery:
    """The snapshot gallery: capped, images by id."""

    def test_cap_on_count(self, clock: Clock) -> None:
        """Only the newest gallery_cap snapshots are kept."""
        st = ConsoleState(clock=clock, gallery_cap=3)
        for seq in range(5):
            st.on_explanation(explanation(seq)[0])
        assert [s["seq"] for s in st.summary()["gallery"]] == [4, 3, 2]
        assert st.image("snap", 1, "heatmap") is None

    def test_cap_on_bytes(self, clock: Clock) -> None:
        """The gallery's bytes stay under gallery_max_bytes."""
        e, _ = explanation(0)
        size = len(e.heatmap_png) + len(e.overlay_png)
        st = ConsoleState(clock=clock, gallery_cap=100, gallery_max_bytes=size * 5)
        for seq in range(20):
            st.on_explanation(explanation(seq)[0])
        assert len(st.gallery) == 5
        assert st.summary()["console"]["gallery_bytes"] <= size * 5

    def test_image_by_id(self, clock: Clock) -> None:
        """Both PNGs are served by snapshot id; other names and sources are refused."""
        st = ConsoleState(clock=clock)
        e, _ = explanation(7)
        st.on_verdict(verdict(7, part_id="P-7"))
        st.on_explanation(e)
        snap = st.summary()["gallery"][0]
        assert snap["part_id"] == "P-7"
        assert st.image("snap", snap["id"], "heatmap") == e.heatmap_png
        assert st.image("snap", snap["id"], "overlay") == e.overlay_png
        assert st.image("snap", snap["id"], "../etc/passwd") is None
        assert st.image("disk", snap["id"], "heatmap") is None


class TestReviewStore:
    """Review items: waiting for an image, stored on disk with one, capped, labelled and exported."""

    def test_review_decision_waits_then_gets_image(self, tmp_path: Path, clock: Clock) -> None:
        """A review verdict waits in memory; its explanation stores it on disk with both PNGs."""
        st = ConsoleState(clock=clock, state_dir=tmp_path)
        st.on_verdict(verdict(5, decision="review", confidence=0.51))
        assert st.summary()["review"]["awaiting_image"] == 1
        assert st.review.listing()["items"] == []
        st.on_explanation(explanation(5)[0])
        items = st.review.listing()["items"]
        assert [(i["seq"], i["has_image"], i["why"]) for i in items] == [(5, True, "agent")]
        item_id = items[0]["id"]
        assert (tmp_path / "review" / f"{item_id}.json").is_file()
        assert st.image("review", item_id, "overlay") == (tmp_path / "review" / f"{item_id}.overlay.png").read_bytes()

    def test_console_rule_flags_low_confidence(self, clock: Clock) -> None:
        """With review_below, an unsure ok verdict is queued although the agent decided divert."""
        st = ConsoleState(clock=clock, review_below=0.8)
        st.on_verdict(verdict(1, confidence=0.95))
        st.on_verdict(verdict(2, confidence=0.6))
        st.on_verdict(verdict(3, status="shed"))
        assert list(st.review.awaiting) == [("cam1", 2)]
        assert st.review.awaiting[("cam1", 2)].why.startswith("console: confidence 0.600")

    def test_disk_cap_evicts_oldest_and_its_files(self, tmp_path: Path, clock: Clock) -> None:
        """Past the cap, the oldest item and its files leave the disk."""
        st = ConsoleState(clock=clock, state_dir=tmp_path, review_cap=2)
        for seq in range(3):
            st.on_verdict(verdict(seq, decision="review"))
            st.on_explanation(explanation(seq)[0])
        assert [i["seq"] for i in st.review.listing()["items"]] == [2, 1]
        assert len(list((tmp_path / "review").glob("*.json"))) == 2
        assert len(list((tmp_path / "review").glob("*.png"))) == 4
        assert st.review.evicted == 1

    def test_awaiting_is_bounded(self, clock: Clock) -> None:
        """Review frames whose image never comes are forgotten past awaiting_cap, and counted."""
        store = ReviewStore(None, None, awaiting_cap=10)
        for seq in range(25):
            store.add(verdict(seq), "review", "agent", [])
        assert len(store.awaiting) == 10
        assert store.expired_without_image == 15

    def test_label_exports_class_folder(self, tmp_path: Path, clock: Clock) -> None:
        """Labelling writes <export>/<class>/<class>_<camera>-<seq>-<id>.png holding the frame."""
        st = ConsoleState(clock=clock, state_dir=tmp_path)
        st.on_heartbeat(heartbeat(classes=tuple(CLASSES)))
        st.on_verdict(verdict(9, decision="review"))
        e, img = explanation(9)
        st.on_explanation(e)
        item_id = st.review.listing()["items"][0]["id"]
        item = st.review.label(item_id, "dent", st.known_labels())
        out = tmp_path / "dataset" / "dent" / f"dent_cam1-9-{item_id}.png"
        assert item.exported == f"dent/dent_cam1-9-{item_id}.png"
        got = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
        # Recovered from the overlay and heatmap: within a few grey levels of the frame the agent saw.
        assert got.shape == img.shape
        assert int(np.abs(got.astype(int) - img.astype(int)).max()) <= 3
        line = json.loads((tmp_path / "dataset" / "labels.jsonl").read_text().splitlines()[-1])
        assert (line["label"], line["predicted"], line["image"]) == ("dent", "crack", "reconstructed")
        assert json.loads((tmp_path / "review" / f"{item_id}.json").read_text())["label"] == "dent"

    def test_relabel_moves_the_file(self, tmp_path: Path, clock: Clock) -> None:
        """Correcting a label again moves the exported file to the new class folder."""
        st = ConsoleState(clock=clock, state_dir=tmp_path)
        st.on_verdict(verdict(1, decision="review"))
        st.on_explanation(explanation(1)[0])
        item_id = st.review.listing()["items"][0]["id"]
        st.review.label(item_id, "crack", set(CLASSES))
        st.review.label(item_id, "dent", set(CLASSES))
        assert sorted(p.relative_to(tmp_path / "dataset").as_posix()
                      for p in (tmp_path / "dataset").rglob("*.png")) == [f"dent/dent_cam1-1-{item_id}.png"]

    @pytest.mark.parametrize("bad", ["../evil", "..", ".hidden", "a/b", "", "x" * 65, "not known"])
    def test_label_refuses_unsafe_or_unknown(self, tmp_path: Path, clock: Clock, bad: str) -> None:
        """Labels that are paths, dot names, too long or unknown classes are refused and nothing is written."""
        st = ConsoleState(clock=clock, state_dir=tmp_path)
        st.on_verdict(verdict(1, decision="review"))
        st.on_explanation(explanation(1)[0])
        item_id = st.review.listing()["items"][0]["id"]
        with pytest.raises(ValueError):
            st.review.label(item_id, bad, set(CLASSES))
        assert not (tmp_path / "dataset").exists()

    def test_unknown_item(self, tmp_path: Path, clock: Clock) -> None:
        """Labelling an id that is not in the store raises KeyError."""
        st = ConsoleState(clock=clock, state_dir=tmp_path)
        with pytest.raises(KeyError):
            st.review.label(42, "crack", set(CLASSES))

    def test_survives_restart(self, tmp_path: Path, clock: Clock) -> None:
        """A new console on the same state dir lists the stored items and continues their ids."""
        st = ConsoleState(clock=clock, state_dir=tmp_path)
        st.on_verdict(verdict(1, decision="review"))
        st.on_explanation(explanation(1)[0])
        old_id = st.review.listing()["items"][0]["id"]
        again = ConsoleState(clock=clock, state_dir=tmp_path)
        assert [i["id"] for i in again.review.listing()["items"]] == [old_id]
        assert again.image("review", old_id, "heatmap") is not None
        again.on_verdict(verdict(2, decision="review"))
        again.on_explanation(explanation(2)[0])
        assert max(i["id"] for i in again.review.listing()["items"]) > old_id


class TestHelpers:
    """Label validation and frame reconstruction."""

    def test_valid_label(self) -> None:
        """Class names with NEU-DET's characters pass; separators and dot names do not."""
        assert valid_label("rolled-in_scale") and valid_label("pitted_surface")
        assert not any(valid_label(x) for x in ("..", "a/b", "a\\b", ".x", "", None))

    def test_reconstruct_refuses_mismatched_pngs(self) -> None:
        """An overlay and heatmap of different sizes give no frame."""
        small = explain.heatmap_png(np.zeros((8, 8), np.float32))
        e, _ = explanation(0)
        assert reconstruct_frame(e.overlay_png, small) is None

    def test_snapshot_nbytes(self) -> None:
        """A snapshot's size counts every PNG it holds."""
        s = Snapshot(1, "c", 1, "a", "x", 0.5, "cam", None, None, 0, b"12", b"345", b"6")
        assert s.nbytes == 6
