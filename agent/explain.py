"""Heatmap explanations of TinyDefectNet decisions (CAM, Grad-CAM, Grad-CAM++, integrated gradients)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from agent.errors import ModelError

# NumPy, OpenCV and the pure functions below are all a lean backend (TFLite, OpenVINO) needs: it computes the
# last feature map with its own runtime and calls `cam`. TensorFlow/Keras are imported inside the functions
# and the Explainer that need them, so importing this module never pulls TensorFlow in.

IMAGE_SIZE = 200
METHODS = ("cam", "gradcam", "gradcampp", "ig")
IG_STEPS = 32
IG_BASELINE = 127.5  # mid-gray: the image the model's normalisation maps to all zeros
# Per-pixel integrated-gradient attributions are speckled; a light blur turns them into regions, so the
# pointing game and the overlays reflect areas rather than single noisy pixels.
IG_SMOOTH_SIGMA = 2.0
_EPS = 1e-12


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each [h,w] map of [N,h,w] to [0,1]; an all-zero map stays zero, a flat one is 1."""
    maps = np.asarray(maps, np.float32)
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    span = hi - lo
    out = np.where(span > _EPS, (maps - lo) / np.maximum(span, _EPS), 0.0)
    # A flat but positive map says "everywhere equally", not "nowhere".
    out = np.where((span <= _EPS) & (hi > _EPS), 1.0, out)
    return out.astype(np.float32)


def to_heatmaps(maps: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """ReLU, bilinear resize to size x size with OpenCV, min-max per image: [N,h,w] -> [N,size,size]."""
    maps = np.maximum(np.asarray(maps, np.float32), 0.0)
    if maps.shape[1:] != (size, size):
        maps = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])
        maps = np.maximum(maps, 0.0)  # bilinear interpolation of non-negative values stays >= 0; belt and braces
    return normalize_maps(maps.reshape(-1, size, size))


def weighted_maps(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Channel-weighted sum of feature maps: features [N,h,w,C], weights [N,C] -> [N,h,w]."""
    features = np.asarray(features, np.float32)
    weights = np.asarray(weights, np.float32)
    if features.ndim != 4 or weights.shape != (features.shape[0], features.shape[3]):
        raise ValueError(f"features {features.shape} and weights {weights.shape} do not match ([N,h,w,C], [N,C])")
    return np.einsum("nhwc,nc->nhw", features, weights)


def cam(features: np.ndarray, dense_kernel: np.ndarray, class_idx: np.ndarray | list[int]) -> np.ndarray:
    """Class activation maps [N,200,200] in [0,1] from the last feature map [N,h,w,C] and the dense kernel [C,K].

    The dense bias only shifts the map by a constant, which the min-max normalisation removes.
    """
    kernel = np.asarray(dense_kernel, np.float32)
    idx = np.asarray(class_idx, np.int64).reshape(-1)
    features = np.asarray(features, np.float32)
    if kernel.ndim != 2 or features.ndim != 4 or kernel.shape[0] != features.shape[3]:
        raise ValueError(f"dense kernel {kernel.shape} does not fit features {features.shape}")
    if len(idx) != len(features):
        raise ValueError(f"{len(idx)} class indices for {len(features)} feature maps")
    return to_heatmaps(weighted_maps(features, kernel.T[idx]))


def gradcam_weights(grads: np.ndarray) -> np.ndarray:
    """Grad-CAM channel weights: the spatial mean of the class logit's gradients [N,h,w,C] -> [N,C]."""
    return np.asarray(grads, np.float32).mean(axis=(1, 2))


def gradcampp_weights(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ channel weights (Chattopadhay et al. 2018, closed form for Y = exp(logit)) -> [N,C].

    With Y = exp(S) and a piecewise-linear network, dY/dA = Y g, d2Y/dA2 = Y g^2, d3Y/dA3 = Y g^3 (g = dS/dA),
    so alpha = g^2 / (2 g^2 + sum_ab(A) g^3) has no Y in it, and Y only scales the weights sum(alpha relu(Y g))
    uniformly, which normalisation removes: leaving exp(S) out avoids overflow for confident logits.
    """
    a = np.asarray(features, np.float64)
    g = np.asarray(grads, np.float64)
    g2 = g * g
    denom = 2.0 * g2 + a.sum(axis=(1, 2), keepdims=True) * g2 * g
    alpha = np.where(np.abs(denom) > _EPS, g2 / np.where(np.abs(denom) > _EPS, denom, 1.0), 0.0)
    return (alpha * np.maximum(g, 0.0)).sum(axis=(1, 2)).astype(np.float32)


def ig_heatmaps(images: np.ndarray, mean_grads: np.ndarray, baseline: float = IG_BASELINE) -> np.ndarray:
    """Integrated-gradient heatmaps [N,200,200]: |(x - baseline) * mean path gradient|, lightly smoothed."""
    attr = np.abs((np.asarray(images, np.float32) - baseline) * np.asarray(mean_grads, np.float32))
    attr = attr.reshape(attr.shape[0], attr.shape[1], attr.shape[2])
    attr = np.stack([cv2.GaussianBlur(a, (0, 0), IG_SMOOTH_SIGMA) for a in attr])
    return normalize_maps(attr)


def heatmap_u8(heatmap: np.ndarray) -> np.ndarray:
    """A [0,1] heatmap as uint8 0..255."""
    return np.round(np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _gray_u8(gray: np.ndarray) -> np.ndarray:
    g = np.asarray(gray)
    if g.ndim == 3 and g.shape[2] == 1:
        g = g[:, :, 0]
    if g.ndim != 2:
        raise ValueError(f"expected a grayscale image [h,w] or [h,w,1], got {g.shape}")
    if g.dtype != np.uint8:
        g = np.round(np.clip(g, 0, 255)).astype(np.uint8)
    return g


def overlay(gray_u8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap in JET colours blended over the grayscale image: BGR uint8 [h,w,3]."""
    g = _gray_u8(gray_u8)
    h = np.asarray(heatmap)
    if h.shape != g.shape:
        raise ValueError(f"heatmap {h.shape} and image {g.shape} differ in shape")
    color = cv2.applyColorMap(heatmap_u8(h), cv2.COLORMAP_JET)
    base = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(base, 1.0 - alpha, color, alpha, 0.0)


def png(img: np.ndarray) -> bytes:
    """PNG bytes of a uint8 grayscale or BGR image."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"could not PNG-encode an image of shape {np.shape(img)} and dtype {img.dtype}")
    return buf.tobytes()


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a [0,1] heatmap (the form explanation messages carry)."""
    return png(heatmap_u8(heatmap))


# --- Keras parts: need TensorFlow ---------------------------------------------------------------------------


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

    "cam" weights the last feature map by the dense kernel (no gradients); "gradcam" and "gradcampp" use the
    gradients of the class logit (pre-softmax, so saturated probabilities do not flatten them) w.r.t. `layer`'s
    output (default: the input of "gap"); "ig" integrates the logit's input gradients from a mid-gray baseline.
    """

    def __init__(self, model: Any, method: str = "cam", layer: str | None = None, batch: int = 32) -> None:
        import keras
        import tensorflow as tf

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if method == "cam" and layer is not None:
            raise ValueError("method 'cam' always uses the input of 'gap'; use 'gradcam' to pick a layer")
        self.model = model
        self.method = method
        self.batch = batch
        self.kernel, self.bias = cam_weights(model)
        probs = _layer(model, "probs").output
        logits = _layer(model, "logits").output
        feats = _layer(model, "gap").input if layer is None else _layer(model, layer).output
        self.layer = layer or "gap:input"
        # One sub-model and one traced function per Explainer; a fixed signature avoids a retrace for the
        # last, smaller batch.
        self._sub = keras.Model(_inputs(model), [probs, logits, feats], name=f"{model.name}_explain")
        img_spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 1], tf.float32)
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

        @tf.function(input_signature=[img_spec, idx_spec])
        def input_grads(x: Any, class_idx: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                _, s, _ = sub(x, training=False)
                target = tf.gather(s, class_idx, batch_dims=1)
            return tape.gradient(target, x)

        self._forward = forward
        self._feature_grads = feature_grads
        self._input_grads = input_grads

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities [N,6] of raw float32 images [N,200,200,1], batched."""
        x = _check_images(images)
        out = [self._forward(x[i : i + self.batch])[0].numpy() for i in range(0, len(x), self.batch)]
        return np.concatenate(out) if out else np.zeros((0, self.kernel.shape[1]), np.float32)

    def explain(
        self, images: np.ndarray, class_idx: np.ndarray | list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probs [N,6], heatmaps [N,200,200] in [0,1]) for the given classes, or the predicted ones."""
        x = _check_images(images)
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
            return np.zeros((0, self.kernel.shape[1]), np.float32), np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        return np.concatenate(probs), np.concatenate(heat)

    def _explain_batch(self, x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.method == "cam":
            p, f = (t.numpy() for t in self._forward(x))
            used = np.where(idx < 0, p.argmax(1), idx)
            return p, cam(f, self.kernel, used)
        if self.method == "ig":
            return self._ig_batch(x, idx)
        p_t, _, f_t, g_t = self._feature_grads(x, idx)
        p, f, g = p_t.numpy(), f_t.numpy(), g_t.numpy()
        w = gradcam_weights(g) if self.method == "gradcam" else gradcampp_weights(f, g)
        return p, to_heatmaps(weighted_maps(f, w))

    def _ig_batch(self, x: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self._forward(x)[0].numpy()
        used = np.where(idx < 0, p.argmax(1), idx).astype(np.int32)
        # Midpoint Riemann sum over the straight path baseline -> image; all (image, step) pairs are
        # flattened so each pass carries `batch` interpolants whatever the image count.
        alphas = (np.arange(IG_STEPS, dtype=np.float32) + 0.5) / IG_STEPS
        n = len(x)
        mean_grads = np.zeros_like(x)
        pairs = [(i, a) for i in range(n) for a in range(IG_STEPS)]
        for j in range(0, len(pairs), self.batch):
            chunk = pairs[j : j + self.batch]
            rows = np.array([i for i, _ in chunk])
            a = alphas[[k for _, k in chunk]].reshape(-1, 1, 1, 1)
            interp = IG_BASELINE + a * (x[rows] - IG_BASELINE)
            g = self._input_grads(interp.astype(np.float32), used[rows]).numpy()
            np.add.at(mean_grads, rows, g / IG_STEPS)
        return p, ig_heatmaps(x, mean_grads)


def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
        raise ValueError(f"expected images [N,{IMAGE_SIZE},{IMAGE_SIZE},1], got {x.shape}")
    return x
