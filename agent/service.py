"""The agent's only ZeroMQ I/O: sockets, threads, signals and the loop; every decision is the line core's."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from agent import explain
from agent.backends.base import Backend, BatchBuffers
from agent.batcher import BatchPolicy
from agent.beacon import Beacon
from agent.config import AgentSettings
from agent.control import Controller, for_agent
from agent.intake import admit
from agent.line import Inferred, InFlight, Job, Line
from agent.logging import RateLimited, get_logger
from agent.memguard import Drop, FrameConnections, MemoryGuard, Resident, Watch, release_large_blocks
from agent.metrics import Health, Metrics, MetricsServer, start_server
from agent.sdnotify import Notifier
from agent.serving import Loader, heartbeat, run_job
from protocol import MAX_HEADER_BYTES, MAX_PAYLOAD_BYTES, AgentState, Explanation, Verdict
from protocol.codec import encode_explanation, encode_heartbeat, encode_verdict

log = get_logger("agent.service")
# Batches handed to inference beyond one per worker: queued behind the running ones (the batcher makes it a full
# batch), so under load a worker starts the next batch the moment its last one ends.
QUEUED_BATCHES = 1
# Python hands the GIL to a waiting thread only every switch interval (5 ms by default). The inference thread
# needs it briefly around every batch, and a 5 ms wait behind the busy I/O loop is a third of a batch here.
GIL_SWITCH_INTERVAL_S = 0.0005
# libzmq applies ZMQ_MAXMSGSIZE to a part as it arrives: under CURVE, 33 bytes longer than the payload (+ 1 dropped
# a 16 MiB payload). 64 covers either.
MAX_PART_BYTES = MAX_PAYLOAD_BYTES + 64
# Kernel receive buffer of each camera connection (Linux doubles it): under two 200x200 gray8 frames.
RCVBUF_BYTES = 32 * 1024
BIG_PAYLOAD = 256 * 1024


class Agent:
    """Owns the sockets; one per process. startup(), main_loop(), shutdown(); request_stop() from a signal."""

    def __init__(self, settings: AgentSettings, backend: Backend, beacon: Beacon, ctx: zmq.Context[Any]):
        self.s = settings
        self.backend = backend
        self.ctx = ctx
        self.beacon = beacon  # owns the PUB socket, beating `starting`, until the model serves
        self.epoch = beacon.epoch
        self.state = AgentState.STARTING
        self.metrics = Metrics()
        self.health = Health(stall_s=max(10.0, 5 * settings.heartbeat_interval_s))
        self.notifier = Notifier()
        self.loader = Loader(settings)
        self.control: zmq.Socket[Any] | None = None  # the REP socket of SPEC 12, with its controller and endpoint
        self.controller: Controller | None = None
        self.control_endpoint: str | None = None
        self.line: Line | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.workers = backend.workers
        self.depth = self.workers + QUEUED_BATCHES
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=self.depth + self.workers)  # + shutdown sentinels
        self._results: queue.Queue[Inferred] = queue.Queue()
        self._explain_in: queue.Queue[tuple[InFlight, Verdict, int] | None] = queue.Queue(maxsize=1)
        self._explain_out: queue.Queue[tuple[Explanation | None, float]] = queue.Queue()
        self._explaining = False
        self._explain_free_at = 0.0  # the explainer's CPU budget: no new task before this (monotonic s)
        self._threads: list[threading.Thread] = []
        self._wake_addr = f"inproc://tdn-wake-{id(self)}"
        self._start_mono = beacon.start_mono  # uptime counts from the launch on every backend
        self._metrics_server: MetricsServer | None = None
        self.curve = beacon.curve
        self.memguard: Watch | None = None

    # --- phases ---

    def startup(self) -> None:
        """Load and warm the model while the beacon beats `starting`, take over the PUB socket, bind intake, READY."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self._metrics_server = start_server(self.metrics, self.health, self.s.metrics_addr, self.s.metrics_port)
        self.notifier.status("loading model")
        model = self.loader.serve(self.backend)
        self.beacon.hold_ready(self.s.ready_subscribers, self.s.ready_wait_s, self.notifier)
        self.pub = self.beacon.hand_over()
        self.publish_endpoint = self.beacon.endpoint
        self.line = Line(BatchPolicy(self.s.max_batch_size, self.s.max_queue_delay_us, self.s.shed_deadline_ms,
                                     self.s.queue_cap, self.s.batch_sizes),
                         model, agent_id=self.s.agent_id, epoch=self.epoch, sink=self.metrics.record,
                         seq_window=self.s.seq_window, log=RateLimited(log), lanes=self.workers)
        self.metrics.identity(self.backend.identity(), model.model_id, self.s.agent_id, self.epoch)
        self._bind_intake()
        self._bind_control()
        self.wake = self.ctx.socket(zmq.PULL)
        self.wake.bind(self._wake_addr)
        self._threads = [*(threading.Thread(target=self._infer_loop, args=(lane,), name=f"tdn-infer-{lane}",
                                            daemon=True) for lane in range(self.workers)),
                         threading.Thread(target=self._explain_loop, name="tdn-explain", daemon=True)]
        for t in self._threads:
            t.start()
        # Everything loaded so far (TensorFlow alone is ~380K objects) lives as long as the process. A full
        # collection walks all of it, 130 ms here, and stalls every frame in flight; frozen, it is never walked.
        gc.collect()
        gc.freeze()
        self._guard_memory()
        self._set_state(AgentState.READY)
        self.ready_s = time.monotonic() - self._start_mono
        log.info("ready", frames=self.frames_endpoint, publish=self.publish_endpoint, control=self.control_endpoint,
                 agent_id=self.s.agent_id,
                 epoch=self.epoch, model_id=model.model_id, start_to_ready_s=round(self.ready_s, 2))
        self.notifier.ready(f"ready: {self.backend.name} model {model.model_id}")

    def request_stop(self) -> None:
        """Signal-safe: only sets a flag that the loop checks every tick."""
        self._stop.set()

    def request_reload(self) -> None:
        """Signal-safe (SIGHUP): only sets a flag; the loop loads the new model beside the running one."""
        self._reload.set()

    def main_loop(self) -> None:
        """The I/O loop, until stopped and drained, then shutdown()."""
        assert self.line is not None
        self.poller = zmq.Poller()
        self.monitors = self.curve.monitors if self.curve is not None else []
        for sock in (self.wake, self.pull, self.pub, *self.monitors, *([self.control] if self.control else [])):
            self.poller.register(sock, zmq.POLLIN)
        self.reading = True
        self.drain_deadline: float | None = None
        now = time.monotonic()
        self.next_hb, self.next_wd = now, now
        self.next_explain = now + self.s.explain_interval_s
        while self.on_tick():
            pass
        self.shutdown()

    def on_tick(self) -> bool:
        """One turn of the loop; False once drained (or the drain bound ran out)."""
        line = self.line
        assert line is not None
        if self._stop.is_set() and self.drain_deadline is None:
            self._start_draining()
        elif self.drain_deadline is None and self.reading == line.batcher.full:
            # Backpressure: while the queue is full, leave frames in ZeroMQ's buffers, which fill and
            # block the cameras' PUSH sockets at their send high-water mark.
            self.reading = not self.reading
            self.poller.modify(self.pull, zmq.POLLIN if self.reading else 0)
        self._handle_events(dict(self.poller.poll(self._timeout_ms())))
        self._collect()
        self._publish(line.expire())
        self._dispatch()
        self._periodic(time.monotonic())
        if self.drain_deadline is not None:
            if not len(line.batcher) and not line.in_flight:
                return False
            if time.monotonic() >= self.drain_deadline:
                self._publish(line.abandon())
                return False
        return True

    def _handle_events(self, events: dict[Any, int]) -> None:
        """Whatever the poll woke for: wake-ups, denied handshakes, subscriptions, commands, frames."""
        if self.wake in events:
            with contextlib.suppress(zmq.Again):
                while True:
                    self.wake.recv(zmq.NOBLOCK)
        self._count_denied(events)
        if (self.pub in events or self.beacon.instant_pending) and self.beacon.read_subscriptions():
            self._heartbeat()  # a bridge just subscribed: it learns the agent, model and classes now
        if self.control is not None and self.control in events:
            self._answer_commands()
        if self.reading and self.pull in events:
            self._read_frames()

    def _count_denied(self, events: dict[Any, int]) -> None:
        for mon in (m for m in self.monitors if m in events):
            for sock, reason in self.curve.drain(mon) if self.curve else ():
                self.line.record("auth_denied")  # type: ignore[union-attr]
                self.metrics.auth_denied.labels(sock, reason).inc()

    def _read_frames(self) -> None:
        line = self.line
        assert line is not None
        spec, limit = self.loader.current_input, self.s.max_frame_bytes
        for _ in range(line.batcher.space):
            try:
                parts = self.pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            buffers = [p.buffer for p in parts]
            self._publish(admit(buffers, line, spec, limit))
            if len(buffers) > 2 and len(buffers[2]) > BIG_PAYLOAD:
                # A big frame takes milliseconds to decode and resize: let a due batch go before the next one.
                self._dispatch()

    def _periodic(self, now: float) -> None:
        if now >= self.next_hb:
            self._heartbeat()
            self.next_hb = now + self.s.heartbeat_interval_s
        if self.s.explain_interval_s > 0 and not self._explaining and now >= self._explain_free_at:
            assert self.line is not None
            # Review verdicts go first, within the budget; other snapshots come every explain_interval_s.
            review = self.line.take_review()
            if review is not None:
                self._offer_explanation(review, self.line.reviews_waiting())
            elif now >= self.next_explain and self._offer_explanation(self.line.take_candidate(), 0):
                self.next_explain = now + self.s.explain_interval_s
        wd = self.notifier.watchdog_interval_s()
        # Watchdog pings only while batches make progress: a wedged inference stops them.
        if wd is not None and now >= self.next_wd and self.line is not None and not self.line.stalled(2 * wd):
            self.notifier.watchdog()
            self.next_wd = now + wd
        if self._reload.is_set() and self.drain_deadline is None:
            self._reload.clear()
            self.loader.start_reload()
        swapped = self.loader.take_ready()
        if swapped is not None and self.line is not None:
            self.line.swap(swapped)
            self.metrics.identity(self.loader.backend.identity(), swapped.model_id, self.s.agent_id, self.epoch)
        self.loader.count_refusals(self.line)

    def _start_draining(self) -> None:
        assert self.line is not None
        self.drain_deadline = time.monotonic() + self.s.shutdown_timeout_s
        self._set_state(AgentState.DRAINING)
        self.notifier.stopping("draining")
        log.info("stopping", queued=len(self.line.batcher), in_flight=self.line.in_flight)
        self.poller.unregister(self.pull)
        self.reading = False
        self.pull.close(linger=0)

    def _timeout_ms(self) -> int:
        assert self.line is not None
        if self.drain_deadline is not None:
            return 5
        limit = min(self.next_hb - time.monotonic(), 0.1)
        if self.line.in_flight < self.depth:
            dl = self.line.next_deadline_ns()
            if dl is not None:
                limit = min(limit, (dl - time.monotonic_ns()) / 1e9)
        return max(0, int(limit * 1000 + 0.999))

    def _set_state(self, state: AgentState) -> None:
        self.state, self.health.state, self.health.ready = state, state.value, state is AgentState.READY
        self.metrics.ready.set(1 if state is AgentState.READY else 0)

    def _bind_intake(self) -> None:
        self.pull = self.ctx.socket(zmq.PULL)
        # libzmq drops a connection whose message part exceeds MAXMSGSIZE, silently; set above the largest
        # SPEC-valid part (a 16 MiB payload), so every valid frame is read, and answered or refused with a count.
        # Every camera connection has its own queues (its SNDHWM, both kernel buffers, this RCVHWM), so frames in
        # flight grow with the camera count, outside the agent's queue cap and shed deadline. A small kernel
        # buffer and RCVHWM keep each connection's share to a few frames (README "The line under load": 32
        # cameras at 150% load, p99 501 ms with 256 KiB and RCVHWM 8, 136 ms with these and a small camera queue).
        for opt, value in ((zmq.RCVHWM, self.s.rcvhwm), (zmq.MAXMSGSIZE, MAX_PART_BYTES), (zmq.LINGER, 0),
                           (zmq.RCVBUF, RCVBUF_BYTES)):
            self.pull.setsockopt(opt, value)
        # No ZMTP heartbeats on this socket: under backpressure libzmq stops reading it, heartbeat replies
        # included, and the timeout then dropped live cameras with their queued frames (seen at 2x overload).
        if self.curve is not None:
            self.curve.secure(self.pull, "frames")
        self.pull.bind(self.s.frames_endpoint)
        self.frames_endpoint = self.pull.getsockopt(zmq.LAST_ENDPOINT).decode()

    def _guard_memory(self) -> None:
        """Start the memory guard's thread: its limit is the resident set now (loaded, warmed) plus the setting."""
        if not self.s.memory_guard_mb or self.frames_endpoint.startswith("inproc://"):
            return  # inproc peers are this process's own code, and have no connection to drop
        release_large_blocks()
        resident = Resident()
        guard = MemoryGuard(resident(), self.s.memory_guard_mb * (1 << 20))
        warn = RateLimited(log)

        def dropped(peer: str, verdict: Drop, rss: int) -> None:
            self.metrics.peers_dropped.labels(verdict.reason).inc()
            warn.warning("peer dropped", f"memory:{verdict.reason}", peer=peer, reason=verdict.reason,
                         rss_mib=rss >> 20, limit_mib=guard.limit >> 20,
                         sample_mib=round(verdict.sent / (1 << 20), 1))

        def rebased(limit: int) -> None:
            log.info("memory guard rebased", limit_mib=limit >> 20)

        self.memguard = Watch(guard, FrameConnections(self.frames_endpoint), dropped, resident=resident,
                              paused=lambda: self.loader.reloading, on_rebase=rebased)
        self.memguard.start()

    def _bind_control(self) -> None:
        """The REP socket of SPEC 12 (operator commands), when control_endpoint is set."""
        if self.s.control_endpoint is None:
            return
        sock = self.ctx.socket(zmq.REP)
        # A command is one header: nothing bigger is read, and a flood queues 16 at most.
        for opt, value in ((zmq.MAXMSGSIZE, MAX_HEADER_BYTES + 1024), (zmq.RCVHWM, 16), (zmq.LINGER, 0)):
            sock.setsockopt(opt, value)
        if self.curve is not None:
            self.curve.secure(sock, "control")
        sock.bind(self.s.control_endpoint)
        self.control, self.control_endpoint = sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.controller = for_agent(self.s, self.loader, self.line, log)

    def _answer_commands(self) -> None:
        assert self.control is not None and self.controller is not None
        for _ in range(16):  # a few per tick: commands are rare, frames must not wait behind a flood of them
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.control.send_multipart(self.controller.handle(parts, draining=self.drain_deadline is not None))

    # --- inference ---

    def _dispatch(self) -> None:
        line = self.line
        assert line is not None
        if line.in_flight >= self.depth:
            return
        job, shed = line.poll(flush=self.drain_deadline is not None)
        self._publish(shed)
        if job is not None:
            self.metrics.batch(job, time.monotonic_ns())
            self._jobs.put(job)

    def _infer_loop(self, lane: int) -> None:
        buffers = BatchBuffers()  # this worker's own, as its lane (runtime instance) is
        self._worker(self._jobs, lambda job: run_job(job, buffers, self.s.batch_sizes, lane), self._results)

    def _worker(self, inbox: queue.Queue[Any], work: Callable[[Any], Any], outbox: queue.Queue[Any]) -> None:
        """Take tasks until the None sentinel; hand each result back and wake the I/O loop."""
        wake = self.ctx.socket(zmq.PUSH)
        wake.connect(self._wake_addr)
        try:
            while (task := inbox.get()) is not None:
                outbox.put(work(task))
                wake.send(b"")
        finally:
            wake.close(linger=0)

    def _collect(self) -> None:
        line = self.line
        assert line is not None
        with contextlib.suppress(queue.Empty):
            while True:
                r = self._results.get_nowait()
                self.metrics.inferred(r.lane, r.infer_s)
                self._publish(line.complete(r.job, r.probs, r.pooled, r.error, r.inferred_ns))
        with contextlib.suppress(queue.Empty):
            while True:
                expl, cost_s = self._explain_out.get_nowait()
                self._explaining = False
                # A task that took c s is followed by c * (1/budget - 1) s of rest: at a high review rate
                # the explainer (PNG encoding, CAM) took ~40% of the agent's CPU and starved the cameras.
                self._explain_free_at = time.monotonic() + cost_s * (1 / self.s.explain_budget - 1)
                if expl is not None:
                    self.pub.send_multipart(encode_explanation(expl), copy=False)
                    line.record("explained")

    # --- publishing ---

    def _publish(self, verdicts: list[Verdict]) -> None:
        if not verdicts:
            return
        sent = []
        for v in verdicts:
            now = time.time_ns()
            object.__setattr__(v, "published_ns", now)  # stamped at the moment it leaves, not when it was made
            self.pub.send_multipart(encode_verdict(v), copy=False)
            sent.append((v, now))
        self.metrics.verdicts(sent)

    def _heartbeat(self) -> None:
        hb = heartbeat(self.s, self.epoch, self.beacon.next_seq(), time.monotonic() - self._start_mono, self.state,
                       self.line, self.loader.model, self.backend)
        self.pub.send_multipart(encode_heartbeat(hb), copy=False)
        self.metrics.queue_depth.set(hb.queue_depth)
        self.metrics.last_heartbeat.set(hb.time_ns / 1e9)
        self.health.beat()

    # --- explanations ---

    def _offer_explanation(self, task: tuple[InFlight, Verdict] | None, waiting: int) -> bool:
        """Hand one verdict to the explainer; `waiting`, the reviews queued behind it, picks the method there."""
        if task is None:
            return False
        self._explain_in.put_nowait((*task, waiting))  # never full: one task at a time, guarded by _explaining
        self._explaining = True
        return True

    def _explain_loop(self) -> None:
        # The explainer is a background worker: lower its OS priority so it yields to inference.
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        self._worker(self._explain_in, self._explain_one, self._explain_out)

    def _explain_one(self, task: tuple[InFlight, Verdict, int]) -> tuple[Explanation | None, float]:
        t0 = time.perf_counter()  # wall time: it also counts the runtime threads the CAM inference uses
        item, v, waiting = task
        # The model that decided explains it, with its card's method (a swap may have happened since).
        model = self.loader.model_by_id(v.model_id) or self.loader.require_model()
        method = explain.method_for(waiting, model.explain_method)
        return (explain.task(model.runner, item, v, self.s.explain_dir, self.s.explain_keep, method),
                time.perf_counter() - t0)

    # --- shutdown ---

    def shutdown(self) -> None:
        """Last heartbeat, stop the workers, close the sockets (the PUB with a short linger)."""
        self._heartbeat()
        with contextlib.suppress(queue.Empty):
            while True:  # batches abandoned at the shutdown bound were already shed; do not run them
                self._jobs.get_nowait()
        for _ in range(self.workers):
            self._jobs.put(None)
        with contextlib.suppress(queue.Full):
            self._explain_in.put_nowait(None)
        for t in self._threads:
            t.join(timeout=2.0)
        self.loader.close()
        if self.memguard is not None:
            self.memguard.stop()
        assert self.line is not None
        log.info("stopped", **self.line.counters(), outstanding=self.line.outstanding)
        for sock in (self.wake, self.control):
            if sock is not None:
                sock.close(linger=0)
        # A short linger lets the last verdicts and the final heartbeat leave before the socket closes.
        self.pub.close(linger=1000)
        if self.curve is not None:
            self.curve.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
