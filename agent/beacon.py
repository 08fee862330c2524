"""The first thing an agent does: bind its publish socket and beat `starting`, before the heavy imports and the model.

A bridge that sees a restarted agent at once holds its parts instead of raising "agent lost" for the seconds a
model takes to load. Only ZeroMQ and the protocol are imported here, so the first heartbeat leaves well within
a second of launch; the agent takes the socket over (hand_over) once it serves.

The socket is an XPUB: it sends like a PUB, and it hands up each subscription as it arrives. A bridge that
subscribes to heartbeats gets one at once (who the agent is, its model and classes), and the agent can hold
READY until the subscribers it expects are there, so no verdict goes out before a restarted line is listening.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from agent.logging import get_logger
from protocol import MAX_IMAGES, AgentState, Heartbeat, encode_heartbeat, topic_for

if TYPE_CHECKING:
    from agent.config import AgentSettings
    from agent.sdnotify import Notifier
    from agent.security import CurveServer

log = get_logger("agent.beacon")
# While starting, beat four times a second: PUB keeps no history, so the beat sent at the bind reaches no bridge
# (none has joined yet), and a bridge that joins a moment later would otherwise wait a whole interval.
STARTING_BEAT_S = 0.25
# A subscription message longer than any topic is no subscription; the peer is dropped (ZMQ_MAXMSGSIZE).
MAX_SUBSCRIPTION_BYTES = 1024
# Instant beats at most this often: a peer that subscribes in a loop cannot make the agent flood its bridges.
MIN_INSTANT_BEAT_S = 0.05


def heartbeat_subscription(message: bytes, agent_id: str) -> bool:
    """Whether an XPUB message subscribes to this agent's heartbeats (a prefix of its topic, "" included)."""
    return message[:1] == b"\x01" and topic_for("heartbeat", agent_id).startswith(message[1:])


class Beacon:
    """Owns the XPUB socket until hand_over(); publishes a `starting` heartbeat every interval meanwhile, and one
    at once to each new heartbeat subscriber."""

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
        self.pub = ctx.socket(zmq.XPUB)
        # Every subscription comes up, also a second bridge's for a topic the first already has: each one counts.
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
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
        self.subscribers = 0  # heartbeat subscriptions seen (XPUB_VERBOSE: one per subscribing bridge)
        self._subscribed = threading.Condition()
        self._last_instant = 0.0
        self.instant_pending = False  # a subscriber waits for its heartbeat (rate-limited)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tdn-starting", daemon=True)
        self._thread.start()

    def next_seq(self) -> int:
        """The next heartbeat's hb_seq (the agent goes on counting from where the beacon stopped)."""
        self.hb_seq += 1
        return self.hb_seq

    def starting_heartbeat(self) -> Heartbeat:
        return Heartbeat(agent_id=self.s.agent_id, epoch=self.epoch, hb_seq=self.next_seq(), time_ns=time.time_ns(),
                         uptime_s=time.monotonic() - self.start_mono, state=AgentState.STARTING, queue_depth=0,
                         counters={}, batch_sizes={}, backend={"backend": str(self.s.backend)}, model_id="",
                         max_frame_bytes=self.s.max_frame_bytes, max_images=MAX_IMAGES)

    def read_subscriptions(self) -> bool:
        """Take every waiting subscription message off the socket; True when a heartbeat is due now because a new
        heartbeat subscriber came (one beat for a burst of them, at most one per MIN_INSTANT_BEAT_S; a subscriber
        that came too soon after the last one is answered by the next call after that)."""
        while True:
            try:
                message = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if heartbeat_subscription(message, self.s.agent_id):
                self.instant_pending = True
                with self._subscribed:
                    self.subscribers += 1
                    self._subscribed.notify_all()
        now = time.monotonic()
        if self.instant_pending and now - self._last_instant >= MIN_INSTANT_BEAT_S:
            self.instant_pending = False
            self._last_instant = now
            return True
        return False

    def _beat(self) -> None:
        interval = min(STARTING_BEAT_S, self.s.heartbeat_interval_s)
        next_beat = time.monotonic()
        while not self._done.is_set():
            instant = self.read_subscriptions()
            now = time.monotonic()
            if instant or now >= next_beat:
                self.pub.send_multipart(encode_heartbeat(self.starting_heartbeat()), copy=False)
                if now >= next_beat:
                    next_beat = now + interval
            # Wake for a subscription as well as for the next beat; at most 50 ms late for hand_over().
            wait_s = min(max(0.0, next_beat - time.monotonic()), 0.05)
            self.pub.poll(int(1000 * wait_s) + 1, zmq.POLLIN)

    def wait_for_subscribers(self, n: int, timeout_s: float) -> int:
        """Block until n heartbeat subscribers came (or timeout_s passed), still beating `starting`; how many came."""
        deadline = time.monotonic() + timeout_s
        with self._subscribed:
            while self.subscribers < n and (left := deadline - time.monotonic()) > 0:
                self._subscribed.wait(left)
            return self.subscribers

    def hold_ready(self, n: int, wait_s: float, notifier: Notifier) -> None:
        """Hold READY, beating `starting`, until n bridges subscribed: verdicts sent before a restarted line's
        bridges reconnect would go nowhere (PUB keeps no history)."""
        if not n:
            return
        notifier.status(f"waiting for {n} subscriber(s)")
        log.info("waiting for subscribers", want=n, wait_s=wait_s)
        got = self.wait_for_subscribers(n, wait_s)
        if got < n:
            log.warning("serving without every subscriber", want=n, subscribers=got, waited_s=wait_s)

    def hand_over(self) -> zmq.Socket[Any]:
        """Stop beating and give the XPUB socket to the caller's thread (sockets are not shared between threads)."""
        self._done.set()
        self._thread.join()
        return self.pub
