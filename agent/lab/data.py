"""NEU-DET and NEU-CLS loading: class from file name, boxes from Pascal-VOC XML, stratified splits."""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.errors import DataError
from protocol import CLASSES, NEU_CLS_PREFIXES

IMAGE_SIZE = 200
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".bmp", ".png"}

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in pixels, inclusive as VOC writes them

REPO_DATA = Path(__file__).resolve().parents[3] / "shared" / "neu-det"


def default_data() -> str | None:
    """The NEU-DET folder from TDN_DATA, else ../shared/neu-det beside the checkout when it exists."""
    env = os.environ.get("TDN_DATA")
    if env:
        return env
    return str(REPO_DATA) if REPO_DATA.is_dir() else None


@dataclass(frozen=True)
class Sample:
    """One labelled image file, with the defect boxes when the folder has annotations."""

    path: Path
    label: int
    boxes: tuple[Box, ...] = field(default=())

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


def class_of(path: Path) -> int:
    """Class index from a NEU-DET (`crazing_12.jpg`) or NEU-CLS (`Cr_12.bmp`) file name."""
    stem = path.stem
    if "_" not in stem:
        raise DataError(f"{path}: file name has no '<class>_<n>' form")
    name = stem.rsplit("_", 1)[0]
    name = NEU_CLS_PREFIXES.get(name, name)
    if name not in CLASSES:
        raise DataError(f"{path}: unknown class {name!r} (expected one of {', '.join(CLASSES)})")
    return CLASSES.index(name)


def read_boxes(xml_path: Path) -> tuple[Box, ...]:
    """Pascal-VOC boxes of one annotation file."""
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{xml_path}: unreadable annotation ({exc})") from exc
    boxes: list[Box] = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{xml_path}: <object> without <bndbox>")
        try:
            coords = [int(float(bb.findtext(k, ""))) for k in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as exc:
            raise DataError(f"{xml_path}: non-numeric box coordinate") from exc
        x0, y0, x1, y1 = coords
        boxes.append((x0, y0, x1, y1))
    return tuple(boxes)


def scan(root: Path | str, *, require_boxes: bool = False) -> list[Sample]:
    """All labelled images of a NEU-DET folder (IMAGES/ + ANNOTATIONS/) or a flat NEU-CLS folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    img_dir = root / "IMAGES" if (root / "IMAGES").is_dir() else root
    ann_dir = root / "ANNOTATIONS"
    paths = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"{img_dir}: no images (*.jpg, *.bmp, *.png) found")
    if require_boxes and not ann_dir.is_dir():
        raise DataError(f"{root}: no ANNOTATIONS/ folder; box metrics need NEU-DET annotations")
    samples = []
    for p in paths:
        boxes: tuple[Box, ...] = ()
        xml = ann_dir / (p.stem + ".xml")
        if ann_dir.is_dir():
            if xml.is_file():
                boxes = read_boxes(xml)
            elif require_boxes:
                raise DataError(f"{p}: no annotation {xml.name} in {ann_dir}")
        samples.append(Sample(p, class_of(p), boxes))
    return samples


def load_image(path: Path | str) -> np.ndarray:
    """Decode one image to 200x200 uint8 grayscale, or raise naming the file."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(f"{path}: unreadable or corrupt image")
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    return img


def load_arrays(samples: Sequence[Sample], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N,200,200,1] of raw 0..255 values, and int labels [N]."""
    it: Iterator[Sample] | Sequence[Sample] = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="loading images", unit="img", leave=False)
    x = np.empty((len(samples), IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    for i, s in enumerate(it):
        x[i, :, :, 0] = load_image(s.path)
    y = np.array([s.label for s in samples], np.int64)
    return x, y


def box_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    """Union of the boxes as a bool [h,w] mask.

    VOC boxes are 1-based and inclusive (NEU-DET's reach 200 on a 200-pixel image), so (1,1,200,200) is the
    whole image.
    """
    h, w = shape
    mask = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = max(int(x0) - 1, 0), max(int(y0) - 1, 0)
        c1, r1 = min(int(x1), w), min(int(y1), h)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def file_list_hash(samples: Sequence[Sample]) -> str:
    """A short hash of the sorted file names, so a model card names exactly what it was trained on."""
    h = hashlib.sha256("\n".join(sorted(s.path.name for s in samples)).encode())
    return h.hexdigest()[:16]


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split that keeps each class's share the same in both parts."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for c in range(len(CLASSES)):
        group = [s for s in samples if s.label == c]
        order = rng.permutation(len(group))
        n_val = round(len(group) * val_fraction)
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return sorted(train, key=lambda s: s.path), sorted(val, key=lambda s: s.path)


def kfold(samples: Sequence[Sample], k: int, seed: int) -> list[tuple[list[Sample], list[Sample]]]:
    """Seeded stratified k-fold: k (train, val) pairs whose val parts partition the samples."""
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    rng = np.random.default_rng(seed)
    folds: list[list[Sample]] = [[] for _ in range(k)]
    for c in range(len(CLASSES)):
        group = [s for s in samples if s.label == c]
        for j, i in enumerate(rng.permutation(len(group))):
            folds[j % k].append(group[i])
    out = []
    for i in range(k):
        val = sorted(folds[i], key=lambda s: s.path)
        train = sorted((s for j, f in enumerate(folds) if j != i for s in f), key=lambda s: s.path)
        out.append((train, val))
    return out
