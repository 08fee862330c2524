"""/metrics, /healthz and /readyz of the real agent agree with its heartbeat counters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from agent.health import check
from protocol import Heartbeat, Status, Verdict
from tests.integration.agentproc import Launcher, http_get
from tests.integration.conftest import collect, subscriber, wait_subscribed
from tests.integration.test_line import gray_frame

pytestmark = pytest.mark.integration


@pytest.fixture
def launcher(tmp_path: Path, shipped_model: Path) -> Iterator[Launcher]:
    """Agents on random ports, killed at teardown."""
    launch = Launcher(tmp_path)
    yield launch
    launch.close()


class TestScrape:
    """A scrape after some good and bad frames."""

    def test_counters_match_heartbeat(self, launcher: Launcher, zctx: zmq.Context[Any]) -> None:
        """/readyz goes 503 -> 200; received, verdicts, rejects, batches and histograms equal the heartbeat's."""
        agent = launcher.start(explain_interval_s=0)
        # The server is up before the model loads: /readyz said 503 during warm-up, then 200.
        assert 503 in agent.readyz_seen, agent.readyz_seen
        assert http_get(agent.url + "/healthz")[0] == 200
        assert check(agent.url + "/readyz", 3)[0]
        sub = subscriber(zctx, agent.publish)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        for seq in range(30):
            push.send_multipart(gray_frame("camM", seq))
        bad_version = gray_frame("camM", 30)
        header = msgpack.unpackb(bad_version[1])
        header["v"] = 2
        bad_version[1] = msgpack.packb(header)
        short = gray_frame("camM", 31)
        short[2] = bytes(10)
        for msg in (bad_version, short, [b"\xc1"]):
            push.send_multipart(msg)
        msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= 32, 20)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        assert len(verdicts) == 32
        t_last = time.time()
        msgs = collect(sub, lambda m: any(isinstance(x, Heartbeat) and x.time_ns / 1e9 > t_last for x in m), 5)
        hb = [m for m in msgs if isinstance(m, Heartbeat)][-1]
        c = hb.counters
        m = agent.metrics()

        assert m["tdn_frames_received_total"] == c["received"] == 33
        ok = sum(v for k, v in m.items() if k.startswith("tdn_verdicts_total") and 'status="ok"' in k)
        assert ok == c["inferred"] == 30 == sum(v.status is Status.OK for v in verdicts)
        assert m['tdn_verdicts_total{class="none",decision="divert",status="rejected"}'] == 2
        rejected = {k: v for k, v in m.items() if k.startswith("tdn_frames_rejected_total")}
        assert rejected == {'tdn_frames_rejected_total{reason="bad_version"}': 1,
                            'tdn_frames_rejected_total{reason="payload_size"}': 1,
                            'tdn_frames_rejected_total{reason="frame_count"}': 1}
        assert m["tdn_batch_size_count"] == c["batches"] == m["tdn_inference_seconds_count"]
        assert sum(v for k, v in m.items() if k.startswith("tdn_worker_batches_total")) == c["batches"]
        assert m["tdn_batch_size_sum"] == m["tdn_queue_wait_seconds_count"] == 30
        assert c["published"] == 32
        # Refused frames echo the capture time their header had, so their latency counts too.
        assert m["tdn_capture_to_verdict_seconds_count"] == 32
        assert m["tdn_frames_shed_total"] == c["shed"] == 0
        assert m["tdn_queue_depth"] == 0 and m["tdn_ready"] == 1
        assert abs(m["tdn_last_heartbeat_timestamp_seconds"] - time.time()) < 5
        info = [k for k in m if k.startswith("tdn_backend_info")]
        assert len(info) == 1 and f'model_id="{hb.model_id}"' in info[0] and f'epoch="{hb.epoch}"' in info[0]
        assert agent.stop() == 0


class TestInferenceWorkers:
    """Two inference workers, each on its own runtime instance, answer a burst from two cameras."""

    def test_both_workers_run_and_order_holds(self, launcher: Launcher, zctx: zmq.Context[Any], neu_det: Path,
                                              tmp_path: Path) -> None:
        """Every frame gets an ok verdict in its camera's order, both workers ran batches, and verdicts agree with
        the same frames sent one at a time (which leaves them to one worker)."""
        import cv2

        agent = launcher.start(backend="litert:fp32", workers=2, artifacts_dir=tmp_path / "art",
                               explain_interval_s=0, max_batch_size=4, queue_cap=16)
        sub = subscriber(zctx, agent.publish)
        wait_subscribed(sub)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(agent.frames)
        images = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).tobytes()
                  for p in sorted((neu_det / "IMAGES").glob("*.jpg"))[::24][:60]]
        for seq, img in enumerate(images):  # a burst: batches queue up and both workers take them
            for cam in ("camA", "camB"):
                push.send_multipart(gray_frame(cam, seq, img))
        msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= 2 * len(images), 60)
        burst = [m for m in msgs if isinstance(m, Verdict)]
        single: list[Verdict] = []
        for seq, img in enumerate(images[:8]):  # one at a time: each batch alone in the agent
            push.send_multipart(gray_frame("camC", seq, img))
            single += [x for x in collect(sub, lambda m: any(isinstance(x, Verdict) for x in m), 10)
                       if isinstance(x, Verdict)]
        m = agent.metrics()
        hb = [x for x in collect(sub, lambda m: any(isinstance(x, Heartbeat) for x in m), 5)
              if isinstance(x, Heartbeat)][-1]

        assert all(v.status is Status.OK for v in burst) and len(burst) == 2 * len(images)
        for cam in ("camA", "camB"):
            assert [v.seq for v in burst if v.camera_id == cam] == list(range(len(images)))
        workers = {k: v for k, v in m.items() if k.startswith("tdn_worker_batches_total")}
        assert set(workers) == {'tdn_worker_batches_total{worker="0"}', 'tdn_worker_batches_total{worker="1"}'}
        assert min(workers.values()) >= 1 and sum(workers.values()) == hb.counters["batches"]
        assert hb.backend["workers"] == "2" and hb.backend["threads"] == "1"
        a = {v.seq: v.probs for v in burst if v.camera_id == "camA"}
        assert [v.seq for v in single] == list(range(8))
        assert all(abs(x - y) < 1e-4 for v in single for x, y in zip(v.probs, a[v.seq], strict=True))
