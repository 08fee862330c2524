"""Input geometry: how a frame of any size becomes the model's square uint8 input, exactly as the card states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

METHODS = ("resize", "letterbox")
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
    """uint8 [size,size] model input from a uint8 frame of any size (gray or BGR), by the card's method."""
    g = to_gray(img)
    h, w = g.shape
    n = spec.size
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


def mask_to_input(mask: np.ndarray, spec: InputSpec) -> np.ndarray:
    """A defect mask moved by the same geometry: bool [size,size], True where any defect pixel lands.

    INTER_AREA averages, so a defect smaller than one output pixel still leaves a non-zero value; thresholding at
    > 0 keeps tiny defects in the mask instead of letting them vanish.
    """
    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    area = InputSpec(spec.size, spec.method, "INTER_AREA", "BORDER_CONSTANT", 0)
    return to_input(m, area) > 0


def self_test_inputs(size: int, n: int = 4) -> np.ndarray:
    """The card's self-test images: seeded uniform noise, float32 [n,size,size,1] of raw 0..255 values."""
    return np.random.default_rng(SELF_TEST_SEED).integers(0, 256, (n, size, size, 1)).astype("float32")
