"""Tests for the input geometry: every frame size becomes the card's input, bit-exact with a hand-written cv2 call."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.geometry import (
    InputSpec,
    combine,
    frame_picks,
    mask_to_input,
    self_test_inputs,
    stitch,
    tile_offsets,
    tile_origins,
    tiles,
    to_gray,
    to_input,
)

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


TILE = InputSpec(200, "tile")


class TestTile:
    """Native-scale tiling: short side to the input size, aspect kept, overlapping tiles edge to edge."""

    @pytest.mark.parametrize(("h", "w"), SIZES)
    def test_every_size_matches_the_card_rule(self, h: int, w: int) -> None:
        """The plane and its tiles are the card's rule written out by hand with cv2 and numpy."""
        img = _frame(h, w)
        s = min(200 / min(h, w), 8 * 200 / max(h, w))
        nw, nh = max(200, round(w * s)), max(200, round(h * s))
        want = img if (nh, nw) == (h, w) else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
        plane = to_input(img, TILE)
        assert plane.dtype == np.uint8 and np.array_equal(plane, want)
        assert min(plane.shape) == 200 and max(plane.shape) <= 8 * 200
        ts = tiles(plane, 200)
        assert all(t.shape == (200, 200) for t in ts)
        k = -(-nh // 200) * -(-nw // 200)
        assert len(ts) == k <= 8

    def test_magnetic_tile_shapes(self) -> None:
        """A 2:1 frame costs 2 inputs, 2.5:1 costs 3, a square one 1 (the card's stated cost)."""
        assert len(tiles(to_input(_frame(200, 400), TILE), 200)) == 2
        assert len(tiles(to_input(_frame(100, 250), TILE), 200)) == 3
        assert len(tiles(to_input(_frame(600, 600), TILE), 200)) == 1

    def test_extreme_aspect_is_capped(self) -> None:
        """A 1x4096 frame is squeezed along its long side to max_tiles inputs, not 4096."""
        plane = to_input(_frame(1, 4096), InputSpec(200, "tile", max_tiles=5))
        assert plane.shape == (200, 1000) and len(tiles(plane, 200)) == 5

    @pytest.mark.parametrize("length", [200, 201, 399, 400, 401, 999, 1600])
    def test_offsets_cover_the_axis(self, length: int) -> None:
        """ceil(L/200) tiles, first at 0, last flush with the end, every pixel covered, evenly spread."""
        offs = tile_offsets(length, 200)
        assert len(offs) == -(-length // 200) and offs[0] == 0 and offs[-1] == length - 200
        covered = np.zeros(length, bool)
        for o in offs:
            covered[o:o + 200] = True
        assert covered.all() and offs == sorted(offs)

    def test_short_axis_is_refused(self) -> None:
        """A plane shorter than a tile is a geometry bug, not a silent pad."""
        with pytest.raises(ValueError):
            tile_offsets(150, 200)

    def test_stitch_puts_each_map_back(self) -> None:
        """Tile maps go back to their origins; overlaps take the maximum."""
        shape = (200, 500)
        maps = np.zeros((3, 200, 200), np.float32)
        for i in range(3):
            maps[i] = i + 1
        out = stitch(maps, shape)
        (o0, o1, o2) = [ox for _, ox in tile_origins(shape, 200)]
        assert (o0, o1, o2) == (0, 150, 300)
        assert out[0, 0] == 1 and out[0, 160] == 2 and out[0, 499] == 3 and out[0, 320] == 3

    def test_mask_follows_the_plane(self) -> None:
        """A defect mask is moved onto the plane: a defect at the far end lands in the last tile."""
        m = np.zeros((100, 400), np.uint8)
        m[40:44, 390:396] = 255
        plane_mask = mask_to_input(m, TILE)
        assert plane_mask.shape == (200, 800)
        ts = tiles(plane_mask, 200)
        assert [bool(t.any()) for t in ts] == [False, False, False, True]


class TestCombine:
    """A tiled frame is decided by its least good-looking tile."""

    def test_lowest_pass_probability_decides(self) -> None:
        """With a pass class, the tile with the lowest pass probability decides; the first one on a tie."""
        p = np.array([[0.1, 0.9], [0.6, 0.4], [0.6, 0.4]])
        assert combine(p, np.array([False, True])) == 1

    def test_no_pass_class_takes_the_most_confident(self) -> None:
        """Without a pass class, the most confident tile decides."""
        p = np.array([[0.5, 0.5], [0.1, 0.9], [0.8, 0.2]])
        assert combine(p, np.zeros(2, bool)) == 1

    def test_frame_picks_matches_combine_per_frame(self) -> None:
        """frame_picks over many frames equals combine on each frame's own rows."""
        rng = np.random.default_rng(3)
        counts = [1, 3, 2, 1, 4]
        p = rng.dirichlet(np.ones(4), sum(counts))
        frame = np.repeat(np.arange(len(counts)), counts)
        mask = np.array([False, False, True, False])
        picks = frame_picks(p, frame, len(counts), mask)
        starts = np.cumsum([0, *counts[:-1]])
        assert picks.tolist() == [int(a) + combine(p[a:a + k], mask) for a, k in zip(starts, counts, strict=True)]


class TestSpec:
    """InputSpec round-trips the card and refuses what it cannot reproduce."""

    @pytest.mark.parametrize("spec", [InputSpec(200, "letterbox", "INTER_LINEAR", "BORDER_REPLICATE", 0),
                                      InputSpec(200, "tile", max_tiles=5)])
    def test_card_round_trip(self, spec: InputSpec) -> None:
        """to_card + the existing keys -> from_card gives the same spec."""
        card_input = {"shape": [None, 200, 200, 1], **spec.to_card()}
        assert InputSpec.from_card(card_input) == spec

    def test_legacy_card(self) -> None:
        """A card with only shape means 200x200 resize with INTER_AREA."""
        assert InputSpec.from_card({"shape": [None, 200, 200, 1]}) == InputSpec()

    @pytest.mark.parametrize("bad", [{"method": "crop"}, {"interpolation": "INTER_MAGIC"}, {"size": 0},
                                     {"method": "tile", "max_tiles": 0}])
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
