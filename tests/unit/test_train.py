"""Unit tests for the training pieces that guide attention: the box-mask augmentation and the attention loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.lab.data import Sample, box_mask
from agent.lab.model.train import TrainConfig, attention_loss, box_masks, make_dataset, sample_weights


def _onehot(label: int) -> np.ndarray:
    return np.eye(6, dtype=np.float32)[[label]]


def _features_peaking_at(row: int, col: int) -> np.ndarray:
    """A [1,13,13,2] feature map whose class-0 map (channel 0 x kernel) peaks at one cell."""
    f = np.zeros((1, 13, 13, 2), np.float32)
    f[0, row, col, 0] = 8.0
    return f


KERNEL = np.zeros((2, 6), np.float32)
KERNEL[0, 0] = 1.0  # class 0's map is feature channel 0


class TestAttentionLoss:
    """attention_loss: low when the class map's mass sits in the boxes, high when it sits outside."""

    def test_peak_inside_beats_peak_outside(self) -> None:
        """A map peaking inside the box scores a lower loss than the same peak outside it."""
        mask = box_mask([(1, 1, 60, 60)], (200, 200)).astype(np.float32)[None, :, :, None]
        inside = float(attention_loss(_features_peaking_at(1, 1), KERNEL, _onehot(0), mask))
        outside = float(attention_loss(_features_peaking_at(11, 11), KERNEL, _onehot(0), mask))
        assert inside < 1.0 < outside

    def test_whole_image_box_is_free(self) -> None:
        """When the box is the whole image the loss is zero, whatever the map."""
        mask = np.ones((1, 200, 200, 1), np.float32)
        assert float(attention_loss(_features_peaking_at(6, 3), KERNEL, _onehot(0), mask)) == pytest.approx(
            0.0, abs=1e-5
        )

    def test_only_the_true_class_map_counts(self) -> None:
        """The loss reads the true class's map: another class's peak outside the box does not change it."""
        mask = box_mask([(1, 1, 60, 60)], (200, 200)).astype(np.float32)[None, :, :, None]
        f = _features_peaking_at(1, 1)
        k = KERNEL.copy()
        base = float(attention_loss(f, k, _onehot(0), mask))
        f[0, 12, 12, 1] = 50.0
        k[1, 3] = 1.0  # class 3 reads channel 1, which now peaks far outside the box
        assert float(attention_loss(f, k, _onehot(0), mask)) == pytest.approx(base, rel=1e-5)


class TestBalancedSampling:
    """sample_weights: class c's share of the draws is proportional to n_c^(1 - balance)."""

    @pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
    def test_class_shares(self, balance: float) -> None:
        y = np.array([0] * 90 + [1] * 10)
        w = sample_weights(y, balance)
        share = w[y == 1].sum()
        assert w.sum() == pytest.approx(1.0)
        assert share == pytest.approx(10 ** (1 - balance) / (90 ** (1 - balance) + 10 ** (1 - balance)))

    def test_degraded_batches_stay_in_range(self) -> None:
        """Augmented training batches (with degradations) are float32 0..255 with masks of 0/1."""
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (8, 200, 200, 1)).astype(np.float32)
        (xa, ma), ya = next(iter(make_dataset(x, np.arange(8) % 2, 8, True, seed=2, n_classes=2, balance=0.5)))
        xa, ma = xa.numpy(), ma.numpy()
        assert xa.shape == (8, 200, 200, 1) and xa.min() >= 0 and xa.max() <= 255
        assert set(np.unique(ma)) <= {0.0, 1.0} and ya.shape == (8, 2)


class TestGuidedAugmentation:
    """make_dataset moves each image's box mask with the image through flips, rotations and shifts."""

    def test_mask_follows_the_defect(self) -> None:
        """A bright square and its box mask still coincide after augmentation, over many draws."""
        img = np.zeros((200, 200), np.float32)
        img[20:70, 120:180] = 255.0
        sample = Sample(path=Path("crazing_1.jpg"), label=0, boxes=((121, 21, 180, 70),))
        masks = box_masks([sample])
        assert masks.dtype == np.uint8 and masks[0, 20:70, 120:180, 0].all() and masks.sum() == 50 * 60
        x = np.repeat(img[None, :, :, None], 16, 0)
        # Geometry only: brightness or contrast drift may push the square across the 127.5 threshold used below.
        ds = make_dataset(x, np.zeros(16, np.int64), 16, True, seed=1, masks=np.repeat(masks, 16, 0),
                          n_classes=6, photometric=False)
        (xa, ma), _ = next(iter(ds))
        bright = xa.numpy()[..., 0] > 127.5
        m = ma.numpy()[..., 0] > 0.5
        assert (bright == m).mean() > 0.99
        assert not (m == m[0]).all(), "sixteen draws should not all land the square in the same place"

    def test_validation_batches_are_plain(self) -> None:
        """Validation batches are (image, one-hot) with untouched pixels."""
        x = np.arange(200 * 200, dtype=np.float32).reshape(1, 200, 200, 1) % 256
        xb, yb = next(iter(make_dataset(x, np.array([2]), 8, False, seed=0)))
        assert np.array_equal(xb.numpy(), x) and yb.numpy().argmax(1).tolist() == [2]

    def test_attention_without_masks_is_an_error(self) -> None:
        """Training with attention but no masks fails fast instead of guiding towards nothing."""
        from agent.lab.model.arch import ArchSpec
        from agent.lab.model.train import fit

        x = np.zeros((2, 200, 200, 1), np.float32)
        with pytest.raises(ValueError, match="box masks"):
            fit(ArchSpec(), (x, np.zeros(2, np.int64)), (x, np.zeros(2, np.int64)), TrainConfig(attention_weight=1))


class TestInputNormalisation:
    """ArchSpec.normalize: the fixed x/127.5 - 1, or each image to zero mean and unit variance."""

    def test_image_normalisation_ignores_brightness_and_contrast(self) -> None:
        """With normalize="image" the first layer maps a tile and its brighter, lower-contrast copy to the same
        values (up to the epsilon's share of the variance); the fixed x/127.5 - 1 does not."""
        import json

        import keras

        from agent.lab.model.arch import IMAGE_NORM_EPSILON, ArchSpec, build

        card = json.loads((Path(__file__).resolve().parents[2] / "agent" / "models" / "magnetic-tile.json").read_text())
        assert ArchSpec.from_dict(card["architecture"]).normalize == "image"
        x = np.random.default_rng(0).integers(60, 200, (1, 200, 200, 1)).astype(np.float32)
        y = (x - 128) * 0.6 + 150  # contrast x0.6 about 128, then brighter
        for normalize in ("image", "fixed"):
            model = build(ArchSpec.from_dict({**card["architecture"], "normalize": normalize}), num_classes=6)
            first = keras.Model(model.inputs, model.get_layer("normalize").output)
            a, b = first.predict(np.concatenate([x, y]), verbose=0)
            if normalize == "image":
                # Exact but for epsilon: sigma_x ~40 and sigma_y ~24 gray levels, so the two differ by ~1.5%.
                ratio = np.sqrt((0.36 * x.var() + IMAGE_NORM_EPSILON) / (0.36 * (x.var() + IMAGE_NORM_EPSILON)))
                np.testing.assert_allclose(a, b * ratio, rtol=1e-3, atol=1e-3)
                assert abs(float(a.mean())) < 1e-3 and abs(float(a.std()) - 1) < 0.02
            else:
                assert not np.allclose(a, b, atol=0.05)

    def test_unknown_normalisation_is_refused(self) -> None:
        """A misspelt normalize is a ValueError naming the choices, not a silently fixed model."""
        from agent.lab.model.arch import ArchSpec

        with pytest.raises(ValueError, match="expected fixed or image"):
            ArchSpec(normalize="per-image")
