"""Tests for the input geometry: every frame size becomes the card's input, bit-exact with a hand-written cv2 call."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.geometry import InputSpec, mask_to_input, self_test_inputs, to_gray, to_input

SIZES = [(1, 1), (1, 7), (100, 400), (400, 100), (200, 200), (199, 201), (600, 600), (1000, 1000), (4096, 4096)]


def _frame(h: int, w: int, seed: int = 0, color: bool = False) -> np.ndarray:
    rng = np.random.default_rng([seed, h, w])
    shape = (h, w, 3) if color else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


class TestResize:
    """The default method: a plain cv2.resize to size x size with the card's interpolation."""

    @pytest.mark.parametrize(("h", "w"), SIZES)
    def test_every_size_is_bit_exact(self, h: int, w: int) -> None:
        """1x1 .. 4096x4096: uint8 [200,200], identical to the cv2 call the card states."""
        img = _frame(h, w)
        out = to_input(img, InputSpec())
        assert out.shape == (200, 200) and out.dtype == np.uint8
        assert np.array_equal(out, cv2.resize(img, (200, 200), interpolation=cv2.INTER_AREA))

    def test_color_is_bgr_to_gray_first(self) -> None:
        """A BGR frame is converted with COLOR_BGR2GRAY, then resized."""
        img = _frame(300, 500, color=True)
        want = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (200, 200), interpolation=cv2.INTER_AREA)
        assert np.array_equal(to_input(img, InputSpec()), want)

    def test_single_channel_and_native_size(self) -> None:
        """HxWx1 equals HxW; a 200x200 frame passes through unchanged."""
        img = _frame(200, 200)
        assert np.array_equal(to_input(img[..., None], InputSpec()), img)

    @pytest.mark.parametrize("interp", ["INTER_NEAREST", "INTER_LINEAR", "INTER_CUBIC", "INTER_LANCZOS4"])
    def test_interpolation_flag_is_used(self, interp: str) -> None:
        """The card's flag name is the OpenCV flag applied."""
        img = _frame(333, 123)
        want = cv2.resize(img, (64, 64), interpolation=getattr(cv2, interp))
        assert np.array_equal(to_input(img, InputSpec(64, "resize", interp)), want)


class TestLetterbox:
    """Aspect-preserving letterbox with a stated border."""

    @pytest.mark.parametrize(("h", "w"), SIZES)
    def test_every_size_matches_the_card_rule(self, h: int, w: int) -> None:
        """Scale by size/max(h,w), centre, pad with the border value: the card's rule written out by hand."""
        spec = InputSpec(200, "letterbox", "INTER_AREA", "BORDER_CONSTANT", 17)
        img = _frame(h, w)
        s = 200 / max(h, w)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        r = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        top, left = (200 - nh) // 2, (200 - nw) // 2
        want = cv2.copyMakeBorder(r, top, 200 - nh - top, left, 200 - nw - left, cv2.BORDER_CONSTANT, value=17)
        out = to_input(img, spec)
        assert out.shape == (200, 200) and np.array_equal(out, want)

    def test_border_is_stated_value(self) -> None:
        """A 100x400 frame keeps its aspect: 50 rows of picture, the rest border."""
        out = to_input(np.full((100, 400), 200, np.uint8), InputSpec(200, "letterbox", border_value=0))
        assert (out[:75] == 0).all() and (out[75:125] == 200).all() and (out[125:] == 0).all()


class TestSpec:
    """InputSpec round-trips the card and refuses what it cannot reproduce."""

    def test_card_round_trip(self) -> None:
        """to_card + the existing keys -> from_card gives the same spec."""
        spec = InputSpec(200, "letterbox", "INTER_LINEAR", "BORDER_REPLICATE", 0)
        card_input = {"shape": [None, 200, 200, 1], **spec.to_card()}
        assert InputSpec.from_card(card_input) == spec

    def test_legacy_card(self) -> None:
        """A card with only shape means 200x200 resize with INTER_AREA."""
        assert InputSpec.from_card({"shape": [None, 200, 200, 1]}) == InputSpec()

    @pytest.mark.parametrize("bad", [{"method": "tile"}, {"interpolation": "INTER_MAGIC"}, {"size": 0}])
    def test_bad_spec(self, bad: dict) -> None:  # type: ignore[type-arg]
        with pytest.raises(ValueError):
            InputSpec(**bad)

    def test_bad_frames(self) -> None:
        """Non-uint8, empty and 4-channel arrays are refused with a ValueError."""
        for img in (np.zeros((4, 4), np.float32), np.zeros((0, 5), np.uint8), np.zeros((4, 4, 4), np.uint8)):
            with pytest.raises(ValueError):
                to_gray(img)


class TestMaskAndSelfTest:
    def test_tiny_defect_survives(self) -> None:
        """A 2-pixel defect in a 600x600 mask still marks at least one input pixel."""
        m = np.zeros((600, 600), np.uint8)
        m[300:302, 300] = 255
        out = mask_to_input(m, InputSpec())
        assert out.dtype == bool and 1 <= out.sum() <= 4

    def test_self_test_inputs(self) -> None:
        """The card's recipe, exactly."""
        x = self_test_inputs(200)
        want = np.random.default_rng(1234).integers(0, 256, (4, 200, 200, 1)).astype("float32")
        assert x.dtype == np.float32 and np.array_equal(x, want)
