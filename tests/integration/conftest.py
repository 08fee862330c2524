"""Fixtures that run the real agent as a subprocess on random loopback ports."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent import testing
from agent.testing import AgentProcess
from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, decode


@pytest.fixture
def start_agent(tmp_path: Path, shipped_model: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `tdn agent` with extra settings on ZeroMQ-chosen ports; every agent started is killed at teardown."""
    started: list[AgentProcess] = []

    def start(*, wait: str = "ready", **settings: Any) -> AgentProcess:
        settings.setdefault("metrics_port", 0)
        agent = testing.start_agent(tmp_path / f"agent{len(started)}.log", settings, wait=wait)
        started.append(agent)
        return agent

    yield start
    for a in started:
        a.kill()


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


def wait_drained(zctx: zmq.Context[Any], publish: str, timeout_s: float = 90.0) -> Any:
    """Block until the agent's heartbeats say it is idle: every accepted frame published, intake quiet, queue empty.

    Overload tests wait on this instead of a fixed sleep: how long the last frames take depends on the machine.
    """
    from protocol import Heartbeat

    sub = subscriber(zctx, publish, HEARTBEAT_PREFIX)
    last: tuple[int, int] | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not sub.poll(200):
                continue
            hb = decode(sub.recv_multipart())
            if not isinstance(hb, Heartbeat):
                continue
            c = hb.counters
            now = (c.get("received", -1), c.get("published", -1))
            if now == last and c.get("accepted") == c.get("published") and hb.queue_depth == 0:
                return hb
            last = now
    finally:
        sub.close(linger=0)
    raise TimeoutError(f"agent not idle within {timeout_s:.0f} s")


def start_bridge(publish: str, report: Path, *args: str) -> subprocess.Popen[bytes]:
    """A PLC-bridge subprocess on `publish`, returned once its subscription is live (it saw a heartbeat)."""
    ready = report.with_suffix(".ready")
    bridge = subprocess.Popen([sys.executable, "-m", "simulators.plc_bridge", "--endpoint", publish,
                               "--report", str(report), "--ready-file", str(ready), "--quiet", *args])

    def live() -> bool:
        if bridge.poll() is not None:
            raise AssertionError(f"bridge exited with {bridge.returncode} before subscribing")
        return ready.exists()

    testing.wait_for(live, 30, "bridge subscribed")
    return bridge
