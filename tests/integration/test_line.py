"""The whole line on real sockets with the shipped model: cameras -> agent -> PLC bridge."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from protocol import (
    EXPLAIN_PREFIX,
    HEARTBEAT_PREFIX,
    VERDICT_PREFIX,
    Decision,
    Encoding,
    Explanation,
    Frame,
    Heartbeat,
    Status,
    Verdict,
    encode_frame,
)
from tests.integration.conftest import collect, start_bridge, subscriber, wait_drained, wait_subscribed

pytestmark = pytest.mark.integration


def run_tool(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def gray_frame(camera: str, seq: int, pixels: bytes | None = None, **kw: Any) -> list[Any]:
    return encode_frame(Frame(camera_id=camera, seq=seq, capture_ns=time.time_ns(), width=200, height=200,
                              encoding=Encoding.GRAY8, payload=pixels or bytes(200 * 200), **kw))


def last_heartbeat(msgs: list[Any]) -> Heartbeat:
    hbs = [m for m in msgs if isinstance(m, Heartbeat)]
    assert hbs, "no heartbeat"
    return hbs[-1]


class TestTwoCameras:
    """Two NEU-DET cameras through the agent to a PLC bridge."""

    def test_every_frame_one_verdict_and_accurate(self, start_agent: Any, neu_det: Path, tmp_path: Path) -> None:
        """2 cameras x 200 shuffled NEU-DET frames: 400 verdicts, no gap or duplicate, accuracy >= 95%."""
        agent = start_agent(explain_interval_s=1, explain_dir=tmp_path / "snaps")
        report = tmp_path / "bridge.json"
        bridge = start_bridge(agent.publish, report, "--expect", "400", "--timeout", "90")
        cams = run_tool("simulators.camera", "--endpoint", agent.frames, "--cameras", "2", "--count", "200",
                        "--fps", "100", "--source", str(neu_det), "--shuffle", "--seed", "3",
                        "--report", str(tmp_path / "cams.json"), "--quiet")
        assert cams.returncode == 0, cams.stderr
        assert bridge.wait(120) == 0
        r = json.loads(report.read_text())
        sent = json.loads((tmp_path / "cams.json").read_text())["sent"]
        assert sent == 400
        assert r["verdicts"] == 400
        assert r["by_status"]["ok"] == 400
        assert (r["gaps"], r["duplicates"]) == (0, 0)
        assert r["accuracy"] >= 0.95
        assert agent.stop() == 0
        assert list((tmp_path / "snaps").glob("*_overlay.png")), "no explanation snapshot was written"


class TestBadInput:
    """Malformed, oversized and wrong-version messages are rejected and counted; serving goes on."""

    def test_rejections_are_counted_and_serving_continues(self, start_agent: Any, zctx: zmq.Context[Any]) -> None:
        """Each kind of bad message is counted by reason; readable ones get a rejected verdict; other sizes pass."""
        agent = start_agent(max_frame_bytes=100_000)
        sub = subscriber(zctx, agent.publish)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        good = gray_frame("camA", 0)
        bad_version = list(gray_frame("camA", 1))
        header = msgpack.unpackb(bad_version[1])
        header["v"] = 99
        bad_version[1] = msgpack.packb(header)
        wrong_size = list(gray_frame("camA", 2))
        wrong_size[2] = bytes(100)  # payload disagrees with 200x200
        oversized = encode_frame(Frame(camera_id="camA", seq=3, capture_ns=time.time_ns(), width=400,
                                       height=400, encoding=Encoding.GRAY8, payload=bytes(400 * 400)))
        small = encode_frame(Frame(camera_id="camA", seq=4, capture_ns=time.time_ns(), width=100, height=100,
                                   encoding=Encoding.GRAY8, payload=bytes(100 * 100)))
        corrupt_jpeg = encode_frame(Frame(camera_id="camA", seq=5, capture_ns=time.time_ns(), width=200, height=200,
                                          encoding=Encoding.JPEG, payload=_jpeg_header_only()))
        for msg in (good, bad_version, [b"\xc1garbage"], [b"frame/camA/", b"\x93\x01"], wrong_size, oversized,
                    small, corrupt_jpeg, gray_frame("camA", 6)):
            push.send_multipart(msg)
        msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= 7, 20)
        verdicts = {v.seq: v for v in msgs if isinstance(v, Verdict)}
        assert verdicts[0].status is Status.OK and verdicts[6].status is Status.OK
        assert verdicts[1].status is Status.REJECTED and verdicts[1].reason == "bad_version"
        assert verdicts[2].reason == "payload_size"
        assert verdicts[3].reason == "oversized"
        assert verdicts[4].status is Status.OK  # 100x100: resized by the card's input geometry
        assert verdicts[5].reason == "undecodable"
        assert verdicts[1].capture_ns is not None  # a refused frame echoes the fields its header had
        assert all(v.defect for s, v in verdicts.items() if s not in (0, 4, 6))
        time.sleep(1.2)
        hb = last_heartbeat(collect(sub, lambda m: any(isinstance(x, Heartbeat) for x in m), 3))
        c = hb.counters
        assert c["received"] == 9
        assert c["rejected_unattributed"] == 2  # the two headers without camera and seq
        assert sum(v for k, v in c.items() if k.startswith("rejected_") and k != "rejected_unattributed") == 6
        assert c["accepted"] == c["published"] == 7
        assert agent.proc.poll() is None


def _jpeg_header_only() -> bytes:
    # A JPEG whose SOF says 200x200 but with no scan data: passes the header check, fails to decode.
    sof = b"\xff\xc0\x00\x0b\x08\x00\xc8\x00\xc8\x01\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


class TestOverload:
    """A camera faster than the agent: shedding, bounded memory, nothing unaccounted."""

    def test_shed_under_overload(self, start_agent: Any, tmp_path: Path) -> None:
        """Flat-out cameras with a tight deadline get shed verdicts; every sent frame gets exactly one verdict."""
        # The deadline is below the batch timer, so any frame that waits for a batch to fill, or behind a running
        # one, is shed: shedding does not depend on how fast this machine happens to be today.
        agent = start_agent(shed_deadline_ms=2, max_queue_delay_us=5_000, max_batch_size=8, queue_cap=64,
                            explain_interval_s=0)
        rss0 = psutil.Process(agent.proc.pid).memory_info().rss
        report = tmp_path / "bridge.json"
        bridge = start_bridge(agent.publish, report, "--timeout", "40")
        cams = run_tool("simulators.camera", "--endpoint", agent.frames, "--cameras", "3", "--count", "1500",
                        "--fps", "0", "--report", str(tmp_path / "cams.json"), "--quiet")
        assert cams.returncode == 0, cams.stderr
        rss1 = psutil.Process(agent.proc.pid).memory_info().rss
        hb = wait_drained(zmq.Context.instance(), agent.publish)
        time.sleep(2.5)  # the bridge's 2 s gap timer must run out for a dropped frame to count as a gap
        bridge.send_signal(2)
        bridge.wait(30)
        r = json.loads(report.read_text())
        cams_r = json.loads((tmp_path / "cams.json").read_text())
        assert r["by_status"].get("shed", 0) > 0
        assert hb.counters["received"] == cams_r["sent"], hb.counters  # every frame sent reached the agent
        assert r["verdicts"] == cams_r["sent"], (r, cams_r)
        assert (r["gaps"] - cams_r["timed_out"], r["duplicates"]) == (0, 0)
        assert rss1 - rss0 < 150 * 2**20, f"RSS grew {(rss1 - rss0) / 2**20:.0f} MiB"
        assert agent.stop() == 0


class TestShutdown:
    """SIGTERM stops intake, drains, publishes and exits 0."""

    def test_sigterm_drains(self, start_agent: Any, zctx: zmq.Context[Any]) -> None:
        """Frames accepted before SIGTERM all get verdicts, the final heartbeat balances, exit code 0."""
        agent = start_agent(max_queue_delay_us=200_000, max_batch_size=32, queue_cap=64, shed_deadline_ms=10_000)
        sub = subscriber(zctx, agent.publish)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        for seq in range(20):
            push.send_multipart(gray_frame("camS", seq))
        time.sleep(0.05)  # inside the 200 ms batch delay: the frames are queued, not yet inferred
        t0 = time.monotonic()
        code = agent.stop()
        took = time.monotonic() - t0
        msgs = collect(sub, lambda m: False, 1.0)
        hb = last_heartbeat(msgs)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        assert code == 0 and took < 10
        assert hb.state == "draining"
        assert hb.counters["accepted"] == hb.counters["published"] == len(verdicts)
        assert [v.seq for v in verdicts] == list(range(len(verdicts)))
        assert len(verdicts) > 0


class TestBridgeFaults:
    """The PLC bridge sees gaps and a lost agent, and fails safe."""

    def test_gap_and_lost_agent(self, start_agent: Any, zctx: zmq.Context[Any], tmp_path: Path) -> None:
        """A skipped seq is a gap rejected by the bridge; a killed agent is reported lost."""
        agent = start_agent()
        report = tmp_path / "bridge.json"
        bridge = start_bridge(agent.publish, report, "--timeout", "12", "--verdict-timeout", "1",
                              "--heartbeat-timeout", "2")
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        for seq in (0, 1, 2, 5, 6):  # 3 and 4 never reach the agent
            push.send_multipart(gray_frame("camG", seq))
        time.sleep(2.5)
        agent.proc.kill()
        agent.proc.wait()
        bridge.wait(30)
        r = json.loads(report.read_text())
        assert r["verdicts"] == 5
        assert r["gaps"] == 2
        assert r["rejects"] >= 2
        assert r["agent_lost"] >= 1


def published_methods(model: Path) -> tuple[str, str]:
    """The explanation method the model's card names and its one-pass fallback behind a queue of reviews."""
    from agent.card import read
    from agent.explain import ONE_PASS

    method = read(model).explain_method
    return method, ONE_PASS.get(method, method)


class TestExplanations:
    """Explanation snapshots are published off the hot path."""

    def test_snapshot_published(self, start_agent: Any, zctx: zmq.Context[Any], neu_det: Path,
                                shipped_model: Path) -> None:
        """With a 1 s interval an explanation for a seen frame arrives with two PNGs."""
        import cv2

        agent = start_agent(explain_interval_s=1)
        sub = subscriber(zctx, agent.publish, EXPLAIN_PREFIX, HEARTBEAT_PREFIX, VERDICT_PREFIX)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        img = cv2.imread(str(sorted((neu_det / "IMAGES").glob("scratches_*.jpg"))[0]), cv2.IMREAD_GRAYSCALE)
        for seq in range(5):
            push.send_multipart(gray_frame("camE", seq, img.tobytes()))
        msgs = collect(sub, lambda m: any(isinstance(x, Explanation) for x in m), 10)
        ex = [m for m in msgs if isinstance(m, Explanation)]
        assert ex, "no explanation within 10 s"
        assert ex[0].camera_id == "camE" and 0 <= ex[0].seq < 5
        assert bytes(ex[0].overlay_png[:4]) == b"\x89PNG"
        assert ex[0].method in published_methods(shipped_model)

    def test_a_burst_of_reviews_is_explained_plainly_then_with_shifts(self, start_agent: Any, zctx: zmq.Context[Any],
                                                                     shipped_model: Path) -> None:
        """16 noise frames end as review: every one is explained, in one pass while more than 2 wait, with the card's
        method last."""
        agent = start_agent(explain_interval_s=3600, explain_budget=1.0)
        sub = subscriber(zctx, agent.publish, EXPLAIN_PREFIX, VERDICT_PREFIX, HEARTBEAT_PREFIX)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        noise = np.random.default_rng(5).integers(0, 256, (16, 200, 200), dtype=np.uint8)
        for seq, img in enumerate(noise):
            push.send_multipart(gray_frame("camR", seq, img.tobytes()))
        msgs = collect(sub, lambda m: sum(isinstance(x, Explanation) for x in m) >= 16, 60)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        ex = [m for m in msgs if isinstance(m, Explanation)]
        assert len(verdicts) == 16 and all(v.decision is Decision.REVIEW for v in verdicts)
        assert sorted(e.seq for e in ex) == list(range(16))
        methods = [e.method for e in ex]
        published, one_pass = published_methods(shipped_model)
        assert set(methods) == {one_pass, published} and methods[-1] == published, methods


class TestEveryBackend:
    """The agent runs end to end on each backend: verdicts and an explanation from real NEU-DET frames."""

    @pytest.mark.parametrize("backend", ["tensorflow", "zendnn", "litert", "openvino"])
    def test_end_to_end(self, backend: str, start_agent: Any, zctx: zmq.Context[Any], neu_det: Path,
                        tmp_path: Path) -> None:
        """12 real frames (2 per class) all get ok verdicts, >= 11 correct, and an explanation arrives."""
        import cv2

        extra = {} if backend in ("tensorflow", "zendnn") else {"precision": "fp32", "artifacts_dir": tmp_path / "art"}
        agent = start_agent(backend=backend, explain_interval_s=0.5, **extra)
        sub = subscriber(zctx, agent.publish, VERDICT_PREFIX, HEARTBEAT_PREFIX, EXPLAIN_PREFIX)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        files = [p for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
                 for p in sorted((neu_det / "IMAGES").glob(f"{c}_*.jpg"))[-2:]]
        for seq, path in enumerate(files):
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            push.send_multipart(gray_frame("camB", seq, img.tobytes(), label=path.stem.rsplit("_", 1)[0]))
        msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= 12
                       and any(isinstance(x, Explanation) for x in m), 20)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        hb = last_heartbeat(msgs + collect(sub, lambda m: any(isinstance(x, Heartbeat) for x in m), 3))
        assert [v.seq for v in verdicts] == list(range(12))
        assert all(v.status is Status.OK for v in verdicts), [(v.seq, v.status, v.reason) for v in verdicts]
        assert sum(v.class_name == v.label for v in verdicts) >= 11
        assert any(isinstance(m, Explanation) for m in msgs)
        assert hb.backend["backend"] == backend
        assert agent.stop() == 0
