"""The first thing an agent does: bind its PUB socket and beat `starting`, before the heavy imports and the model.

A bridge that sees a restarted agent at once holds its parts instead of raising "agent lost" for the seconds a
model takes to load. Only ZeroMQ and the protocol are imported here, so the first heartbeat leaves well within
a second of launch; the agent takes the socket over (hand_over) once it serves.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from agent.logging import get_logger
from protocol import AgentState, Heartbeat, encode_heartbeat

if TYPE_CHECKING:
    from agent.config import AgentSettings
    from agent.security import CurveServer

log = get_logger("agent.beacon")
# While starting, beat four times a second: PUB keeps no history, so the beat sent at the bind reaches no bridge
# (none has joined yet), and a bridge that joins a moment later would otherwise wait a whole interval.
STARTING_BEAT_S = 0.25


class Beacon:
    """Owns the PUB socket until hand_over(); publishes a `starting` heartbeat every interval meanwhile."""

    def __init__(self, settings: AgentSettings, ctx: zmq.Context[Any]) -> None:
        self.s = settings
        self.start_mono = time.monotonic()  # uptime counts from here, the same on every backend
        # Random, so a restarted agent is always told apart even within one clock tick.
        self.epoch = random.getrandbits(63)
        self.hb_seq = 0
        self.curve: CurveServer | None = None
        if settings.curve_enabled:
            from agent.security import CurveServer

            self.curve = CurveServer(settings.curve_server_secret, settings.curve_allow_dir,
                                     settings.curve_require_subscribers)
            self.curve.start(ctx)  # the ZAP handler must run before a CURVE socket binds
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, settings.sndhwm)
        self.pub.setsockopt(zmq.LINGER, 1000)
        # A vanished bridge (host down, cable out) is dropped after 3 s, with the verdicts queued to it.
        self.pub.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.pub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        self.pub.setsockopt(zmq.TCP_MAXRT, 3000)
        if self.curve is not None:
            self.curve.secure(self.pub, "publish")
        self.pub.bind(settings.publish_endpoint)
        # The bound endpoint, port resolved when the setting asked ZeroMQ to choose one (tcp://host:*).
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        log.info("publishing", publish=self.endpoint, agent_id=settings.agent_id, epoch=self.epoch)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tdn-starting", daemon=True)
        self._thread.start()

    def next_seq(self) -> int:
        """The next heartbeat's hb_seq (the agent goes on counting from where the beacon stopped)."""
        self.hb_seq += 1
        return self.hb_seq

    def _beat(self) -> None:
        while not self._done.is_set():
            hb = Heartbeat(agent_id=self.s.agent_id, epoch=self.epoch, hb_seq=self.next_seq(), time_ns=time.time_ns(),
                           uptime_s=time.monotonic() - self.start_mono, state=AgentState.STARTING, queue_depth=0,
                           counters={}, batch_sizes={}, backend={"backend": str(self.s.backend)}, model_id="",
                           max_frame_bytes=self.s.max_frame_bytes)
            self.pub.send_multipart(encode_heartbeat(hb), copy=False)
            self._done.wait(min(STARTING_BEAT_S, self.s.heartbeat_interval_s))

    def hand_over(self) -> zmq.Socket[Any]:
        """Stop beating and give the PUB socket to the caller's thread (sockets are not shared between threads)."""
        self._done.set()
        self._thread.join()
        return self.pub
