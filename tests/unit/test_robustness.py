"""`tdn robustness` on a small subset: the table, the JSON and the plot, with the decision rule of the card."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.lab import degrade, robustness


class TestDegradations:
    """The named severities do what their names say, deterministically."""

    def test_mild_is_the_issue_definition(self) -> None:
        assert {k: degrade.LEVELS[k][0] for k in degrade.KINDS} == {
            "gaussian_blur": 3, "motion_blur": 3, "noise": 4.0, "jpeg": 60, "brightness": 15.0, "contrast": 0.8,
            "rotation": 2.0, "shift": 6.0}

    @pytest.mark.parametrize("kind", degrade.KINDS)
    def test_stronger_changes_more(self, kind: str) -> None:
        """Each severity changes a textured image more than the one before, and repeats for the same seed."""
        rng = np.random.default_rng(0)
        img = np.clip(rng.normal(128, 40, (1, 200, 200)), 0, 255).astype(np.uint8)
        if kind in degrade.GEOMETRIC:
            # Moving i.i.d. noise by any amount changes it completely; a smooth image changes with the distance.
            img = cv2.GaussianBlur(img[0], (0, 0), 10)[None]
            img = cv2.normalize(img[0], None, 0, 255, cv2.NORM_MINMAX)[None]
        diffs = []
        for sev in degrade.SEVERITIES:
            out = degrade.apply_batch(img, degrade.named(kind, sev), seed=3)
            assert out.dtype == np.uint8 and out.shape == img.shape
            assert np.array_equal(out, degrade.apply_batch(img, degrade.named(kind, sev), seed=3))
            diffs.append(float(np.abs(out.astype(float) - img).mean()))
        assert diffs[0] > 0 and diffs == sorted(diffs)

    def test_geometric_moves_mask(self) -> None:
        """A shift moves the mask with the image."""
        img = np.zeros((200, 200), np.uint8)
        img[90:110, 90:110] = 255
        out, mask = degrade.Degradation("shift", 12.0).apply(img, np.random.default_rng(1), (img > 0).astype(np.uint8))
        assert mask is not None and ((out > 127) == (mask > 0)).mean() > 0.99


def test_robustness_runs_on_a_subset(tmp_path: Path, neu_det: Path, shipped_model: Path) -> None:
    """12 held-out images, two kinds x two severities: table, JSON with every cell, and a PNG plot."""
    p = argparse.ArgumentParser()
    robustness.add_arguments(p)
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    args = p.parse_args(["--model", str(shipped_model), "--data", str(neu_det), "--limit", "12",
                         "--kinds", "gaussian_blur,jpeg", "--severities", "mild,strong", "--json", str(js),
                         "--plot", str(png), "--quiet"])
    assert robustness.run(args) == 0
    out = json.loads(js.read_text())
    assert out["n"] == 12 and set(out["results"]) == {"clean", "gaussian_blur", "jpeg"}
    cell = out["results"]["jpeg"]["strong"]
    assert cell["n"] == 12 and cell["pass"] == 0 and cell["divert"] + cell["review"] == 12
    assert 0.0 <= out["summary"]["mean_degraded_accuracy"] <= 1.0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_robustness_decides_a_tiled_model_per_image(tmp_path: Path, magnetic_tile: Path) -> None:
    """The shipped Magnetic-tile model tiles: every cell counts images (not tiles), each decided by its tile."""
    model = Path(__file__).resolve().parents[2] / "agent" / "models" / "magnetic-tile.keras"
    p = argparse.ArgumentParser()
    robustness.add_arguments(p)
    js = tmp_path / "r.json"
    args = p.parse_args(["--model", str(model), "--data", str(magnetic_tile), "--limit", "12", "--kinds", "jpeg",
                         "--severities", "mild", "--json", str(js), "--plot", str(tmp_path / "r.png"), "--quiet"])
    assert robustness.run(args) == 0
    out = json.loads(js.read_text())
    for cell in (out["results"]["clean"], out["results"]["jpeg"]["mild"]):
        assert cell["n"] == 12 == cell["pass"] + cell["divert"] + cell["review"]
