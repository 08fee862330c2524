"""The agent's only ZeroMQ I/O: intake, micro-batching, an inference thread, an explainer, publishing."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import random
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from agent.backends.base import Backend, preprocess
from agent.batcher import Batch, BatchPolicy, MicroBatcher, Pending
from agent.config import AgentSettings
from agent.logging import get_logger
from agent.metrics import Health, Metrics, MetricsServer
from agent.sdnotify import Notifier
from agent.security import CurveServer
from agent.sequencer import Sequencer
from protocol import (
    CLASSES,
    AgentState,
    Encoding,
    Explanation,
    Frame,
    Heartbeat,
    ProtocolError,
    Status,
    Verdict,
    decode_frame,
    encode_explanation,
    encode_heartbeat,
    encode_verdict,
)

log = get_logger("agent.service")
IMAGE_SIZE = 200
# Batches handed to the inference thread at once: one running and one queued behind it (the batcher makes that
# one a full batch), so under load the backend starts the next batch the moment the last one ends instead of
# waiting for this loop to dispatch it.
PIPELINE_DEPTH = 2
# Python hands the GIL to a waiting thread only every switch interval (5 ms by default). The inference thread
# needs it briefly around every batch, and a 5 ms wait behind the busy I/O loop is a third of a batch here.
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclass(slots=True)
class Accepted:
    """What the batcher carries for one accepted frame."""

    image: np.ndarray
    part_id: str | None
    label: str | None
    received_ns: int  # wall clock, as published in the verdict


@dataclass(slots=True)
class Job:
    """One batch handed to the inference thread."""

    run: list[Pending[Accepted]]
    padded_size: int
    started_mono: float = 0.0
    infer_s: float = 0.0  # set by the inference thread: backend time alone, without the hand-over


@dataclass
class Counters:
    """What the heartbeat reports; every accepted frame ends in exactly one of ok/shed/rejected."""

    received: int = 0
    accepted: int = 0
    inferred: int = 0
    shed: int = 0
    rejected: int = 0
    rejected_unattributed: int = 0
    published: int = 0
    explained: int = 0
    batches: int = 0
    auth_denied: int = 0  # CURVE handshakes refused (unknown key, plaintext client); no frame was read
    rejected_by_reason: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in self.__dict__.items() if isinstance(v, int)}
        out.update({f"rejected_{k}": v for k, v in self.rejected_by_reason.items()})
        return out


def decode_image(frame: Frame) -> np.ndarray:
    """The frame's pixels as uint8 [200,200]; raises ValueError with a reason code when they are unusable."""
    if (frame.width, frame.height) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError("wrong_size")
    if frame.encoding is Encoding.GRAY8:
        return np.frombuffer(frame.payload, np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    img = cv2.imdecode(np.frombuffer(frame.payload, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError("undecodable")
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError("wrong_size")
    return img


def check_output(probs: Any, rows: int) -> np.ndarray:
    """The backend's [N,6] probabilities for the first `rows` rows; ValueError if short, misshapen or not finite.

    A runtime bug must end as rejected verdicts for its batch, not as an exception in the I/O loop.
    """
    out = np.asarray(probs)
    if out.ndim != 2 or out.shape[0] < rows or out.shape[1] != len(CLASSES):
        raise ValueError(f"backend returned shape {out.shape} for {rows} frames")
    out = out[:rows]
    if not np.isfinite(out).all():
        raise ValueError("backend returned non-finite probabilities")
    return out


class Agent:
    """Owns the sockets; one instance per process. start() then run(); request_stop() from a signal."""

    def __init__(self, settings: AgentSettings, backend: Backend, ctx: zmq.Context[Any] | None = None):
        self.s = settings
        self.backend = backend
        self.ctx = ctx or zmq.Context.instance()
        # Random, so a restarted agent is always told apart even within one clock tick.
        self.epoch = random.getrandbits(63)
        self.counters = Counters()
        self.state = AgentState.STARTING
        self.policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            max_queue_delay_us=settings.max_queue_delay_us,
            shed_deadline_ms=settings.shed_deadline_ms,
            queue_cap=settings.queue_cap,
            batch_sizes=settings.batch_sizes,
        )
        self.batcher: MicroBatcher[Accepted] = MicroBatcher(self.policy)
        self.sequencer: Sequencer[Verdict] = Sequencer()
        self.notifier = Notifier()
        self._stop = threading.Event()
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=PIPELINE_DEPTH + 1)  # + the shutdown sentinel
        self._results: queue.Queue[tuple[Job, np.ndarray | None, int, str | None]] = queue.Queue()
        self._explain_in: queue.Queue[tuple[Accepted, Verdict] | None] = queue.Queue(maxsize=1)
        self._explain_out: queue.Queue[Explanation] = queue.Queue()
        self._in_flight: deque[Job] = deque()  # dispatched, not yet collected; the first one is running
        self._explaining = False
        self._candidate: tuple[tuple[bool, float], Accepted, Verdict] | None = None
        self._threads: list[threading.Thread] = []
        self._wake_addr = f"inproc://tdn-wake-{id(self)}"
        self._start_mono = time.monotonic()
        self._hb_seq = 0
        self._latency_ms: list[float] = []
        self.metrics = Metrics()
        self.health = Health(stall_s=max(10.0, 5 * settings.heartbeat_interval_s))
        self._metrics_server: MetricsServer | None = None
        self.curve = (CurveServer(settings.curve_server_secret, settings.curve_allow_dir,
                                  settings.curve_require_subscribers) if settings.curve_enabled else None)

    # --- lifecycle ---

    def start(self) -> None:
        """Load and warm the backend, bind sockets, start workers; READY to systemd at the end."""
        t0 = time.monotonic()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._start_metrics()
        self.notifier.status("loading model")
        self.backend.load()
        self.backend.warmup(self.s.batch_sizes)
        ident = self.backend.identity()
        log.info("backend ready", model_id=self.backend.model_id, warmup_s=round(time.monotonic() - t0, 2),
                 batch_sizes=list(self.s.batch_sizes), **ident)
        self.metrics.identity(ident, self.backend.model_id or "none", self.s.agent_id, self.epoch)
        if self.curve is not None:
            self.curve.start(self.ctx)  # the ZAP handler must run before a CURVE socket binds
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, self.s.rcvhwm)
        # A hard memory guard well above the counted application limit, so oversized frames are
        # normally read, counted and rejected rather than silently cutting the camera's connection.
        self.pull.setsockopt(zmq.MAXMSGSIZE, 2 * self.s.max_frame_bytes)
        self.pull.setsockopt(zmq.LINGER, 0)
        # Kernel TCP buffers are a hidden queue of hundreds of frames on loopback; keeping them small makes the
        # camera feel backpressure before its frames grow stale in transit.
        self.pull.setsockopt(zmq.RCVBUF, 256 * 1024)
        if self.curve is not None:
            self.curve.secure(self.pull, "frames")
        self.pull.bind(self.s.frames_endpoint)
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, self.s.sndhwm)
        self.pub.setsockopt(zmq.LINGER, 1000)
        if self.curve is not None:
            self.curve.secure(self.pub, "publish")
        self.pub.bind(self.s.publish_endpoint)
        self.wake = self.ctx.socket(zmq.PULL)
        self.wake.bind(self._wake_addr)
        self._threads = [
            threading.Thread(target=self._infer_loop, name="tdn-infer", daemon=True),
            threading.Thread(target=self._explain_loop, name="tdn-explain", daemon=True),
        ]
        for t in self._threads:
            t.start()
        # Everything loaded so far (TensorFlow alone is ~380K objects) lives as long as the process. A full
        # collection walks all of it, 130 ms here, and stalls every frame in flight; frozen, it is never walked.
        gc.collect()
        gc.freeze()
        self.state = AgentState.READY
        self.health.state, self.health.ready = "ready", True
        self.metrics.ready.set(1)
        self.ready_s = time.monotonic() - t0
        log.info("ready", frames=self.s.frames_endpoint, publish=self.s.publish_endpoint, agent_id=self.s.agent_id,
                 epoch=self.epoch, start_to_ready_s=round(self.ready_s, 2))
        self.notifier.ready(f"ready: {ident.get('backend')} model {self.backend.model_id}")

    def _start_metrics(self) -> None:
        if self.s.metrics_port == 0:
            return
        server = MetricsServer(self.metrics, self.health, self.s.metrics_addr, self.s.metrics_port)
        try:
            port = server.start()
        except OSError as exc:
            # Metrics are for people; inspection goes on without them rather than stopping the line.
            log.error("metrics server not started", addr=self.s.metrics_addr, port=self.s.metrics_port,
                      error=str(exc))
            return
        self._metrics_server = server
        host = f"[{self.s.metrics_addr}]" if ":" in self.s.metrics_addr else self.s.metrics_addr
        log.info("metrics", url=f"http://{host}:{port}/metrics")

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag that the loop checks every tick."""
        self._stop.set()

    def run(self) -> None:
        """The I/O loop, until stopped and drained."""
        poller = zmq.Poller()
        poller.register(self.wake, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        monitors = self.curve.monitors if self.curve is not None else []
        for mon in monitors:
            poller.register(mon, zmq.POLLIN)
        reading = True
        next_hb = time.monotonic()
        next_explain = time.monotonic() + self.s.explain_interval_s
        wd = self.notifier.watchdog_interval_s()
        next_wd = time.monotonic()
        drain_deadline: float | None = None
        while True:
            now = time.monotonic()
            if self._stop.is_set() and drain_deadline is None:
                drain_deadline = now + self.s.shutdown_timeout_s
                self.state = AgentState.DRAINING
                self.health.state, self.health.ready = "draining", False
                self.metrics.ready.set(0)
                self.notifier.stopping("draining")
                log.info("stopping", queued=len(self.batcher), in_flight=len(self._in_flight))
                poller.unregister(self.pull)
                reading = False
                self.pull.close(linger=0)
            # Backpressure: while the queue is full, leave frames in ZeroMQ's buffers, which fill and
            # block the cameras' PUSH sockets at their send high-water mark.
            if drain_deadline is None:
                want = not self.batcher.full
                if want != reading:
                    poller.modify(self.pull, zmq.POLLIN if want else 0)
                    reading = want
            timeout_ms = self._timeout_ms(now, next_hb, drain_deadline is not None)
            events = dict(poller.poll(timeout_ms))
            if self.wake in events:
                self._drain_wake()
            for mon in monitors:
                if mon in events:
                    self._count_denied(mon)
            if reading and self.pull in events:
                self._read_frames()
            self._collect()
            self._shed_expired()
            self._dispatch(draining=drain_deadline is not None)
            now = time.monotonic()
            if now >= next_hb:
                self._heartbeat()
                next_hb = now + self.s.heartbeat_interval_s
            if self.s.explain_interval_s > 0 and now >= next_explain and self._offer_explanation():
                next_explain = now + self.s.explain_interval_s
            if wd is not None and now >= next_wd and self._healthy(now, wd):
                self.notifier.watchdog()
                next_wd = now + wd
            if drain_deadline is not None:
                if not len(self.batcher) and not self._in_flight:
                    break
                if now >= drain_deadline:
                    self._abandon("shutdown")
                    break
        self._shutdown()

    def _timeout_ms(self, now: float, next_hb: float, draining: bool) -> int:
        if draining:
            return 5
        limit = min(next_hb - now, 0.1)
        if len(self._in_flight) < PIPELINE_DEPTH:
            dl = self.batcher.next_deadline_ns(busy=bool(self._in_flight))
            if dl is not None:
                limit = min(limit, (dl - time.monotonic_ns()) / 1e9)
        return max(0, int(limit * 1000 + 0.999))

    def _count_denied(self, mon: zmq.Socket[Any]) -> None:
        assert self.curve is not None
        for sock, reason in self.curve.drain(mon):
            self.counters.auth_denied += 1
            self.metrics.auth_denied.labels(sock, reason).inc()

    def _healthy(self, now: float, wd: float) -> bool:
        # Watchdog pings only while batches make progress: a wedged inference stops them.
        return not self._in_flight or now - self._in_flight[0].started_mono < 2 * wd

    # --- intake ---

    def _read_frames(self) -> None:
        for _ in range(self.batcher.space):
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._accept(parts)

    def _accept(self, parts: list[zmq.Frame]) -> None:
        c = self.counters
        c.received += 1
        self.metrics.received.inc()
        received_ns = time.time_ns()
        try:
            size = sum(len(p.buffer) for p in parts)
            frame = decode_frame([p.buffer for p in parts])
            if size > self.s.max_frame_bytes:
                raise ProtocolError("oversized", frame.camera_id, frame.seq,
                                    detail=f"{size} B > max_frame_bytes {self.s.max_frame_bytes}")
            image = decode_image(frame)
        except ProtocolError as exc:
            self._reject(exc.reason, exc.camera_id, exc.seq, received_ns, None, str(exc))
            return
        except ValueError as exc:
            self._reject(str(exc), frame.camera_id, frame.seq, received_ns, frame, str(exc))
            return
        if not self.sequencer.accept(frame.camera_id, frame.seq):
            # A verdict is already owed for this seq: a second one would read as a duplicate downstream.
            self._count_reject("duplicate_seq", attributed=False)
            log.warning("rejected frame", reason="duplicate_seq", camera_id=frame.camera_id, seq=frame.seq)
            return
        c.accepted += 1
        item = self.batcher.pending(
            Accepted(image, frame.part_id, frame.label, received_ns),
            camera_id=frame.camera_id, seq=frame.seq, capture_ns=frame.capture_ns,
        )
        # The read loop takes at most batcher.space frames, so the offer cannot be refused.
        self.batcher.offer(item)

    def _count_reject(self, reason: str, attributed: bool) -> None:
        self.counters.rejected_by_reason[str(reason)] += 1
        self.metrics.reject(str(reason))
        if not attributed:
            self.counters.rejected_unattributed += 1

    def _reject(self, reason: str, camera_id: str | None, seq: int | None, received_ns: int,
                frame: Frame | None, detail: str) -> None:
        attributed = camera_id is not None and seq is not None
        self._count_reject(reason, attributed)
        log.warning("rejected frame", reason=str(reason), camera_id=camera_id, seq=seq, detail=detail)
        if camera_id is None or seq is None or not self.sequencer.accept(camera_id, seq):
            return
        self.counters.accepted += 1
        self.counters.rejected += 1
        self._complete(self._verdict(
            camera_id, seq, Status.REJECTED, str(reason),
            capture_ns=frame.capture_ns if frame else None, received_ns=received_ns,
            part_id=frame.part_id if frame else None, label=frame.label if frame else None,
        ))

    # --- batching and inference ---

    def _shed(self, items: list[Pending[Accepted]], reason: str) -> None:
        for p in items:
            self.counters.shed += 1
            self.metrics.shed.inc()
            self._complete(self._verdict(
                p.camera_id, p.seq, Status.SHED, reason, capture_ns=p.capture_ns,
                received_ns=p.payload.received_ns, part_id=p.payload.part_id, label=p.payload.label,
            ))

    def _shed_expired(self) -> None:
        expired = self.batcher.expire()
        if expired:
            self._shed(expired, "deadline")

    def _dispatch(self, draining: bool) -> None:
        if len(self._in_flight) >= PIPELINE_DEPTH:
            return
        batch: Batch[Accepted] | None = (next(iter(self.batcher.flush()), None) if draining
                                         else self.batcher.poll(busy=bool(self._in_flight)))
        if batch is None:
            return
        self._shed(batch.shed, "deadline")
        if batch.run:
            now_ns = time.time_ns()
            self.metrics.batch_size.observe(len(batch.run))
            for p in batch.run:
                self.metrics.queue_wait.observe(max(0, now_ns - p.payload.received_ns) / 1e9)
            job = Job(batch.run, batch.padded_size, time.monotonic())
            self._in_flight.append(job)
            self.counters.batches += 1
            self._jobs.put(job)

    def _infer_loop(self) -> None:
        wake = self.ctx.socket(zmq.PUSH)
        wake.connect(self._wake_addr)
        try:
            while (job := self._jobs.get()) is not None:
                job.started_mono = time.monotonic()
                batch = preprocess([p.payload.image for p in job.run], job.padded_size)
                error = None
                probs = None
                t0 = time.perf_counter()
                try:
                    probs = check_output(self.backend.infer(batch), len(job.run))
                except Exception as exc:  # any runtime failure must still end in verdicts
                    error = f"{type(exc).__name__}: {exc}"
                job.infer_s = time.perf_counter() - t0
                self._results.put((job, probs, time.time_ns(), error))
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _drain_wake(self) -> None:
        with contextlib.suppress(zmq.Again):
            while True:
                self.wake.recv(zmq.NOBLOCK)

    def _collect(self) -> None:
        while True:
            try:
                job, probs, inferred_ns, error = self._results.get_nowait()
            except queue.Empty:
                break
            self._in_flight.popleft()
            self.metrics.inference.observe(job.infer_s)
            if probs is None:
                log.error("inference failed", error=error, batch=len(job.run))
                for p in job.run:
                    self.counters.rejected += 1
                    self._count_reject("inference_error", attributed=True)
                    self._complete(self._verdict(
                        p.camera_id, p.seq, Status.REJECTED, "inference_error", capture_ns=p.capture_ns,
                        received_ns=p.payload.received_ns, part_id=p.payload.part_id, label=p.payload.label,
                    ))
                continue
            # One vectorised clip + tolist per batch: per-row numpy scalar calls cost ~50 us a frame here.
            rows = np.clip(probs.astype(np.float64), 0.0, 1.0).tolist()
            for p, row in zip(job.run, rows, strict=True):
                self.counters.inferred += 1
                v = self._verdict(
                    p.camera_id, p.seq, Status.OK, None, capture_ns=p.capture_ns,
                    received_ns=p.payload.received_ns, part_id=p.payload.part_id, label=p.payload.label,
                    probs=row, inferred_ns=inferred_ns,
                )
                self._consider_for_explanation(p.payload, v)
                self._complete(v)
        while True:
            try:
                expl = self._explain_out.get_nowait()
            except queue.Empty:
                break
            self._explaining = False
            self.pub.send_multipart(encode_explanation(expl), copy=False)
            self.counters.explained += 1
            self._save_explanation(expl)

    def _abandon(self, reason: str) -> None:
        """Shutdown bound reached: every frame still owed a verdict is shed, so none is lost silently."""
        self._shed(list(self.batcher.expire()) + [p for b in self.batcher.flush() for p in b.run + b.shed],
                   reason)
        while self._in_flight:
            self._shed(self._in_flight.popleft().run, reason)

    # --- verdicts ---

    def _verdict(self, camera_id: str, seq: int, status: Status, reason: str | None, *, capture_ns: int | None,
                 received_ns: int, part_id: str | None, label: str | None, probs: list[float] | None = None,
                 inferred_ns: int | None = None) -> Verdict:
        if probs is None:
            return Verdict(
                camera_id=camera_id, seq=seq, status=status, reason=reason, class_name=None, class_index=None,
                confidence=None, probs=None, defect=True, model_id=self.backend.model_id or "none",
                agent_id=self.s.agent_id, epoch=self.epoch, capture_ns=capture_ns, received_ns=received_ns,
                inferred_ns=None, published_ns=0, part_id=part_id, label=label,
            )
        idx = max(range(len(probs)), key=probs.__getitem__)
        conf = probs[idx]
        defect = CLASSES[idx] in self.s.reject_classes or conf < self.s.min_confidence
        return Verdict(
            camera_id=camera_id, seq=seq, status=status, reason=reason, class_name=CLASSES[idx], class_index=idx,
            confidence=conf, probs=tuple(probs), defect=defect,
            model_id=self.backend.model_id, agent_id=self.s.agent_id, epoch=self.epoch, capture_ns=capture_ns,
            received_ns=received_ns, inferred_ns=inferred_ns, published_ns=0, part_id=part_id, label=label,
        )

    def _complete(self, v: Verdict) -> None:
        for ready in self.sequencer.complete(v.camera_id, v.seq, v):
            self._publish(ready)

    def _publish(self, v: Verdict) -> None:
        now = time.time_ns()
        object.__setattr__(v, "published_ns", now)  # stamped at the moment it leaves, not when it was made
        self.pub.send_multipart(encode_verdict(v), copy=False)
        self.counters.published += 1
        self.metrics.verdict(v.status.value, v.class_name)
        if v.capture_ns:
            self.metrics.latency.observe(max(0, now - v.capture_ns) / 1e9)
            self._latency_ms.append((now - v.capture_ns) / 1e6)
            if len(self._latency_ms) > 4096:
                del self._latency_ms[:2048]

    # --- heartbeat ---

    def _heartbeat(self) -> None:
        self._hb_seq += 1
        st = self.batcher.stats
        hb = Heartbeat(
            agent_id=self.s.agent_id, epoch=self.epoch, hb_seq=self._hb_seq, time_ns=time.time_ns(),
            uptime_s=time.monotonic() - self._start_mono, state=self.state, queue_depth=len(self.batcher),
            counters=self.counters.as_dict(),
            batch_sizes={str(k): v for k, v in sorted(st.batches_by_size.items())},
            backend=self.backend.identity(), model_id=self.backend.model_id or "none",
        )
        self.pub.send_multipart(encode_heartbeat(hb), copy=False)
        self.metrics.queue_depth.set(hb.queue_depth)
        self.metrics.last_heartbeat.set(hb.time_ns / 1e9)
        self.health.beat()

    # --- explanations ---

    def _consider_for_explanation(self, item: Accepted, v: Verdict) -> None:
        # Prefer a defect verdict, then the least confident one: those are what an operator wants to see.
        score = (bool(v.defect), -(v.confidence or 0.0))
        if self._candidate is None or score > self._candidate[0]:
            self._candidate = (score, item, v)

    def _offer_explanation(self) -> bool:
        if self._explaining or self._candidate is None:
            return False
        _, item, v = self._candidate
        self._candidate = None
        try:
            self._explain_in.put_nowait((item, v))
        except queue.Full:
            return False
        self._explaining = True
        return True

    def _explain_loop(self) -> None:
        from agent import explain

        wake = self.ctx.socket(zmq.PUSH)
        wake.connect(self._wake_addr)
        # The explainer is a background worker: lower its OS priority so it yields to inference.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            while (task := self._explain_in.get()) is not None:
                item, v = task
                try:
                    batch = preprocess([item.image], 1)
                    _, feats = self.backend.features(batch)
                    cls = int(v.class_index or 0)
                    heat = explain.cam(feats, self.backend.cam_weights(), np.array([cls]))[0]
                    overlay = explain.png(explain.overlay(item.image, heat))
                    expl = Explanation(
                        camera_id=v.camera_id, seq=v.seq, class_name=CLASSES[cls], class_index=cls,
                        confidence=float(v.confidence or 0.0), method="cam", capture_ns=v.capture_ns or 0,
                        agent_id=self.s.agent_id, epoch=self.epoch,
                        heatmap_png=explain.heatmap_png(heat), overlay_png=overlay,
                    )
                except Exception as exc:  # an explanation is optional; it must never take the agent down
                    log.error("explanation failed", error=f"{type(exc).__name__}: {exc}")
                    self._explaining = False
                    continue
                self._explain_out.put(expl)
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _save_explanation(self, e: Explanation) -> None:
        d = self.s.explain_dir
        if d is None:
            return
        try:
            d.mkdir(parents=True, exist_ok=True)
            stem = f"{e.capture_ns}_{e.camera_id}_{e.seq}_{e.class_name}"
            (d / f"{stem}_overlay.png").write_bytes(bytes(e.overlay_png))
            (d / f"{stem}_heatmap.png").write_bytes(bytes(e.heatmap_png))
            files = sorted(d.glob("*_overlay.png"))
            for old in files[: max(0, len(files) - self.s.explain_keep)]:
                old.unlink(missing_ok=True)
                Path(str(old).replace("_overlay.png", "_heatmap.png")).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot write explanation", dir=str(d), error=str(exc))

    # --- shutdown ---

    def _shutdown(self) -> None:
        self._heartbeat()
        with contextlib.suppress(queue.Empty):
            while True:  # batches abandoned at the shutdown bound were already shed; do not run them
                self._jobs.get_nowait()
        self._jobs.put(None)
        with contextlib.suppress(queue.Full):
            self._explain_in.put_nowait(None)
        for t in self._threads:
            t.join(timeout=2.0)
        c = self.counters
        log.info("stopped", **c.as_dict(), outstanding=self.sequencer.outstanding)
        self.wake.close(linger=0)
        # A short linger lets the last verdicts and the final heartbeat leave before the socket closes.
        self.pub.close(linger=1000)
        if self.curve is not None:
            self.curve.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
