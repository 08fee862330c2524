"""A stand-in agent for tests and `tdn bench bridge`: a ZeroMQ PUB sending protocol verdicts and heartbeats."""

from __future__ import annotations

import threading
import time
from typing import Any

import zmq

from protocol import AgentState, Heartbeat, Status, Verdict, encode_heartbeat, encode_verdict

CLASS_NAMES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


def make_verdict(camera_id: str, seq: int, *, agent_id: str = "synth", epoch: int = 1, model_id: str = "synthetic",
                 class_index: int | None = None, defect: bool = True) -> Verdict:
    """An ok verdict (class chosen from the seq unless given), published now."""
    now = time.time_ns()
    idx = seq % len(CLASS_NAMES) if class_index is None else class_index
    return Verdict(camera_id=camera_id, seq=seq, status=Status.OK, reason=None, class_name=CLASS_NAMES[idx],
                   class_index=idx, confidence=0.5 + (seq % 50) / 100, probs=None, defect=defect,
                   model_id=model_id, agent_id=agent_id, epoch=epoch, capture_ns=now, received_ns=now,
                   inferred_ns=now, published_ns=now, part_id=f"{camera_id}-{seq}")


class SyntheticAgent:
    """Binds a PUB, sends a heartbeat every `heartbeat_s` from a thread, and publishes verdicts on demand."""

    def __init__(self, endpoint: str, *, agent_id: str = "synth", epoch: int = 1, heartbeat_s: float = 0.2,
                 sndhwm: int = 0) -> None:
        self.endpoint = endpoint
        self.agent_id = agent_id
        self.epoch = epoch
        self.heartbeat_s = heartbeat_s
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)  # 0: never drop; a test's counts are the assertion
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self._lock = threading.Lock()  # ZeroMQ sockets are not thread-safe
        self.beating = threading.Event()
        self.beating.set()
        self._stop = threading.Event()
        self._hb_seq = 0
        self._thread = threading.Thread(target=self._beat, name="synthetic-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            if not self.beating.is_set():
                continue
            hb = Heartbeat(agent_id=self.agent_id, epoch=self.epoch, hb_seq=self._hb_seq, time_ns=time.time_ns(),
                           uptime_s=time.monotonic() - start, state=AgentState.READY, queue_depth=0, counters={},
                           batch_sizes={}, backend={}, model_id="synthetic")
            self._hb_seq += 1
            with self._lock:
                self.sock.send_multipart(encode_heartbeat(hb))

    def publish(self, verdict: Verdict) -> None:
        """Send one verdict now."""
        parts = encode_verdict(verdict)
        with self._lock:
            self.sock.send_multipart(parts)

    def send(self, camera_id: str, seq: int, **kw: Any) -> Verdict:
        """Build and send an ok verdict for (camera, seq)."""
        v = make_verdict(camera_id, seq, agent_id=self.agent_id, epoch=self.epoch, **kw)
        self.publish(v)
        return v

    def close(self) -> None:
        """Stop the heartbeats and close the socket."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()
