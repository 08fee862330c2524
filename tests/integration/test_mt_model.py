"""The shipped Magnetic-tile model: a plain Keras load, its card's self-test, and the agent serving native tiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from agent.backends import installed
from agent.lab.bench.heldout import frame_for
from protocol import Decision, Status, Verdict, encode_frame
from tests.integration.conftest import collect, subscriber, wait_subscribed

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MT_MODEL = REPO / "agent" / "models" / "magnetic-tile.keras"
LEAN = [b for b in ("litert", "openvino") if installed(b)]


@pytest.fixture(scope="module")
def card() -> dict[str, Any]:
    return dict(json.loads(MT_MODEL.with_suffix(".json").read_text()))


@pytest.fixture(scope="module")
def mt_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's fp32 artifacts for every installed lean runtime, built by the agent's own first-start export,
    with TDN_DATA (NEU-DET in CI) set: its class list is not the model's, and must not stop the export."""
    from agent.backends import export_first_start

    root = tmp_path_factory.mktemp("mt-artifacts")
    assert export_first_start(MT_MODEL, root, None, "no data in this test") == LEAN
    return root


class TestShippedMagneticTile:
    """The committed Magnetic-tile model is what its card says."""

    def test_plain_keras_load_and_self_test(self, card: dict[str, Any]) -> None:
        """keras.models.load_model without custom objects, then the card's self-test probabilities to its atol."""
        import keras

        from agent.geometry import self_test_inputs

        model = keras.models.load_model(MT_MODEL, compile=False)
        st = card["self_test"]
        probs = model.predict(self_test_inputs(200, len(st["expected_probs"])), verbose=0)
        np.testing.assert_allclose(probs, np.asarray(st["expected_probs"]), atol=st["atol"])
        assert model.count_params() == card["params"] and card["pass_classes"] == ["MT_Free"]

    @pytest.mark.parametrize("backend", ["tensorflow", *(f"{b}:fp32" for b in LEAN)])
    def test_agent_serves_native_tiles(self, backend: str, start_agent: Any, zctx: zmq.Context[Any],
                                       magnetic_tile: Path, mt_artifacts: Path, card: dict[str, Any]) -> None:
        """Tiles of three classes at their own sizes, as JPEG files, get ok verdicts over the model's six classes."""
        agent = start_agent(model_path=MT_MODEL, backend=backend, artifacts_dir=mt_artifacts, explain_interval_s=0)
        sub = subscriber(zctx, agent.publish)
        push = zctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        try:
            wait_subscribed(sub)
            push.connect(agent.frames)
            files = [next(iter(sorted((magnetic_tile / c / "Imgs").glob("*.jpg")))) for c in
                     ("MT_Free", "MT_Blowhole", "MT_Uneven")]
            frames = [frame_for(f, i, f.parts[-3], "file") for i, f in enumerate(files)]
            for f in frames:
                push.send_multipart(encode_frame(f))
            msgs = collect(sub, lambda m: sum(isinstance(x, Verdict) for x in m) >= len(frames), 120)
        finally:
            push.close(linger=0)
            sub.close(linger=0)
        verdicts = sorted((m for m in msgs if isinstance(m, Verdict)), key=lambda v: v.seq)
        assert [v.seq for v in verdicts] == [0, 1, 2]
        assert len({(f.width, f.height) for f in frames}) > 1 or frames[0].width != 200  # native, not 200x200
        for v in verdicts:
            assert v.status is Status.OK and v.class_name in card["classes"] and v.probs is not None
            assert len(v.probs) == 6 and v.decision in (Decision.PASS, Decision.DIVERT, Decision.REVIEW)
            assert v.model_id.endswith("/" + (backend.replace(":", "-") if ":" in backend else f"{backend}-fp32"))
