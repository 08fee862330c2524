"""Input geometry: how a frame of any size becomes the model's square uint8 input(s), exactly as the card states."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import cv2
import numpy as np

METHODS = ("resize", "letterbox", "tile")
# The OpenCV flags a card may name; looked up by name so the card stays plain JSON.
INTERPOLATIONS = ("INTER_NEAREST", "INTER_LINEAR", "INTER_CUBIC", "INTER_AREA", "INTER_LANCZOS4")
BORDERS = ("BORDER_CONSTANT", "BORDER_REPLICATE", "BORDER_REFLECT_101")
MAX_SIDE = 4096  # the SPEC's largest frame side
SELF_TEST_SEED = 1234

# What the card's `input` says about gray conversion; to_input applies exactly this.
GRAY_RULE = "uint8 HxW as is; HxWx1 squeezed; HxWx3 is BGR -> cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)"


@dataclass(frozen=True)
class InputSpec:
    """The card's input geometry: target size, method, OpenCV interpolation and (letterbox) border."""

    size: int = 200
    method: str = "resize"
    interpolation: str = "INTER_AREA"
    border: str = "BORDER_CONSTANT"
    border_value: int = 0
    # tile: the most tiles a frame may cost; a longer aspect ratio is squeezed along its long side to fit, so a
    # 1x4096 frame costs max_tiles inputs, not 4096.
    max_tiles: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not 1 <= self.size <= MAX_SIDE:
            raise ValueError(f"input size must be an int in 1..{MAX_SIDE}, got {self.size!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown input method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; "
                             f"expected one of {', '.join(INTERPOLATIONS)}")
        if self.border not in BORDERS:
            raise ValueError(f"unknown border {self.border!r}; expected one of {', '.join(BORDERS)}")
        if not isinstance(self.max_tiles, int) or not 1 <= self.max_tiles <= 64:
            raise ValueError(f"max_tiles must be an int in 1..64, got {self.max_tiles!r}")
        if not 0 <= int(self.border_value) <= 255:
            raise ValueError(f"border_value must be in 0..255, got {self.border_value}")

    @classmethod
    def from_card(cls, card_input: dict[str, Any]) -> InputSpec:
        """From a card's `input` dict; a card written before geometry existed means 200x200 resize/INTER_AREA."""
        shape = card_input.get("shape") or [None, 200, 200, 1]
        size = int(card_input.get("size", shape[1]))
        return cls(
            size=size,
            method=str(card_input.get("method", "resize")),
            interpolation=str(card_input.get("interpolation", "INTER_AREA")),
            border=str(card_input.get("border", "BORDER_CONSTANT")),
            border_value=int(card_input.get("border_value", 0)),
            max_tiles=int(card_input.get("max_tiles", 8)),
        )

    def to_card(self) -> dict[str, Any]:
        """The keys this spec adds to a card's `input` (beside shape, dtype, range, normalization)."""
        d: dict[str, Any] = {
            "size": self.size,
            "method": self.method,
            "interpolation": self.interpolation,
            "gray": GRAY_RULE,
        }
        if self.method == "resize":
            d["rule"] = (f"cv2.resize(gray, ({self.size}, {self.size}), interpolation=cv2.{self.interpolation}); "
                         "aspect ratio not kept")
        elif self.method == "tile":
            n = self.size
            d["max_tiles"] = self.max_tiles
            d["rule"] = (f"s = min({n} / min(h, w), {self.max_tiles * n} / max(h, w)); "
                         f"nw, nh = max({n}, round(w * s)), max({n}, round(h * s)); "
                         f"plane = cv2.resize(gray, (nw, nh), interpolation=cv2.{self.interpolation}) "
                         f"(skipped when (nh, nw) == (h, w)); per axis of length L: k = ceil(L / {n}) tiles at "
                         f"offsets round(i * (L - {n}) / (k - 1)) for i in 0..k-1 (0 when k == 1); tiles in row-major "
                         f"order, each plane[oy:oy+{n}, ox:ox+{n}]")
            d["combine"] = ("the frame takes the probabilities (and pooled features) of its tile with the lowest "
                            "summed probability of the pass classes (no pass class: the highest top probability); "
                            "first such tile on a tie; the decision rule then applies to that row")
            d["cost"] = (f"one model input per tile: a {n}x{n} frame is 1 tile, a 2:1 frame 2, a 3:1 frame 3; the "
                         "FLOPs per frame are the card's flops times the tile count")
        else:
            d["border"] = self.border
            d["border_value"] = self.border_value
            d["rule"] = (f"s = {self.size} / max(h, w); nw, nh = max(1, round(w * s)), max(1, round(h * s)); "
                         f"r = cv2.resize(gray, (nw, nh), interpolation=cv2.{self.interpolation}); "
                         f"top = ({self.size} - nh) // 2; left = ({self.size} - nw) // 2; "
                         f"cv2.copyMakeBorder(r, top, {self.size} - nh - top, left, {self.size} - nw - left, "
                         f"cv2.{self.border}, value={self.border_value})")
        return d

    @property
    def flag(self) -> int:
        return int(getattr(cv2, self.interpolation))


def to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 HxW gray from uint8 HxW, HxWx1 or HxWx3 BGR."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    elif a.ndim == 3 and a.shape[2] == 3:
        a = cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_BGR2GRAY)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected an image HxW, HxWx1 or HxWx3, got shape {a.shape}")
    return a


def to_input(img: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 model input from a uint8 frame of any size (gray or BGR), by the card's method.

    [size,size] for resize and letterbox. For tile, the scaled frame ("plane", short side = size) that `tiles`
    cuts into the model's inputs: the line keeps the plane, so an explanation can be drawn over the whole frame.
    """
    g = to_gray(img)
    h, w = g.shape
    n = spec.size
    if spec.method == "tile":
        s = min(n / min(h, w), spec.max_tiles * n / max(h, w))
        nw, nh = max(n, round(w * s)), max(n, round(h * s))
        return np.ascontiguousarray(g) if (nh, nw) == (h, w) else cv2.resize(g, (nw, nh), interpolation=spec.flag)
    if spec.method == "resize":
        if (h, w) == (n, n):
            return np.ascontiguousarray(g)  # cv2.resize to the same size is the identity; skip the copy pass
        return cv2.resize(g, (n, n), interpolation=spec.flag)
    s = n / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    r = g if (nh, nw) == (h, w) else cv2.resize(g, (nw, nh), interpolation=spec.flag)
    top, left = (n - nh) // 2, (n - nw) // 2
    if (nh, nw) == (n, n):
        return np.ascontiguousarray(r)
    out: np.ndarray = cv2.copyMakeBorder(r, top, n - nh - top, left, n - nw - left, getattr(cv2, spec.border),
                                         value=(float(spec.border_value),))
    return out


def tile_offsets(length: int, size: int) -> list[int]:
    """Where the tiles of one axis start: ceil(length / size) of them, evenly spread, overlapping, edge to edge."""
    if length < size:
        raise ValueError(f"a plane side of {length} is shorter than the tile side {size}")
    k = -(-length // size)
    return [0] if k == 1 else [round(i * (length - size) / (k - 1)) for i in range(k)]


def tile_origins(shape: tuple[int, ...], size: int) -> list[tuple[int, int]]:
    """(top, left) of every tile of a plane [h,w], row-major."""
    return [(oy, ox) for oy in tile_offsets(shape[0], size) for ox in tile_offsets(shape[1], size)]


def tiles(plane: np.ndarray, size: int) -> list[np.ndarray]:
    """The model inputs of one plane: views [size,size], row-major; a [size,size] input is its own one tile."""
    if plane.shape[:2] == (size, size):
        return [plane]
    return [plane[oy:oy + size, ox:ox + size] for oy, ox in tile_origins(plane.shape[:2], size)]


def combine(probs: np.ndarray, pass_mask: np.ndarray) -> int:
    """Which tile of a frame decides it: the lowest summed pass-class probability (no pass class: the highest top
    probability), the first one on a tie. probs [k,C]."""
    p = np.asarray(probs)
    if len(p) == 1:
        return 0
    if bool(np.any(pass_mask)):
        return int(np.argmin(p[:, pass_mask].sum(1)))
    return int(np.argmax(p.max(1)))


def frame_picks(probs: np.ndarray, frame: np.ndarray, n: int, pass_mask: np.ndarray) -> np.ndarray:
    """For input rows [T,C] of n frames (frame [T]: each row's frame, rows of a frame contiguous), the row that
    decides each frame, by `combine`: indices [n]."""
    p = np.asarray(probs)
    f = np.asarray(frame)
    starts = np.searchsorted(f, np.arange(n + 1))
    return np.array([a + combine(p[a:b], pass_mask) for a, b in pairwise(starts)], np.int64)


def stitch(maps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-tile maps [k,size,size] back onto the plane [h,w]: the maximum where tiles overlap."""
    m = np.asarray(maps, np.float32)
    size = m.shape[1]
    out = np.zeros(shape, np.float32)
    for (oy, ox), tile_map in zip(tile_origins(shape, size), m, strict=True):
        region = out[oy:oy + size, ox:ox + size]
        np.maximum(region, tile_map, out=region)
    return out


def mask_to_input(mask: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A defect mask moved by the same geometry: bool [size,size] (tile: the plane), True where a defect pixel lands.

    INTER_AREA averages, so a defect smaller than one output pixel still leaves a non-zero value; thresholding at
    > 0 keeps tiny defects in the mask instead of letting them vanish.
    """
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    area = replace(spec, interpolation="INTER_AREA", border="BORDER_CONSTANT", border_value=0)
    return to_input(m, area) > 0


def self_test_inputs(size: int, n: int = 4) -> np.ndarray:
    """The card's self-test images: seeded uniform noise, float32 [n,size,size,1] of raw 0..255 values."""
    return np.random.default_rng(SELF_TEST_SEED).integers(0, 256, (n, size, size, 1)).astype("float32")
