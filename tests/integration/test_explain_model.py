"""Integration tests of heatmap explanations and the audit with the shipped model on real NEU-DET images."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.explain import cam, normalize_maps
from agent.lab import audit
from agent.lab.data import Sample, load_arrays, scan
from agent.lab.explain import BackendExplainer, Explainer, cam_weights, features_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# TDN_MODEL lets CI audit a candidate model; by default the test is about the one we ship.
MODEL = Path(os.environ.get("TDN_MODEL", REPO / "agent" / "models" / "tinydefectnet.keras"))
JSON_KEYS = {
    "n", "accuracy", "pointing_game", "energy_in_boxes", "box_area_share", "impact", "per_class", "seconds",
    "method", "errors",
}  # fmt: skip
CLASS_KEYS = {"n", "accuracy", "pointing_game", "energy_in_boxes", "box_area_share"}


def data_root() -> Path:
    env = os.environ.get("TDN_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "neu-det"
    if not root.is_dir():
        if env:
            pytest.fail(f"TDN_DATA={env} is not a folder")
        pytest.skip(f"NEU-DET not found at {root}; set TDN_DATA")
    return root


@pytest.fixture(scope="module")
def model() -> Any:
    if not MODEL.is_file():
        pytest.fail(f"shipped model {MODEL} is missing; train it with `tdn train`")
    return audit.load_model(MODEL)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    # Two images per class, spread over the file list.
    return audit.interleave_by_class(scan(data_root(), require_boxes=True))[:12]


@pytest.fixture(scope="module")
def images(samples: list[Sample]) -> np.ndarray:
    return load_arrays(samples)[0]


@pytest.fixture(scope="module")
def cam_explainer(model: Any) -> Explainer:
    return Explainer(model, "cam")


@pytest.fixture(scope="module")
def gradcam_explainer(model: Any) -> Explainer:
    return Explainer(model, "gradcam", batch=8)


def check_heatmaps(probs: np.ndarray, heat: np.ndarray, n: int) -> None:
    assert probs.shape == (n, 6) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert heat.shape == (n, 200, 200) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and (heat.max(axis=(1, 2)) == 1).all()


class TestExplainer:
    def test_cam_shape_range_and_determinism(self, cam_explainer: Explainer, images: np.ndarray) -> None:
        """CAM heatmaps are [N,200,200] in [0,1], each reaching 1, and identical on a second run."""
        p1, h1 = cam_explainer.explain(images)
        p2, h2 = cam_explainer.explain(images)
        check_heatmaps(p1, h1, len(images))
        assert np.array_equal(h1, h2) and np.array_equal(p1, p2)

    def test_gradcam_determinism(self, gradcam_explainer: Explainer, images: np.ndarray) -> None:
        """Grad-CAM heatmaps are valid and identical on a second run (batched over 8 + 4 images)."""
        p1, h1 = gradcam_explainer.explain(images)
        _, h2 = gradcam_explainer.explain(images)
        check_heatmaps(p1, h1, len(images))
        assert np.array_equal(h1, h2)

    def test_gradcam_equals_cam_for_gap_dense_head(
        self, cam_explainer: Explainer, gradcam_explainer: Explainer, images: np.ndarray
    ) -> None:
        """Through GAP + dense the logit gradient is w/(h*w) everywhere, so normalised Grad-CAM equals CAM."""
        pc, hc = cam_explainer.explain(images)
        pg, hg = gradcam_explainer.explain(images)
        assert np.allclose(pc, pg, atol=1e-6)
        assert np.abs(hc - hg).max() <= 1e-4

    def test_explicit_class_changes_the_map(self, cam_explainer: Explainer, images: np.ndarray) -> None:
        """Explaining the predicted class explicitly equals the default; another class gives another map."""
        probs, heat = cam_explainer.explain(images[:4])
        pred = probs.argmax(1)
        assert np.array_equal(cam_explainer.explain(images[:4], pred)[1], heat)
        other = (pred + 1) % 6
        assert not np.array_equal(cam_explainer.explain(images[:4], other)[1], heat)

    @pytest.mark.parametrize("method", ["gradcampp", "ig", "cam-ig"])
    def test_finer_methods_give_valid_maps(self, model: Any, images: np.ndarray, method: str) -> None:
        """Grad-CAM++ and integrated gradients return valid, deterministic maps with the model's probabilities."""
        ex = Explainer(model, method, batch=32)
        p, h = ex.explain(images[:2])
        check_heatmaps(p, h, 2)
        assert np.array_equal(ex.explain(images[:2])[1], h)
        assert np.allclose(p, np.asarray(model(images[:2])), atol=1e-5)

    def test_cam_ig_is_the_product_of_cam_and_ig(self, model: Any, images: np.ndarray) -> None:
        """cam-ig's map is the normalised product of the CAM and the IG maps of the same class."""
        _, c = Explainer(model, "cam").explain(images[:2])
        _, g = Explainer(model, "ig").explain(images[:2])
        ex = Explainer(model, "cam-ig")
        feats = np.asarray(features_model(model)(images[:1])[1])
        assert ex.grid is None and Explainer(model, "cam").grid == feats.shape[1]
        assert np.abs(ex.explain(images[:2])[1] - normalize_maps(c * g)).max() <= 1e-5

    @pytest.mark.parametrize("method", ["cam", "shift-cam", "gradcam", "ig", "cam-ig"])
    def test_a_model_of_another_input_size_is_explained_at_its_size(self, method: str) -> None:
        """A model trained with `tdn train --input-size 96` gets 96x96 heatmaps, not a shape error."""
        from agent.lab.model.arch import ArchSpec, Stage, build

        net = build(ArchSpec(stem_width=8, stages=(Stage(8, stride=2),)), batchnorm=False, size=96)
        x = np.random.default_rng(0).uniform(0, 255, (3, 96, 96, 1)).astype(np.float32)
        ex = Explainer(net, method)
        p, h = ex.explain(x)
        assert ex.size == 96 and p.shape == (3, 6) and h.shape == (3, 96, 96)
        assert np.isfinite(h).all() and h.min() >= 0.0 and h.max() <= 1.0
        with pytest.raises(ValueError, match=r"\[N,96,96,1\]"):
            ex.explain(np.zeros((1, 200, 200, 1), np.float32))

    def test_gradcam_on_an_earlier_layer(self, model: Any, images: np.ndarray) -> None:
        """Grad-CAM can target another conv layer's output, e.g. the first stage's."""
        ex = Explainer(model, "gradcam", layer="s1b1_out")
        check_heatmaps(*ex.explain(images[:2]), 2)


class TestLeanBackendPath:
    def test_features_model_plus_cam_matches_explainer(
        self, model: Any, cam_explainer: Explainer, images: np.ndarray
    ) -> None:
        """A backend running features_model and calling the pure cam() gets the Explainer's maps and probs."""
        probs, feats = (np.asarray(t) for t in features_model(model)(images))
        kernel, _ = cam_weights(model)
        p, h = cam_explainer.explain(images)
        assert np.allclose(probs, p, atol=1e-6)
        assert np.abs(cam(feats, kernel, probs.argmax(1)) - h).max() <= 1e-5

    def test_the_agent_publishes_the_audits_shift_cam(self, model: Any, tf_backend: Any, images: np.ndarray
                                                        ) -> None:
        """The agent's explainer (agent.explain.frame_cam on a loaded backend) draws the map `tdn audit` scores."""
        from agent.explain import AGENT_METHOD, frame_cam

        ex = Explainer(model, AGENT_METHOD)
        probs, heat = ex.explain(images[:3])
        for img, p, h in zip(images[:3], probs, heat, strict=True):
            agent_map = frame_cam(tf_backend, img[:, :, 0].astype(np.uint8), int(p.argmax()))
            assert agent_map.shape == (200, 200) and np.abs(agent_map - h).max() <= 1e-4
        _, plain = Explainer(model, "cam").explain(images[:3])
        assert np.abs(plain - heat).max() > 0.05  # the shifts do change the map

    @pytest.mark.parametrize("method", ["shift-cam-detail", "cam-detail", "shift-cam-smooth", "cam-smooth"])
    def test_the_agent_publishes_the_audits_refined_maps(self, model: Any, tf_backend: Any, images: np.ndarray,
                                                         method: str) -> None:
        """frame_cam's refined methods and their one-pass fallbacks draw the audit's maps, and the refinement changes
        them (where it moves a peak is TestDetailRefined's and TestSmoothed's)."""
        from agent.explain import frame_cam

        coarse_method = method.rsplit("-", 1)[0]
        probs, heat = Explainer(model, method).explain(images[:3])
        _, coarse = Explainer(model, coarse_method).explain(images[:3])
        for img, p, h in zip(images[:3], probs, heat, strict=True):
            agent_map = frame_cam(tf_backend, img[:, :, 0].astype(np.uint8), int(p.argmax()), method)
            assert np.abs(agent_map - h).max() <= 1e-4
        assert np.abs(heat - coarse).max() > 0.05


@pytest.fixture(scope="module")
def tf_backend() -> Any:
    from agent.backends import create

    backend = create("tensorflow", MODEL)
    backend.load()
    return backend


class TestBackendExplainer:
    @pytest.mark.parametrize("method", ["cam", "cam-detail", "cam-smooth", "shift-cam", "shift-cam-detail",
                                        "shift-cam-smooth"])
    def test_equals_the_keras_explainer(self, model: Any, tf_backend: Any, images: np.ndarray, method: str) -> None:
        """On a loaded fp32 backend the audit's backend explainer gives the Keras explainer's probabilities and maps."""
        keras_ex, backend_ex = Explainer(model, method), BackendExplainer(tf_backend, method)
        p, h = keras_ex.explain(images[:4])
        bp, bh = backend_ex.explain(images[:4])
        assert np.abs(bp - p).max() <= 1e-5 and np.abs(bh - h).max() <= 1e-4
        assert backend_ex.grid == keras_ex.grid and backend_ex.size == 200
        assert np.abs(backend_ex.predict(images[:4]) - p).max() <= 1e-5
        other = (p.argmax(1) + 1) % 6
        assert np.abs(backend_ex.explain(images[:4], other)[1] - keras_ex.explain(images[:4], other)[1]).max() <= 1e-4

    def test_refuses_what_needs_gradients_and_bad_classes(self, tf_backend: Any, images: np.ndarray) -> None:
        """A gradient method, or a class index the model lacks, is a ValueError that says why."""
        with pytest.raises(ValueError, match="no gradients"):
            BackendExplainer(tf_backend, "cam-ig")
        with pytest.raises(ValueError, match=r"class indices in 0\.\.5"):
            BackendExplainer(tf_backend, "cam").explain(images[:2], [0, 6])


class TestSyntheticBlob:
    # The defect is a dark 20x20 spot, like NEU-DET's inclusions and pits. A *bright* blob on flat gray is nothing
    # the model was trained on: it then looks at the image borders (where padding breaks the flat texture), and
    # pasted onto a real NEU-DET texture the real defect dominates, so neither would test the explanation.
    CORNERS = ((120, 50), (40, 130), (150, 140))  # top-left (row, col) of the blob in the three images

    def images(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        img = np.clip(rng.normal(127.5, 6.0, (len(self.CORNERS), 200, 200, 1)), 0, 255).astype(np.float32)
        for i, (r, c) in enumerate(self.CORNERS):
            img[i, r : r + 20, c : c + 20] = 30.0
        return img

    def boxes(self, slack: int) -> list[tuple[int, int, int, int]]:
        return [(c + 1 - slack, r + 1 - slack, c + 20 + slack, r + 20 + slack) for r, c in self.CORNERS]

    @pytest.mark.parametrize("method", ["cam", "shift-cam", "gradcam", "ig", "cam-ig"])
    def test_pointing_game_finds_a_dark_blob(self, model: Any, method: str) -> None:
        """On mid-gray noise with one dark blob the heatmap maximum lies on the blob (CAM: within 10 px)."""
        # The last feature map is 13x13, so a CAM peak can sit up to about half a ~15 px cell off the blob.
        slack = 0 if method in ("ig", "cam-ig") else 10
        _, heat = Explainer(model, method).explain(self.images())
        for h, box in zip(heat, self.boxes(slack), strict=True):
            peak = np.unravel_index(h.argmax(), h.shape)
            assert audit.pointing_hit(h, [box]), f"{method}: maximum at (row, col) {peak}, blob box {box}"


class TestAuditRun:
    def test_run_writes_json_and_html(self, tmp_path: Path) -> None:
        """`tdn audit --limit 12` writes the JSON with every key, the HTML report and the grids."""
        parser = argparse.ArgumentParser()
        audit.add_arguments(parser)
        out, js = tmp_path / "audit", tmp_path / "audit.json"
        args = parser.parse_args(
            ["--data", str(data_root()), "--model", str(MODEL), "--limit", "12", "--method", "gradcam",
             "--per-class", "1", "--out", str(out), "--json", str(js)]
        )  # fmt: skip
        assert audit.run(args) == 0
        report = json.loads(js.read_text())
        assert report.keys() >= JSON_KEYS and report["n"] == 12 and report["method"] == "gradcam"
        assert set(report["impact"]) == {"top5", "top10", "top20", "random5", "random10", "random20"}
        rates = [report[k] for k in ("accuracy", "pointing_game", "energy_in_boxes", "box_area_share")]
        assert all(0.0 <= v <= 1.0 for v in rates + list(report["impact"].values()))
        assert all(v.keys() >= CLASS_KEYS and v["n"] == 2 for v in report["per_class"].values())
        html = (out / "report.html").read_text()
        assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
        assert len(list(out.glob("samples_*.png"))) == 6

    def test_a_tiling_model_is_audited_on_its_deciding_tiles(self, tmp_path: Path, magnetic_tile: Path) -> None:
        """The tile model: one result per image (not per tile), each on a 200x200 deciding tile, pointing against
        the part of the mask inside it; its decision is the agent's (accuracy equals the frame-level one)."""
        from agent.decision import pass_mask_of
        from agent.geometry import InputSpec, combine, tiles, to_input
        from agent.lab.data import read_gray

        mt = MODEL.parent / "magnetic-tile.keras"
        card = json.loads(mt.with_suffix(".json").read_text())
        parser = argparse.ArgumentParser()
        audit.add_arguments(parser)
        js = tmp_path / "audit.json"
        args = parser.parse_args(["--data", str(magnetic_tile), "--model", str(mt), "--split", "val", "--limit", "12",
                                  "--per-class", "1", "--out", str(tmp_path / "audit"), "--json", str(js)])
        assert audit.run(args) == 0
        report = json.loads(js.read_text())
        assert report["n"] == 12 and report["n_with_boxes"] == 10 and report["localisation"] == "pixel masks"
        # the same frames decided by hand from the card: the audit's accuracy is theirs
        samples = sorted(audit.interleave_by_class(audit.select_split(
            list(audit.load_dataset(magnetic_tile).samples), mt, "val"))[:12], key=lambda s: s.path)
        spec, mask = InputSpec.from_card(card["input"]), pass_mask_of(card["classes"], card["pass_classes"])
        model = audit.load_model(mt)
        right = 0
        for s in samples:
            p = model.predict(np.stack(tiles(to_input(read_gray(s.path), spec), 200))[..., None].astype(np.float32),
                              verbose=0)
            right += int(p[combine(p, mask)].argmax() == s.label)
        assert report["accuracy"] == pytest.approx(right / 12)

    def test_choose_method_writes_what_the_agent_publishes(self, tmp_path: Path, magnetic_tile: Path) -> None:
        """--choose-method --write-card scores each publishable method as a plain audit of it does, records the best
        in a copy of the tile model's card, and from then on the agent and the audit's default use it."""
        import shutil

        from agent import card as cards
        from agent.errors import ConfigError

        src = MODEL.parent / "magnetic-tile.keras"
        mt = tmp_path / "mt.keras"
        shutil.copy(src, mt)
        raw = json.loads(src.with_suffix(".json").read_text())
        raw.pop("explanation", None)
        mt.with_suffix(".json").write_text(json.dumps(raw))
        parser = argparse.ArgumentParser()
        audit.add_arguments(parser)
        common = ["--data", str(magnetic_tile), "--model", str(mt), "--split", "val", "--limit", "24",
                  "--per-class", "0", "--seeds", "0"]
        assert cards.read(mt).explain_method == "shift-cam"
        with pytest.raises(ConfigError, match="--choose-method"):
            audit.run(parser.parse_args([*common, "--write-card"]))
        assert audit.run(parser.parse_args([*common, "--choose-method", "--write-card"])) == 0
        block = json.loads(mt.with_suffix(".json").read_text())["explanation"]
        scores = {m: v["pointing_game"] for m, v in block["pointing_game"].items()}
        assert set(scores) == set(audit.PUBLISHABLE) and block["method"] == max(scores, key=scores.__getitem__)
        for method, score in scores.items():
            js = tmp_path / f"{method}.json"
            audit.run(parser.parse_args([*common, "--method", method, "--out", str(tmp_path / method),
                                         "--json", str(js)]))
            assert json.loads(js.read_text())["pointing_game"] == score, method
        assert cards.read(mt).explain_method == block["method"]
        js = tmp_path / "default.json"
        audit.run(parser.parse_args([*common, "--out", str(tmp_path / "default"), "--json", str(js)]))
        assert json.loads(js.read_text())["method"] == block["method"]

    def test_whole_frame_scores_the_published_map_of_every_defective_frame(self, tmp_path: Path,
                                                                          magnetic_tile: Path) -> None:
        """--whole-frame scores the agent's own frame_cam over each frame's whole mask: the same defective frames the
        deciding-tile audit counts, with the card's method; a one-input model and a method mix are refused."""
        from agent.errors import ConfigError

        mt = MODEL.parent / "magnetic-tile.keras"
        parser = argparse.ArgumentParser()
        audit.add_arguments(parser)
        common = ["--data", str(magnetic_tile), "--model", str(mt), "--split", "val", "--limit", "12"]
        js = tmp_path / "frames.json"
        assert audit.run(parser.parse_args([*common, "--whole-frame", "--json", str(js)])) == 0
        report = json.loads(js.read_text())
        assert report["whole_frame"] and report["n_with_boxes"] == 10 and 0.0 <= report["pointing_game"] <= 1.0
        assert report["method"] == json.loads(mt.with_suffix(".json").read_text())["explanation"]["method"]
        assert report["backend"]["backend"] == "tensorflow"
        assert sum(v["n_with_boxes"] for v in report["per_class"].values()) == 10
        with pytest.raises(ConfigError, match="tiling model"):
            audit.run(parser.parse_args(["--data", str(data_root()), "--model", str(MODEL), "--whole-frame"]))
        with pytest.raises(ConfigError, match="--choose-method"):
            audit.run(parser.parse_args([*common, "--whole-frame", "--choose-method"]))

    def test_audits_the_maps_a_serving_backend_computes(self, tmp_path: Path) -> None:
        """--backend tensorflow scores the same as the Keras audit and says which runtime drew the maps; an int8
        variant is audited as it serves, and a gradient method on a backend is refused before anything loads."""
        from agent import card as cards
        from agent.errors import ConfigError

        parser = argparse.ArgumentParser()
        audit.add_arguments(parser)
        common = ["--data", str(data_root()), "--model", str(MODEL), "--split", "val", "--limit", "12",
                  "--per-class", "0", "--seeds", "1"]
        reports = {}
        for name in ("keras", "tensorflow", "litert:int8"):
            js = tmp_path / f"{name}.json"
            extra = [] if name == "keras" else ["--backend", name]
            args = parser.parse_args([*common, *extra, "--out", str(tmp_path / name), "--json", str(js)])
            assert audit.run(args) == 0
            reports[name] = json.loads(js.read_text())
        k, t, q = reports["keras"], reports["tensorflow"], reports["litert:int8"]
        published = cards.read(MODEL).explain_method
        assert k["backend"] == "keras" and k["method"] == t["method"] == q["method"] == published
        assert t["backend"]["backend"] == "tensorflow" and q["backend"]["precision"] == "int8"
        for key in ("accuracy", "pointing_game", "impact"):
            assert t[key] == k[key], key
        assert t["energy_in_boxes"] == pytest.approx(k["energy_in_boxes"], abs=1e-5)
        assert q["n"] == 12 and abs(q["energy_in_boxes"] - k["energy_in_boxes"]) < 0.05
        assert "litert int8" in (tmp_path / "litert:int8" / "report.html").read_text()
        args = parser.parse_args([*common, "--backend", "litert", "--method", "cam-ig"])
        with pytest.raises(ConfigError, match="no gradients"):
            audit.run(args)

    def test_split_val_is_the_model_cards_hold_out(self) -> None:
        """--split val selects exactly the images the model card says were held out."""
        card = json.loads(MODEL.with_suffix(".json").read_text())
        val = audit.select_split(scan(data_root(), require_boxes=True), MODEL, "val")
        assert len(val) == card["validation"]["n"]


class TestContrastiveIg:
    # The NEU-DET model has no pass class; pretending "patches" (2) passes exercises the contrastive target.
    PASS = 2

    def test_target_weights(self, model: Any) -> None:
        """A defect class is its logit minus the pass class's; a pass class is its own logit; no pass class, plain."""
        w = Explainer(model, "ig", pass_classes=[self.PASS]).target_weights(np.array([0, self.PASS, 5]))
        expected = np.eye(6, dtype=np.float32)[[0, self.PASS, 5]]
        expected[[0, 2], self.PASS] -= 1.0
        assert np.array_equal(w, expected)
        assert np.array_equal(Explainer(model, "ig").target_weights(np.array([0, 5])), np.eye(6)[[0, 5]])

    def test_defect_maps_change_and_pass_maps_do_not(self, model: Any, images: np.ndarray) -> None:
        """With a pass class, IG maps of a defect class differ from the plain ones; those of the pass class match."""
        plain, contrast = Explainer(model, "ig"), Explainer(model, "ig", pass_classes=[self.PASS])
        x = images[:2]
        assert not np.allclose(plain.explain(x, [0, 0])[1], contrast.explain(x, [0, 0])[1], atol=1e-3)
        assert np.abs(plain.explain(x, [self.PASS] * 2)[1] - contrast.explain(x, [self.PASS] * 2)[1]).max() <= 1e-5

    def test_rejects_a_pass_class_out_of_range(self, model: Any) -> None:
        """A pass class index the model does not have is a ValueError naming the range."""
        with pytest.raises(ValueError, match=r"0\.\.5"):
            Explainer(model, "ig", pass_classes=[6])


class TestExplainBench:
    def test_times_both_methods_on_held_out_frames(self, tmp_path: Path) -> None:
        """`tdn bench explain --frames 2` times cam, shift-cam, the card's method and its fallback on a loaded
        backend and writes the JSON."""
        from agent import card as cards
        from agent.explain import ONE_PASS
        from agent.lab.bench import explain as bench

        parser = argparse.ArgumentParser()
        bench.add_arguments(parser)
        js = tmp_path / "explain.json"
        args = parser.parse_args(["--model", str(MODEL), "--data", str(data_root()), "--backend", "tensorflow",
                                  "--frames", "2", "--repeats", "1", "--json", str(js)])
        assert bench.run(args) == 0
        r = json.loads(js.read_text())
        assert r["frames"] == 2 and r["backend"]["backend"] == "tensorflow" and r["tiles_per_frame"] == 1.0
        published = cards.read(MODEL).explain_method
        fallback = ONE_PASS.get(published, published)
        assert r["published"] == published and r["fallback"] == fallback
        assert set(r["median_ms"]) == {"cam", "shift-cam", published, fallback}
        assert all(v > 0 for v in r["median_ms"].values())
        assert r["ratio"] == pytest.approx(r["median_ms"][published] / r["median_ms"][fallback])
