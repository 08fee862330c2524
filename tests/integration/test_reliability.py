"""Reliability of the real agent: protocol fuzzing, 2x overload, SIGKILL and restart, a subscriber that never reads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agent.lab.bench.stream import capacity
from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, Heartbeat, ProtocolError, Status, Verdict, decode, topic_for
from simulators.camera import Camera, Shot, list_images, read_gray
from tests.integration.agentproc import Launcher
from tests.integration.conftest import collect, start_bridge, subscriber, wait_drained, wait_subscribed
from tests.integration.test_line import gray_frame

pytestmark = pytest.mark.integration

FUZZ_LISTS, FUZZ_LIST_SIZE = 220, 50  # 11,000 messages
FUZZ_MAX_FRAME_BYTES = 65_536  # so valid-but-large frames are refused as oversized, below ZMQ_MAXMSGSIZE
GOOD = 200 * 200


@pytest.fixture
def launcher(tmp_path: Path, shipped_model: Path) -> Iterator[Launcher]:
    """Agents on random ports, killed at teardown."""
    launch = Launcher(tmp_path)
    yield launch
    launch.close()


@pytest.fixture(scope="module")
def bmp_source(tmp_path_factory: pytest.TempPathFactory, neu_det: Path) -> Path:
    """60 NEU-DET images (10 per class) as BMP: cheap for a camera process to read at thousands of fps."""
    out = tmp_path_factory.mktemp("bmp")
    by_class: dict[str | None, int] = {}
    for path, label in list_images(neu_det):
        if by_class.get(label, 0) < 10:
            by_class[label] = by_class.get(label, 0) + 1
            cv2.imwrite(str(out / f"{path.stem}.bmp"), read_gray(path))
    return out


# --- protocol fuzzing: every generated message is invalid by construction ---

CAMS = ("fz0", "fz1", "fz2")
_ids = st.sampled_from(CAMS)
_seqs = st.integers(0, 2**64 - 1)
_not_int = st.one_of(st.text(max_size=6), st.floats(), st.none(), st.binary(max_size=6), st.booleans(),
                     st.lists(st.integers(0, 9), max_size=2))
_not_id = st.one_of(st.integers(-5, 5), st.none(), st.binary(max_size=6), st.booleans(),
                    st.sampled_from(["", "a b", "x" * 65, "é", "cam/1"]))
_BIG = bytes(300 * 300)


def _header(cam: str, seq: int, **over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"v": 1, "kind": "frame", "camera_id": cam, "seq": seq, "capture_ns": time.time_ns(),
                         "width": 200, "height": 200, "encoding": "gray8"}
    h.update(over)
    return h


def _msg(h: dict[str, Any], payload: bytes, topic: bytes | None = None) -> list[bytes]:
    cam = h.get("camera_id")
    return [topic if topic is not None else f"frame/{cam}/".encode(), msgpack.packb(h), payload]


@st.composite
def _truncated(draw: Any) -> list[bytes]:
    cam = draw(_ids)
    packed = msgpack.packb(_header(cam, draw(_seqs)))
    return [f"frame/{cam}/".encode(), packed[: draw(st.integers(0, len(packed) - 1))], bytes(GOOD)]


@st.composite
def _wrong_type(draw: Any) -> list[bytes]:
    cam, seq = draw(_ids), draw(_seqs)
    name = draw(st.sampled_from(["seq", "capture_ns", "width", "height", "camera_id", "encoding", "kind"]))
    value = draw(_not_id if name == "camera_id" else _not_int if name != "encoding" else
                 st.one_of(_not_int.filter(lambda v: v not in ("gray8", "jpeg", "png")),
                           st.sampled_from(["GRAY8", "bmp", ""])))
    if name == "kind":
        value = draw(st.one_of(_not_int, st.sampled_from(["verdict", "heartbeat", "explain", "FRAME", ""])))
    h = _header(cam, seq)
    h[name] = value
    return _msg(h, bytes(GOOD), f"frame/{cam}/".encode())


@st.composite
def _huge_dims(draw: Any) -> list[bytes]:
    bad = st.one_of(st.integers(4097, 2**64 - 1), st.integers(-(2**63), 0))
    over = draw(st.sampled_from([{"width": draw(bad)}, {"height": draw(bad)}, {"width": draw(bad), "height": 5}]))
    return _msg(_header(draw(_ids), draw(_seqs), **over), bytes(draw(st.integers(0, 64))))


@st.composite
def _payload_size(draw: Any) -> list[bytes]:
    n = draw(st.integers(0, 2 * GOOD).filter(lambda n: n != GOOD))
    return _msg(_header(draw(_ids), draw(_seqs)), bytes(n))


@st.composite
def _bad_version(draw: Any) -> list[bytes]:
    h = _header(draw(_ids), draw(_seqs))
    if draw(st.booleans()):
        h["v"] = draw(st.one_of(st.integers(-(2**63), 2**64 - 1).filter(lambda v: v != 1), _not_int))
    else:
        del h["v"]
    return _msg(h, bytes(GOOD))


@st.composite
def _bad_topic_or_parts(draw: Any) -> list[bytes]:
    cam = draw(_ids)
    parts = _msg(_header(cam, draw(_seqs)), bytes(GOOD))
    if draw(st.booleans()):
        parts[0] = draw(st.binary(max_size=80).filter(lambda t: t != topic_for("frame", cam)))
        return parts
    n = draw(st.sampled_from([1, 2, 4, 5]))
    return [*parts, b"extra", b"more"][:n]


@st.composite
def _bad_image(draw: Any) -> list[bytes]:
    enc = draw(st.sampled_from(["jpeg", "png"]))
    magic = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}[enc] if draw(st.booleans()) else b""
    return _msg(_header(draw(_ids), draw(_seqs), encoding=enc), magic + draw(st.binary(max_size=200)))


@st.composite
def _agent_refused(draw: Any) -> list[bytes]:
    # Valid protocol, refused by the agent: above its max_frame_bytes (every size itself is valid since SPEC 1.1).
    side = draw(st.sampled_from([257, 300, 400]))
    payload = _BIG[: side * side] if side == 300 else bytes(side * side)
    return _msg(_header(draw(_ids), draw(_seqs), width=side, height=side), payload)


BAD_MESSAGE = st.one_of(
    st.lists(st.binary(max_size=64), min_size=1, max_size=5),
    _truncated(), _wrong_type(), _huge_dims(), _payload_size(), _bad_version(), _bad_topic_or_parts(),
    _bad_image(), _agent_refused(),
)


def _rejected_total(counters: dict[str, int]) -> int:
    return sum(v for k, v in counters.items() if k.startswith("rejected_") and k != "rejected_unattributed")


def _latest_heartbeat(sub: zmq.Socket[Any], until: Any, timeout_s: float) -> Heartbeat | None:
    last: Heartbeat | None = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if sub.poll(100):
            msg = decode(sub.recv_multipart())
            if isinstance(msg, Heartbeat):
                last = msg
                if until(msg):
                    return msg
    return last


class TestFuzz:
    """Hypothesis-generated invalid messages against the running agent."""

    def test_flood_of_invalid_messages(self, launcher: Launcher, zctx: zmq.Context[Any]) -> None:
        """11,000 invalid messages: the agent stays up, counts each one as received and rejected, then serves."""
        # Rejection warnings are rate-limited per reason, so the flood does not flood the log either.
        agent = launcher.start(max_frame_bytes=FUZZ_MAX_FRAME_BYTES, explain_interval_s=0)
        sub = subscriber(zctx, agent.publish, HEARTBEAT_PREFIX, b"verdict/fzgood/")
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 10_000)
        push.connect(agent.frames)
        sent = 0

        @settings(max_examples=FUZZ_LISTS, database=None, derandomize=True, deadline=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.lists(BAD_MESSAGE, min_size=FUZZ_LIST_SIZE, max_size=FUZZ_LIST_SIZE))
        def flood(messages: list[list[bytes]]) -> None:
            nonlocal sent
            for parts in messages:
                push.send_multipart(parts)
                sent += 1
            assert agent.proc.poll() is None, "the agent died during the flood"

        t0 = time.monotonic()
        flood()
        took = time.monotonic() - t0
        assert sent >= 10_000
        hb = _latest_heartbeat(sub, lambda h: h.counters["received"] >= sent, 60)
        assert hb is not None and agent.proc.poll() is None
        c = hb.counters
        print(f"\nfuzz: {sent} messages in {took:.1f} s; rejected by reason: "
              f"{ {k: v for k, v in c.items() if k.startswith('rejected_')} }")
        assert c["received"] == sent
        assert _rejected_total(c) == sent, c  # every one refused, and counted exactly once
        assert c["inferred"] == 0 and c["rejected"] + c["rejected_unattributed"] == sent

        push.send_multipart(gray_frame("fzgood", 0))
        got = collect(sub, lambda m: any(isinstance(x, Verdict) for x in m), 10)
        verdicts = [v for v in got if isinstance(v, Verdict)]
        assert verdicts and verdicts[0].status is Status.OK, "no ok verdict for a good frame after the flood"
        assert agent.stop() == 0


# --- overload ---


def _watch_heartbeats(ctx: zmq.Context[Any], endpoint: str, stop: threading.Event, times: list[float]) -> None:
    """Record the arrival time of every heartbeat (a separate thread: the gap is the agent's, not ours)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_PREFIX)
    sub.connect(endpoint)
    try:
        while not stop.is_set():
            if sub.poll(100):
                sub.recv_multipart()
                times.append(time.monotonic())
    finally:
        sub.close(linger=0)


class TestOverload:
    """Twice the measured capacity for 20 s."""

    def test_twice_capacity(self, launcher: Launcher, shipped_model: Path, bmp_source: Path, tmp_path: Path,
                            zctx: zmq.Context[Any]) -> None:
        """RSS stays bounded, every frame sent gets exactly one verdict, heartbeats never pause for 2.5 s."""
        cap = capacity("tensorflow", shipped_model, 16, seconds=2.0)
        # The same backend as the capacity probe, so "twice the capacity" means what it says.
        agent = launcher.start(backend="tensorflow", explain_interval_s=0, max_batch_size=16, queue_cap=64)
        proc = psutil.Process(agent.proc.pid)
        hb_times: list[float] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_heartbeats, args=(zctx, agent.publish, stop, hb_times))
        watcher.start()
        report = tmp_path / "bridge.json"
        bridge = start_bridge(agent.publish, report, "--timeout", "60")
        # In-process cameras replaying preloaded images: a camera process reading files cannot offer 2x.
        shots = [Shot(read_gray(p), label, p.name) for p, label in list_images(bmp_source)]
        fps, seconds = cap, 20.0  # per camera; two cameras offer twice the capacity
        ctx: zmq.Context[Any] = zmq.Context()
        cameras = [Camera(f"cam{i}", cycle(shots[i::2]), endpoint=agent.frames, fps=fps, send_timeout_ms=200,
                          context=ctx) for i in range(2)]
        threads = [threading.Thread(target=c.run) for c in cameras]
        rss: list[float] = [proc.memory_info().rss / 2**20]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while time.monotonic() - t0 < seconds:
            time.sleep(1.0)
            rss.append(proc.memory_info().rss / 2**20)
        # Ending by count rather than by stop lets each camera flush every frame it counted as sent.
        for c in cameras:
            c.count = c.stats.next_seq - c.stats.first_seq
        for t in threads:
            t.join(10)
        took = time.monotonic() - t0
        ctx.term()  # each camera's socket lingers until its queued frames (counted as sent) have left
        idle = wait_drained(zctx, agent.publish)
        time.sleep(2.5)  # the bridge's 2 s gap timer must run out for a dropped frame to count as a gap
        bridge.send_signal(2)
        bridge.wait(30)
        stop.set()
        watcher.join(5)
        r = json.loads(report.read_text())
        sent = sum(c.stats.sent for c in cameras)
        timed_out = sum(c.stats.timed_out for c in cameras)
        blocked = sum(c.stats.blocked for c in cameras)
        gaps = np.diff(hb_times)
        growth, steady = max(rss) - rss[0], max(rss[5:]) - rss[5]
        print(f"\noverload: capacity {cap:.0f}/s, offered {2 * cap:.0f}/s for {seconds:.0f} s, sent "
              f"{sent / took:.0f}/s in {took:.1f} s; verdicts {r['verdicts']} {r['by_status']}, camera blocked "
              f"{blocked} timed out {timed_out}; RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max growth {growth:.1f}, "
              f"after 5 s {steady:.1f}); max heartbeat gap {gaps.max():.2f} s over {len(hb_times)} heartbeats")
        assert all(c.stats.error is None for c in cameras)
        assert idle.counters["received"] == sent, (idle.counters, sent)  # every frame sent reached the agent
        assert r["verdicts"] == sent, (r, sent)
        assert r["duplicates"] == 0
        assert r["gaps"] <= timed_out  # a gap is a frame the camera dropped, never one the agent lost
        assert r["by_status"].get("shed", 0) + blocked > 0, "no pushback or shedding: not an overload"
        assert len(hb_times) >= 20 and gaps.max() < 2.5
        assert steady < 50, f"RSS grew {steady:.1f} MiB under steady overload"
        assert growth < 150
        assert agent.stop() == 0


# --- crash and restart ---


class TestCrash:
    """SIGKILL mid-stream, then a restart on the same endpoints."""

    def test_kill_and_restart(self, launcher: Launcher, bmp_source: Path, tmp_path: Path) -> None:
        """The camera reconnects by itself; the bridge, back before the agent serves, sees the new epoch and
        fail-safes every lost frame once."""
        first = launcher.start(explain_interval_s=0)
        report = tmp_path / "bridge.json"
        bridge = start_bridge(first.publish, report, "--first-seq", "0", "--verdict-timeout", "1", "--timeout", "90")
        shots = cycle([Shot(read_gray(p), None, p.name) for p, _ in list_images(bmp_source)[:12]])
        ctx: zmq.Context[Any] = zmq.Context()
        camera = Camera("camK", shots, endpoint=first.frames, fps=100, send_timeout_ms=200, context=ctx)
        cam_thread = threading.Thread(target=camera.run)
        cam_thread.start()
        try:
            time.sleep(3.0)
            first.kill()
            seq_at_kill = camera.stats.next_seq
            # The default ready_subscribers (None: 1): the restarted agent reads no frame before the bridge is back.
            second = launcher.start(frames=first.frames, publish=first.publish, metrics_port=first.metrics_port,
                                    explain_interval_s=0, ready_subscribers=None)
            seq_at_ready = camera.stats.next_seq
            time.sleep(3.0)
        finally:
            camera.stop.set()
            cam_thread.join(10)
            ctx.destroy(linger=0)
        time.sleep(2.0)  # gap timeouts at the bridge
        bridge.send_signal(2)
        bridge.wait(30)
        r = json.loads(report.read_text())
        cam = r["per_camera"]["camK"]
        highest = cam["highest_seq"]
        lost = highest + 1 - r["verdicts"]
        print(f"\ncrash: seq at kill {seq_at_kill}, at ready {seq_at_ready}, highest {highest}; verdicts "
              f"{r['verdicts']}, gaps {r['gaps']}, camera timeouts {camera.stats.timed_out}, restarts "
              f"{r['agent_restarts']}, lost {r['agent_lost']}")
        assert r["agent_restarts"] >= 1
        # No verdict of the new epoch went out before the bridge had resubscribed (none lost to slow joining).
        assert second.event("waiting for subscribers") and not second.event("serving without every subscriber")
        assert r["agents"]["agent1"]["epoch"] != 0 and not r["agents"]["agent1"]["lost"]
        assert highest > seq_at_ready, "no verdict after the restart: the camera did not reconnect"
        assert r["duplicates"] == 0
        assert lost > 0 and r["gaps"] == lost and cam["pending"] == 0  # every unverdicted seq fail-safed
        assert r["gaps"] >= camera.stats.timed_out
        assert r["rejects"] >= lost
        assert second.stop() == 0


# --- a subscriber that never reads ---


def _verdict_reader(ctx: zmq.Context[Any], endpoint: str, stop: threading.Event, out: list[tuple[float, float]],
                    ready: threading.Event) -> None:
    """(receive time, agent latency ms) for every verdict, on its own thread."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, VERDICT_PREFIX)
    sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_PREFIX)
    sub.connect(endpoint)
    try:
        while not stop.is_set():
            if sub.poll(100):
                try:
                    msg = decode(sub.recv_multipart())
                except ProtocolError:
                    continue
                if isinstance(msg, Heartbeat):
                    ready.set()
                elif isinstance(msg, Verdict) and msg.capture_ns:
                    out.append((time.monotonic(), (msg.published_ns - msg.capture_ns) / 1e6))
    finally:
        sub.close(linger=0)


class TestSlowSubscriber:
    """PUB drops for a subscriber that does not read; nobody else notices."""

    def _run(self, agent: Any, bmp_source: Path, tmp_path: Path, tag: str, fps: float,
             count: int) -> tuple[int, float, float]:
        ctx: zmq.Context[Any] = zmq.Context()
        stop, ready = threading.Event(), threading.Event()
        got: list[tuple[float, float]] = []
        reader = threading.Thread(target=_verdict_reader, args=(ctx, agent.publish, stop, got, ready))
        reader.start()
        try:
            assert ready.wait(10)
            cams = subprocess.run([sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames,
                                   "--camera-id", f"cam{tag}", "--fps", str(fps), "--count", str(count),
                                   "--source", str(bmp_source), "--report", str(tmp_path / f"{tag}.json"),
                                   "--quiet"], capture_output=True, text=True, timeout=120)
            assert cams.returncode == 0, cams.stderr
            deadline = time.monotonic() + 10
            while len(got) < count and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            reader.join(5)
            ctx.destroy(linger=0)
        times = [t for t, _ in got]
        rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        return len(got), rate, float(np.percentile([ms for _, ms in got], 95))

    def test_never_reading_subscriber(self, launcher: Launcher, bmp_source: Path, tmp_path: Path,
                                      zctx: zmq.Context[Any]) -> None:
        """With a stuck SUB attached, a normal subscriber gets every verdict at the same rate and latency."""
        agent = launcher.start(explain_interval_s=0, sndhwm=200)
        fps, count = 300.0, 1800
        self._run(agent, bmp_source, tmp_path, "W", fps, 300)  # warm-up: first runs of each batch size are slow
        n0, rate0, p95_0 = self._run(agent, bmp_source, tmp_path, "A", fps, count)
        stuck = zctx.socket(zmq.SUB)
        stuck.setsockopt(zmq.LINGER, 0)
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.connect(agent.publish)
        time.sleep(1.0)
        n1, rate1, p95_1 = self._run(agent, bmp_source, tmp_path, "B", fps, count)
        stuck_got = 0
        while stuck.poll(0):
            stuck.recv_multipart()
            stuck_got += 1
        print(f"\nslow subscriber: without {n0} verdicts at {rate0:.0f}/s p95 {p95_0:.1f} ms; with {n1} at "
              f"{rate1:.0f}/s p95 {p95_1:.1f} ms; the stuck SUB holds {stuck_got} messages")
        assert n0 == n1 == count
        assert rate1 > 0.9 * rate0
        assert p95_1 < 2 * p95_0 + 20
        assert stuck_got < count, "the stuck subscriber was not actually behind"
        assert agent.proc.poll() is None
        assert agent.stop() == 0
