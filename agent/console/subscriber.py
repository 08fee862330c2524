"""The console's ZeroMQ side: one thread that takes what arrived each tick, within a budget, and feeds the state."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import zmq

from agent.console.state import ConsoleState
from protocol import EXPLAIN_PREFIX, HEARTBEAT_PREFIX, VERDICT_PREFIX, Explanation, Heartbeat, ProtocolError, Verdict
from protocol import decode as decode_message
from simulators.common import CurveKeys, make_curve_client

# Large enough that libzmq never drops for the console between two ticks (it would not be counted); the
# budget below is what bounds the work.
DEFAULT_RCVHWM = 100_000
# The most messages decoded a second; beyond it the console drops (and counts) rather than take more CPU from the
# agent on the same small machine: at ~50 us a verdict, 5,000/s is a quarter of one core.
DEFAULT_MAX_RATE = 5_000
# Work in ticks, not per message: woken per verdict, the console's threads cost 96-147 us of CPU a verdict at
# 2,000/s (GIL and futex hand-offs); the page still shows a verdict well within its 1 s.
TICK_S = 0.02


class Subscriber:
    """SUB to every endpoint; each tick, decode what arrived into the state, up to the budget, and count the rest."""

    def __init__(self, state: ConsoleState, lock: threading.Lock, endpoints: list[str], *,
                 curve: CurveKeys | None = None, rcvhwm: int = DEFAULT_RCVHWM,
                 max_rate: int = DEFAULT_MAX_RATE) -> None:
        self.state = state
        self.lock = lock
        self.endpoints = endpoints
        self.curve = curve
        self.rcvhwm = rcvhwm
        self.max_rate = max_rate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context[Any] = zmq.Context()

    def start(self) -> None:
        """Connect and start the thread."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        make_curve_client(sock, self.curve)
        for prefix in (VERDICT_PREFIX, EXPLAIN_PREFIX, HEARTBEAT_PREFIX):
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        for endpoint in self.endpoints:
            sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, args=(sock,), name="console-sub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._ctx.destroy(linger=0)

    def _run(self, sock: zmq.Socket[Any]) -> None:
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                time.sleep(TICK_S)  # not Event.wait: a timed wait costs twice the CPU of a sleep here
                now = time.monotonic()
                # The budget is the rate times the time since the last take (a tick plus the last one's work).
                batch, dropped = self.take(sock, max(1, int(self.max_rate * min(now - last, 1.0))))
                last = now
                # One lock per tick, not per message; the page's readers wait at most one batch.
                with self.lock:
                    for kind, n in dropped.items():
                        self.state.on_dropped(kind, n)
                    for parts in batch:
                        self._handle(parts)
                    self.state.tick()
        finally:
            sock.close(linger=0)

    def take(self, sock: zmq.Socket[Any], budget: int) -> tuple[list[list[bytes]], Counter[str]]:
        """What arrived since the last tick: up to `budget` to decode (heartbeats always: they carry liveness), the
        rest received and dropped, counted by kind. Bounded, so a flood cannot hold the thread."""
        batch: list[list[bytes]] = []
        dropped: Counter[str] = Counter()
        decoded = 0
        for _ in range(budget + self.rcvhwm):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if parts[0].startswith(HEARTBEAT_PREFIX):
                batch.append(parts)
            elif decoded < budget:
                batch.append(parts)
                decoded += 1
            else:
                dropped[parts[0].split(b"/", 1)[0].decode("ascii", "replace")[:16] or "?"] += 1
        return batch, dropped

    def _handle(self, parts: list[bytes]) -> None:
        try:
            msg = decode_message(parts)
        except ProtocolError as err:
            self.state.on_malformed(str(err.reason))
            return
        if isinstance(msg, Verdict):
            self.state.on_verdict(msg)
        elif isinstance(msg, Explanation):
            self.state.on_explanation(msg)
        elif isinstance(msg, Heartbeat):
            self.state.on_heartbeat(msg)
        else:
            self.state.on_malformed("bad_kind")  # a frame on a PUB socket has no business there
