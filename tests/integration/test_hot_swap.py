"""Swapping the model without stopping the line (SIGHUP): nothing lost or doubled, every verdict names its model."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from agent.serving import NEXT_MODEL_FILE
from agent.testing import wait_for
from protocol import Encoding, Frame, Status, Verdict, encode_frame
from tests.integration.conftest import collect, subscriber, wait_subscribed

pytestmark = pytest.mark.integration
CAMERAS = ("swapA", "swapB")


def copy_model(src: Path, dest_dir: Path, stem: str, edit: Any = None) -> Path:
    """The model and its card under a new name (a new model id); `edit` may change the card."""
    dest = dest_dir / f"{stem}.keras"
    shutil.copyfile(src, dest)
    card = json.loads(src.with_suffix(".json").read_text())
    if edit is not None:
        edit(card)
    dest.with_suffix(".json").write_text(json.dumps(card))
    return dest


def send_steadily(push: zmq.Socket[Any], n: int, fps: float, stop: threading.Event) -> None:
    """n frames per camera at fps per camera, interleaved, from a thread (the test thread watches the agent)."""
    pixels = np.random.default_rng(0).integers(0, 256, 200 * 200, dtype=np.uint8).tobytes()
    for seq in range(n):
        if stop.is_set():
            return
        for cam in CAMERAS:
            push.send_multipart(encode_frame(Frame(camera_id=cam, seq=seq, capture_ns=time.time_ns(), width=200,
                                                   height=200, encoding=Encoding.GRAY8, payload=pixels)))
        time.sleep(1 / fps)


@pytest.fixture
def swapping(start_agent: Any, zctx: zmq.Context[Any], tmp_path: Path, shared_artifacts: Path) -> Any:
    state = tmp_path / "state"
    state.mkdir()
    agent = start_agent(state_dir=state, artifacts_dir=shared_artifacts, explain_interval_s=0, shed_deadline_ms=5000)
    sub = subscriber(zctx, agent.publish)
    wait_subscribed(sub)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(agent.frames)
    return agent, sub, push, state


class TestHotSwap:
    """SIGHUP loads, checks and warms the next model beside the running one, then swaps between batches."""

    def test_swap_under_load(self, swapping: Any, shipped_model: Path, tmp_path: Path) -> None:
        """0 frames lost, 0 duplicates, and model_id changes at one point in each camera's seq order."""
        agent, sub, push, state = swapping
        new = copy_model(shipped_model, tmp_path, "tinydefectnet-next")
        (state / NEXT_MODEL_FILE).write_text(str(new))
        stop = threading.Event()
        n = 300
        sender = threading.Thread(target=send_steadily, args=(push, n, 50.0, stop), daemon=True)
        sender.start()
        try:
            time.sleep(1.0)
            agent.signal(signal.SIGHUP)
            wait_for(lambda: agent.event("model swapped") or agent.event("model refused"), 120, "swap or refusal")
            swapped = agent.event("model swapped")
            assert swapped is not None, agent.event("model refused")
            msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= n * len(CAMERAS), 120)
        finally:
            stop.set()
            sender.join(10)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        assert len(verdicts) == n * len(CAMERAS)
        for cam in CAMERAS:
            mine = [v for v in verdicts if v.camera_id == cam]
            assert [v.seq for v in mine] == list(range(n))  # none lost, none twice, in order
            ids = [v.model_id.split("/")[0] for v in mine if v.status is Status.OK]
            changes = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
            assert len(changes) == 1, (cam, changes)
            assert ids[0].startswith("tinydefectnet-") and ids[-1].startswith("tinydefectnet-next-")
        assert swapped["model_id"].startswith("tinydefectnet-next-")

    @pytest.mark.parametrize(("what", "edit"), [
        ("classes", lambda c: c.update(classes=[*c["classes"], "extra"])),
        ("self-test", lambda c: c.update(self_test={"expected_probs": [[1.0] + [0.0] * (len(c["classes"]) - 1)]
                                                    * 4})),
    ])
    def test_bad_model_is_refused(self, swapping: Any, shipped_model: Path, tmp_path: Path, what: str,
                                  edit: Any) -> None:
        """A model that fails its card's checks is refused with one log line and a count; the old one serves."""
        agent, sub, push, state = swapping
        bad = copy_model(shipped_model, tmp_path, "broken", edit)
        (state / NEXT_MODEL_FILE).write_text(str(bad))
        agent.signal(signal.SIGHUP)
        refused = wait_for(lambda: agent.event("model refused"), 120, "refusal")
        assert str(bad) in refused["path"] and refused["serving"].startswith("tinydefectnet-")
        assert agent.event("model swapped") is None
        send_steadily(push, 5, 100.0, threading.Event())
        msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= 10, 30)
        verdicts = [m for m in msgs if isinstance(m, Verdict)]
        assert len(verdicts) == 10 and all(v.model_id.startswith("tinydefectnet-") for v in verdicts)
        hb = wait_for(lambda: next((m for m in collect(sub, lambda x: False, 1.5) if hasattr(m, "counters")), None),
                      10, "heartbeat")
        assert hb.counters["model_refused"] == 1 and not hb.model_id.startswith("broken")
