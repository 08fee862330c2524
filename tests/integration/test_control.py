"""Run-time thresholds through a real agent's control socket: `tdn thresholds`, hostile peers, restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import pytest
import zmq

from agent.control import THRESHOLDS_FILE
from agent.security import make_token
from agent.testing import wait_for
from protocol import Decision, Encoding, Frame, Heartbeat, Status, Verdict, encode_frame
from protocol.control import Outcome, decode_reply
from tests.integration.conftest import collect, subscriber, wait_subscribed

pytestmark = pytest.mark.integration


def tdn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60)


def thresholds(agent: Any, token: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return tdn("thresholds", "--endpoint", agent.control, "--token-file", str(token), "--json", *args)


def neu_images(root: Path, n: int = 20) -> list[bytes]:
    """n real NEU-DET images (gray 200x200), a few of each class."""
    files = sorted(root.rglob("*.jpg"))[:: max(1, len(list(root.rglob("*.jpg"))) // n)][:n]
    return [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE).tobytes() for f in files]


def decisions(zctx: zmq.Context[Any], agent: Any, camera: str, images: list[bytes]) -> list[Verdict]:
    """Real images from one camera, and their verdicts."""
    n = len(images)
    sub = subscriber(zctx, agent.publish)
    wait_subscribed(sub)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(agent.frames)
    try:
        for seq, pixels in enumerate(images):
            push.send_multipart(encode_frame(Frame(camera_id=camera, seq=seq, capture_ns=time.time_ns(), width=200,
                                                   height=200, encoding=Encoding.GRAY8, payload=pixels)))
        msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) and x.camera_id == camera for x in m) >= n, 60)
    finally:
        push.close(linger=0)
        sub.close(linger=0)
    return [m for m in msgs if isinstance(m, Verdict) and m.camera_id == camera]


def heartbeat(zctx: zmq.Context[Any], agent: Any, until: Any) -> Heartbeat:
    sub = subscriber(zctx, agent.publish)
    try:
        msgs = collect(sub, lambda m: any(isinstance(x, Heartbeat) and until(x) for x in m), 15)
    finally:
        sub.close(linger=0)
    hbs = [m for m in msgs if isinstance(m, Heartbeat) and until(m)]
    assert hbs, "no heartbeat matched within 15 s"
    return hbs[-1]


@pytest.fixture
def controlled(start_agent: Any, tmp_path: Path, shared_artifacts: Path) -> tuple[Any, Path, Path]:
    token = make_token(tmp_path / "control.token")
    state = tmp_path / "state"
    agent = start_agent(control_endpoint="tcp://127.0.0.1:*", control_token_file=str(token), state_dir=str(state),
                        artifacts_dir=str(shared_artifacts), explain_interval_s=0)
    assert agent.control.startswith("tcp://127.0.0.1:")
    return agent, token, state


class TestThresholdCommand:
    """`tdn thresholds` changes how a running agent decides, authenticated, logged and kept."""

    @pytest.mark.hang_guard(240)
    def test_set_applies_to_the_next_batches_and_reset_restores(self, controlled: Any, zctx: Any,
                                                                 neu_det: Path) -> None:
        """ood_threshold 0 turns every ok verdict to review; reset returns to the card's decisions."""
        agent, token, state = controlled
        images = neu_images(neu_det)
        before = decisions(zctx, agent, "camA", images)
        assert len(before) == 20 and all(v.status is Status.OK for v in before)
        assert sum(v.decision is Decision.DIVERT for v in before) >= 15
        r = thresholds(agent, token, "--set", "ood_threshold=0", "--operator", "alice")
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["outcome"] == "ok" and reply["thresholds"]["ood_threshold"] == 0.0
        assert reply["overridden"] == ["ood_threshold"]
        after = decisions(zctx, agent, "camB", images)
        assert len(after) == 20 and {v.decision for v in after} == {Decision.REVIEW}
        hb = heartbeat(zctx, agent, lambda h: h.thresholds.get("ood_threshold") == 0.0)
        assert hb.counters["thresholds_changed"] == 1 and hb.counters["commands"] >= 1
        ev = agent.event("thresholds changed")
        assert ev is not None and ev["operator"] == "alice" and ev["changed"]["ood_threshold"][1] == 0.0
        assert json.loads((state / THRESHOLDS_FILE).read_text())["thresholds"] == {"ood_threshold": 0.0}
        r = thresholds(agent, token, "--reset")
        assert r.returncode == 0 and json.loads(r.stdout)["overridden"] == []
        again = decisions(zctx, agent, "camC", images)
        assert [v.decision for v in again] == [v.decision for v in before]
        assert not (state / THRESHOLDS_FILE).exists()

    @pytest.mark.hang_guard(240)
    def test_hostile_peers_are_refused_and_counted(self, controlled: Any, zctx: Any, tmp_path: Path,
                                                   neu_det: Path) -> None:
        """A wrong token, a bad value and garbage frames are answered and counted; nothing changes; frames flow."""
        agent, token, _ = controlled
        wrong = make_token(tmp_path / "wrong.token")
        r = thresholds(agent, wrong, "--set", "ood_threshold=0")
        assert r.returncode == 1 and json.loads(r.stdout)["outcome"] == "unauthorized"
        assert "unauthorized" in r.stderr and "Traceback" not in r.stderr
        r = thresholds(agent, token, "--set", "pass_threshold=1.5")
        assert r.returncode == 1 and "pass_threshold must be in [0, 1]" in r.stderr
        req = zctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RCVTIMEO, 5000)
        req.connect(agent.control)
        outcomes = []
        try:
            for parts in ([b"garbage"], [b"command", b"\xc1\xc1"], [b"command", b"\x80", b"extra"],
                          [b"x" * 100, b"y" * 40_000]):
                req.send_multipart(parts)
                outcomes.append(decode_reply(req.recv_multipart()).outcome)
        finally:
            req.close(linger=0)
        assert outcomes == [Outcome.UNAUTHORIZED] * 4  # no token could be read from any of them
        hb = heartbeat(zctx, agent, lambda h: h.counters.get("commands_refused", 0) >= 5)
        assert hb.counters.get("thresholds_changed", 0) == 0 and "ood_threshold" in hb.thresholds
        assert hb.thresholds["ood_threshold"] > 0
        assert len(decisions(zctx, agent, "camD", neu_images(neu_det, 10))) == 10
        assert agent.alive()

    @pytest.mark.hang_guard(300)
    def test_thresholds_survive_a_restart(self, start_agent: Any, tmp_path: Path, zctx: Any,
                                          shared_artifacts: Path) -> None:
        """A threshold set before a restart is in force after it, and the heartbeat shows it."""
        token = make_token(tmp_path / "t.token")
        state = tmp_path / "st"
        settings = {"control_endpoint": "tcp://127.0.0.1:*", "control_token_file": str(token),
                    "state_dir": str(state), "artifacts_dir": str(shared_artifacts), "explain_interval_s": 0}
        first = start_agent(**settings)
        assert thresholds(first, token, "--set", "min_confidence=0.25").returncode == 0
        assert first.stop() == 0
        second = start_agent(**settings)
        hb = heartbeat(zctx, second, lambda h: h.state.value == "ready")
        assert hb.thresholds["min_confidence"] == 0.25
        serving = second.event("model serving")
        assert serving is not None and serving["set_at_run_time"] == {"min_confidence": 0.25}
        assert json.loads(thresholds(second, token).stdout)["overridden"] == ["min_confidence"]

    def test_bad_state_file_is_one_clear_error(self, tmp_path: Path, shipped_model: Path) -> None:
        """A corrupt thresholds.json stops the start-up with exit 1 and one line naming it."""
        state = tmp_path / "st"
        state.mkdir()
        (state / THRESHOLDS_FILE).write_text('{"thresholds": {"pass_threshold": 9}}')
        r = tdn("agent", "--state-dir", str(state), "--frames-endpoint", "tcp://127.0.0.1:*",
                "--publish-endpoint", "tcp://127.0.0.1:*", "--metrics-port", "0", "--log-json", "true")
        assert r.returncode == 1
        lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert any(THRESHOLDS_FILE in ln for ln in lines) and "Traceback" not in r.stderr

    def test_no_control_socket_unless_configured(self, start_agent: Any) -> None:
        """Without control_endpoint the agent binds no control socket and logs none."""
        agent = start_agent(explain_interval_s=0)
        ready = agent.event("ready")
        assert agent.control == "" and ready is not None and ready["control"] is None
        wait_for(lambda: agent.alive(), 1, "agent alive")
