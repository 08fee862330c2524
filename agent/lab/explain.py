"""Explanations for the audit: gradient methods on a Keras model, gradient-free ones on a serving backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.errors import ModelError
from agent.explain import (
    GRADIENT_FREE,
    GRADIENT_FREE_FORMS,
    IG_STEPS,
    METHODS,
    blurred,
    cam,
    cam_ig_heatmaps,
    features_one_by_one,
    gradcam_weights,
    gradcampp_weights,
    ig_heatmaps,
    normalize_maps,
    refined,
    shift_cam_raw,
    to_heatmaps,
    weighted_maps,
)


def gradient_free_maps(method: str, x: np.ndarray, features: np.ndarray, kernel: np.ndarray, used: np.ndarray,
                       features_of: Any) -> np.ndarray:
    """[N,size,size] heatmaps in [0,1] of a gradient-free method (agent.explain.GRADIENT_FREE), from a forward
    pass's feature maps (shift-cam runs `features_of` on the moved inputs; the unshifted maps are the ones given)."""
    shifted, how = GRADIENT_FREE_FORMS[method]
    heat = (normalize_maps(shift_cam_raw(features_of, x, kernel, used, features=features)) if shifted
            else cam(features, kernel, used, x.shape[1]))
    return refined(heat, x, how, x.shape[1] / features.shape[1])


def _layer(model: Any, name: str) -> Any:
    try:
        return model.get_layer(name)
    except ValueError as exc:
        raise ModelError(f"model {model.name!r} has no layer {name!r}; is it a TinyDefectNet?") from exc


def _inputs(model: Any) -> Any:
    # A single-input model must be rebuilt on the bare input tensor (not a one-item list), so the sub-model
    # takes a plain tensor like the model itself does.
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def cam_weights(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """The "logits" Dense layer's kernel [C,6] and bias [6], as float32 arrays."""
    weights = _layer(model, "logits").get_weights()
    if len(weights) != 2:
        raise ModelError("the 'logits' layer has no bias; expected Dense(6) with bias")
    kernel, bias = weights
    return np.asarray(kernel, np.float32), np.asarray(bias, np.float32)


def features_model(model: Any) -> Any:
    """A Keras model with outputs [probs, last feature map (the input of "gap")] for backends to export."""
    import keras

    return keras.Model(
        _inputs(model), [_layer(model, "probs").output, _layer(model, "gap").input], name=f"{model.name}_features"
    )


class Explainer:
    """Batched probabilities and [0,1] heatmaps for a TinyDefectNet Keras model.

    "cam" weights the last feature map by the dense kernel (no gradients); "shift-cam" (what the agent publishes)
    averages the CAMs of the input moved by thirds of a cell, moved back (agent.explain.shift_cam_raw); "gradcam"
    and "gradcampp" use the gradients of the class logit (pre-softmax, so saturated probabilities do not flatten
    them) w.r.t. `layer`'s output (default: the input of "gap"); "ig" integrates the logit's input gradients from
    the image blurred (agent.explain.blurred) to the image; "cam-ig" multiplies the CAM by the IG map, so the
    coarse map's cell is refined to pixels.

    With `pass_classes` (the card's, as indices), IG explains a defect class against passing: it integrates the
    gradients of the class logit minus the pass classes' mean logit, so what the defect class and the good parts
    share (the tile's texture, its edges) cancels and what tells the defect from a good part remains. A pass class
    itself is explained by its own logit. On the Magnetic-tile held-out split this took cam-ig's pointing game
    from 72.6% to 80.6% (both with the blurred baseline).
    """

    def __init__(self, model: Any, method: str = "cam", layer: str | None = None, batch: int = 32,
                 pass_classes: Sequence[int] = ()) -> None:
        import keras
        import tensorflow as tf

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if (method in GRADIENT_FREE or method == "cam-ig") and layer is not None:
            raise ValueError(f"method {method!r} always uses the input of 'gap'; use 'gradcam' to pick a layer")
        self.model = model
        self.method = method
        self.batch = batch
        self.kernel, self.bias = cam_weights(model)
        k = self.kernel.shape[1]
        if any(not 0 <= c < k for c in pass_classes):
            raise ValueError(f"pass classes {list(pass_classes)} must be in 0..{k - 1}")
        self.pass_classes = tuple(sorted(set(int(c) for c in pass_classes)))
        probs = _layer(model, "probs").output
        logits = _layer(model, "logits").output
        feats = _layer(model, "gap").input if layer is None else _layer(model, layer).output
        self.layer = layer or "gap:input"
        # The side of the grid a heatmap is upsampled from (7 for the shipped models' CAM), or None when the
        # method attributes single pixels: the audit's pointing ceiling depends on it.
        # A shift-averaged or detail-refined map peaks between cell centres too, so it has no grid ceiling either.
        self.grid: int | None = int(feats.shape[1]) if method in ("cam", "gradcam", "gradcampp") else None
        # One sub-model and one traced function per Explainer; a fixed signature avoids a retrace for the
        # last, smaller batch.
        self._sub = keras.Model(_inputs(model), [probs, logits, feats], name=f"{model.name}_explain")
        # The model's own input side (200 for the shipped models; `tdn train --input-size` makes others), so the
        # heatmaps line up with the input they explain.
        self.size = int(_inputs(model).shape[1])
        img_spec = tf.TensorSpec([None, self.size, self.size, 1], tf.float32)
        idx_spec = tf.TensorSpec([None], tf.int32)
        sub = self._sub

        def pick(logits: Any, class_idx: Any) -> Any:
            # class_idx < 0 means "the predicted class".
            return tf.where(class_idx < 0, tf.argmax(logits, 1, output_type=tf.int32), class_idx)

        @tf.function(input_signature=[img_spec])
        def forward(x: Any) -> Any:
            p, _, f = sub(x, training=False)
            return p, f

        @tf.function(input_signature=[img_spec, idx_spec])
        def feature_grads(x: Any, class_idx: Any) -> Any:
            with tf.GradientTape() as tape:
                p, s, f = sub(x, training=False)
                idx = pick(s, class_idx)
                target = tf.gather(s, idx, batch_dims=1)
            # Images are independent in inference mode, so the gradient of the sum is per-image gradients.
            return p, idx, f, tape.gradient(target, f)

        @tf.function(input_signature=[img_spec, tf.TensorSpec([None, k], tf.float32)])
        def input_grads(x: Any, target_weights: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                _, s, _ = sub(x, training=False)
                target = tf.reduce_sum(s * target_weights, axis=1)
            return tape.gradient(target, x)

        self._forward = forward
        self._feature_grads = feature_grads
        self._input_grads = input_grads

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities [N,6] of raw float32 images [N,200,200,1], batched."""
        x = _check_images(images, self.size)
        out = [self._forward(x[i : i + self.batch])[0].numpy() for i in range(0, len(x), self.batch)]
        return np.concatenate(out) if out else np.zeros((0, self.kernel.shape[1]), np.float32)

    def explain(
        self, images: np.ndarray, class_idx: np.ndarray | list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probs [N,6], heatmaps [N,200,200] in [0,1]) for the given classes, or the predicted ones."""
        x = _check_images(images, self.size)
        n = len(x)
        if class_idx is None:
            idx = np.full(n, -1, np.int32)
        else:
            idx = np.asarray(class_idx, np.int32).reshape(-1)
            if len(idx) != n:
                raise ValueError(f"{len(idx)} class indices for {n} images")
            if ((idx < 0) | (idx >= self.kernel.shape[1])).any():
                raise ValueError(f"class indices must be in 0..{self.kernel.shape[1] - 1}")
        probs: list[np.ndarray] = []
        heat: list[np.ndarray] = []
        for i in range(0, n, self.batch):
            p, h = self._explain_batch(x[i : i + self.batch], idx[i : i + self.batch])
            probs.append(p)
            heat.append(h)
        if not probs:
            return np.zeros((0, self.kernel.shape[1]), np.float32), np.zeros((0, self.size, self.size), np.float32)
        return np.concatenate(probs), np.concatenate(heat)

    def _explain_batch(self, x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.method in ("gradcam", "gradcampp"):
            p_t, _, f_t, g_t = self._feature_grads(x, idx)
            p, f, g = p_t.numpy(), f_t.numpy(), g_t.numpy()
            w = gradcam_weights(g) if self.method == "gradcam" else gradcampp_weights(f, g)
            return p, to_heatmaps(weighted_maps(f, w), self.size)
        # cam, ig and cam-ig share one forward pass: the probabilities, the class explained and the feature map.
        p, f = (t.numpy() for t in self._forward(x))
        used = np.where(idx < 0, p.argmax(1), idx).astype(np.int32)
        if self.method in GRADIENT_FREE:
            return p, gradient_free_maps(self.method, x, f, self.kernel, used, self._features)
        ig = self._ig_maps(x, used)
        return p, ig if self.method == "ig" else cam_ig_heatmaps(cam(f, self.kernel, used, self.size), ig)

    def _features(self, x: np.ndarray) -> np.ndarray:
        """The last feature map [N,h,w,C] of raw inputs [N,size,size,1], batched."""
        return np.concatenate([self._forward(x[i:i + self.batch])[1].numpy() for i in range(0, len(x), self.batch)])

    def target_weights(self, used: np.ndarray) -> np.ndarray:
        """The logit combination IG explains per image [N,K]: one-hot on the class, minus the pass classes' mean
        for a defect class of a model that has pass classes."""
        w = np.eye(self.kernel.shape[1], dtype=np.float32)[np.asarray(used, np.int64)]
        if self.pass_classes:
            defect = ~np.isin(used, self.pass_classes)
            w[np.ix_(defect, np.array(self.pass_classes))] -= 1.0 / len(self.pass_classes)
        return w

    def _ig_maps(self, x: np.ndarray, used: np.ndarray) -> np.ndarray:
        # Midpoint Riemann sum over the straight path baseline -> image; all (image, step) pairs are
        # flattened so each pass carries `batch` interpolants whatever the image count.
        alphas = (np.arange(IG_STEPS, dtype=np.float32) + 0.5) / IG_STEPS
        n = len(x)
        base = blurred(x)
        weights = self.target_weights(used)
        mean_grads = np.zeros_like(x)
        pairs = [(i, a) for i in range(n) for a in range(IG_STEPS)]
        for j in range(0, len(pairs), self.batch):
            chunk = pairs[j : j + self.batch]
            rows = np.array([i for i, _ in chunk])
            a = alphas[[k for _, k in chunk]].reshape(-1, 1, 1, 1)
            interp = base[rows] + a * (x[rows] - base[rows])
            g = self._input_grads(interp.astype(np.float32), weights[rows]).numpy()
            np.add.at(mean_grads, rows, g / IG_STEPS)
        return ig_heatmaps(x, mean_grads, base)


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (size, size, 1):
        raise ValueError(f"expected images [N,{size},{size},1], got {x.shape}")
    return x


class BackendExplainer:
    """The audit's explainer on a loaded agent backend (any runtime and precision): the maps the agent publishes.

    The Keras Explainer's interface for the gradient-free methods only. Every input runs alone, at batch 1, the
    size every backend warms, as agent.explain.frame_cam runs it; probabilities and feature maps come from the
    backend, so an int8 or bf16 variant is audited as it serves, not as its fp32 source.
    """

    def __init__(self, backend: Any, method: str = "shift-cam", pass_classes: Sequence[int] = ()) -> None:
        if method not in GRADIENT_FREE:
            raise ValueError(f"a backend explains with {', '.join(GRADIENT_FREE)}, not {method!r} (it has no "
                             "gradients)")
        self.backend = backend
        self.method = method
        self.batch = 1
        self.kernel = np.asarray(backend.cam_weights(), np.float32)
        self.pass_classes = tuple(sorted(set(int(c) for c in pass_classes)))
        self.layer = "gap:input"
        self.size = int(backend.input_shape[0])
        # The plain CAM's grid (for the pointing ceiling) is its feature map's side: one probe pass tells it.
        self.grid: int | None = None if method != "cam" else int(
            self._forward(np.zeros((1, self.size, self.size, 1), np.float32))[1].shape[1])

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return features_one_by_one(self.backend, x)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [N,K] of raw float32 images [N,size,size,1]."""
        return self._forward(_check_images(images, self.size))[0]

    def explain(self, images: np.ndarray, class_idx: np.ndarray | list[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """(probs [N,K], heatmaps [N,size,size] in [0,1]) for the given classes, or the predicted ones."""
        x = _check_images(images, self.size)
        p, f = self._forward(x)
        used = p.argmax(1) if class_idx is None else np.asarray(class_idx, np.int64).reshape(-1)
        if len(used) != len(x) or ((used < 0) | (used >= self.kernel.shape[1])).any():
            raise ValueError(f"need {len(x)} class indices in 0..{self.kernel.shape[1] - 1}")
        return p, gradient_free_maps(self.method, x, f, self.kernel, used, lambda t: self._forward(t)[1])
