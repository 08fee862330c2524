"""Line-camera degradations at named severities: one home for training augmentation and `tdn robustness`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

SEVERITIES = ("mild", "moderate", "strong")

# Each degradation's parameter at each severity. Mild is the definition of an everyday line camera;
# moderate and strong roughly double and triple it (JPEG: quality 60 -> 30 -> 15, "down to low quality").
LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_blur": (3, 5, 7),  # kernel size (sigma from OpenCV's rule for the size)
    "motion_blur": (3, 5, 9),  # line-kernel length in pixels, random direction
    "noise": (4.0, 8.0, 12.0),  # Gaussian sensor-noise sigma in gray levels
    "jpeg": (60, 30, 15),  # re-compression quality
    "brightness": (15.0, 30.0, 45.0),  # +- gray levels, sign random
    "contrast": (0.8, 0.65, 0.5),  # factor about the image mean
    "rotation": (2.0, 5.0, 10.0),  # +- degrees, sign random, mirrored border
    "shift": (6.0, 12.0, 20.0),  # pixels, random direction, mirrored border
}
KINDS = tuple(LEVELS)
GEOMETRIC = ("rotation", "shift")


def gaussian_blur(img: np.ndarray, k: float) -> np.ndarray:
    k = int(k) | 1  # an odd kernel size
    return cv2.GaussianBlur(img, (k, k), 0)


def motion_kernel(length: float, angle_deg: float) -> np.ndarray:
    """A normalised line kernel of `length` pixels at `angle_deg`: the blur of a part moving past the shutter."""
    length = max(1, round(length))
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    t = np.deg2rad(angle_deg)
    for s in np.linspace(-c, c, 4 * length):
        k[round(c + s * np.sin(t)), round(c + s * np.cos(t))] = 1.0
    return k / k.sum()


def motion_blur(img: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
    if length < 2:
        return img
    return cv2.filter2D(img, -1, motion_kernel(round(length), angle_deg), borderType=cv2.BORDER_REFLECT_101)


def noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = rng.normal(0.0, sigma, img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32) + n, 0, 255).round().astype(np.uint8)


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, round(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)


def brightness(img: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(img.astype(np.float32) + delta, 0, 255).round().astype(np.uint8)


def contrast(img: np.ndarray, factor: float) -> np.ndarray:
    f = img.astype(np.float32)
    m = float(f.mean())
    return np.clip((f - m) * factor + m, 0, 255).round().astype(np.uint8)


def affine(img: np.ndarray, angle_deg: float, dx: float, dy: float, nearest: bool = False) -> np.ndarray:
    """Rotate about the centre and shift, with a mirrored border so no black wedge appears."""
    h, w = img.shape[:2]
    m = np.asarray(cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, 1.0), np.float64)
    m[:, 2] += (dx, dy)
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.warpAffine(img, m, (w, h), flags=flags, borderMode=cv2.BORDER_REFLECT_101)


@dataclass(frozen=True)
class Degradation:
    """One named degradation at one parameter value; random parts (direction, sign, noise) come from rng."""

    kind: str
    value: float

    def apply(self, img: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """(degraded uint8 image, the mask moved along for geometric kinds) of a uint8 [h,w] image."""
        k, v = self.kind, self.value
        if k == "gaussian_blur":
            return gaussian_blur(img, v), mask
        if k == "motion_blur":
            return motion_blur(img, v, float(rng.uniform(0, 180))), mask
        if k == "noise":
            return noise(img, v, rng), mask
        if k == "jpeg":
            return jpeg(img, v), mask
        if k == "brightness":
            return brightness(img, v * rng.choice((-1.0, 1.0))), mask
        if k == "contrast":
            return contrast(img, v), mask
        if k in GEOMETRIC:
            if k == "rotation":
                angle, dx, dy = v * float(rng.choice((-1.0, 1.0))), 0.0, 0.0
            else:
                t = rng.uniform(0, 2 * np.pi)
                angle, dx, dy = 0.0, v * float(np.cos(t)), v * float(np.sin(t))
            out = affine(img, angle, dx, dy)
            moved = None if mask is None else affine(mask, angle, dx, dy, nearest=True)
            return out, moved
        raise ValueError(f"unknown degradation {k!r}; expected one of {', '.join(KINDS)}")


def named(kind: str, severity: str) -> Degradation:
    """The degradation `kind` at a named severity (mild, moderate, strong)."""
    if kind not in LEVELS:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {', '.join(KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; expected one of {', '.join(SEVERITIES)}")
    return Degradation(kind, LEVELS[kind][SEVERITIES.index(severity)])


def apply_batch(images: np.ndarray, d: Degradation, seed: int) -> np.ndarray:
    """A degraded copy of uint8 [N,h,w] images; image i's random parts are seeded by (seed, i), order-free."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        out[i] = d.apply(img, np.random.default_rng([seed, i]))[0]
    return out


# --- training augmentation ---------------------------------------------------------------------------------

# Probability that each photometric degradation is drawn for a training image; with 6 independent draws about
# 18% of images stay photometrically clean, so the clean accuracy is still trained for.
P_PHOTOMETRIC = 0.25


def _draw(kind: str, rng: np.random.Generator) -> Degradation:
    """A value between none and a little beyond strong, so strong is inside the training distribution."""
    lo_hi: dict[str, Callable[[], float]] = {
        "gaussian_blur": lambda: float(rng.choice((3, 5, 7, 9))),
        "motion_blur": lambda: float(rng.integers(3, 12)),
        "noise": lambda: float(rng.uniform(1.0, 14.0)),
        "jpeg": lambda: float(rng.integers(10, 90)),
        "brightness": lambda: float(rng.uniform(0.0, 50.0)),
        "contrast": lambda: float(rng.uniform(0.45, 1.0)) if rng.random() < 0.8 else float(rng.uniform(1.0, 1.3)),
    }
    return Degradation(kind, lo_hi[kind]())


def augment(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *, photometric: bool = True,
            p: float = P_PHOTOMETRIC, max_rotation: float = 12.0, max_shift: float = 22.0
            ) -> tuple[np.ndarray, np.ndarray]:
    """One training draw: flips, 90° turns, a small rotation + shift (moving the mask), then random degradations.

    Geometric steps come first and move the defect mask with the image; the photometric ones (blur, noise, JPEG,
    brightness, contrast, in random order) touch only the image.
    """
    if rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        img, mask = img[::-1], mask[::-1]
    k = int(rng.integers(0, 4))
    img, mask = np.rot90(img, k), np.rot90(mask, k)
    img, mask = np.ascontiguousarray(img), np.ascontiguousarray(mask)
    angle = float(rng.uniform(-max_rotation, max_rotation)) if rng.random() < 0.5 else 0.0
    t = rng.uniform(0, 2 * np.pi)
    r = float(rng.uniform(0, max_shift))
    dx, dy = r * np.cos(t), r * np.sin(t)
    img = affine(img, angle, dx, dy)
    mask = affine(mask, angle, dx, dy, nearest=True)
    if not photometric:
        return img, mask
    kinds = [k for k in KINDS if k not in GEOMETRIC]
    for i in rng.permutation(len(kinds)):
        if rng.random() < p:
            img = _draw(kinds[i], rng).apply(img, rng)[0]
    return img, mask


# --- an augmenting worker process ---------------------------------------------------------------------------

_POOL: dict[str, np.ndarray] = {}


def worker_init(images: np.ndarray, masks: np.ndarray) -> None:
    """Initializer of the augmenting process: it keeps the training set (uint8 [N,h,w]) for every epoch."""
    cv2.setNumThreads(1)
    _POOL["x"], _POOL["m"] = images, masks


def augment_epoch(order: np.ndarray, seed: int, photometric: bool, p: float = P_PHOTOMETRIC
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of augmented copies, in draw order: (uint8 [N,h,w] images, uint8 [N,h,w] masks)."""
    x, m = _POOL["x"], _POOL["m"]
    rng = np.random.default_rng(seed)
    xs = np.empty((len(order), *x.shape[1:]), np.uint8)
    ms = np.empty((len(order), *x.shape[1:]), np.uint8)
    for j, i in enumerate(order):
        xs[j], ms[j] = augment(x[i], m[i], rng, photometric=photometric, p=p)
    return xs, ms
