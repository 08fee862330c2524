"""Integration tests of every installed backend with the shipped model on NEU-DET images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import create, installed
from agent.backends.artifacts import ArtifactBackend
from agent.backends.gate import read_gate
from agent.backends.store import model_dir
from agent.card import read_dict
from agent.errors import BackendError, ConfigError
from agent.hostinfo import cores, cpu_flags
from agent.lab.data import held_out as card_split
from agent.lab.data import load_arrays, scan, stratified_subset
from agent.lab.export import predict_all
from tests.conftest import data_dir

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# TDN_MODEL lets CI check a candidate model; by default the tests are about the one we ship.
MODEL = Path(os.environ.get("TDN_MODEL", REPO / "agent" / "models" / "tinydefectnet.keras"))
BATCH = 8
N_IMAGES = 120
LEAN = [b for b in ("litert", "openvino") if installed(b)]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}


def python(code: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter (runtimes that must be set up before TensorFlow's import need one)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def model() -> Path:
    if not MODEL.is_file():
        pytest.fail(f"shipped model {MODEL} is missing; train it with `tdn train`")
    return MODEL


@pytest.fixture(scope="module")
def images(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path]:
    """~120 held-out images, every class equally, their labels, and the images saved for child processes."""
    _, val, _ = card_split(read_dict(model), scan(data_dir()))
    x, y = load_arrays(stratified_subset(val, N_IMAGES, seed=0))
    path = tmp_path_factory.mktemp("images") / "x.npy"
    np.save(path, x)
    return x, y, path


@pytest.fixture(scope="module")
def reference(model: Path, images: tuple[np.ndarray, np.ndarray, Path]) -> np.ndarray:
    """Top-1 decisions of native TensorFlow on the images."""
    b = create("tensorflow", model)
    b.load()
    b.warmup((BATCH,))
    return predict_all(b.infer, images[0], BATCH)


@pytest.fixture(scope="module")
def artifacts(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every artifact of the model, exported once (fp32, bf16 gate, int8) into a private folder."""
    root = tmp_path_factory.mktemp("artifacts")
    if LEAN:
        out = subprocess.run(
            [sys.executable, "-m", "agent.lab.export", "--model", str(model), "--data", str(data_dir()),
             "--artifacts-dir", str(root), "--backends", ",".join(LEAN), "--calibration", "96"],
            capture_output=True, text=True, env=ENV, timeout=600, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "gate images: the model card's held-out split" in out.stdout
    return root


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


class TestNativeTensorFlow:
    def test_native_is_onednn_without_the_plugin_rewrite(self, model: Path) -> None:
        """The tensorflow backend runs fused kernels (oneDNN or Eigen): no ZenDNN op, no fusion lost to zentf."""
        b: Any = create("tensorflow", model)
        b.load()
        b.warmup((1,))
        assert not any(op.startswith("_Zen") for op in b.ops)
        # oneDNN serves where TensorFlow enables it (Intel CPUs with AVX-512), Eigen elsewhere (this AMD EPYC,
        # AVX2 only): either way every conv must be fused with its bias and activation.
        fused = b.ops.get("_MklNativeFusedConv2D", 0) + b.ops.get("_FusedConv2D", 0)
        assert fused >= 1 and not {"_MklNativeConv2DWithBias", "Conv2D", "BiasAdd"} & set(b.ops), dict(b.ops)
        assert b.identity()["runtime"].endswith(("(oneDNN)", "(Eigen)")), b.identity()["runtime"]


@pytest.mark.skipif(not installed("zendnn"), reason="zentf is not installed")
class TestZenDNN:
    def test_runs_active_and_agrees(self, model: Path, images: tuple[np.ndarray, np.ndarray, Path],
                                    reference: np.ndarray) -> None:
        """In its own process ZenDNN rewrites the graph to _Zen* ops and agrees with native TF on >= 99%."""
        out = python(f"""
            import json, numpy as np
            from agent.backends import create
            from agent.lab.export import predict_all
            b = create("zendnn", {str(model)!r})
            b.load(); b.warmup(({BATCH},))
            pred = predict_all(b.infer, np.load({str(images[2])!r}), {BATCH})
            print(json.dumps({{"pred": pred.tolist(), "identity": b.identity(), "ops": dict(b.ops)}}))
        """)
        assert out.returncode == 0, out.stderr[-2000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["ops"].get("_ZenFusedConv2D", 0) >= 1
        assert "plugin loaded" in res["identity"]["zendnn"] and "_ZenFusedConv2D" in res["identity"]["zendnn"]
        assert "TF_ENABLE_ZENDNN_OPTS=1" in res["identity"]["env"]
        assert agreement(res["pred"], reference) >= 0.99

    @pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="this CPU has no native bf16")
    def test_bf16_is_gated_and_serves(self, model: Path, artifacts: Path, images: tuple[np.ndarray, np.ndarray, Path],
                                      reference: np.ndarray) -> None:
        """`tdn export` gates ZenDNN's bf16 path; in its own process it then passes the agent's start-up checks, runs
        the plugin's bf16 casts and agrees with native TF on >= 99%."""
        rec = read_gate(model_dir(artifacts, model), "zendnn", "bf16")
        assert rec is not None and rec["passed"] and len(rec["self_test_probs"]) >= 1
        out = python(f"""
            import json, numpy as np
            from pathlib import Path
            from agent.backends import create
            from agent.config import AgentSettings
            from agent.lab.export import predict_all
            from agent.serving import prepare
            b = create("zendnn:bf16", {str(model)!r}, artifacts_dir={str(artifacts)!r})
            sm = prepare(b, AgentSettings(max_batch_size={BATCH}), Path({str(model)!r}))
            pred = predict_all(b.infer, np.load({str(images[2])!r}), {BATCH})
            print(json.dumps({{"pred": pred.tolist(), "identity": b.identity(), "casts": b.ops.get("Cast", 0),
                              "model_id": sm.model_id}}))
        """)
        assert out.returncode == 0, out.stderr[-2000:]
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["casts"] >= 1 and res["identity"]["precision"] == "bf16"
        assert "TF_ZENDNN_PLUGIN_BF16=1" in res["identity"]["env"] and res["identity"]["gate"].startswith("passes")
        assert res["model_id"].endswith("/zendnn-bf16")
        assert agreement(res["pred"], reference) >= 0.99

    def test_bf16_without_export_names_the_command(self, model: Path, tmp_path: Path) -> None:
        """ZenDNN bf16 before `tdn export` gated it is one error naming the command (or, without bf16, saying so)."""
        with pytest.raises(BackendError, match="tdn export" if "avx512_bf16" in cpu_flags() else "no native bf16"):
            create("zendnn:bf16", model, artifacts_dir=tmp_path).load()

    def test_refuses_after_a_plain_tensorflow_import(self) -> None:
        """When TensorFlow was imported without the ZenDNN switches, the backend says so in one line."""
        out = python(f"""
            import tensorflow
            from agent.backends import create
            try:
                create("zendnn", {str(MODEL)!r}).load()
            except Exception as exc:
                print(type(exc).__name__, exc)
        """)
        last = out.stdout.strip().splitlines()[-1]
        assert last.startswith("BackendError") and "before TensorFlow's import" in last


@pytest.mark.skipif(not LEAN, reason="neither ai-edge-litert nor openvino is installed")
class TestLeanBackends:
    @pytest.mark.parametrize("name", LEAN)
    def test_fp32_agrees_with_native(self, name: str, model: Path, artifacts: Path,
                                     images: tuple[np.ndarray, np.ndarray, Path], reference: np.ndarray) -> None:
        """The fp32 artifact agrees with native TF on >= 99% of top-1 decisions and explains with CAM."""
        b = create(name, model, precision="fp32", artifacts_dir=artifacts)
        b.load()
        b.warmup((1, BATCH))
        assert agreement(predict_all(b.infer, images[0], BATCH), reference) >= 0.99
        probs, feats = b.features(images[0][:1])
        assert probs.shape == (1, 6) and feats.ndim == 4 and feats.shape[3] == b.cam_weights().shape[0]

    @pytest.mark.parametrize("name", LEAN)
    def test_reduced_precision_is_gated(self, name: str, model: Path, artifacts: Path) -> None:
        """Every variant below fp32 has a gate record on the held-out split, and auto serves only passing ones."""
        folder = model_dir(artifacts, model)
        n_val = read_dict(model).get("validation", {}).get("n")
        b = create(name, model, artifacts_dir=artifacts)
        assert isinstance(b, ArtifactBackend)
        for precision in b.precisions[1:]:
            rec = read_gate(folder, name, precision)
            if rec is None:
                assert not b.supported_here(precision), f"{name} {precision} was not gated"
                continue
            assert {"accuracy", "fp32_accuracy", "agreement", "n", "passed", "decision"} <= set(rec)
            assert n_val is None or rec["n"] == n_val
            ok = rec["fp32_accuracy"] - rec["accuracy"] <= 0.005 + 1e-9 and rec["agreement"] >= 0.99 - 1e-9
            assert rec["passed"] == ok
        b.load()
        if b.precision != "fp32":
            assert read_gate(folder, name, b.precision)["passed"]  # type: ignore[index]

    @pytest.mark.parametrize("name", LEAN)
    def test_every_gated_variant_passes_the_start_up_self_test(self, name: str, model: Path, artifacts: Path) -> None:
        """Each variant auto may pick serves: its self-test is held to its own output at export, not to fp32's."""
        from agent.config import AgentSettings
        from agent.serving import prepare

        folder = model_dir(artifacts, model)
        probe = create(name, model, artifacts_dir=artifacts)
        assert isinstance(probe, ArtifactBackend)
        served = 0
        for precision in probe.precisions:
            rec = read_gate(folder, name, precision)
            if precision != "fp32" and not (rec and rec.get("passed")):
                continue
            assert precision == "fp32" or len(rec["self_test_probs"]) >= 1  # type: ignore[index]
            b = create(name, model, precision=precision, artifacts_dir=artifacts)
            sm = prepare(b, AgentSettings(max_batch_size=4), model)  # raises ModelError on a failed self-test
            assert sm.model_id.endswith(f"/{name}-{precision}")
            served += 1
        assert served >= 2  # fp32 and at least one reduced precision on this CPU

    @pytest.mark.parametrize("name", LEAN)
    def test_an_edited_card_fails_the_reduced_precision_self_test(self, name: str, model: Path, artifacts: Path,
                                                                   tmp_path: Path) -> None:
        """The same weights (the same artifacts) under a card whose self-test was edited are refused at int8 too,
        though int8 is held to its own recorded output: the record names the card it was measured against."""
        import shutil

        from agent.config import AgentSettings
        from agent.errors import ModelError
        from agent.serving import prepare

        if not (read_gate(model_dir(artifacts, model), name, "int8") or {}).get("passed"):
            pytest.skip(f"{name} int8 did not pass its gate on this CPU")  # measured by the artifacts fixture
        edited = tmp_path / "edited.keras"
        shutil.copyfile(model, edited)
        card = json.loads(model.with_suffix(".json").read_text())
        probs = card["self_test"]["expected_probs"]
        card["self_test"]["expected_probs"] = [[1.0] + [0.0] * (len(probs[0]) - 1)] * len(probs)
        edited.with_suffix(".json").write_text(json.dumps(card))
        b = create(name, edited, precision="int8", artifacts_dir=artifacts)
        with pytest.raises(ModelError, match=f"not the one {name}:int8 was exported with"):
            prepare(b, AgentSettings(max_batch_size=4), edited)

    @pytest.mark.parametrize("name", LEAN)
    def test_serving_never_imports_tensorflow(self, name: str, model: Path, artifacts: Path) -> None:
        """load, warmup, infer and features of a lean backend leave TensorFlow unimported."""
        out = python(f"""
            import sys, numpy as np
            from agent.backends import create
            b = create({name!r}, {str(model)!r}, artifacts_dir={str(artifacts)!r})
            b.load(); b.warmup((1, 4))
            b.infer(np.zeros((4, 200, 200, 1), np.float32)); b.features(np.zeros((1, 200, 200, 1), np.float32))
            print(b.identity()["backend"], "tensorflow" in sys.modules)
        """)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == f"{name} False"

    def test_export_is_cached_by_model_hash(self, model: Path, artifacts: Path) -> None:
        """A second export of the same model builds nothing and prints the variant table."""
        out = subprocess.run(
            [sys.executable, "-m", "agent.lab.export", "--model", str(model), "--data", str(data_dir()),
             "--artifacts-dir", str(artifacts), "--backends", ",".join(LEAN), "--calibration", "96"],
            capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "0 step(s) built" in out.stdout and "variant" in out.stdout

    def test_tune_writes_a_profile_auto_uses(self, model: Path, artifacts: Path, tmp_path: Path) -> None:
        """A small tune writes a profile for this model and host, and backend auto then picks its choice."""
        profile = tmp_path / "profile.json"
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "tune", "--model", str(model), "--artifacts-dir", str(artifacts),
             "--profile", str(profile), "--backends", f"{LEAN[0]}:fp32", "--threads", "1", "--batch-sizes", "1",
             "--seconds", "0.1", "--latency-ms", "1000"],
            capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "<- chosen" in out.stdout
        b: Any = create("auto", model, artifacts_dir=artifacts, profile_path=profile)
        assert (b.name, b.threads) == (LEAN[0], 1) and b.selected_by.startswith("profile")
        # Both layouts of one thread were timed (1 worker, and one per core), and auto serves the chosen one.
        rows = json.loads(profile.read_text())["rows"]
        assert {r["workers"] for r in rows} == {1, cores()} or cores() == 1
        assert b.workers == json.loads(profile.read_text())["choice"]["workers"]


class TestBadSettings:
    def test_unknown_backend_and_precision(self, model: Path) -> None:
        """Unknown names are one-line errors naming the choices."""
        for name, precision in (("nope", "auto"), ("litert", "fp16"), ("tensorflow:int8", "auto")):
            with pytest.raises(BackendError) as err:
                create(name, model, precision=precision)
            assert "\n" not in str(err.value)

    @pytest.mark.parametrize("name", LEAN)
    def test_int8_without_export(self, name: str, model: Path, tmp_path: Path) -> None:
        """Asking for int8 before `tdn export` built it names the command to run."""
        with pytest.raises(BackendError, match="tdn export") as err:
            create(name, model, precision="int8", artifacts_dir=tmp_path).load()
        assert "\n" not in str(err.value)

    def test_config_rejects_bad_combinations(self, model: Path) -> None:
        """Settings reject an unknown backend and a precision the backend cannot run."""
        with pytest.raises(ConfigError, match="backend"):
            from agent import config

            config.load(model_path=str(model), backend="nope")
        with pytest.raises(ConfigError, match="litert or openvino"):
            config.load(model_path=str(model), backend="tensorflow", precision="int8")

    def test_agent_cli_bad_backend_is_one_line(self, model: Path) -> None:
        """`tdn agent --backend nope` exits 1 with a single error line."""
        out = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--backend", "nope",
                              "--model-path", str(model)], capture_output=True, text=True, env=ENV, timeout=120,
                             cwd=REPO)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "backend" in lines[0]
