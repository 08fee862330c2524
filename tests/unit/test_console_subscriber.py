"""The console's subscriber: what one tick takes from a real SUB socket, within its budget, and what it drops."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from agent.console.state import ConsoleState
from agent.console.subscriber import Subscriber
from protocol import AgentState, Heartbeat, Status, Verdict, encode_heartbeat, encode_verdict


def verdict(seq: int) -> list[bytes]:
    now = time.time_ns()
    return [bytes(p) for p in encode_verdict(Verdict("camS", seq, Status.OK, None, "a", 0, 0.9, None, True, "m",
                                                     "ag", 1, now, now, now, now))]


def heartbeat(n: int) -> list[bytes]:
    hb = Heartbeat("ag", 1, n, time.time_ns(), 1.0, AgentState.READY, 0, {}, {}, {}, "m")
    return [bytes(p) for p in encode_heartbeat(hb)]


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[Any], zmq.Socket[Any]]]:
    ctx: zmq.Context[Any] = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub.bind("inproc://console-test")
    sub.connect("inproc://console-test")
    time.sleep(0.05)  # the subscription reaches the PUB
    yield pub, sub
    pub.close(linger=0)
    sub.close(linger=0)
    ctx.term()


def arrived(sub: zmq.Socket[Any]) -> None:
    """inproc puts a message in the SUB's queue as it is sent; this only checks that it did."""
    assert sub.poll(1000)


class TestTake:
    """One tick's take: the budget of messages decoded, heartbeats always, the rest dropped and counted."""

    def test_within_the_budget_everything_is_taken(self, pair: Any) -> None:
        """Fewer messages than the budget: all of them, in arrival order, nothing dropped."""
        pub, sub = pair
        for seq in range(5):
            pub.send_multipart(verdict(seq))
        arrived(sub)
        batch, dropped = Subscriber(ConsoleState(), threading.Lock(), []).take(sub, budget=10)
        assert [m[0] for m in batch] == [b"verdict/camS/"] * 5 and not dropped

    def test_over_the_budget_the_rest_is_dropped_and_counted(self, pair: Any) -> None:
        """50 verdicts and 2 heartbeats against a budget of 10: 10 verdicts and both heartbeats, 40 dropped."""
        pub, sub = pair
        for seq in range(50):
            pub.send_multipart(verdict(seq))
            if seq in (20, 45):
                pub.send_multipart(heartbeat(seq))
        arrived(sub)
        batch, dropped = Subscriber(ConsoleState(), threading.Lock(), []).take(sub, budget=10)
        kinds = [m[0].split(b"/", 1)[0] for m in batch]
        assert kinds.count(b"verdict") == 10 and kinds.count(b"heartbeat") == 2
        assert dropped == {"verdict": 40}

    def test_a_running_subscriber_counts_every_message_once(self) -> None:
        """Through the thread and TCP: every verdict is either decoded into the state or counted as dropped."""
        ctx: zmq.Context[Any] = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind("tcp://127.0.0.1:*")
        state, lock = ConsoleState(), threading.Lock()
        sub = Subscriber(state, lock, [pub.getsockopt(zmq.LAST_ENDPOINT).decode()], max_rate=1000)
        sub.start()
        try:
            def seen() -> int:
                with lock:
                    return int(state.received["heartbeat"])

            deadline = time.monotonic() + 10
            while not seen() and time.monotonic() < deadline:  # the subscription is live once one arrives
                pub.send_multipart(heartbeat(0))
                time.sleep(0.05)
            for seq in range(3000):
                pub.send_multipart(verdict(seq))
            while time.monotonic() < deadline:
                with lock:
                    if state.received["verdict"] + state.dropped["verdict"] >= 3000:
                        break
                time.sleep(0.05)
            with lock:
                assert state.received["verdict"] + state.dropped["verdict"] == 3000
                assert state.dropped["verdict"] > 0  # 3,000 at once is over a 1,000/s budget
        finally:
            sub.stop()
            pub.close(linger=0)
            ctx.term()
