"""Tests for the NEU-DET / NEU-CLS loader and the splits, on the real images."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.errors import DataError
from agent.lab import data
from protocol import CLASSES


class TestScan:
    """Scanning finds every labelled image with its boxes."""

    def test_real_neu_det(self, neu_det: Path) -> None:
        """The training pool holds 240 images of each class, each with at least one box."""
        samples = data.scan(neu_det, require_boxes=True)
        assert Counter(s.class_name for s in samples) == dict.fromkeys(CLASSES, 240)
        assert all(s.boxes for s in samples)
        x0, y0, x1, y1 = samples[0].boxes[0]
        assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 200

    def test_neu_cls_names(self, neu_det: Path, tmp_path: Path) -> None:
        """NEU-CLS prefixes (Cr_, PS_, RS_, ...) map to the same class order."""
        src = sorted((neu_det / "IMAGES").glob("pitted_surface_*.jpg"))[0]
        img = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(tmp_path / "PS_1.bmp"), img)
        cv2.imwrite(str(tmp_path / "Cr_7.bmp"), img)
        labels = {s.path.name: s.class_name for s in data.scan(tmp_path)}
        assert labels == {"Cr_7.bmp": "crazing", "PS_1.bmp": "pitted_surface"}

    def test_missing_folder(self, tmp_path: Path) -> None:
        """A folder that does not exist is a DataError naming it."""
        with pytest.raises(DataError, match="not found"):
            data.scan(tmp_path / "nope")

    def test_unknown_class(self, tmp_path: Path) -> None:
        """An unknown class name is an error naming the file."""
        (tmp_path / "rust_1.jpg").write_bytes(b"x")
        with pytest.raises(DataError, match=r"rust_1\.jpg.*unknown class 'rust'"):
            data.scan(tmp_path)

    def test_boxes_required(self, tmp_path: Path, neu_det: Path) -> None:
        """Box metrics need ANNOTATIONS/: its absence is a clear error."""
        (tmp_path / "IMAGES").mkdir()
        shutil.copy(sorted((neu_det / "IMAGES").glob("*.jpg"))[0], tmp_path / "IMAGES")
        with pytest.raises(DataError, match="ANNOTATIONS"):
            data.scan(tmp_path, require_boxes=True)


class TestLoadImage:
    """Decoding gives 200x200 uint8 gray or an error naming the file."""

    def test_real_image(self, neu_det: Path) -> None:
        """A NEU-DET JPEG decodes to 200x200 uint8 with real texture."""
        img = data.load_image(sorted((neu_det / "IMAGES").glob("scratches_*.jpg"))[0])
        assert img.shape == (200, 200) and img.dtype == np.uint8 and img.std() > 1

    def test_corrupt_image(self, tmp_path: Path, neu_det: Path) -> None:
        """A truncated JPEG is an error naming the file, never skipped."""
        good = sorted((neu_det / "IMAGES").glob("*.jpg"))[0].read_bytes()
        bad = tmp_path / "IMAGES"
        bad.mkdir()
        (bad / "crazing_1.jpg").write_bytes(good[:50])
        samples = data.scan(tmp_path)
        with pytest.raises(DataError, match=r"crazing_1\.jpg: unreadable"):
            data.load_arrays(samples)

    def test_wrong_size(self, tmp_path: Path) -> None:
        """An image that is not 200x200 is refused with its size."""
        p = tmp_path / "patches_1.png"
        cv2.imwrite(str(p), np.zeros((100, 120), np.uint8))
        with pytest.raises(DataError, match="120x100"):
            data.load_image(p)


class TestSplits:
    """Splits are stratified, seeded and disjoint."""

    def test_stratified_split(self, neu_det: Path) -> None:
        """A 20% split holds 48 of each class, is disjoint and repeats with the same seed."""
        samples = data.scan(neu_det)
        train, val = data.stratified_split(samples, 0.2, seed=0)
        assert Counter(s.label for s in val) == dict.fromkeys(range(6), 48)
        assert not {s.path for s in train} & {s.path for s in val}
        assert data.stratified_split(samples, 0.2, seed=0)[1] == val
        assert data.stratified_split(samples, 0.2, seed=1)[1] != val

    def test_kfold_partitions(self, neu_det: Path) -> None:
        """The k validation folds partition the pool."""
        samples = data.scan(neu_det)
        folds = data.kfold(samples, 5, seed=0)
        vals = [s.path for _, v in folds for s in v]
        assert len(vals) == len(set(vals)) == len(samples)
