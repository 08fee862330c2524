"""CurveZMQ on the real agent: only allow-listed cameras are served, refused handshakes are counted."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from agent.security import make_keypair
from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, Heartbeat, Status, Verdict
from simulators.common import curve_client_keys, make_curve_client
from tests.integration.agentproc import Launcher
from tests.integration.conftest import collect
from tests.integration.test_line import gray_frame

pytestmark = pytest.mark.integration


@dataclass
class Keys:
    """An agent key pair, a camera and a bridge whose public keys are allow-listed, and the allow dir."""

    agent_public: Path
    agent_secret: Path
    allow_dir: Path
    camera_secret: Path
    bridge_secret: Path


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    """Fresh keys from the same code `tdn keygen` runs."""
    pub, sec = make_keypair(tmp_path / "agent", "agent")
    allow = tmp_path / "allowed"
    allow.mkdir()
    _, cam = make_keypair(tmp_path / "cam", "cam1")
    _, bridge = make_keypair(tmp_path / "bridge", "bridge1")
    for s in (cam, bridge):
        shutil.copy(s.with_suffix(".key"), allow)
    return Keys(pub, sec, allow, cam, bridge)


@pytest.fixture
def launcher(tmp_path: Path, shipped_model: Path) -> Iterator[Launcher]:
    """Agents on random ports, killed at teardown."""
    launch = Launcher(tmp_path)
    yield launch
    launch.close()


def push(ctx: zmq.Context[Any], endpoint: str, keys: tuple[bytes, bytes, bytes] | None) -> zmq.Socket[Any]:
    """A camera-like PUSH socket, plaintext when keys is None."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 200)
    make_curve_client(sock, keys)
    sock.connect(endpoint)
    return sock


def sub(ctx: zmq.Context[Any], endpoint: str, keys: tuple[bytes, bytes, bytes] | None) -> zmq.Socket[Any]:
    """A verdict+heartbeat SUB socket, plaintext when keys is None."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    make_curve_client(sock, keys)
    for p in (VERDICT_PREFIX, HEARTBEAT_PREFIX):
        sock.setsockopt(zmq.SUBSCRIBE, p)
    sock.connect(endpoint)
    return sock


class TestCurve:
    """An agent with curve_enabled and curve_require_subscribers."""

    def test_allow_list(self, launcher: Launcher, keys: Keys, zctx: zmq.Context[Any], tmp_path: Path) -> None:
        """Unknown-key and plaintext cameras/subscribers get nothing and are counted; allow-listed ones work."""
        agent = launcher.start(curve_enabled="true", curve_server_secret=keys.agent_secret,
                               curve_allow_dir=keys.allow_dir, curve_require_subscribers="true",
                               explain_interval_s=0)
        bridge_keys = curve_client_keys(keys.bridge_secret, keys.agent_public)
        good_sub = sub(zctx, agent.publish, bridge_keys)
        plain_sub = sub(zctx, agent.publish, None)
        stranger_sub = sub(zctx, agent.publish, curve_client_keys(None, keys.agent_public))
        hb = collect(good_sub, lambda m: any(isinstance(x, Heartbeat) for x in m), 10)
        assert any(isinstance(x, Heartbeat) for x in hb), "no heartbeat over the CURVE subscription"

        plain = push(zctx, agent.frames, None)
        stranger = push(zctx, agent.frames, curve_client_keys(None, keys.agent_public))
        for seq in range(5):
            # Neither handshake completes, so nothing may ever reach the agent: a send either queues locally or,
            # between a failed handshake and the reconnect (no pipe at all), times out. Both are fine here.
            for sock, cam in ((plain, "plain"), (stranger, "stranger")):
                with contextlib.suppress(zmq.Again):
                    sock.send_multipart(gray_frame(cam, seq))

        # The allow-listed camera and bridge, through the simulators' own --curve-* options.
        report = tmp_path / "bridge.json"
        bridge = subprocess.Popen(
            [sys.executable, "-m", "simulators.plc_bridge", "--endpoint", agent.publish, "--expect", "10",
             "--timeout", "40", "--report", str(report), "--quiet", "--curve-secret", str(keys.bridge_secret),
             "--curve-server-key", str(keys.agent_public)])
        time.sleep(1.0)
        cam = subprocess.run(
            [sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames, "--camera-id", "good",
             "--count", "10", "--fps", "50", "--quiet", "--curve-secret", str(keys.camera_secret),
             "--curve-server-key", str(keys.agent_public)], capture_output=True, text=True, timeout=60)
        assert cam.returncode == 0, cam.stderr
        assert bridge.wait(60) == 0, "the allow-listed bridge did not get the 10 verdicts"
        r = json.loads(report.read_text())
        assert r["verdicts"] == 10 and r["by_status"]["ok"] == 10

        time.sleep(1.5)  # a heartbeat after the last handshake attempts
        msgs = collect(good_sub, lambda m: False, 1.5)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        assert {v.camera_id for v in verdicts} == {"good"}
        assert all(v.status is Status.OK for v in verdicts)
        counters = [m for m in msgs if isinstance(m, Heartbeat)][-1].counters
        assert counters["received"] == 10, counters  # not one frame from the plaintext or unknown camera
        assert counters["auth_denied"] >= 4, counters  # 2 cameras + 2 subscribers, each at least once

        m = agent.metrics()
        assert m['tdn_auth_denied_total{reason="unknown_key",socket="frames"}'] >= 1
        assert m['tdn_auth_denied_total{reason="unknown_key",socket="publish"}'] >= 1
        plaintext = sum(v for k, v in m.items() if k.startswith("tdn_auth_denied_total") and "unknown_key" not in k)
        assert plaintext >= 2  # the plaintext camera and subscriber fail the mechanism handshake
        assert m["tdn_frames_received_total"] == 10
        for s in (plain_sub, stranger_sub):
            assert not s.poll(0), "a subscriber without an allow-listed key received something"
        assert "curve key not allowed" in agent.log_text()
        secret = zmq.auth.load_certificate(keys.agent_secret)[1]
        assert secret and secret.decode() not in agent.log_text()
        assert agent.stop() == 0
