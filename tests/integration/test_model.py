"""The shipped model: parameter and FLOP budget, held-out accuracy, and a smoke training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.lab.data import scan, stratified_split
from agent.lab.model.arch import ArchSpec, count_macs
from agent.lab.model.flops import MAX_PARAMS, profiler_flops, within_band

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def card(shipped_model: Path) -> dict:
    return json.loads(shipped_model.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def model(shipped_model: Path):  # type: ignore[no-untyped-def]
    import keras

    return keras.saving.load_model(shipped_model, compile=False)


class TestBudget:
    """The shipped model meets the paper's constraints, measured with the counter."""

    def test_params_and_flop_band(self, model, card: dict) -> None:  # type: ignore[no-untyped-def]
        """At most 430K parameters; FLOPs by the TF profiler within 5% of 100M, as the card says."""
        flops = profiler_flops(model)
        assert model.count_params() <= MAX_PARAMS
        assert within_band(flops)
        assert flops == card["flops"] and count_macs(model) == card["macs"]

    def test_io_contract(self, model) -> None:  # type: ignore[no-untyped-def]
        """Raw 0..255 float32 [N,200,200,1] in, softmax [N,6] out."""
        x = np.random.default_rng(0).uniform(0, 255, (3, 200, 200, 1)).astype(np.float32)
        p = np.asarray(model(x, training=False))
        assert p.shape == (3, 6)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


class TestAccuracy:
    """Accuracy on NEU-DET images the model was never trained on."""

    def test_held_out_accuracy(self, model, card: dict, neu_det: Path) -> None:  # type: ignore[no-untyped-def]
        """The card's held-out split (rebuilt from its seed and checked by hash) scores >= 98%."""
        from agent.lab.data import file_list_hash, load_arrays

        cfg = card["training"]["config"]
        train, val = stratified_split(scan(neu_det), cfg["val_fraction"], card["training"]["seed"])
        assert file_list_hash(val) == card["validation"]["files_hash"]
        assert not {s.path.name for s in train} & {s.path.name for s in val}
        x, y = load_arrays(val)
        pred = np.asarray(model.predict(x, batch_size=64, verbose=0)).argmax(1)
        assert (pred == y).mean() >= 0.98


class TestSmokeTraining:
    """The training pipeline runs end to end on a small subset."""

    @pytest.mark.slow
    def test_one_epoch_writes_model_and_card(self, neu_det: Path, tmp_path: Path, card: dict) -> None:
        """One epoch on 10 images per class, with the box-guided attention loss, writes a model and a full card."""
        from agent.lab.model.train import TrainConfig, train_and_ship

        samples = [s for c in range(6) for s in [x for x in scan(neu_det) if x.label == c][:10]]
        spec = ArchSpec.from_dict(card["architecture"])
        cfg = TrainConfig(epochs=1, warmup_epochs=0, val_fraction=0.2, attention_weight=0.5)
        out = train_and_ship(samples, spec, cfg, tmp_path, data_root="subset")
        new = json.loads((tmp_path / "tinydefectnet.json").read_text())
        assert (tmp_path / "tinydefectnet.keras").is_file()
        for key in ("classes", "input", "params", "flops", "macs", "netscore", "validation", "training", "versions"):
            assert key in new
        assert new["training"]["images"] == 48 and new["validation"]["n"] == 12
        assert 0.0 <= out["validation"]["accuracy"] <= 1.0
        assert np.asarray(new["validation"]["confusion_matrix"]).sum() == 12


class TestOtherInputSize:
    """A model trained at another input side (`tdn train --input-size`) is served and explained at that side."""

    @pytest.mark.slow
    def test_auto_probes_and_serves_a_96_px_model(self, neu_det: Path, tmp_path: Path) -> None:
        """One epoch at 96x96, exported to LiteRT fp32: auto's probe, the backend and the lab explainer all use 96."""
        import os
        import subprocess
        import sys

        from agent.backends import PROBE_CACHE, create, installed, probe
        from agent.geometry import InputSpec
        from agent.lab.explain import Explainer
        from agent.lab.model.arch import Stage
        from agent.lab.model.train import TrainConfig, train_and_ship

        if not installed("litert"):
            pytest.fail("the litert extra is part of the test install")
        samples = [s for c in range(6) for s in [x for x in scan(neu_det) if x.label == c][:6]]
        spec = ArchSpec(stem_width=8, stages=(Stage(8), Stage(16)))
        cfg = TrainConfig(epochs=1, warmup_epochs=0, val_fraction=0.34)
        card = train_and_ship(samples, spec, cfg, tmp_path, data_root="subset", input_spec=InputSpec(size=96))
        assert card["input"]["size"] == 96 and card["input"]["shape"][1:] == [96, 96, 1]
        model = tmp_path / "tinydefectnet.keras"
        arts = tmp_path / "artifacts"
        out = subprocess.run(
            [sys.executable, "-m", "agent.lab.export", "--model", str(model), "--data", str(neu_det),
             "--artifacts-dir", str(arts), "--backends", "litert", "--precisions", "fp32", "--quiet"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            cwd=Path(__file__).resolve().parents[2])
        assert out.returncode == 0, out.stderr[-2000:]
        choice = probe(model, 1, arts)  # this raised a shape error: the probe batch was 200x200
        assert choice is not None and choice.backend == "litert"
        again = probe(model, 1, arts)  # the next start: the same variant, from the first start's measurement
        assert again is not None and (again.backend, again.precision) == (choice.backend, choice.precision)
        assert PROBE_CACHE in again.reason and PROBE_CACHE not in choice.reason
        b = create("litert", model, 1, artifacts_dir=arts)
        b.load()
        b.warmup((1, 4))
        x = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 1)).astype(np.float32)
        assert b.input_shape == (96, 96, 1) and b.infer(x).shape == (4, 6)
        import keras

        _, heat = Explainer(keras.saving.load_model(model, compile=False)).explain(x)
        assert heat.shape == (4, 96, 96)


class TestTiledTraining:
    """`tdn train --input-method tile`: tiles labelled by the masks, every card figure per frame."""

    @pytest.mark.slow
    def test_one_epoch_on_magnetic_tile_writes_a_per_frame_card(self, magnetic_tile: Path, neu_det: Path,
                                                                 tmp_path: Path) -> None:
        """A tiny tiled run: the card states the tile rule, counts images (not tiles) everywhere, applies the escape
        budget, and decides the other dataset's images per frame too."""
        from agent.geometry import InputSpec
        from agent.lab.data import Dataset, load_dataset
        from agent.lab.model.train import TrainConfig, train_and_ship

        ds = load_dataset(magnetic_tile)
        kept = tuple(s for c in range(len(ds.classes)) for s in [x for x in ds.samples if x.label == c][:8])
        sub = Dataset(ds.root, ds.layout, ds.classes, tuple(sorted(kept, key=lambda s: s.path)))
        cfg = TrainConfig(epochs=1, warmup_epochs=0, val_fraction=0.25, attention_weight=0.25,
                          pass_classes=("MT_Free",), escape_budget=1)
        shipped = Path(__file__).resolve().parents[2] / "agent" / "models" / "magnetic-tile.json"
        arch = ArchSpec.from_dict(json.loads(shipped.read_text())["architecture"])
        card = train_and_ship(sub, arch, cfg, tmp_path, data_root="subset", name="mt",
                              input_spec=InputSpec(200, "tile"), ood_check=(str(neu_det),))
        assert card["input"]["method"] == "tile" and "combine" in card["input"]
        assert "tiles(" in card["input"]["function"]
        n_val = card["validation"]["n"]
        assert n_val == 12 == card["decision"]["validation"]["n"]  # 2 per class, frames not tiles
        assert sum(map(sum, card["validation"]["confusion_matrix"])) == n_val
        tiles = card["training"]["tiles"]
        assert tiles["val_tiles"] > n_val and tiles["per_frame"] > 1
        assert "at most 1 defect escapes" in card["decision"]["how_chosen"]["pass_threshold"]
        cross = next(iter(card["ood"]["cross_dataset"].values()))
        assert cross["pass"] + cross["divert"] + cross["review"] == cross["n"]
