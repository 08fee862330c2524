"""Unit tests for the pure parts of explanations and of the audit: heatmaps, pictures and metrics."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.errors import DataError
from agent.explain import (
    blurred,
    cam,
    cam_ig_heatmaps,
    detail_maps,
    detail_refined,
    gradcam_weights,
    gradcampp_weights,
    heatmap_png,
    heatmap_u8,
    ig_heatmaps,
    normalize_maps,
    overlay,
    png,
    shift_cam_raw,
    shift_offsets,
    shifted_crops,
    to_heatmaps,
    unshift_mean,
    weighted_maps,
)
from agent.lab import audit
from agent.lab.audit import (
    ImageResult,
    box_area_share,
    decision_changed,
    energy_in_boxes,
    grid_peaks,
    interleave_by_class,
    mask_random,
    mask_top,
    neutral_fill,
    pointing_hit,
    pointing_reachable,
    render_row,
    summarize,
    top_mask,
)
from agent.lab.data import Sample, box_mask

REPO = Path(__file__).resolve().parents[2]
BOX = (51, 101, 100, 150)  # VOC, 1-based inclusive: columns 50..99, rows 100..149 (0-based)


def perfect_heatmap(box: tuple[int, int, int, int] = BOX) -> np.ndarray:
    h = np.zeros((200, 200), np.float32)
    x0, y0, x1, y1 = box
    h[y0 - 1 : y1, x0 - 1 : x1] = 1.0
    return h


class TestImports:
    def test_pure_modules_do_not_import_tensorflow(self) -> None:
        """Lean backends import explain and audit without pulling TensorFlow in."""
        code = ("import sys, agent.explain, agent.lab.audit; "
                "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
        assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


class TestNormalizeMaps:
    def test_each_map_spans_zero_to_one(self) -> None:
        """Min-max normalisation is per image, not per batch."""
        maps = np.stack([np.arange(16, dtype=np.float32).reshape(4, 4), 100 + 3 * np.eye(4, dtype=np.float32)])
        out = normalize_maps(maps)
        assert out.dtype == np.float32
        assert np.allclose(out.min(axis=(1, 2)), 0) and np.allclose(out.max(axis=(1, 2)), 1)

    def test_all_zero_map_stays_zero(self) -> None:
        """A map with no positive evidence is not blown up into noise."""
        assert not normalize_maps(np.zeros((1, 5, 5))).any()

    def test_flat_positive_map_is_all_ones(self) -> None:
        """A uniform positive map means 'everywhere equally', which normalises to ones, not zeros."""
        assert (normalize_maps(np.full((1, 3, 3), 2.5)) == 1).all()


class TestToHeatmaps:
    def test_resizes_relus_and_normalises(self) -> None:
        """A 13x13 map with negative parts becomes a [0,1] 200x200 heatmap whose max stays in place."""
        m = -np.ones((1, 13, 13), np.float32)
        m[0, 3, 9] = 5.0
        h = to_heatmaps(m)
        assert h.shape == (1, 200, 200) and h.min() == 0 and h.max() == pytest.approx(1)
        r, c = np.unravel_index(np.argmax(h[0]), (200, 200))
        assert abs(r - (3 + 0.5) * 200 / 13) < 8 and abs(c - (9 + 0.5) * 200 / 13) < 8


class TestCam:
    def test_shape_range_and_dtype(self) -> None:
        """CAM maps are [N,200,200] float32 in [0,1] for any feature resolution."""
        rng = np.random.default_rng(0)
        feats = rng.random((3, 7, 7, 16)).astype(np.float32)
        kernel = rng.normal(size=(16, 6)).astype(np.float32)
        h = cam(feats, kernel, [0, 3, 5])
        assert h.shape == (3, 200, 200) and h.dtype == np.float32
        assert h.min() >= 0 and h.max() <= 1

    def test_picks_the_class_column_of_the_kernel(self) -> None:
        """Channel 0 lights the left half, channel 1 the right; the class's weights choose which shows."""
        feats = np.zeros((2, 4, 4, 2), np.float32)
        feats[:, :, :2, 0] = 1.0
        feats[:, :, 2:, 1] = 1.0
        kernel = np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], np.float32)
        h = cam(feats, kernel, [0, 1])
        assert h[0, :, :75].mean() > 0.9 and h[0, :, 125:].max() == 0
        assert h[1, :, 125:].mean() > 0.9 and h[1, :, :75].max() == 0

    def test_rejects_mismatched_kernel(self) -> None:
        """A kernel with the wrong channel count is an error, not a broadcast."""
        with pytest.raises(ValueError, match="does not fit"):
            cam(np.zeros((1, 4, 4, 8)), np.zeros((7, 6)), [0])


class TestGradWeights:
    def test_gradcam_of_gap_dense_gradients_is_cam(self) -> None:
        """For a GAP + dense head the logit's gradient is w/(h*w) everywhere, so Grad-CAM equals CAM."""
        rng = np.random.default_rng(1)
        feats = rng.random((2, 5, 5, 8)).astype(np.float32)
        kernel = rng.normal(size=(8, 6)).astype(np.float32)
        idx = np.array([2, 4])
        grads = np.broadcast_to(kernel.T[idx][:, None, None, :] / 25, feats.shape)
        assert np.allclose(
            to_heatmaps(weighted_maps(feats, gradcam_weights(grads))), cam(feats, kernel, idx), atol=1e-5
        )

    def test_gradcampp_ignores_channels_with_negative_gradients(self) -> None:
        """Grad-CAM++ weights only positive gradients, so a channel that lowers the logit gets weight 0."""
        feats = np.ones((1, 3, 3, 2), np.float32)
        grads = np.stack([np.full((1, 3, 3), 0.5), np.full((1, 3, 3), -0.5)], axis=-1)
        w = gradcampp_weights(feats, grads)
        assert w[0, 0] > 0 and w[0, 1] == 0

    def test_gradcampp_survives_zero_gradients(self) -> None:
        """All-zero gradients give zero weights, not NaN from 0/0."""
        w = gradcampp_weights(np.ones((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)))
        assert np.isfinite(w).all() and not w.any()


class TestIgHeatmaps:
    def test_attribution_is_zero_where_image_equals_baseline(self) -> None:
        """Pixels equal to their baseline get no attribution, bright ones with gradient do."""
        x = np.full((1, 200, 200, 1), 127.5, np.float32)
        x[0, 90:110, 90:110] = 250
        h = ig_heatmaps(x, np.ones_like(x), np.full_like(x, 127.5))
        assert h.shape == (1, 200, 200) and h.max() == pytest.approx(1)
        assert h[0, 100, 100] > 0.9 and h[0, 10, 10] == 0

    def test_blurred_baseline_attributes_the_fine_structure_not_the_shading(self) -> None:
        """Against its blurred self, a smooth brightness ramp gets ~no attribution and a small pit on it all of it."""
        ramp = np.tile(np.linspace(40, 220, 200, dtype=np.float32), (200, 1))
        x = ramp.copy()
        x[150:154, 30:34] -= 35  # a 4x4 pit in the dark half, where a mid-gray baseline would rate it least
        x = x[None, :, :, None]
        h = ig_heatmaps(x, np.ones_like(x), blurred(x))
        assert np.unravel_index(h[0].argmax(), (200, 200)) in {(y, xx) for y in range(148, 156) for xx in range(28, 36)}
        assert h[0, 20:100, 60:170].max() < 0.05  # the ramp, away from the pit and from the borders


class TestBlurred:
    def test_keeps_shape_and_flattens_detail(self) -> None:
        """[N,h,w,1] in, the same shape out; a single bright pixel is spread to a low bump, a flat image unchanged."""
        x = np.full((2, 50, 60, 1), 100.0, np.float32)
        x[1, 25, 30] = 255
        b = blurred(x)
        assert b.shape == x.shape and b.dtype == np.float32
        assert np.allclose(b[0], 100.0) and b[1].max() < 102.0 and b[1].max() > 100.0


class TestCamIgHeatmaps:
    def test_product_keeps_the_pixel_inside_the_hot_cell(self) -> None:
        """Of two equally sharp IG peaks, the one inside the CAM's hot cell wins the maximum."""
        c = np.zeros((1, 200, 200), np.float32)
        c[0, 0:40, 0:40] = 1.0
        g = np.zeros((1, 200, 200), np.float32)
        g[0, 20, 25] = g[0, 150, 150] = 1.0
        h = cam_ig_heatmaps(c, g)
        assert h.max() == pytest.approx(1.0) and np.unravel_index(h.argmax(), h.shape[1:]) == (20, 25)
        assert h[0, 150, 150] == 0

    def test_rejects_mismatched_shapes(self) -> None:
        """Maps of different shapes are a ValueError, not a broadcast."""
        with pytest.raises(ValueError, match="differ"):
            cam_ig_heatmaps(np.zeros((1, 200, 200)), np.zeros((2, 200, 200)))


class TestDetailRefined:
    @staticmethod
    def scene(spots: list[tuple[int, int, float]]) -> np.ndarray:
        """A flat gray tile (120) with light noise and a 4x4 spot of the given gray at each (row, col, gray)."""
        img = np.clip(np.random.default_rng(0).normal(120.0, 2.0, (1, 200, 200)), 0, 255).astype(np.float32)
        for r, c, gray in spots:
            img[0, r:r + 4, c:c + 4] = gray
        return img

    @staticmethod
    def blob(r: int, c: int, sigma: float = 20.0) -> np.ndarray:
        """A broad class map peaking at (r, c), the shape an upsampled 7x7 CAM has."""
        yy, xx = np.mgrid[:200, :200]
        return np.exp(-((yy - r) ** 2 + (xx - c) ** 2) / (2 * sigma**2)).astype(np.float32)[None]

    def test_moves_the_peak_onto_the_small_defect_the_class_map_points_near(self) -> None:
        """A spot 14 px from the class map's peak: the refined map peaks on the spot, the class map beside it."""
        img, heat = self.scene([(60, 70, 40.0)]), self.blob(70, 80)
        refined = detail_refined(heat, img)
        spot = [(71, 61, 74, 64)]  # VOC, 1-based inclusive
        assert not pointing_hit(heat[0], spot) and pointing_hit(refined[0], spot)
        assert refined.shape == (1, 200, 200) and refined.min() >= 0.0 and refined.max() == pytest.approx(1.0)

    def test_keeps_the_class_maps_choice_of_region(self) -> None:
        """A spot twice as strong, 25 px from the class map's peak, does not take the maximum from the weaker spot
        14 px from it (it would with the map to the first power): the class map picks where, the detail the point."""
        img, heat = self.scene([(60, 70, 80.0), (92, 90, 40.0)]), self.blob(70, 80)
        r, c = np.unravel_index(detail_refined(heat, img)[0].argmax(), (200, 200))
        assert abs(r - 62) <= 3 and abs(c - 72) <= 3
        r1, c1 = np.unravel_index(normalize_maps(heat * detail_maps(img))[0].argmax(), (200, 200))
        assert abs(r1 - 94) <= 3 and abs(c1 - 92) <= 3

    def test_detail_is_the_fine_structure_not_the_shading(self) -> None:
        """A smooth ramp has almost no detail; a spot on it has, in [0,1] with the maximum at the spot."""
        ramp = np.tile(np.linspace(40, 200, 200, dtype=np.float32), (200, 1))[None]
        spotted = ramp.copy()
        spotted[0, 100:104, 100:104] = 0.0
        d = detail_maps(spotted)
        assert d.max() == pytest.approx(1.0) and abs(np.unravel_index(d.argmax(), d.shape[1:])[0] - 101) <= 3
        assert d[0, 20:60, 20:60].max() < 0.1  # the ramp away from the spot (and away from the border)

    def test_rejects_mismatched_shapes(self) -> None:
        """Heatmaps and images of different shapes are a ValueError."""
        with pytest.raises(ValueError, match="differ"):
            detail_refined(np.zeros((1, 200, 200)), np.zeros((1, 100, 100)))


def block_features(x: np.ndarray) -> np.ndarray:
    """A stand-in for a network's last feature map: each input averaged over a 7x7 grid of cells, one channel."""
    return np.stack([cv2.resize(t[..., 0], (7, 7), interpolation=cv2.INTER_AREA) for t in x])[..., None]


class TestShiftCam:
    def test_offsets_are_thirds_of_a_cell_around_zero(self) -> None:
        """A 7x7 map on 200 px moves the input by -10, 0, +10 px per axis: 9 offsets, (0, 0) among them."""
        offs = shift_offsets(7, 200)
        assert len(offs) == 9 and (0, 0) in offs and {dy for dy, _ in offs} == {-10, 0, 10}
        assert shift_offsets(13, 200)[0] == (-5, -5)
        with pytest.raises(ValueError):
            shift_offsets(0, 200)

    def test_crops_moved_back_give_the_image(self) -> None:
        """Each crop shows the image at its offset, so moving the crops back and averaging is the image itself."""
        img = np.random.default_rng(0).uniform(0, 255, (60, 80)).astype(np.float32)
        offs = shift_offsets(7, 60)
        crops = shifted_crops(img, offs)
        assert crops.shape == (9, 60, 80)
        dy, dx = offs[-1]
        assert np.array_equal(crops[-1][: 60 - dy, : 80 - dx], img[dy:, dx:])
        assert np.allclose(unshift_mean(crops, offs), img, atol=1e-4)

    def test_rejects_offsets_larger_than_the_image_and_miscounted_maps(self) -> None:
        """Offsets the mirror cannot fill, or a map count that is not the offset count, are ValueErrors."""
        with pytest.raises(ValueError, match="larger than"):
            shifted_crops(np.zeros((5, 5)), [(0, 0), (7, 7)])
        with pytest.raises(ValueError, match="2 maps for 3 offsets"):
            unshift_mean(np.zeros((2, 10, 10)), [(0, 0), (1, 1), (-1, -1)])

    def test_peaks_on_a_defect_between_cell_centres_that_one_cam_misses(self) -> None:
        """A 5x5 spot between a 7x7 map's cell centres: one CAM peaks 11 px away, the shift-averaged map on it."""
        img = np.zeros((200, 200), np.float32)
        img[48:53, 48:53] = 255.0
        kernel = np.ones((1, 1), np.float32)
        plain = cam(block_features(img[None, :, :, None]), kernel, [0])[0]
        shifted = shift_cam_raw(block_features, img[None], kernel, [0])[0]
        spot = [(49, 49, 53, 53)]  # VOC, 1-based inclusive
        assert not pointing_hit(plain, spot)
        assert pointing_hit(normalize_maps(shifted[None])[0], spot)
        assert shifted.shape == (200, 200) and shifted.min() >= 0.0

    def test_without_shifts_it_is_the_plain_cam(self) -> None:
        """shift=False gives each tile's one CAM, the map `cam` draws, before normalisation."""
        img = np.random.default_rng(1).uniform(0, 255, (2, 200, 200)).astype(np.float32)
        kernel = np.ones((1, 1), np.float32)
        raw = shift_cam_raw(block_features, img, kernel, [0, 0], shift=False)
        assert np.allclose(normalize_maps(raw), cam(block_features(img[..., None]), kernel, [0, 0]), atol=1e-6)

    def test_falls_back_to_plain_cam_behind_a_queue_of_reviews(self) -> None:
        """Up to SHIFT_MAX_WAITING reviews waiting the agent explains with the card's method; more, with its one-pass
        form (plain cam, or cam-detail for shift-cam-detail)."""
        from agent.explain import AGENT_METHOD, SHIFT_MAX_WAITING, method_for

        assert method_for(0) == method_for(SHIFT_MAX_WAITING) == AGENT_METHOD == "shift-cam"
        assert method_for(SHIFT_MAX_WAITING, "shift-cam-detail") == "shift-cam-detail"
        assert method_for(SHIFT_MAX_WAITING + 1) == "cam"
        assert method_for(SHIFT_MAX_WAITING + 1, "shift-cam-detail") == "cam-detail"
        assert method_for(SHIFT_MAX_WAITING + 1, "shift-cam-smooth") == "cam-smooth"

    def test_uses_the_class_column_of_each_input(self) -> None:
        """Each input is explained by its own class's kernel column; a negative column gives an all-zero map."""
        img = np.zeros((2, 200, 200), np.float32)
        img[:, 90:110, 90:110] = 255.0
        kernel = np.array([[1.0, -1.0]], np.float32)
        maps = shift_cam_raw(block_features, img, kernel, [0, 1])
        assert maps[0].max() > 0 and not maps[1].any()
        with pytest.raises(ValueError, match="1 class indices for 2 inputs"):
            shift_cam_raw(block_features, img, kernel, [0])


class TestOverlayAndPng:
    def test_overlay_is_bgr_uint8(self) -> None:
        """The overlay has the image's size, three channels, uint8."""
        gray = np.full((200, 200), 90, np.uint8)
        out = overlay(gray, perfect_heatmap())
        assert out.shape == (200, 200, 3) and out.dtype == np.uint8
        assert not np.array_equal(out[125, 75], out[10, 10])  # hot and cold regions differ

    def test_overlay_accepts_float_hw1_images(self) -> None:
        """The model's float [h,w,1] input can be overlaid directly."""
        assert overlay(np.full((200, 200, 1), 90.0, np.float32), perfect_heatmap()).shape == (200, 200, 3)

    def test_overlay_rejects_shape_mismatch(self) -> None:
        """A heatmap of another size is an error, not a silent crop."""
        with pytest.raises(ValueError, match="differ"):
            overlay(np.zeros((200, 200), np.uint8), np.zeros((100, 100)))

    def test_png_round_trip(self) -> None:
        """PNG is lossless: decoding gives the image back."""
        img = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        data = png(img)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), img)

    def test_heatmap_png_is_8bit_grayscale(self) -> None:
        """A heatmap PNG decodes to one uint8 channel equal to round(255 * heatmap)."""
        h = np.linspace(0, 1, 200 * 200, dtype=np.float32).reshape(200, 200)
        dec = cv2.imdecode(np.frombuffer(heatmap_png(h), np.uint8), cv2.IMREAD_UNCHANGED)
        assert dec.shape == (200, 200) and dec.dtype == np.uint8
        assert np.array_equal(dec, heatmap_u8(h)) and dec.max() == 255 and dec.min() == 0


class TestBoxMask:
    def test_voc_boxes_are_one_based_inclusive(self) -> None:
        """(1,1,200,200) covers the whole image and (51,101,100,150) a 50x50 block starting at (100,50)."""
        assert box_mask([(1, 1, 200, 200)], (200, 200)).all()
        m = box_mask([BOX], (200, 200))
        assert m.sum() == 2500 and m[100, 50] and m[149, 99] and not m[99, 50] and not m[100, 100]

    def test_union_counts_overlap_once(self) -> None:
        """Overlapping boxes form a union, so their shared area is not double counted."""
        m = box_mask([(1, 1, 10, 10), (6, 6, 15, 15)], (200, 200))
        assert m.sum() == 100 + 100 - 25


class TestPointingHit:
    def test_perfect_heatmap_hits(self) -> None:
        """A heatmap that is 1 inside the box and 0 outside points into the box."""
        assert pointing_hit(perfect_heatmap(), [BOX])

    def test_max_outside_misses(self) -> None:
        """A maximum outside every box is a miss."""
        h = perfect_heatmap() * 0.5
        h[10, 10] = 1.0
        assert not pointing_hit(h, [BOX, (150, 150, 200, 200)])

    def test_any_of_several_boxes_counts(self) -> None:
        """The maximum may be in any of the boxes."""
        assert pointing_hit(perfect_heatmap(), [(1, 1, 5, 5), BOX])

    def test_zero_map_or_no_boxes_miss(self) -> None:
        """An all-zero heatmap points nowhere and an image without boxes cannot be hit."""
        assert not pointing_hit(np.zeros((200, 200)), [(1, 1, 200, 200)])
        assert not pointing_hit(perfect_heatmap(), [])


class TestPointingCeiling:
    def test_a_7x7_map_peaks_at_cell_centres(self) -> None:
        """A 7x7 map can peak at about 49 places of a 200x200 heatmap, the cell centres among them."""
        peaks = grid_peaks(7)
        assert peaks.shape == (200, 200) and 49 <= peaks.sum() < 2000
        step = 200 / 7
        centre = round(3.5 * step - 0.5)  # the middle cell's centre in pixel coordinates
        assert peaks[centre - 1 : centre + 2, centre - 1 : centre + 2].any()
        assert not peaks[round(3 * step) + 2, centre]  # between two centres nothing can peak

    def test_a_small_region_between_centres_is_out_of_reach(self) -> None:
        """A 3x3 defect between two cell centres is unreachable at 7x7 but reachable at 50x50, and with tolerance."""
        region = np.zeros((200, 200), bool)
        r = round(3 * 200 / 7)  # the border between rows 2 and 3 of the grid
        region[r - 1 : r + 2, 99:102] = True
        assert not pointing_reachable(region, 7)
        assert pointing_reachable(region, 50)
        assert pointing_reachable(region, 7, tolerance=15)

    def test_empty_region_is_never_reached(self) -> None:
        """No defect pixels means no hit, at any grid."""
        assert not pointing_reachable(np.zeros((200, 200), bool), 50)


class TestEnergyInBoxes:
    def test_perfect_heatmap_scores_one(self) -> None:
        """All of a perfect heatmap's mass is inside the box."""
        assert energy_in_boxes(perfect_heatmap(), [BOX]) == pytest.approx(1.0)

    def test_uniform_heatmap_scores_box_area_share(self) -> None:
        """An uninformative (uniform) heatmap scores exactly the boxes' share of the image."""
        boxes = [BOX, (150, 10, 190, 60), (60, 120, 120, 180)]
        e = energy_in_boxes(np.full((200, 200), 0.7, np.float32), boxes)
        assert e == pytest.approx(box_area_share(boxes, (200, 200)))

    def test_zero_heatmap_scores_zero(self) -> None:
        """No mass anywhere means none in the boxes."""
        assert energy_in_boxes(np.zeros((200, 200)), [BOX]) == 0.0


class TestBoxAreaShare:
    def test_share_of_image(self) -> None:
        """A 50x50 box is 1/16 of a 200x200 image, the whole-image box is 1."""
        assert box_area_share([BOX], (200, 200)) == pytest.approx(2500 / 40000)
        assert box_area_share([(1, 1, 200, 200)]) == 1.0

    def test_boxes_are_clipped_to_the_image(self) -> None:
        """A box running past the border only counts its visible part."""
        assert box_area_share([(101, 1, 300, 200)], (200, 200)) == pytest.approx(0.5)


class TestMaskTop:
    def test_replaces_exactly_the_hottest_pixels(self) -> None:
        """Masking 5% of a heatmap whose 2,000 hottest pixels are a block replaces exactly that block."""
        img = np.full((200, 200, 1), 200.0, np.float32)
        h = np.zeros((200, 200), np.float32)
        h[0:40, 0:50] = np.linspace(0.5, 1, 2000).reshape(40, 50)
        out = mask_top(img, h, 0.05, 7.0)
        assert out.shape == img.shape and (out[0:40, 0:50] == 7).all() and (out == 7).sum() == 2000
        assert (img == 200).all()  # the input is not modified

    def test_array_fill_takes_the_fill_image_pixels(self) -> None:
        """With an image as fill the masked pixels take the fill's values at the same places."""
        img = np.zeros((200, 200), np.float32)
        fill = np.arange(40000, dtype=np.float32).reshape(200, 200)
        out = mask_top(img, perfect_heatmap(), 2500 / 40000, fill)
        m = box_mask([BOX], (200, 200))
        assert np.array_equal(out[m], fill[m]) and not out[~m].any()

    def test_top_mask_size(self) -> None:
        """top_mask selects round(frac * pixels) pixels even with ties."""
        assert top_mask(np.zeros((200, 200)), 0.1).sum() == 4000


class TestMaskRandom:
    def test_count_and_seed_determinism(self) -> None:
        """The same seed masks the same round(frac * pixels) pixels; another seed different ones."""
        img = np.full((200, 200, 1), 100.0, np.float32)
        a = mask_random(img, 0.2, np.random.default_rng(3), 0.0)
        b = mask_random(img, 0.2, np.random.default_rng(3), 0.0)
        c = mask_random(img, 0.2, np.random.default_rng(4), 0.0)
        assert (a == 0).sum() == 8000 and np.array_equal(a, b) and not np.array_equal(a, c)


class TestNeutralFill:
    def test_mean_and_blur(self) -> None:
        """'mean' is the image mean; 'blur' is an image of the same shape keeping the overall level."""
        img = np.random.default_rng(5).integers(0, 256, (200, 200, 1)).astype(np.float32)
        assert neutral_fill(img, "mean") == pytest.approx(float(img.mean()))
        blurred = neutral_fill(img, "blur")
        assert isinstance(blurred, np.ndarray) and blurred.shape == img.shape
        assert blurred.std() < img.std() / 5 and abs(blurred.mean() - img.mean()) < 2

    def test_unknown_mode(self) -> None:
        """An unknown fill name is rejected."""
        with pytest.raises(ValueError):
            neutral_fill(np.zeros((2, 2)), "noise")


class TestDecisionChanged:
    def test_flip_and_confidence_drop(self) -> None:
        """A new argmax is a flip and an impact; a kept argmax below 0.5 is an impact only."""
        assert decision_changed(0, np.array([0.9, 0.1])) == (False, False)
        assert decision_changed(0, np.array([0.2, 0.8])) == (True, True)
        assert decision_changed(0, np.array([0.45, 0.3, 0.25])) == (True, False)


class TestInterleaveByClass:
    def test_prefix_covers_all_classes(self) -> None:
        """Round-robin order puts one image of each class first, so --limit stays balanced."""
        samples = [Sample(Path(f"{c}_{i}.jpg"), c) for c in (0, 1, 2) for i in range(3)]
        assert [s.label for s in interleave_by_class(samples)[:6]] == [0, 1, 2, 0, 1, 2]


class TestSummarize:
    def test_keys_and_rates(self) -> None:
        """The summary has the report's keys, per-class blocks and impact rates averaged over seeds."""

        def result(i: int, label: int, pred: int, hit: bool, top: bool, rnd: bool) -> ImageResult:
            r = ImageResult(i, f"x_{i}.jpg", label, pred, 0.9, (BOX,), hit, 0.5, 0.0625)
            for k in ("5", "10", "20"):
                r.impact[f"top{k}"] = r.flipped[f"top{k}"] = top
                for s in range(2):
                    r.impact[f"random{k}@{s}"] = r.flipped[f"random{k}@{s}"] = rnd and s == 0
            return r

        s = summarize([result(0, 0, 0, True, True, True), result(1, 1, 2, False, False, False)], 2, True)
        assert s["n"] == 2 and s["accuracy"] == 0.5 and s["pointing_game"] == 0.5
        assert s["energy_in_boxes"] == 0.5 and s["box_area_share"] == 0.0625
        assert s["impact"] == {
            "top5": 0.5,
            "random5": 0.25,
            "top10": 0.5,
            "random10": 0.25,
            "top20": 0.5,
            "random20": 0.25,
        }
        assert s["per_class"]["crazing"]["n"] == 1 and s["per_class"]["inclusion"]["accuracy"] == 0.0
        assert s["errors"] == [{"file": "x_1.jpg", "true": "inclusion", "pred": "patches", "confidence": 0.9}]
        assert s["pointing_ceiling"] is None  # no grid given: a pixel-level method has no ceiling below 100%

    def test_pointing_ceiling_is_the_reachable_share(self) -> None:
        """With a grid, the ceiling is the share of localised images some map at that grid could hit."""
        rs = [ImageResult(i, f"x_{i}.jpg", 0, 0, 0.9, (BOX,), hit=False, reachable=i < 3) for i in range(4)]
        for r in rs:
            r.impact = r.flipped = {"top5": False, "top10": False, "top20": False}
        s = summarize(rs, 0, True)
        assert s["pointing_ceiling"] == 0.75 and s["per_class"]["crazing"]["pointing_ceiling"] == 0.75


class TestRenderRow:
    def test_three_panels_and_caption(self) -> None:
        """A grid row is input | overlay | boxes side by side under a caption band."""
        row = render_row(np.full((200, 200), 120, np.uint8), perfect_heatmap(), [BOX], "crazing_1.jpg")
        assert row.shape == (200 + audit.CAPTION, 3 * 200 + 2 * audit.GAP, 3) and row.dtype == np.uint8


class TestRunInputErrors:
    def args(self, data: Path, *extra: str) -> argparse.Namespace:
        p = argparse.ArgumentParser()
        audit.add_arguments(p)
        return p.parse_args(["--data", str(data), *extra])

    def test_folder_without_annotations_names_no_boxes(self, tmp_path: Path) -> None:
        """Without ANNOTATIONS/ the audit stops with a DataError that tells about --no-boxes."""
        (tmp_path / "IMAGES").mkdir()
        cv2.imwrite(str(tmp_path / "IMAGES" / "crazing_1.jpg"), np.zeros((200, 200), np.uint8))
        with pytest.raises(DataError, match="--no-boxes"):
            audit.run(self.args(tmp_path))

    def test_missing_folder(self, tmp_path: Path) -> None:
        """A missing dataset folder is a DataError."""
        with pytest.raises(DataError, match="not found"):
            audit.run(self.args(tmp_path / "nope"))


class TestSmoothed:
    def test_moves_the_maximum_to_the_middle_of_the_evidence(self) -> None:
        """A one-pixel spike beats a broad plateau before the blur and loses to it after: a texture's map points at
        the middle of where the class is, not at its single strongest cell."""
        from agent.explain import smoothed

        heat = np.zeros((1, 200, 200), np.float32)
        heat[0, 100:140, 100:140] = 0.9
        heat[0, 30, 30] = 1.0
        s = smoothed(heat, 200 / 13)
        r, c = np.unravel_index(s[0].argmax(), (200, 200))
        assert 110 <= r <= 130 and 110 <= c <= 130 and s.max() == pytest.approx(1.0)
        with pytest.raises(ValueError, match="cell"):
            smoothed(heat, 0)


class TestTileWeighted:
    def test_a_tile_counts_as_much_as_it_holds_the_class(self) -> None:
        """A strong map in a tile the model calls good (p 0.1) ends below a weaker one in the deciding tile (p 0.9)."""
        from agent.explain import tile_weighted

        raw = np.zeros((2, 4, 4), np.float32)
        raw[0, 1, 1], raw[1, 2, 2] = 5.0, 1.0
        probs = np.array([[0.9, 0.1], [0.1, 0.9]], np.float32)  # class 1: tile 0 good, tile 1 the defect
        w = tile_weighted(raw, probs, 1)
        assert w[0, 1, 1] == pytest.approx(0.5) and w[1, 2, 2] == pytest.approx(0.9)
        assert np.unravel_index(w.argmax(), w.shape) == (1, 2, 2)
        assert np.array_equal(tile_weighted(raw, probs, 0) > 0, raw > 0)  # only scaled, never moved
