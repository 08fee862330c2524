"""Datasets (NEU-DET, NEU-CLS, class-per-folder), masks and VOC boxes as side data, seeded stratified splits."""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.errors import DataError
from agent.geometry import InputSpec, mask_to_input, to_gray, to_input

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".bmp", ".png", ".tif", ".tiff"}
# A .png beside a photo with the same stem is that photo's defect mask (Magnetic-tile's convention), not a sample.
MASK_SUFFIX = ".png"
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}

# NEU-DET names its files by class; NEU-CLS by a short prefix. These layouts fix the class order.
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
NEU_CLS_PREFIXES = {"Cr": "crazing", "In": "inclusion", "Pa": "patches", "PS": "pitted_surface",
                    "RS": "rolled-in_scale", "Sc": "scratches"}
LAYOUTS = ("neu-det", "neu-cls", "class-per-folder")

Box = tuple[int, int, int, int]  # xmin, ymin, xmax, ymax in pixels, inclusive as VOC writes them

DEFAULT_SPEC = InputSpec()


@dataclass(frozen=True)
class Sample:
    """One labelled image file; label indexes its dataset's class list. Boxes (VOC) or a mask file are optional."""

    path: Path
    label: int
    boxes: tuple[Box, ...] = field(default=())
    mask: Path | None = None
    name: str = ""  # the class name
    rel: str = ""  # path under the dataset root (class-per-folder), for file-list hashes

    @property
    def class_name(self) -> str:
        return self.name

    @property
    def localised(self) -> bool:
        """Has side data saying where the defect is (boxes or a mask file)."""
        return bool(self.boxes) or self.mask is not None


@dataclass(frozen=True)
class Dataset:
    """A scanned folder: its layout, its class list (the model's output order) and its samples, sorted."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.classes, 0)
        for s in self.samples:
            out[s.name] += 1
        return out


def class_of(path: Path) -> int:
    """NEU class index from a NEU-DET (`crazing_12.jpg`) or NEU-CLS (`Cr_12.bmp`) file name."""
    stem = path.stem
    if "_" not in stem:
        raise DataError(f"{path}: file name has no '<class>_<n>' form")
    name = stem.rsplit("_", 1)[0]
    name = NEU_CLS_PREFIXES.get(name, name)
    if name not in NEU_CLASSES:
        raise DataError(f"{path}: unknown class {name!r} (expected one of {', '.join(NEU_CLASSES)})")
    return NEU_CLASSES.index(name)


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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _neu(root: Path, require_boxes: bool) -> Dataset:
    img_dir = root / "IMAGES" if (root / "IMAGES").is_dir() else root
    layout = "neu-det" if img_dir != root else "neu-cls"
    ann_dir = root / "ANNOTATIONS"
    paths = _images_in(img_dir)
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
        label = class_of(p)
        samples.append(Sample(p, label, boxes, name=NEU_CLASSES[label]))
    return Dataset(root, layout, NEU_CLASSES, tuple(samples))


def _class_folder(root: Path, class_dir: Path, label: int) -> list[Sample]:
    """Every image under class_dir at any depth; a .png sharing a photo's stem is that photo's mask."""
    out: list[Sample] = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        files = [folder / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        photos = {p.stem for p in files if p.suffix.lower() in PHOTO_SUFFIXES}
        for p in sorted(files):
            if p.suffix.lower() == MASK_SUFFIX and p.stem in photos:
                continue
            mask = folder / (p.stem + MASK_SUFFIX)
            has_mask = p.suffix.lower() in PHOTO_SUFFIXES and mask.is_file()
            out.append(Sample(p, label, mask=mask if has_mask else None, name=class_dir.name,
                              rel=p.relative_to(root).as_posix()))
    return out


def _per_folder(root: Path, dirs: list[Path]) -> Dataset:
    classes = tuple(d.name for d in dirs)
    samples: list[Sample] = []
    for label, d in enumerate(dirs):
        found = _class_folder(root, d, label)
        if not found:
            raise DataError(f"{d}: empty class folder (no images at any depth)")
        samples += found
    return Dataset(root, "class-per-folder", classes, tuple(sorted(samples, key=lambda s: s.path)))


def load_dataset(root: Path | str, *, require_boxes: bool = False) -> Dataset:
    """Scan a dataset folder of any supported layout, or raise a DataError naming the path.

    - NEU-DET: IMAGES/<class>_<n>.jpg (+ ANNOTATIONS/<stem>.xml VOC boxes);
    - NEU-CLS: a flat folder of <prefix>_<n>.bmp (Cr_, In_, Pa_, PS_, RS_, Sc_);
    - class-per-folder: one top-level folder per class (sorted names are the class order), images at any depth,
      masks as <stem>.png beside <stem>.jpg.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if (root / "IMAGES").is_dir():
        return _neu(root, require_boxes)
    top_images = _images_in(root)
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top_images and not dirs:
        return _neu(root, require_boxes)
    if dirs and not top_images:
        ds = _per_folder(root, dirs)
        if require_boxes and not any(s.localised for s in ds.samples):
            raise DataError(f"{root}: no defect masks (<stem>.png beside <stem>.jpg) for the localisation metrics")
        return ds
    if top_images and dirs:
        raise DataError(f"{root}: unknown layout (images and class folders side by side); expected NEU-DET "
                        "(IMAGES/), NEU-CLS (a flat folder) or one folder per class")
    raise DataError(f"{root}: unknown layout (no images and no class folders); expected NEU-DET (IMAGES/), "
                    "NEU-CLS (a flat folder) or one folder per class")


def scan(root: Path | str, *, require_boxes: bool = False) -> list[Sample]:
    """All labelled images of a dataset folder (see load_dataset), sorted by path."""
    return list(load_dataset(root, require_boxes=require_boxes).samples)


def read_gray(path: Path | str) -> np.ndarray:
    """Decode one image file at its own size to uint8 gray (color -> gray, 16-bit -> top 8 bits), or raise."""
    img: np.ndarray | None = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise DataError(f"{path}: unreadable or corrupt image")
    if img.dtype == np.uint16:
        img = (np.asarray(img, np.uint16) >> 8).astype(np.uint8)
    if img.dtype != np.uint8:
        raise DataError(f"{path}: unsupported pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    try:
        return to_gray(img)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def load_image(path: Path | str, spec: InputSpec = DEFAULT_SPEC) -> np.ndarray:
    """Decode one image of any size to the model input, uint8 [size,size], by the card's geometry."""
    return to_input(read_gray(path), spec)


def load_arrays(samples: Sequence[Sample], progress: bool = False,
                spec: InputSpec = DEFAULT_SPEC) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 [N,size,size,1] of raw 0..255 values, and int labels [N].

    A tiling geometry gives one row per tile and each tile's own label (load_tiles), without a pass class.
    """
    if spec.method == "tile":
        t = load_tiles(samples, spec, progress=progress)
        return t.x, t.y
    it: Iterator[Sample] | Sequence[Sample] = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="loading images", unit="img", leave=False)
    x = np.empty((len(samples), spec.size, spec.size, 1), np.float32)
    for i, s in enumerate(it):
        x[i, :, :, 0] = load_image(s.path, spec)
    y = np.array([s.label for s in samples], np.int64)
    return x, y


# A tile of a defective image keeps the image's class only when it holds this share of the image's defect
# pixels (and at least TILE_MIN_PIXELS of them): a sliver of a defect at a tile's edge is not that class's
# evidence, and the tile is labelled with the pass class instead.
TILE_MASK_SHARE = 0.10
TILE_MIN_PIXELS = 4


@dataclass(frozen=True)
class Tiles:
    """A tiling geometry's rows: inputs, per-tile labels, attention masks, and the frame each tile came from."""

    x: np.ndarray  # float32 [T,size,size,1]
    y: np.ndarray  # int64 [T]
    masks: np.ndarray  # uint8 [T,size,size,1]: the defect inside the tile, all ones when it holds none
    frame: np.ndarray  # int64 [T]: index into the samples
    frame_y: np.ndarray  # int64 [N]: the image labels


def tile_label(label: int, tile_mask: np.ndarray | None, total: int, pass_label: int | None) -> int:
    """A tile's class: the image's, unless the image is defective, its mask is known, and the tile holds too
    little of it (TILE_MASK_SHARE, TILE_MIN_PIXELS): then the pass class."""
    if pass_label is None or label == pass_label or tile_mask is None or total <= 0:
        return label
    inside = int(tile_mask.sum())
    return label if inside >= max(TILE_MIN_PIXELS, TILE_MASK_SHARE * total) else pass_label


def load_tiles(samples: Sequence[Sample], spec: InputSpec, pass_label: int | None = None,
               progress: bool = False) -> Tiles:
    """Every tile of every image by the card's tiling geometry, labelled by tile_label (masks give the share)."""
    from agent.geometry import tile_origins

    it: Iterator[Sample] | Sequence[Sample] = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="loading tiles", unit="img", leave=False)
    n = spec.size
    xs: list[np.ndarray] = []
    ys: list[int] = []
    ms: list[np.ndarray] = []
    fr: list[int] = []
    ones = np.ones((n, n), np.uint8)
    for i, s in enumerate(it):
        g = read_gray(s.path)
        plane = to_input(g, spec)
        m = defect_mask(s, spec, (g.shape[0], g.shape[1])) if s.localised else None
        total = int(m.sum()) if m is not None else 0
        for oy, ox in tile_origins(plane.shape, n):
            tm = None if m is None else m[oy:oy + n, ox:ox + n]
            lab = tile_label(s.label, tm, total, pass_label)
            xs.append(plane[oy:oy + n, ox:ox + n])
            ys.append(lab)
            ms.append(ones if tm is None or lab == pass_label or not tm.any() else tm.astype(np.uint8))
            fr.append(i)
    x = np.stack(xs)[..., None].astype(np.float32) if xs else np.zeros((0, n, n, 1), np.float32)
    mk = np.stack(ms)[..., None] if ms else np.zeros((0, n, n, 1), np.uint8)
    return Tiles(x, np.array(ys, np.int64), mk, np.array(fr, np.int64),
                 np.array([s.label for s in samples], np.int64))


def load_frames(samples: Sequence[Sample], spec: InputSpec, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Model inputs float32 [T,size,size,1], the images' labels [N], and for a tiling geometry each input's image
    [T] (agent.geometry.frame_picks turns rows into frames); None when every image is one input (T = N)."""
    if spec.method == "tile":
        t = load_tiles(samples, spec, progress=progress)
        return t.x, t.frame_y, t.frame
    x, y = load_arrays(samples, progress=progress, spec=spec)
    return x, y, None


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


def defect_mask(sample: Sample, spec: InputSpec = DEFAULT_SPEC, shape: tuple[int, int] | None = None
                ) -> np.ndarray | None:
    """Where the defect is, in model-input coordinates (bool [size,size]); None without side data or defect.

    Boxes are drawn at the image's own size and mask files read at theirs, then both are moved by the same
    geometry as the image, so they stay on the defect whatever the frame size. shape is the image's own (h, w)
    when the caller knows it (boxes need it; otherwise the image is read).
    """
    if sample.boxes:
        hw = shape if shape is not None else read_gray(sample.path).shape
        m = mask_to_input(box_mask(sample.boxes, (int(hw[0]), int(hw[1]))), spec)
    elif sample.mask is not None:
        raw = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            raise DataError(f"{sample.mask}: unreadable or corrupt mask")
        m = mask_to_input(raw, spec)
    else:
        return None
    return m if m.any() else None


def file_list_hash(samples: Sequence[Sample]) -> str:
    """A short hash of the sorted file names, so a model card names exactly what it was trained on."""
    h = hashlib.sha256("\n".join(sorted(s.rel or s.path.name for s in samples)).encode())
    return h.hexdigest()[:16]


def _by_label(samples: Sequence[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.label, []).append(s)
    return dict(sorted(groups.items()))


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Seeded split that keeps each class's share the same in both parts."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for group in _by_label(sorted(samples, key=lambda s: s.path)).values():
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
    for group in _by_label(sorted(samples, key=lambda s: s.path)).values():
        for j, i in enumerate(rng.permutation(len(group))):
            folds[j % k].append(group[i])
    out = []
    for i in range(k):
        val = sorted(folds[i], key=lambda s: s.path)
        train = sorted((s for j, f in enumerate(folds) if j != i for s in f), key=lambda s: s.path)
        out.append((train, val))
    return out


def stratified_subset(samples: Sequence[Sample], n: int, seed: int = 0) -> list[Sample]:
    """About n samples with every class equally represented (as far as each class has images), seeded."""
    groups = _by_label(samples)
    if not groups or n <= 0:
        return []
    per = max(1, n // len(groups))
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for group in groups.values():
        out += [group[i] for i in sorted(rng.permutation(len(group))[:per])]
    return sorted(out, key=lambda s: s.path)


def held_out(card: dict[str, Any], samples: Sequence[Sample], *, strict: bool = False
             ) -> tuple[list[Sample], list[Sample], str]:
    """(train, held-out, how) of the model card's split: the one implementation the gate, benches and audit use.

    The split is re-drawn from the card's seed and val_fraction and checked against its validation files_hash;
    a card that names no split, or a folder whose split does not match, falls back to a stratified 20% sample and
    says so in `how` (those images may include training images), or with strict=True raises a DataError.
    """
    training = card.get("training", {})
    cfg = training.get("config", {})
    if "seed" in training and "val_fraction" in cfg:
        train, val = stratified_split(samples, float(cfg["val_fraction"]), int(training["seed"]))
        want = card.get("validation", {}).get("files_hash")
        if want is None or want == file_list_hash(val):
            return train, val, f"the model card's held-out split ({len(val)} images, seed {training['seed']})"
        if strict:
            raise DataError(f"the held-out split of this folder does not match the model card's (files_hash "
                            f"{file_list_hash(val)} != {want}): it needs the folder the model was trained from")
    elif strict:
        raise DataError("the model card names no split (training.seed, training.config.val_fraction)")
    train, val = stratified_split(samples, 0.2, 0)
    return train, val, (f"a stratified 20% sample ({len(val)} images, seed 0): the model card names no matching "
                        "split, so these may include training images")


def check_classes(card: dict[str, Any], ds: Dataset) -> None:
    """The dataset's class list must be the card's (same names, same order), or labels would mean other classes."""
    classes = tuple(card.get("classes", ()))
    if classes and classes != ds.classes:
        raise DataError(f"{ds.root}: classes {list(ds.classes)} do not match the model card's {list(classes)}")
