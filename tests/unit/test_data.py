"""Tests for the dataset loader (NEU-DET, NEU-CLS, class-per-folder with masks) and the splits, on real images."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.errors import DataError
from agent.geometry import InputSpec
from agent.lab import data
from tests.conftest import mt_data_dir

NEU_CLASSES = data.NEU_CLASSES


class TestScan:
    """Scanning finds every labelled image with its boxes."""

    def test_real_neu_det(self, neu_det: Path) -> None:
        """The training pool holds 240 images of each class, each with at least one box."""
        samples = data.scan(neu_det, require_boxes=True)
        assert Counter(s.class_name for s in samples) == dict.fromkeys(NEU_CLASSES, 240)
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

    def test_any_size(self, tmp_path: Path) -> None:
        """An image of another size becomes the 200x200 input by the geometry function."""
        p = tmp_path / "patches_1.png"
        img = np.random.default_rng(0).integers(0, 256, (100, 120), dtype=np.uint8)
        cv2.imwrite(str(p), img)
        out = data.load_image(p)
        assert out.shape == (200, 200) and np.array_equal(out, cv2.resize(img, (200, 200),
                                                                          interpolation=cv2.INTER_AREA))

    def test_color_image(self, tmp_path: Path) -> None:
        """A color file is converted BGR -> gray, as the runtime does."""
        img = np.random.default_rng(1).integers(0, 256, (50, 80, 3), dtype=np.uint8)
        p = tmp_path / "c.png"
        cv2.imwrite(str(p), img)
        want = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (200, 200), interpolation=cv2.INTER_AREA)
        assert np.array_equal(data.load_image(p), want)


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


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


class TestClassPerFolder:
    """A folder per class, images at any depth and size, masks beside them as side data."""

    def _make(self, root: Path) -> None:
        rng = np.random.default_rng(0)
        _write(root / "good" / "a" / "b" / "g1.jpg", rng.integers(0, 256, (120, 300), dtype=np.uint8))
        _write(root / "good" / "g2.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
        _write(root / "crack" / "Imgs" / "c1.jpg", rng.integers(0, 256, (400, 250, 3), dtype=np.uint8))
        mask = np.zeros((400, 250), np.uint8)
        mask[100:104, 50:52] = 255
        _write(root / "crack" / "Imgs" / "c1.png", mask)

    def test_layout_classes_and_masks(self, tmp_path: Path) -> None:
        """Classes are the sorted top-level folders; the .png beside a .jpg is its mask, never a sample."""
        self._make(tmp_path)
        ds = data.load_dataset(tmp_path)
        assert ds.layout == "class-per-folder" and ds.classes == ("crack", "good")
        assert sorted(s.rel for s in ds.samples) == ["crack/Imgs/c1.jpg", "good/a/b/g1.jpg", "good/g2.png"]
        crack = next(s for s in ds.samples if s.name == "crack")
        assert crack.label == 0 and crack.mask == tmp_path / "crack" / "Imgs" / "c1.png"
        m = data.defect_mask(crack)
        assert m is not None and m.shape == (200, 200) and 0 < m.sum() < 40
        x, y = data.load_arrays(list(ds.samples))
        assert x.shape == (3, 200, 200, 1) and y.tolist() == [0, 1, 1]

    def test_empty_class(self, tmp_path: Path) -> None:
        """A class folder with no images is an error naming it."""
        self._make(tmp_path)
        (tmp_path / "empty" / "deep").mkdir(parents=True)
        (tmp_path / "empty" / "deep" / "notes.txt").write_text("x")
        with pytest.raises(DataError, match=r"empty: empty class"):
            data.load_dataset(tmp_path)

    def test_corrupt_file(self, tmp_path: Path) -> None:
        """An unreadable image is one error naming the file."""
        self._make(tmp_path)
        (tmp_path / "good" / "bad.jpg").write_bytes(b"\xff\xd8not a jpeg")
        samples = data.scan(tmp_path)
        with pytest.raises(DataError, match=r"bad\.jpg: unreadable"):
            data.load_arrays(samples)

    def test_unknown_layout(self, tmp_path: Path) -> None:
        """Neither images nor class folders, or both side by side: one error naming the folder."""
        (tmp_path / "README.md").write_text("x")
        with pytest.raises(DataError, match="unknown layout"):
            data.load_dataset(tmp_path)
        _write(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
        _write(tmp_path / "cls" / "y.png", np.zeros((4, 4), np.uint8))
        with pytest.raises(DataError, match="unknown layout"):
            data.load_dataset(tmp_path)

    def test_split_is_stratified_and_seeded(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        for c, n in (("a", 30), ("b", 10)):
            for i in range(n):
                _write(tmp_path / c / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
        samples = data.scan(tmp_path)
        train, val = data.stratified_split(samples, 0.2, 3)
        assert Counter(s.name for s in val) == {"a": 6, "b": 2}
        assert data.stratified_split(samples, 0.2, 3) == (train, val)


class TestMagneticTile:
    """The real Magnetic-tile pool (TDN_MT_DATA)."""

    def test_real_magnetic_tile(self) -> None:
        root = mt_data_dir()
        ds = data.load_dataset(root)
        assert ds.layout == "class-per-folder"
        assert ds.counts() == {"MT_Blowhole": 92, "MT_Break": 68, "MT_Crack": 46, "MT_Fray": 26, "MT_Free": 762,
                               "MT_Uneven": 82}
        assert all(s.mask is not None for s in ds.samples)
        blow = next(s for s in ds.samples if s.name == "MT_Blowhole")
        free = next(s for s in ds.samples if s.name == "MT_Free")
        m = data.defect_mask(blow)
        assert m is not None and m.any() and data.defect_mask(free) is None
        img = data.load_image(blow.path, InputSpec())
        assert img.shape == (200, 200) and img.dtype == np.uint8

    def test_tiles_are_labelled_by_the_mask(self) -> None:
        """Tiling a defective image: tiles holding its defect keep its class, the others are the pass class;
        load_frames gives one label per image and each tile's image, contiguous."""
        ds = data.load_dataset(mt_data_dir())
        free = ds.classes.index("MT_Free")
        spec = InputSpec(200, "tile")
        blow = [s for s in ds.samples if s.name == "MT_Blowhole"][:20]
        t = data.load_tiles(blow, spec, pass_label=free)
        assert t.x.shape[1:] == (200, 200, 1) and len(t.x) == len(t.y) == len(t.frame) > len(blow)
        assert np.array_equal(t.frame, np.sort(t.frame)) and set(t.frame.tolist()) == set(range(len(blow)))
        for i, s in enumerate(blow):
            rows = np.flatnonzero(t.frame == i)
            labels = set(t.y[rows].tolist())
            assert s.label in labels and labels <= {s.label, free}
            # an attention mask is the defect inside a defect tile, all ones in a pass tile
            assert all(t.masks[r].all() for r in rows if t.y[r] == free)
        assert (t.y == free).any()  # some tile of these 20 holds no blowhole
        x, y, frame = data.load_frames(blow, spec)
        assert frame is not None and np.array_equal(x, t.x) and np.array_equal(frame, t.frame)
        assert y.tolist() == [s.label for s in blow]
        x1, _, f1 = data.load_frames(blow[:3], InputSpec())
        assert f1 is None and x1.shape == (3, 200, 200, 1)

    def test_held_out_matches_card(self) -> None:
        """held_out re-draws a card's split and checks its hash; a mismatch falls back and says so."""
        ds = data.load_dataset(mt_data_dir())
        train, val = data.stratified_split(list(ds.samples), 0.2, 0)
        card = {"training": {"seed": 0, "config": {"val_fraction": 0.2}},
                "validation": {"files_hash": data.file_list_hash(val)}}
        tr, va, how = data.held_out(card, list(ds.samples))
        assert (tr, va) == (train, val) and "held-out split" in how
        card["validation"]["files_hash"] = "0" * 16
        assert "may include training images" in data.held_out(card, list(ds.samples))[2]
