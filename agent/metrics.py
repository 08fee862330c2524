"""Prometheus metrics (private registry) and a small HTTP server for /metrics, /healthz and /readyz."""

from __future__ import annotations

import bisect
import http.server
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from agent.logging import get_logger

if TYPE_CHECKING:
    from agent.line import Job
    from protocol import Verdict

log = get_logger("agent.metrics")

# Buckets in seconds, dense around the line's budget: a 250 ms shed deadline and single-digit-ms batches.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
INFERENCE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.2, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NO_CLASS = "none"  # class label of shed and rejected verdicts


class BulkHistogram:
    """A Prometheus histogram observed a batch at a time: one numpy pass per batch instead of a lock per frame.

    Histogram.observe() takes a lock and walks the buckets in Python, ~2 us a call; per-frame latencies made it
    the larger part of the agent's metrics cost. The exposition is the same as a prometheus_client Histogram's.
    """

    # Up to this many values go through bisect in Python: numpy's fixed cost per call (~10 us for the five calls
    # below) is most of a light-load batch of one or two frames.
    SMALL = 8

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(buckets, np.float64)
        self._bound_list = [float(b) for b in buckets]
        self._labels = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self._counts = np.zeros(len(buckets) + 1, np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, values: Any) -> None:
        """Add every value of an array-like (seconds, or any unit the buckets are in)."""
        if isinstance(values, (list, tuple)) and len(values) <= self.SMALL:
            self.observe_few(values)
            return
        v = np.asarray(values, np.float64).ravel()
        if not v.size:
            return
        # le semantics: a value equal to a bound belongs to that bound's bucket, as in prometheus_client.
        counts = np.bincount(np.searchsorted(self._bounds, v, side="left"), minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def observe_few(self, values: Any, scale: float = 1.0) -> None:
        """Add a few plain numbers, each divided by `scale`: the same buckets as observe(), bisect_left being
        searchsorted's side="left"."""
        bounds, counts = self._bound_list, self._counts
        with self._lock:
            for x in values:
                x = float(x) / scale
                counts[bisect.bisect_left(bounds, x)] += 1
                self._sum += x

    def collect(self) -> Any:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        yield HistogramMetricFamily(self.name, self.documentation, sum_value=total,
                                    buckets=list(zip(self._labels, cumulative, strict=True)))

    def describe(self) -> Any:
        yield HistogramMetricFamily(self.name, self.documentation)


class Metrics:
    """Every metric the agent exports; updated from the I/O thread, read by the HTTP thread (thread-safe)."""

    def __init__(self) -> None:
        # The *_created series double the exposition for no use on a line PC (process-wide switch).
        disable_created_metrics()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter("tdn_frames_received", "Frame messages taken off the frame socket", registry=r)
        self.rejected = Counter("tdn_frames_rejected", "Frames refused, by reason code (protocol or agent)",
                                ["reason"], registry=r)
        self.shed = Counter("tdn_frames_shed", "Frames too old at batch time, answered shed without inference",
                            registry=r)
        self.verdicts_total = Counter("tdn_verdicts", "Verdicts published, by status, decision and predicted class",
                                ["status", "decision", "class"], registry=r)
        self.swaps = Counter("tdn_model_swaps", "Models swapped in without a restart (SIGHUP)", registry=r)
        self.refused = Counter("tdn_models_refused", "New models refused by their checks; the old one served on",
                               registry=r)
        self.queue_depth = Gauge("tdn_queue_depth", "Accepted frames waiting for a batch", registry=r)
        self.batch_size = BulkHistogram("tdn_batch_size", "Frames per inference batch (before padding)",
                                        BATCH_BUCKETS, r)
        self.queue_wait = BulkHistogram("tdn_queue_wait_seconds", "Time from intake to the frame's batch leaving",
                                        LATENCY_BUCKETS, r)
        self.inference = Histogram("tdn_inference_seconds", "Backend time per batch", buckets=INFERENCE_BUCKETS,
                                   registry=r)
        self.worker_batches = Counter("tdn_worker_batches", "Batches run by each inference worker", ["worker"],
                                      registry=r)
        self.latency = BulkHistogram("tdn_capture_to_verdict_seconds", "Capture time to verdict publish time",
                                     LATENCY_BUCKETS, r)
        self.backend = Info("tdn_backend", "Inference backend, model and agent identity", registry=r)
        self.last_heartbeat = Gauge("tdn_last_heartbeat_timestamp_seconds", "Unix time of the last heartbeat",
                                    registry=r)
        self.auth_denied = Counter("tdn_auth_denied", "Refused CURVE handshakes, by socket and reason",
                                   ["socket", "reason"], registry=r)
        self.peers_dropped = Counter("tdn_peers_dropped", "Frame connections dropped to keep memory under the "
                                     "guard (agent/memguard.py), by reason", ["reason"], registry=r)
        self.ready = Gauge("tdn_ready", "1 once warmed up and serving, 0 while starting or draining", registry=r)
        # Label children resolved once: a .labels() lookup per frame would cost a lock and a dict build.
        self._verdict: dict[tuple[str, str, str | None], Any] = {}
        self._rejected: dict[str, Any] = {}
        self._workers: dict[int, Any] = {}
        self._counters: dict[str, Any] = {"received": self.received, "shed": self.shed, "model_swaps": self.swaps,
                                          "model_refused": self.refused}

    def record(self, event: str, reason: str | None, n: int) -> None:
        """The line core's accounting sink: the same events its heartbeat counters count."""
        if event in ("rejected", "rejected_unattributed"):
            key = reason or "unknown"
            child = self._rejected.get(key)
            if child is None:
                child = self._rejected[key] = self.rejected.labels(key)
            child.inc(n)
            return
        counter = self._counters.get(event)
        if counter is not None:
            counter.inc(n)

    def verdicts(self, published: list[tuple[Verdict, int]]) -> None:
        """Observe published verdicts with their publish times: status, decision and class, and the
        capture-to-verdict latency of each that has a capture time. Counted per label set, once per call."""
        by_key: dict[tuple[str, str, str | None], int] = {}
        latencies = []
        for v, published_ns in published:
            key = (v.status.value, v.decision.value if v.decision else NO_CLASS, v.class_name)
            by_key[key] = by_key.get(key, 0) + 1
            if v.capture_ns:
                latencies.append(max(0, published_ns - v.capture_ns))
        for key, n in by_key.items():
            child = self._verdict.get(key)
            if child is None:
                child = self._verdict[key] = self.verdicts_total.labels(key[0], key[1], key[2] or NO_CLASS)
            child.inc(n)
        if len(latencies) <= BulkHistogram.SMALL:
            self.latency.observe_few(latencies, 1e9)
        else:
            self.latency.observe(np.asarray(latencies, np.float64) / 1e9)

    def batch(self, job: Job, now_mono_ns: int) -> None:
        """Observe a dispatched batch: its size, and how long each frame waited for it."""
        self.batch_size.observe_few((len(job.items),))
        if len(job.items) <= BulkHistogram.SMALL:
            self.queue_wait.observe_few([max(now_mono_ns - p.received_ns, 0) for p in job.items], 1e9)
            return
        waits = np.fromiter((now_mono_ns - p.received_ns for p in job.items), np.float64, len(job.items))
        self.queue_wait.observe(np.maximum(waits, 0.0) / 1e9)

    def inferred(self, lane: int, infer_s: float) -> None:
        """Observe a batch back from inference worker `lane`: its backend time, and the worker's count."""
        self.inference.observe(infer_s)
        child = self._workers.get(lane)
        if child is None:
            child = self._workers[lane] = self.worker_batches.labels(str(lane))
        child.inc()

    def identity(self, backend: Mapping[str, str], model_id: str, agent_id: str, epoch: int) -> None:
        """Set the info metric once the backend is loaded."""
        self.backend.info({**{str(k): str(v) for k, v in backend.items()}, "model_id": model_id,
                           "agent_id": agent_id, "epoch": str(epoch)})

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


@dataclass
class Health:
    """What /healthz and /readyz answer; written by the I/O thread, read by the HTTP thread."""

    ready: bool = False
    state: str = "starting"
    stall_s: float = 10.0
    _last_beat: float | None = None

    def beat(self) -> None:
        """The I/O loop is turning (called with every heartbeat)."""
        self._last_beat = time.monotonic()

    def live(self) -> tuple[bool, str]:
        """Live unless the I/O loop, once running, has not beaten for stall_s (warm-up counts as live)."""
        last = self._last_beat
        if last is None:
            return True, self.state
        age = time.monotonic() - last
        return (age < self.stall_s), f"{self.state}, last heartbeat {age:.1f} s ago"


def make_handler(metrics: Metrics, health: Health) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler bound to these metrics and this health state."""

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "tdn-agent"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, text = health.live()
                self._send(200 if ok else 503, f"{'live' if ok else 'stalled'}: {text}\n".encode())
            elif path == "/readyz":
                ok = health.ready
                self._send(200 if ok else 503, f"{'ready' if ok else 'not ready'}: {health.state}\n".encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes every few seconds would drown the agent's log; errors still show through log_error.
            pass

        def log_error(self, format: str, *args: Any) -> None:
            log.warning("metrics http error", detail=format % args)

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # A restarted agent must get its port back at once, even with connections in TIME_WAIT.
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves /metrics, /healthz and /readyz from a daemon thread; start() binds, stop() closes."""

    def __init__(self, metrics: Metrics, health: Health, addr: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        self.addr = addr
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0). OSError if the address is taken."""
        cls = _Server6 if ":" in self.addr else _Server
        server = cls((self.addr, self.port), make_handler(self.metrics, self.health))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="tdn-metrics", daemon=True)
        self._thread.start()
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start_server(metrics: Metrics, health: Health, addr: str, port: int) -> MetricsServer | None:
    """Serve /metrics, /healthz and /readyz (port 0: not at all); None, with an error logged, if it cannot bind."""
    if port == 0:
        return None
    server = MetricsServer(metrics, health, addr, port)
    try:
        bound = server.start()
    except OSError as exc:
        # Metrics are for people; inspection goes on without them rather than stopping the line.
        log.error("metrics server not started", addr=addr, port=port, error=str(exc))
        return None
    host = f"[{addr}]" if ":" in addr else addr
    log.info("metrics", url=f"http://{host}:{bound}/metrics")
    return server
