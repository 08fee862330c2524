"""Fixtures that run the real agent as a subprocess on random loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent.cli.demo import wait_ready
from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, decode
from tests.conftest import free_port


@dataclass
class RunningAgent:
    """A live agent process and where to reach it."""

    proc: subprocess.Popen[bytes]
    frames: str
    publish: str
    log: Path

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_agent(tmp_path: Path, shipped_model: Path) -> Iterator[Callable[..., RunningAgent]]:
    """Start `tdn agent` with extra settings; every agent started is killed at teardown."""
    started: list[RunningAgent] = []

    def start(**settings: Any) -> RunningAgent:
        frames = f"tcp://127.0.0.1:{free_port()}"
        publish = f"tcp://127.0.0.1:{free_port()}"
        log = tmp_path / f"agent{len(started)}.log"
        cmd = [sys.executable, "-m", "agent.cli", "agent", "--frames-endpoint", frames,
               "--publish-endpoint", publish, "--log-json", "true", "--metrics-port", "0"]
        for k, v in settings.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with log.open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        agent = RunningAgent(proc, frames, publish, log)
        started.append(agent)
        wait_ready(publish, proc, 120, log)
        return agent

    yield start
    for a in started:
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


def subscriber(ctx: zmq.Context[Any], endpoint: str, *prefixes: bytes) -> zmq.Socket[Any]:
    """A SUB socket connected and subscribed, given time to join before anything is published."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)  # never drop in a test: the count is the assertion
    for p in prefixes or (VERDICT_PREFIX, HEARTBEAT_PREFIX):
        sub.setsockopt(zmq.SUBSCRIBE, p)
    sub.connect(endpoint)
    return sub


def collect(sub: zmq.Socket[Any], until: Callable[[list[Any]], bool], timeout_s: float) -> list[Any]:
    """Decoded messages received until `until(messages)` holds or the timeout passes (poll, never hang)."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until(out):
        if sub.poll(100):
            out.append(decode(sub.recv_multipart()))
    return out


def wait_subscribed(sub: zmq.Socket[Any], timeout_s: float = 5.0) -> None:
    """Wait for one heartbeat, which proves the subscription is live (PUB keeps no history)."""
    from protocol import Heartbeat

    msgs = collect(sub, lambda m: any(isinstance(x, Heartbeat) for x in m), timeout_s)
    assert any(isinstance(x, Heartbeat) for x in msgs), "no heartbeat within the timeout"
