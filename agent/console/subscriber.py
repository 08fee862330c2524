"""The console's ZeroMQ side: a receiving thread that never blocks on the agent and a decoding thread feeding state."""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

import zmq

from agent.console.state import ConsoleState
from protocol import EXPLAIN_PREFIX, HEARTBEAT_PREFIX, VERDICT_PREFIX, Explanation, Heartbeat, ProtocolError, Verdict
from protocol import decode as decode_message
from simulators.common import CurveKeys, make_curve_client

# Small on purpose: when the console is slow, ZeroMQ drops for it instead of buffering the agent's rate in RAM.
DEFAULT_RCVHWM = 2000
DEFAULT_QUEUE = 4000
# Both threads work in batches, not per message: woken per verdict, they cost ~100-150 us of CPU a verdict at
# 2,000/s (GIL and futex hand-offs between them), CPU taken from the agent on a small line PC. The receiver
# drains the socket every RECEIVE_TICK_S (its RCVHWM holds a second at 2,000/s), the decoder every APPLY_TICK_S;
# the page still shows a verdict well within its 1 s.
RECEIVE_TICK_S = 0.01
APPLY_TICK_S = 0.05


class Subscriber:
    """SUB to every endpoint; receive into a bounded queue (counting what does not fit), decode into state."""

    def __init__(self, state: ConsoleState, lock: threading.Lock, endpoints: list[str], *,
                 curve: CurveKeys | None = None, rcvhwm: int = DEFAULT_RCVHWM, queue_size: int = DEFAULT_QUEUE) -> None:
        self.state = state
        self.lock = lock
        self.endpoints = endpoints
        self.curve = curve
        self.rcvhwm = rcvhwm
        self._queue: queue.Queue[list[bytes]] = queue.Queue(maxsize=queue_size)
        # Heartbeats carry liveness and fail-safe state: a separate lane so a flood of verdicts never drops them.
        self._beats: queue.Queue[list[bytes]] = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ctx: zmq.Context[Any] = zmq.Context()

    def start(self) -> None:
        """Connect and start both threads."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        make_curve_client(sock, self.curve)
        for prefix in (VERDICT_PREFIX, EXPLAIN_PREFIX, HEARTBEAT_PREFIX):
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        for endpoint in self.endpoints:
            sock.connect(endpoint)
        self._threads = [
            threading.Thread(target=self._receive, args=(sock,), name="console-recv", daemon=True),
            threading.Thread(target=self._apply, name="console-apply", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop both threads and close the socket."""
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._ctx.destroy(linger=0)

    def _receive(self, sock: zmq.Socket[Any]) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(100, zmq.POLLIN):
                    continue
                for _ in range(self.rcvhwm):
                    try:
                        parts = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    lane = self._beats if parts[0].startswith(HEARTBEAT_PREFIX) else self._queue
                    try:
                        lane.put_nowait(parts)
                    except queue.Full:
                        kind = parts[0].split(b"/", 1)[0].decode("ascii", "replace")[:16] or "?"
                        with self.lock:
                            self.state.on_dropped(kind)
                self._stop.wait(RECEIVE_TICK_S)
        finally:
            sock.close(linger=0)

    def _apply(self) -> None:
        while not self._stop.wait(APPLY_TICK_S):
            batch: list[list[bytes]] = []
            for lane in (self._beats, self._queue):  # heartbeats first: liveness must not wait behind verdicts
                with contextlib.suppress(queue.Empty):
                    while True:
                        batch.append(lane.get_nowait())
            # One lock per batch, not per message; the page's readers wait at most one batch.
            with self.lock:
                for parts in batch:
                    self._handle(parts)
                self.state.tick()

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
