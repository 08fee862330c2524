"""Unit tests for the simulators: surfaces, image folders, the bridge's LineTracker, and a real ZeroMQ camera."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import zmq

from protocol import (
    NEU_CLASSES,
    AgentState,
    Decision,
    Encoding,
    Heartbeat,
    Status,
    Verdict,
    decode_frame,
    encode_heartbeat,
    encode_verdict,
)
from simulators import camera as camera_mod
from simulators import plc_bridge
from simulators.camera import (
    Camera,
    SourceError,
    folder_shots,
    label_for,
    list_images,
    synthetic_shots,
)
from simulators.plc_bridge import LineTracker, percentiles
from simulators.surfaces import SIZE, generate, synthetic_surfaces

NEU_DET = Path("/work/shared/neu-det")
NOW_NS = 1_750_000_000_000_000_000


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def verdict(seq: int, camera_id: str = "cam1", **kw: Any) -> Verdict:
    """An ok verdict for (camera, seq), overridable field by field."""
    base: dict[str, Any] = dict(
        camera_id=camera_id,
        seq=seq,
        status=Status.OK,
        reason=None,
        class_name="patches",
        class_index=2,
        confidence=0.9,
        probs=None,
        defect=True,
        model_id="m",
        agent_id="a1",
        epoch=1,
        capture_ns=NOW_NS,
        received_ns=NOW_NS + 1_000_000,
        inferred_ns=NOW_NS + 2_000_000,
        published_ns=NOW_NS + 3_000_000,
        label="patches",
    )
    base.update(kw)
    return Verdict(**base)


def shed(seq: int, **kw: Any) -> Verdict:
    """A shed verdict (no inference, fail-safe defect)."""
    fields: dict[str, Any] = dict(status=Status.SHED, reason="too_old", class_name=None, class_index=None)
    fields.update(confidence=None, inferred_ns=None, defect=True)
    fields.update(kw)
    return verdict(seq, **fields)


def heartbeat(agent_id: str = "a1", epoch: int = 1, hb_seq: int = 0) -> Heartbeat:
    """A ready heartbeat."""
    return Heartbeat(
        agent_id=agent_id,
        epoch=epoch,
        hb_seq=hb_seq,
        time_ns=NOW_NS,
        uptime_s=1.0,
        state=AgentState.READY,
        queue_depth=0,
        counters={},
        batch_sizes={},
        backend={},
        model_id="m",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tracker(clock: FakeClock) -> LineTracker:
    return LineTracker(clock=clock, verdict_timeout_s=2.0, heartbeat_timeout_s=3.0)


class TestSurfaces:
    """The procedural surface generator."""

    @pytest.mark.parametrize("label", NEU_CLASSES)
    def test_shape_and_type(self, label: str) -> None:
        """Every class gives a 200x200 uint8 image that is not flat."""
        img = generate(label, np.random.default_rng(0))
        assert img.shape == (SIZE, SIZE) and img.dtype == np.uint8
        assert img.std() > 3

    def test_seeded(self) -> None:
        """The same seed gives the same image; another seed a different one."""
        a = generate("scratches", np.random.default_rng(5))
        assert np.array_equal(a, generate("scratches", np.random.default_rng(5)))
        assert not np.array_equal(a, generate("scratches", np.random.default_rng(6)))

    def test_unknown_class(self) -> None:
        """Asking for a class that does not exist is a ValueError."""
        with pytest.raises(ValueError, match="unknown class"):
            generate("rust", np.random.default_rng(0))

    def test_stream_is_balanced_and_labelled(self) -> None:
        """Each round of six images holds every class once, labelled with its class."""
        stream = synthetic_surfaces(seed=3)
        labels = [next(stream)[1] for _ in range(12)]
        assert sorted(labels[:6]) == sorted(NEU_CLASSES) and sorted(labels[6:]) == sorted(NEU_CLASSES)

    def test_classes_differ(self) -> None:
        """Scratches are long bright lines: more very bright pixels than an inclusion image."""
        rng = np.random.default_rng(0)
        bright = [
            np.mean(img > np.median(img) + 25) for img in (generate("scratches", rng), generate("inclusion", rng))
        ]
        dark = [np.mean(img < np.median(img) - 25) for img in (generate("inclusion", rng), generate("scratches", rng))]
        assert bright[0] > bright[1] or dark[0] > dark[1]


def _write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = np.full((200, 200, 3), 40 + i, np.uint8)  # 3 identical channels, like NEU-DET
        assert cv2.imwrite(str(folder / name), img)


class TestImageFolders:
    """Listing and decoding NEU-DET and NEU-CLS folders."""

    def test_neu_det_layout(self, tmp_path: Path) -> None:
        """A root with IMAGES/ is listed in natural order with class names from the file names."""
        _write_images(tmp_path / "IMAGES", ["crazing_10.jpg", "crazing_2.jpg", "rolled-in_scale_1.jpg"])
        (tmp_path / "IMAGES" / "notes.txt").write_text("not an image")
        files = list_images(tmp_path)
        assert [p.name for p, _ in files] == ["crazing_2.jpg", "crazing_10.jpg", "rolled-in_scale_1.jpg"]
        assert [label for _, label in files] == ["crazing", "crazing", "rolled-in_scale"]

    def test_neu_cls_layout(self, tmp_path: Path) -> None:
        """A flat folder of Cr_/In_/Pa_/PS_/RS_/Sc_ files maps prefixes to classes."""
        names = ["Cr_1.bmp", "In_1.bmp", "Pa_1.bmp", "PS_1.bmp", "RS_1.bmp", "Sc_1.bmp", "other_1.bmp"]
        _write_images(tmp_path, names)
        labels = dict((p.name, label) for p, label in list_images(tmp_path))
        assert [labels[n] for n in names[:6]] == list(NEU_CLASSES)
        assert labels["other_1.bmp"] is None

    @pytest.mark.parametrize(
        ("name", "label"),
        [("pitted_surface_12.jpg", "pitted_surface"), ("RS_3.bmp", "rolled-in_scale"), ("x.jpg", None)],
    )
    def test_label_for(self, name: str, label: str | None) -> None:
        """File names map to classes (or None when they encode none)."""
        assert label_for(Path(name)) == label

    def test_undecodable_file_is_named(self, tmp_path: Path) -> None:
        """A file OpenCV cannot decode raises SourceError naming that file."""
        _write_images(tmp_path, ["Cr_1.bmp"])
        (tmp_path / "Cr_2.bmp").write_bytes(b"not a bitmap")
        shots = folder_shots(list_images(tmp_path), loop=False)
        first = next(shots)
        assert first.image.shape == (200, 200) and first.label == "crazing"
        with pytest.raises(SourceError, match=r"Cr_2\.bmp"):
            next(shots)

    def test_missing_or_empty_folder(self, tmp_path: Path) -> None:
        """A missing folder or one without images is a SourceError."""
        with pytest.raises(SourceError, match="not found"):
            list_images(tmp_path / "nope")
        with pytest.raises(SourceError, match="no images"):
            list_images(tmp_path)

    def test_shuffle_and_loop(self, tmp_path: Path) -> None:
        """Shuffling is seeded and covers every file once per pass; loop repeats the folder."""
        _write_images(tmp_path, [f"Sc_{i}.bmp" for i in range(1, 6)])
        files = list_images(tmp_path)
        order = [s.origin for s, _ in zip(folder_shots(files, shuffle=True, seed=1), range(10), strict=False)]
        again = [s.origin for s, _ in zip(folder_shots(files, shuffle=True, seed=1), range(10), strict=False)]
        assert order == again and sorted(order[:5]) == sorted(p.name for p, _ in files)
        assert len(list(folder_shots(files, loop=False))) == 5

    @pytest.mark.skipif(not (NEU_DET / "IMAGES").is_dir(), reason="NEU-DET not available")
    def test_real_neu_det(self) -> None:
        """The shared NEU-DET folder lists 1,440 labelled 200x200 images."""
        files = list_images(NEU_DET)
        assert len(files) == 1440 and all(label in NEU_CLASSES for _, label in files)
        assert next(folder_shots(files)).image.shape == (200, 200)


class TestLineTracker:
    """The bridge's tracking logic, driven by a fake clock."""

    def test_in_order_verdicts(self, tracker: LineTracker) -> None:
        """Consecutive verdicts are counted, with no gaps or duplicates."""
        for seq in range(5):
            assert tracker.on_verdict(verdict(seq), NOW_NS + 10_000_000) == "new"
        tracker.tick()
        summary = tracker.summary()
        assert (summary["verdicts"], summary["gaps"], summary["duplicates"], summary["rejects"]) == (5, 0, 0, 5)
        assert summary["latency_ms"]["p50"] == 10.0 and summary["agent_latency_ms"]["max"] == 3.0

    def test_duplicate_from_any_agent(self, tracker: LineTracker) -> None:
        """The same camera and seq twice is a duplicate, even from another agent, and is not recounted."""
        tracker.on_verdict(verdict(0))
        assert tracker.on_verdict(verdict(0)) == "duplicate"
        assert tracker.on_verdict(verdict(0, agent_id="a2")) == "duplicate"
        assert (tracker.verdicts, tracker.duplicates, tracker.rejects) == (1, 2, 1)

    def test_decisions_are_counted(self, tracker: LineTracker) -> None:
        """pass, divert and review are counted from each first verdict (defect for a v1 agent's)."""
        tracker.on_verdict(verdict(0, defect=False, decision=Decision.PASS))
        tracker.on_verdict(verdict(1, decision=Decision.REVIEW))
        tracker.on_verdict(verdict(2))  # no decision: a v1 agent; defect -> divert
        assert tracker.summary()["by_decision"] == {"pass": 1, "divert": 1, "review": 1}
        assert "pass 1 divert 1 review 1" in tracker.status_line()

    def test_reused_seq_fails_the_second_part_safe(self, tracker: LineTracker) -> None:
        """A duplicate_seq rejection is the second part's verdict: counted as reused and rejected, not a duplicate."""
        tracker.on_verdict(verdict(4, defect=False, decision=Decision.PASS))
        dup = verdict(4, status=Status.REJECTED, reason="duplicate_seq", class_name=None, class_index=None,
                      confidence=None, inferred_ns=None, decision=Decision.DIVERT)
        assert tracker.on_verdict(dup) == "reused"
        s = tracker.summary()
        assert (s["reused"], s["duplicates"], s["rejects"]) == (1, 0, 1)

    def test_gap_after_timeout_counted_once(self, clock: FakeClock) -> None:
        """A seq skipped over is fail-safed once, only after the verdict timeout."""
        tracker = LineTracker(clock=clock, verdict_timeout_s=2.0, heartbeat_timeout_s=60.0)
        tracker.on_verdict(verdict(0))
        tracker.on_verdict(verdict(3))
        assert [e.kind for e in tracker.tick()] == ["agent_seen"]
        clock.advance(1.9)
        assert tracker.tick() == [] and tracker.gaps == 0
        clock.advance(0.2)
        events = tracker.tick()
        assert [e.kind for e in events] == ["gap", "gap"] and tracker.gaps == 2
        clock.advance(10)
        assert tracker.tick() == [] and tracker.gaps == 2
        assert tracker.rejects == 4  # two defect verdicts + two fail-safed parts

    def test_out_of_order_within_timeout_is_not_a_gap(self, tracker: LineTracker, clock: FakeClock) -> None:
        """With two agents, seq 1 arriving after seq 2 (within the timeout) is fine."""
        tracker.on_verdict(verdict(0, agent_id="a1"))
        tracker.on_verdict(verdict(2, agent_id="a1"))
        clock.advance(1.0)
        tracker.on_verdict(verdict(1, agent_id="a2"))
        clock.advance(5.0)
        tracker.tick()
        assert (tracker.gaps, tracker.verdicts, tracker.duplicates) == (0, 3, 0)

    def test_late_verdict_after_gap(self, tracker: LineTracker, clock: FakeClock) -> None:
        """A verdict after its part was fail-safed is counted late and does not add a reject."""
        tracker.on_verdict(verdict(0))
        tracker.on_verdict(verdict(2))
        clock.advance(3)
        tracker.tick()
        assert tracker.on_verdict(verdict(1)) == "late"
        assert tracker.on_verdict(verdict(1)) == "duplicate"
        summary = tracker.summary()
        assert (summary["gaps"], summary["late"], summary["rejects"], summary["verdicts"]) == (1, 1, 3, 3)

    def test_seqs_before_first_are_not_gaps(self, tracker: LineTracker, clock: FakeClock) -> None:
        """A bridge that starts late does not count the seqs before the first one it saw."""
        tracker.on_verdict(verdict(100))
        tracker.on_verdict(verdict(99))  # another agent's, still welcome
        clock.advance(5)
        tracker.tick()
        assert (tracker.gaps, tracker.verdicts) == (0, 2)

    def test_first_seq_makes_missing_start_a_gap(self, clock: FakeClock) -> None:
        """With first_seq set, seqs below the first verdict are tracked as missing."""
        tracker = LineTracker(clock=clock, first_seq=0)
        tracker.on_verdict(verdict(2))
        clock.advance(3)
        tracker.tick()
        assert tracker.gaps == 2

    def test_cameras_are_separate(self, tracker: LineTracker, clock: FakeClock) -> None:
        """cam1 and cam10 keep separate seq sets."""
        tracker.on_verdict(verdict(0, camera_id="cam1"))
        tracker.on_verdict(verdict(0, camera_id="cam10"))
        tracker.on_verdict(verdict(1, camera_id="cam10"))
        clock.advance(5)
        tracker.tick()
        summary = tracker.summary()
        assert (summary["duplicates"], summary["gaps"]) == (0, 0)
        assert summary["per_camera"]["cam10"]["verdicts"] == 2 and summary["per_camera"]["cam1"]["verdicts"] == 1

    def test_status_counts_and_fail_safe(self, tracker: LineTracker) -> None:
        """Shed and rejected verdicts are counted by status and always rejected; ok non-defects are not."""
        tracker.on_verdict(verdict(0, defect=False))
        tracker.on_verdict(shed(1))
        tracker.on_verdict(shed(2, status=Status.REJECTED, reason="bad_dims"))
        summary = tracker.summary()
        assert summary["by_status"] == {"ok": 1, "shed": 1, "rejected": 1}
        assert summary["rejects"] == 2

    def test_accuracy_from_labels(self, tracker: LineTracker) -> None:
        """Accuracy uses ok verdicts that carry a label; unlabelled runs report None."""
        assert tracker.summary()["accuracy"] is None
        tracker.on_verdict(verdict(0, label="patches"))
        tracker.on_verdict(verdict(1, label="crazing"))
        tracker.on_verdict(verdict(2, label=None))
        tracker.on_verdict(shed(3, label="patches"))
        summary = tracker.summary()
        assert (summary["accuracy"], summary["labeled"]) == (0.5, 2)
        assert summary["confusion"] == {"crazing": {"patches": 1}, "patches": {"patches": 1}}

    def test_agent_restart_by_heartbeat(self, tracker: LineTracker) -> None:
        """A new epoch for a known agent is one restart and fail-safes its missing seqs at once."""
        tracker.on_heartbeat(heartbeat(epoch=1))
        tracker.on_verdict(verdict(0))
        tracker.on_verdict(verdict(2))
        tracker.on_heartbeat(heartbeat(epoch=2))
        tracker.on_heartbeat(heartbeat(epoch=2, hb_seq=1))
        kinds = [e.kind for e in tracker.tick()]
        assert kinds == ["agent_seen", "agent_restart", "gap"]
        assert (tracker.agent_restarts, tracker.gaps) == (1, 1)

    def test_agent_restart_by_verdict_epoch(self, tracker: LineTracker) -> None:
        """A verdict with a new epoch reveals a restart too; an old epoch seen again is not another one."""
        tracker.on_verdict(verdict(0, epoch=1))
        tracker.on_verdict(verdict(1, epoch=2))
        tracker.on_verdict(verdict(2, epoch=1))
        assert tracker.agent_restarts == 1

    def test_agent_lost_once_then_back(self, tracker: LineTracker, clock: FakeClock) -> None:
        """Heartbeat silence beyond the timeout raises agent_lost once; a heartbeat brings it back."""
        tracker.on_heartbeat(heartbeat())
        clock.advance(2.9)
        tracker.tick()
        clock.advance(0.2)
        assert [e.kind for e in tracker.tick()] == ["agent_lost"]
        clock.advance(10)
        assert tracker.tick() == [] and tracker.agent_lost == 1 and tracker.agents_up == 0
        assert "NO AGENT" in tracker.status_line()
        tracker.on_heartbeat(heartbeat(hb_seq=5))
        assert [e.kind for e in tracker.tick()] == ["agent_back"] and tracker.agents_up == 1

    def test_agent_lost_fail_safes_its_cameras(self, clock: FakeClock) -> None:
        """When an agent is lost, missing seqs of the cameras it served are rejected without waiting."""
        tracker = LineTracker(clock=clock, verdict_timeout_s=60.0, heartbeat_timeout_s=3.0)
        tracker.on_heartbeat(heartbeat())
        tracker.on_verdict(verdict(0))
        tracker.on_verdict(verdict(5))
        tracker.on_verdict(verdict(0, camera_id="cam2", agent_id="other"))
        tracker.on_verdict(verdict(2, camera_id="cam2", agent_id="other"))
        clock.advance(1.0)
        tracker.on_heartbeat(heartbeat(agent_id="other"))
        tracker.tick()
        assert tracker.gaps == 0
        clock.advance(2.5)
        tracker.tick()
        assert tracker.agent_lost == 1
        per_camera = tracker.summary()["per_camera"]
        assert (per_camera["cam1"]["gaps"], per_camera["cam2"]["gaps"], per_camera["cam2"]["pending"]) == (4, 0, 1)

    def test_agent_lost_spares_a_camera_another_agent_serves(self, clock: FakeClock) -> None:
        """A camera shared with a live agent keeps the gap timer: the live one may still answer its seqs."""
        tracker = LineTracker(clock=clock, verdict_timeout_s=60.0, heartbeat_timeout_s=3.0)
        tracker.on_heartbeat(heartbeat())
        tracker.on_verdict(verdict(0))
        tracker.on_verdict(verdict(1, agent_id="other"))
        tracker.on_verdict(verdict(5, agent_id="other"))
        for _ in range(4):  # "other" stays alive, the first agent falls silent
            clock.advance(1.0)
            tracker.on_heartbeat(heartbeat(agent_id="other"))
            tracker.tick()
        assert tracker.agent_lost == 1
        assert tracker.summary()["per_camera"]["cam1"]["pending"] == 3 and tracker.gaps == 0

    def test_agent_known_only_from_verdicts_can_be_lost(self, tracker: LineTracker, clock: FakeClock) -> None:
        """An agent that never sent a heartbeat is lost 3 s after it was first seen."""
        tracker.on_verdict(verdict(0, agent_id="quiet"))
        clock.advance(3.5)
        assert "agent_lost" in [e.kind for e in tracker.tick()]

    def test_huge_seq_jump_rebases(self, clock: FakeClock) -> None:
        """A jump larger than the window is a seq_jump event, not millions of gaps."""
        tracker = LineTracker(clock=clock, seq_window=100)
        tracker.on_verdict(verdict(0))
        tracker.on_verdict(verdict(10_000))
        clock.advance(5)
        tracker.tick()
        assert tracker.gaps == 0 and tracker.summary()["per_camera"]["cam1"]["seq_jumps"] == 1

    def test_memory_is_bounded(self, clock: FakeClock) -> None:
        """Seen seqs far below the highest are forgotten; a very old one counts as a duplicate."""
        tracker = LineTracker(clock=clock, seq_window=10)
        for seq in range(100):
            tracker.on_verdict(verdict(seq))
        assert len(tracker.cameras["cam1"].seen) <= 21
        assert tracker.on_verdict(verdict(3)) == "duplicate"

    def test_protocol_errors_counted(self, tracker: LineTracker) -> None:
        """Dropped messages are counted by reason."""
        tracker.on_protocol_error("bad_version")
        tracker.on_protocol_error("bad_version")
        assert tracker.summary()["protocol_errors"] == {"bad_version": 2}

    def test_percentiles(self) -> None:
        """Percentiles interpolate linearly; empty input gives None."""
        stats = percentiles([float(v) for v in range(1, 101)])
        assert (stats["p50"], stats["p99"], stats["max"], stats["count"]) == (50.5, 99.01, 100.0, 100)
        assert percentiles([])["p50"] is None

    def test_summary_is_json(self, tracker: LineTracker) -> None:
        """The report serialises to JSON with the required keys."""
        tracker.on_heartbeat(heartbeat())
        tracker.on_verdict(verdict(0))
        data = json.loads(json.dumps(tracker.summary()))
        required = {"verdicts", "by_status", "rejects", "gaps", "duplicates", "accuracy", "latency_ms"}
        assert required | {"agent_restarts", "agent_lost", "per_camera"} <= data.keys()


def _pull(ctx: zmq.Context[Any]) -> tuple[zmq.Socket[Any], str]:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def _recv(sock: zmq.Socket[Any], n: int, timeout_ms: int = 5000) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    while len(out) < n and sock.poll(timeout_ms):
        out.append(sock.recv_multipart())
    return out


class TestCameraOverZeroMQ:
    """The camera against a real PULL socket."""

    @staticmethod
    def run_main(args: list[str], report: Path, messages: int) -> tuple[list[int], list[Any]]:
        """`tdn camera` main with args (and --fps 0 --quiet) against a PULL socket: exit codes and decoded frames."""
        ctx: zmq.Context[Any] = zmq.Context()
        pull, endpoint = _pull(ctx)
        argv = ["--endpoint", endpoint, "--fps", "0", "--report", str(report), "--quiet", *args]
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(camera_mod.main(argv)))
        thread.start()
        try:
            frames = [decode_frame(parts) for parts in _recv(pull, messages)]
        finally:
            thread.join(10)
            pull.close()
            ctx.term()
        return result, frames

    def test_main_sends_n_decodable_frames(self, tmp_path: Path) -> None:
        """`main --count N --fps 0` sends N labelled frames with seqs 0..N-1 and writes its report."""
        report = tmp_path / "camera.json"
        result, frames = self.run_main(["--count", "12"], report, 12)
        assert result == [0]
        assert [f.seq for f in frames] == list(range(12))
        assert {f.camera_id for f in frames} == {"cam1"} and all(f.label in NEU_CLASSES for f in frames)
        assert all((f.width, f.height, f.encoding, len(f.payload)) == (200, 200, Encoding.GRAY8, 40000) for f in frames)
        data = json.loads(report.read_text())
        assert (data["sent"], data["timed_out"], data["camera_id"]) == (12, 0, "cam1")
        assert {"blocked", "seconds", "fps_achieved"} <= data.keys()

    def test_several_images_a_message(self, tmp_path: Path) -> None:
        """`--images 4 --count 10`: strips of 4, 4 and 2 images, seqs 0, 4, 8, a label per image, sent counts images."""
        report = tmp_path / "camera.json"
        result, frames = self.run_main(["--count", "10", "--images", "4"], report, 3)
        assert result == [0]
        assert [(f.seq, f.images, f.height) for f in frames] == [(0, 4, 800), (4, 4, 800), (8, 2, 400)]
        assert all(f.labels is not None and len(f.labels) == f.images and set(f.labels) <= set(NEU_CLASSES)
                   for f in frames)
        assert json.loads(report.read_text())["sent"] == 10

    def test_a_strip_over_the_size_limit_is_named(self) -> None:
        """21 images of 200 rows would be 4,200 rows: the camera names the limit instead of sending."""
        cam = Camera("cam1", synthetic_shots(0), endpoint="inproc://unused", fps=0, count=21, images=21)
        with pytest.raises(SourceError, match="at most 20 per message"):
            cam._frame(cam._take())

    @pytest.mark.parametrize("encoding", [Encoding.JPEG, Encoding.PNG])
    def test_compressed_encodings(self, encoding: Encoding) -> None:
        """JPEG and PNG frames decode back to 200x200 images."""
        ctx: zmq.Context[Any] = zmq.Context()
        pull, endpoint = _pull(ctx)
        cam = Camera("camX", synthetic_shots(1), endpoint=endpoint, fps=0, count=2, encoding=encoding, context=ctx)
        try:
            stats = cam.run()
            frames = [decode_frame(parts) for parts in _recv(pull, 2)]
        finally:
            pull.close()
            ctx.term()
        assert stats.sent == 2 and [f.encoding for f in frames] == [encoding, encoding]
        img = cv2.imdecode(np.frombuffer(frames[0].payload, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (200, 200)

    def test_no_agent_times_out_and_consumes_seqs(self, tmp_path: Path) -> None:
        """With nobody listening, each send times out, is counted, and still uses up its seq."""
        ctx: zmq.Context[Any] = zmq.Context()
        # An IPC path nobody binds: unlike a freed TCP port, it cannot be reused or self-connected.
        endpoint = f"ipc://{tmp_path / 'nobody'}"
        cam = Camera("cam1", synthetic_shots(0), endpoint=endpoint, fps=0, count=3, send_timeout_ms=30, context=ctx)
        try:
            stats = cam.run()
        finally:
            ctx.term()
        assert (stats.sent, stats.blocked, stats.timed_out, stats.next_seq) == (0, 3, 3, 3)

    def test_bad_source_exits_1(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A source folder without images makes main print the error and return 1."""
        assert camera_mod.main(["--source", str(tmp_path), "--count", "1"]) == 1
        assert "no images" in capsys.readouterr().err

    def test_corrupt_file_found_before_sending(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Images are decoded up front, so a corrupt one stops the camera before its first frame, named."""
        _write_images(tmp_path, ["Cr_1.bmp"])
        (tmp_path / "Sc_9.bmp").write_bytes(b"not a bitmap")
        report = tmp_path / "cams.json"
        argv = ["--source", str(tmp_path), "--count", "1", "--endpoint", "tcp://127.0.0.1:1", "--report", str(report)]
        assert camera_mod.main(argv) == 1
        assert "Sc_9.bmp" in capsys.readouterr().err
        assert not report.exists(), "no camera should have started"


class TestBridgeOverZeroMQ:
    """The bridge's main loop against a real publisher."""

    def test_bridge_counts_verdicts_and_reports(self, tmp_path: Path) -> None:
        """`main --expect 3` receives a heartbeat and 3 verdicts (one duplicate ignored) and writes the report."""
        ctx: zmq.Context[Any] = zmq.Context()
        pub = ctx.socket(zmq.XPUB)  # XPUB shows us the bridge's subscriptions: no slow-joiner sleep
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        report = tmp_path / "bridge.json"
        argv = ["--endpoint", f"tcp://127.0.0.1:{port}", "--expect", "3", "--timeout", "10"]
        argv += ["--report", str(report), "--quiet"]
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(plc_bridge.main(argv)))
        thread.start()
        try:
            subscriptions: set[bytes] = set()
            while len(subscriptions) < 2 and pub.poll(5000):
                subscriptions.add(pub.recv()[1:])
            assert subscriptions == {b"verdict/", b"heartbeat/"}
            pub.send_multipart(encode_heartbeat(heartbeat()))
            for seq in (0, 0, 1, 2):
                pub.send_multipart(encode_verdict(verdict(seq, capture_ns=time.time_ns())))
            thread.join(10)
        finally:
            pub.close()
            ctx.term()
        assert result == [0]
        data = json.loads(report.read_text())
        assert (data["verdicts"], data["duplicates"], data["gaps"], data["heartbeats"]) == (3, 1, 0, 1)
        assert data["accuracy"] == 1.0 and data["latency_ms"]["count"] == 3

    def test_bridge_timeout_without_expected_verdicts(self, tmp_path: Path) -> None:
        """With nothing published, --timeout ends the run and the exit code says --expect was not met."""
        report = tmp_path / "bridge.json"
        argv = ["--endpoint", "tcp://127.0.0.1:1", "--expect", "1", "--timeout", "0.3", "--quiet"]
        assert plc_bridge.main([*argv, "--report", str(report)]) == 1
        assert json.loads(report.read_text())["verdicts"] == 0
