"""Seeded procedural steel-surface images, one texture generator per NEU defect class."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import cv2
import numpy as np

from protocol import NEU_CLASSES

SIZE = 200

Image = np.ndarray  # uint8, (size, size)
_Rng = np.random.Generator


def _smooth_noise(rng: _Rng, size: int, cells: int) -> np.ndarray:
    """Noise with features about size/cells pixels wide, scaled to [-1, 1]."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return field / (np.abs(field).max() + 1e-6)


# Per class: (grey level range, grain strength range), roughly as in NEU pictures of that class.
_LOOK: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "crazing": ((110, 160), (12, 20)),
    "inclusion": ((80, 130), (3, 6)),
    "patches": ((130, 190), (10, 16)),
    "pitted_surface": ((150, 220), (3, 7)),
    "rolled-in_scale": ((80, 120), (6, 10)),
    "scratches": ((80, 130), (4, 8)),
}


def _background(rng: _Rng, size: int, label: str) -> np.ndarray:
    """Hot-rolled strip: a grey level, uneven lighting, streaks along the rolling direction, fine grain."""
    levels, grains = _LOOK[label]
    level = rng.uniform(*levels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    lighting = rng.uniform(-12, 12) * (xx - 0.5) + rng.uniform(-12, 12) * (yy - 0.5)
    lighting += rng.uniform(3, 10) * _smooth_noise(rng, size, 3)
    streaks = cv2.GaussianBlur(rng.standard_normal((size, 1)).astype(np.float32), (1, 5), 0)
    grain = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (3, 3), 0)
    img = level + lighting + rng.uniform(3, 7) * streaks + rng.uniform(*grains) * grain
    # Rolling marks run along a random one of the two axes, as in the dataset.
    return img.T.copy() if rng.random() < 0.5 else img


def _draw_mask(size: int) -> np.ndarray:
    return np.zeros((size, size), np.float32)


def _ink(value: float) -> tuple[float]:
    """A drawing colour for OpenCV on a one-channel float mask."""
    return (float(value),)


def _crazing(rng: _Rng, img: np.ndarray) -> None:
    """A dense network of short, branching, low-contrast dark cracks."""
    size = img.shape[0]
    mask = _draw_mask(size)
    base_angle = rng.uniform(0, np.pi)
    for _ in range(int(rng.integers(50, 110))):
        point = rng.uniform(0, size, 2)
        angle = base_angle + rng.normal(0, 0.9)
        pts = [point.copy()]
        for _ in range(int(rng.integers(3, 9))):
            angle += rng.normal(0, 0.5)
            point = point + rng.uniform(3, 9) * np.array([np.cos(angle), np.sin(angle)])
            pts.append(point.copy())
        poly = np.round(np.array(pts)).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(mask, [poly], False, _ink(rng.uniform(0.5, 1.0)), 1, cv2.LINE_AA)
    img -= rng.uniform(45, 70) * cv2.GaussianBlur(mask, (3, 3), 0)


def _inclusion(rng: _Rng, img: np.ndarray) -> None:
    """A few dark, ragged, elongated blobs with darker cores and small satellite specks."""
    size = img.shape[0]
    mask = _draw_mask(size)
    along = rng.choice([0.0, 90.0])
    for _ in range(int(rng.integers(1, 5))):
        center = (int(rng.integers(15, size - 15)), int(rng.integers(15, size - 15)))
        axes = (int(rng.integers(8, 40)), int(rng.integers(2, 9)))
        angle = float(along + rng.normal(0, 12))
        cv2.ellipse(mask, center, axes, angle, 0, 360, _ink(1.0), -1, cv2.LINE_AA)
        core = (max(axes[0] // 2, 1), max(axes[1] // 2, 1))
        cv2.ellipse(mask, center, core, angle, 0, 360, _ink(1.6), -1, cv2.LINE_AA)
        for _ in range(int(rng.integers(0, 6))):
            speck = (center[0] + int(rng.normal(0, axes[0])), center[1] + int(rng.normal(0, 6)))
            cv2.circle(mask, speck, int(rng.integers(1, 3)), _ink(0.8), -1, cv2.LINE_AA)
    ragged = mask * (0.75 + 0.25 * _smooth_noise(rng, size, 25))
    img -= rng.uniform(35, 60) * cv2.GaussianBlur(ragged, (5, 5), 0)


def _patches(rng: _Rng, img: np.ndarray) -> None:
    """Large irregular blotches, mostly darker than the surrounding strip."""
    size = img.shape[0]
    field = _smooth_noise(rng, size, int(rng.integers(4, 8)))
    threshold = np.quantile(field, rng.uniform(0.55, 0.8))
    mask = np.clip((field - threshold) * 6.0, 0.0, 1.0).astype(np.float32)
    mask = cv2.GaussianBlur(mask, (9, 9), 0) * (0.8 + 0.2 * _smooth_noise(rng, size, 30))
    sign = -1.0 if rng.random() < 0.75 else 1.0
    img += sign * rng.uniform(35, 65) * mask


def _pitted_surface(rng: _Rng, img: np.ndarray) -> None:
    """Clusters of small dark pits, each with a faint bright rim."""
    size = img.shape[0]
    dark = _draw_mask(size)
    rim = _draw_mask(size)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(20, size - 20, 2)
        spread = rng.uniform(8, 35)
        for _ in range(int(rng.integers(10, 45))):
            x = int(np.clip(rng.normal(cx, spread), 0, size - 1))
            y = int(np.clip(rng.normal(cy, spread), 0, size - 1))
            radius = int(rng.integers(1, 4))
            cv2.circle(rim, (x + 1, y + 1), radius + 1, _ink(1.0), -1, cv2.LINE_AA)
            cv2.circle(dark, (x, y), radius, _ink(rng.uniform(0.6, 1.0)), -1, cv2.LINE_AA)
    img += rng.uniform(8, 15) * cv2.GaussianBlur(rim, (3, 3), 0)
    img -= rng.uniform(35, 60) * cv2.GaussianBlur(dark, (3, 3), 0)


def _rolled_in_scale(rng: _Rng, img: np.ndarray) -> None:
    """Many small flakes of oxide scale pressed into the surface: mixed dark and bright speckle."""
    size = img.shape[0]
    mask = _draw_mask(size)
    along = rng.choice([0.0, 90.0])
    region = _smooth_noise(rng, size, 4) > rng.uniform(-0.6, 0.0)
    for _ in range(int(rng.integers(120, 320))):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if not region[y, x]:
            continue
        axes = (int(rng.integers(2, 7)), int(rng.integers(1, 3)))
        value = float(rng.choice([-1.0, 0.6], p=[0.7, 0.3]) * rng.uniform(0.5, 1.0))
        angle = float(along + rng.normal(0, 25))
        cv2.ellipse(mask, (x, y), axes, angle, 0, 360, _ink(value), -1, cv2.LINE_AA)
    img += rng.uniform(20, 35) * cv2.GaussianBlur(mask, (3, 3), 0)


def _scratches(rng: _Rng, img: np.ndarray) -> None:
    """One to four long, thin, nearly parallel lines, usually brighter than the strip."""
    size = img.shape[0]
    mask = _draw_mask(size)
    angle = rng.uniform(0, np.pi)
    for _ in range(int(rng.integers(1, 5))):
        a = angle + rng.normal(0, 0.06)
        direction = np.array([np.cos(a), np.sin(a)])
        normal = np.array([-direction[1], direction[0]])
        center = rng.uniform(0.2 * size, 0.8 * size, 2)
        half = rng.uniform(0.3, 0.7) * size
        bow = rng.normal(0, 4)
        t = np.linspace(-1.0, 1.0, 24)[:, None]
        pts = center + half * t * direction + bow * (1 - t**2) * normal
        poly = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
        width = int(rng.integers(1, 5))
        cv2.polylines(mask, [poly], False, _ink(rng.uniform(0.7, 1.0)), width, cv2.LINE_AA)
    sign = 1.0 if rng.random() < 0.7 else -1.0
    img += sign * rng.uniform(35, 70) * cv2.GaussianBlur(mask, (3, 3), 0)


_GENERATORS: dict[str, Callable[[_Rng, np.ndarray], None]] = {
    "crazing": _crazing,
    "inclusion": _inclusion,
    "patches": _patches,
    "pitted_surface": _pitted_surface,
    "rolled-in_scale": _rolled_in_scale,
    "scratches": _scratches,
}
assert tuple(_GENERATORS) == NEU_CLASSES


def generate(label: str, rng: _Rng, size: int = SIZE) -> Image:
    """A size x size uint8 grayscale surface showing a defect of class `label`."""
    if label not in _GENERATORS:
        raise ValueError(f"unknown class {label!r}; expected one of {', '.join(NEU_CLASSES)}")
    img = _background(rng, size, label)
    _GENERATORS[label](rng, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_surfaces(seed: int = 0, size: int = SIZE) -> Iterator[tuple[Image, str]]:
    """Endless (image, label) pairs: every class once per round of six, in a seeded random order."""
    rng = np.random.default_rng(seed)
    while True:
        for index in rng.permutation(len(NEU_CLASSES)):
            label = NEU_CLASSES[int(index)]
            yield generate(label, rng, size), label
