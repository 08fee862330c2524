"""Tests for the metrics registry, the /metrics /healthz /readyz server and `tdn health`."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.cli import main
from agent.metrics import Health, Metrics, MetricsServer
from protocol import Decision
from tests.conftest import free_port
from tests.unit.test_protocol import make_shed, make_verdict


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, Health, str]]:
    """A metrics server on a free loopback port."""
    m, h = Metrics(), Health(stall_s=0.3)
    server = MetricsServer(m, h, "127.0.0.1", 0)
    port = server.start()
    yield m, h, f"http://127.0.0.1:{port}"
    server.stop()


class TestMetrics:
    """The registry is private and counts what the agent feeds it."""

    def test_private_registry(self) -> None:
        """Two instances do not share series (no global registry clash)."""
        a, b = Metrics(), Metrics()
        a.received.inc(3)
        assert b.registry.get_sample_value("tdn_frames_received_total") == 0
        assert a.registry.get_sample_value("tdn_frames_received_total") == 3

    def test_verdict_and_reject_labels(self) -> None:
        """Verdicts count by status, decision and class (class 'none' when not inferred); rejects by reason."""
        m = Metrics()
        ok = make_verdict(decision=Decision.DIVERT)
        shed = make_shed(decision=Decision.DIVERT)
        m.verdicts([(ok, ok.received_ns), (ok, ok.received_ns)])
        m.verdicts([(shed, shed.received_ns)])
        m.verdicts([])
        m.record("rejected_unattributed", "bad_msgpack", 1)
        m.record("rejected", "undecodable", 2)
        v = m.registry.get_sample_value
        assert v("tdn_verdicts_total", {"status": "ok", "decision": "divert", "class": "scratches"}) == 2
        assert v("tdn_verdicts_total", {"status": "shed", "decision": "divert", "class": "none"}) == 1
        assert v("tdn_frames_rejected_total", {"reason": "bad_msgpack"}) == 1
        assert v("tdn_frames_rejected_total", {"reason": "undecodable"}) == 2

    def test_bulk_histogram_matches_prometheus_client(self) -> None:
        """A latency histogram fed a batch at a time exposes what a prometheus_client Histogram fed one by one does."""
        import numpy as np
        from prometheus_client import CollectorRegistry, Histogram, generate_latest

        from agent.metrics import LATENCY_BUCKETS, BulkHistogram

        values = np.concatenate([np.random.default_rng(3).exponential(0.02, 500), LATENCY_BUCKETS, [0.0, 9.0]])
        ours, ref = CollectorRegistry(), CollectorRegistry()
        bulk = BulkHistogram("tdn_x_seconds", "doc", LATENCY_BUCKETS, ours)
        one = Histogram("tdn_x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=ref)
        chunks = np.array_split(values, 7)
        for chunk in chunks[:4]:
            bulk.observe(chunk)
        for chunk in chunks[4:]:  # the few-values path (lists of <= SMALL, and scaled ns), bucket for bucket alike
            for i in range(0, len(chunk), 3):
                if i % 2:
                    bulk.observe([float(x) for x in chunk[i:i + 3]])
                else:
                    bulk.observe_few([float(x) * 1e9 for x in chunk[i:i + 3]], 1e9)
        bulk.observe([])
        for x in values:
            one.observe(float(x))
        ours_text, ref_text = generate_latest(ours).decode(), generate_latest(ref).decode()
        drop = ("_created", "_sum")  # created is off in Metrics; the sums differ in the last float digits
        keep = [ln for ln in ref_text.splitlines() if not any(d in ln for d in drop)]
        assert keep == [ln for ln in ours_text.splitlines() if not any(d in ln for d in drop)]
        assert ours.get_sample_value("tdn_x_seconds_sum") == pytest.approx(float(values.sum()))
        assert ours.get_sample_value("tdn_x_seconds_bucket", {"le": "0.002"}) == int((values <= 0.002).sum())

    def test_latency_from_capture_to_publish(self) -> None:
        """Each verdict with a capture time adds its capture-to-publish time; one without adds nothing."""
        m = Metrics()
        ok = make_verdict(decision=Decision.DIVERT)
        m.verdicts([(ok, ok.capture_ns + 3_000_000), (ok, ok.capture_ns + 40_000_000)])
        v = m.registry.get_sample_value
        assert v("tdn_capture_to_verdict_seconds_count") == 2
        assert v("tdn_capture_to_verdict_seconds_bucket", {"le": "0.005"}) == 1
        assert v("tdn_capture_to_verdict_seconds_sum") == pytest.approx(0.043)

    def test_identity_info(self) -> None:
        """Backend identity, model, agent and epoch appear as one info series."""
        m = Metrics()
        m.identity({"backend": "tensorflow", "threads": "2"}, "tdn-x", "a1", 7)
        labels = {"backend": "tensorflow", "threads": "2", "model_id": "tdn-x", "agent_id": "a1", "epoch": "7"}
        assert m.registry.get_sample_value("tdn_backend_info", labels) == 1


class TestServer:
    """The HTTP endpoints answer from the shared state."""

    def test_readyz_follows_the_flag(self, served: tuple[Metrics, Health, str]) -> None:
        """/readyz is 503 while starting, 200 once ready, 503 again while draining."""
        _, h, url = served
        assert get(url + "/readyz")[0] == 503
        h.ready, h.state = True, "ready"
        assert get(url + "/readyz")[0] == 200
        h.ready, h.state = False, "draining"
        code, _, body = get(url + "/readyz")
        assert code == 503 and "draining" in body

    def test_healthz_detects_a_stalled_loop(self, served: tuple[Metrics, Health, str]) -> None:
        """/healthz is 200 during warm-up and while beating, 503 once beats stop for stall_s."""
        _, h, url = served
        assert get(url + "/healthz")[0] == 200
        h.beat()
        assert get(url + "/healthz")[0] == 200
        time.sleep(0.4)
        assert get(url + "/healthz")[0] == 503

    def test_metrics_exposition(self, served: tuple[Metrics, Health, str]) -> None:
        """/metrics parses as Prometheus text with the agent's families and no *_created series."""
        m, _, url = served
        m.received.inc(5)
        code, ctype, body = get(url + "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(body)}
        assert {"tdn_frames_received", "tdn_verdicts", "tdn_capture_to_verdict_seconds", "tdn_ready"} <= names
        assert "_created" not in body
        assert get(url + "/other")[0] == 404

    def test_port_taken(self) -> None:
        """A second server on a bound port raises OSError (the agent logs it and serves on)."""
        first = MetricsServer(Metrics(), Health(), "127.0.0.1", 0)
        port = first.start()
        try:
            with pytest.raises(OSError):
                MetricsServer(Metrics(), Health(), "127.0.0.1", port).start()
        finally:
            first.stop()


class TestHealthCommand:
    """`tdn health` exits 0 only on a 200 from /readyz."""

    def test_exit_codes(self, served: tuple[Metrics, Health, str], capsys: pytest.CaptureFixture[str]) -> None:
        """1 while not ready or unreachable, 0 when ready."""
        _, h, url = served
        assert main(["health", "--url", url + "/readyz"]) == 1
        h.ready = True
        assert main(["health", "--url", url + "/readyz"]) == 0
        assert main(["health", "--quiet", "--url", f"http://127.0.0.1:{free_port()}/readyz"]) == 1
        assert "503" in capsys.readouterr().out
