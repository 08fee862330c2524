"""The XPUB publish socket: a new heartbeat subscriber hears the agent at once, and READY can wait for bridges."""

from __future__ import annotations

import time
from typing import Any

import pytest
import zmq

from agent.testing import wait_ready
from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, AgentState, Encoding, Frame, Heartbeat, Verdict, encode_frame
from tests.integration.conftest import collect, subscriber

pytestmark = pytest.mark.integration


def heartbeats(msgs: list[Any]) -> list[Heartbeat]:
    return [m for m in msgs if isinstance(m, Heartbeat)]


class TestInstantHeartbeat:
    """A bridge that subscribes gets a heartbeat without waiting for the next interval."""

    def test_new_subscriber_hears_the_agent_at_once(self, start_agent: Any, zctx: zmq.Context[Any]) -> None:
        """With heartbeats 60 s apart, each new subscriber still gets one (model and classes) within seconds."""
        agent = start_agent(heartbeat_interval_s=60)
        for _ in range(2):  # a second bridge on the same topic gets its own (XPUB_VERBOSE)
            sub = subscriber(zctx, agent.publish, HEARTBEAT_PREFIX)
            try:
                hbs = heartbeats(collect(sub, lambda m: bool(heartbeats(m)), 20))
            finally:
                sub.close(linger=0)
            assert hbs, "no heartbeat: the subscription did not trigger one"
            assert hbs[0].state is AgentState.READY and hbs[0].model_id and hbs[0].classes

    def test_verdict_subscription_alone_triggers_nothing(self, start_agent: Any, zctx: zmq.Context[Any]) -> None:
        """Only a subscription that covers this agent's heartbeat topic is answered with a heartbeat."""
        agent = start_agent(heartbeat_interval_s=60, agent_id="xa")
        other = subscriber(zctx, agent.publish, b"heartbeat/other-agent/", VERDICT_PREFIX)
        mine = subscriber(zctx, agent.publish, b"heartbeat/xa/")
        try:
            assert heartbeats(collect(mine, lambda m: bool(heartbeats(m)), 20))
            assert not collect(other, lambda m: bool(m), 1.5)
        finally:
            other.close(linger=0)
            mine.close(linger=0)


class TestReadyWaitsForSubscribers:
    """TDN_READY_SUBSCRIBERS (default 1) holds READY (and the frame socket) until that many bridges subscribed."""

    def test_ready_after_the_bridge_and_first_verdict_seen(self, start_agent: Any, zctx: zmq.Context[Any]) -> None:
        """By default the agent stays starting until a bridge subscribes; that bridge sees the very first verdict."""
        agent = start_agent(wait="publishing", ready_subscribers=None, ready_wait_s=600)  # None: the default
        waiting = agent.wait_event("waiting for subscribers", 180)
        assert waiting["want"] == 1
        time.sleep(1.0)
        assert agent.event("ready") is None  # the model is warm, but no bridge listens yet
        sub = subscriber(zctx, agent.publish)
        try:
            wait_ready(agent, 60)
            push = zctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(agent.frames)
            pixels = bytes(200 * 200)
            push.send_multipart(encode_frame(Frame(camera_id="c1", seq=0, capture_ns=time.time_ns(), width=200,
                                                   height=200, encoding=Encoding.GRAY8, payload=pixels)))
            msgs = collect(sub, lambda m: any(isinstance(x, Verdict) for x in m), 60)
            push.close(linger=0)
        finally:
            sub.close(linger=0)
        assert [v.seq for v in msgs if isinstance(v, Verdict)] == [0]
        states = [h.state for h in heartbeats(msgs)]
        assert AgentState.STARTING in states  # the subscriber heard it starting, before it served

    def test_serves_anyway_after_the_wait(self, start_agent: Any) -> None:
        """No bridge within ready_wait_s: one warning naming the shortfall, then it serves."""
        agent = start_agent(ready_subscribers=2, ready_wait_s=1.0)
        warned = agent.event("serving without every subscriber")
        assert warned is not None and warned["want"] == 2 and warned["subscribers"] == 0
        assert agent.event("ready") is not None
