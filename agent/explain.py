"""Gradient-free explanation heatmaps (CAM, shifted, refined or smoothed) and the snapshots the agent publishes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.geometry import InputSpec
from agent.logging import get_logger
from protocol import Explanation, Verdict

log = get_logger("agent.explain")

# NumPy, OpenCV and the pure functions below are all a lean backend (TFLite, OpenVINO) needs: it computes the
# last feature map with its own runtime and calls `cam`. The gradient methods, which need TensorFlow, live in
# agent/lab/explain.py; the Grad-CAM++ and IG weightings stay here as pure functions the lab and tests share.

# The side of the heatmaps: the default model input (agent/geometry.py is its one home).
IMAGE_SIZE = InputSpec().size
METHODS = ("shift-cam", "shift-cam-detail", "shift-cam-smooth", "cam", "cam-detail", "cam-smooth", "gradcam",
           "gradcampp", "ig", "cam-ig")
# What the agent publishes for a model whose card names no method (card.explain_method); `tdn audit` measures the
# card's method by default, so the audit scores what operators see.
AGENT_METHOD = "shift-cam"
# Shift-averaged CAM (the idea of Morbidelli et al. 2020, "Augmented Grad-CAM"): a bilinearly upsampled h x h class
# map can only peak near its h x h cell centres, so on a 7x7 map a defect smaller than a cell (a blowhole, a crack)
# is out of reach wherever the evidence lies. The input is explained moved by -1/3, 0 and +1/3 of a cell on each
# axis, and the maps, moved back, are averaged: their peaks then fall on a regular lattice three times as fine
# (21x21 for a 7x7 map). Nine forward passes a tile instead of one; see method_for for when the agent falls back.
SHIFT_STEPS = (-1, 0, 1)
SHIFT_DIVISIONS = 3
# The explainer works within a CPU budget (explain_budget) and queues review verdicts: with more than this many
# waiting, it explains with one CAM (a ninth of the forward passes; with the PNGs, about a quarter of the time,
# `tdn bench explain`), so a burst of reviews is explained, not dropped.
SHIFT_MAX_WAITING = 2
# The methods a serving backend can compute (from its probabilities and feature maps; no gradients), each as
# (shifted, refinement): shift-cam averages nine shifted CAMs; the refinement (refined) sets the scale the map points
# at: "detail" the image's own fine structure (small defects), "smooth" half a feature cell (large textures).
GRADIENT_FREE_FORMS: dict[str, tuple[bool, str | None]] = {
    "cam": (False, None), "cam-detail": (False, "detail"), "cam-smooth": (False, "smooth"),
    "shift-cam": (True, None), "shift-cam-detail": (True, "detail"), "shift-cam-smooth": (True, "smooth"),
}
GRADIENT_FREE = tuple(GRADIENT_FREE_FORMS)
# What a shifted method falls back to behind a queue of reviews (method_for): its one-pass form, the same refinement.
ONE_PASS = {m: next(n for n, (s, r) in GRADIENT_FREE_FORMS.items() if not s and r == how)
            for m, (shifted, how) in GRADIENT_FREE_FORMS.items() if shifted}
# "shift-cam-detail" puts shift-cam's peak on the image's own fine structure: shift-cam raised to this power, times
# the detail map (detail_maps), min-max normalised. The class map still picks the region (a high power keeps its
# choice), the detail inside it picks the point: a blowhole or a crack thinner than a feature cell, which a 7x7 map
# can only point near. This is cam-ig's idea (the class map picks the cell, a pixel map the place) without the
# gradients, so every backend computes it. On the Magnetic-tile held-out split the power 4, 8, 12, 16 gave 80.6,
# 83.9, 83.9, 82.3% (shift-cam 66.1%); on NEU-DET's texture classes it points worse than shift-cam (crazing 85.4%
# vs 91.7% on the previous model), so the card says which a model uses (`tdn audit --choose-method`). Its one-pass
# form, cam-detail (the plain CAM refined alike), is what the agent falls back to: 61.3% there, against the plain
# CAM's 45.2%.
DETAIL_SHARPEN = 8
# "shift-cam-smooth" blurs the map with a Gaussian of this many feature cells (sigma): a texture defect (crazing, a
# rolled-in scale) lights many cells, and a sharp map's maximum falls on whichever of them is a little stronger,
# often outside the annotated box; blurred, the maximum moves to the middle of the evidence. On the shipped NEU-DET
# model it took crazing's pointing game from 83.3% to 91.7% (sigma 6-12 px all the same; 0.5 cell = 7.7 px on the
# 13x13 map); on the previous one it lowered it (91.7% -> 89.6%), so this too is the card's choice.
SMOOTH_CELLS = 0.5
IG_STEPS = 32
# The image without its fine structure: wide enough to wipe a scratch, a pit or a crack, narrow enough to keep the
# shading. It is the audit's neutral fill and the integrated-gradients baseline: the IG path then adds only the
# fine structure on top of the image's own shading, so shading and lighting get no attribution. Against a
# mid-gray baseline, cam-ig's pointing game on the held-out splits went from 89.6% to 93.4% (NEU-DET) and, with
# the contrastive target of agent/lab/explain.py, from 71.0% to 80.6% (Magnetic-tile).
BLUR_SIGMA = 8.0
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


def cam(features: np.ndarray, dense_kernel: np.ndarray, class_idx: np.ndarray | list[int],
        size: int = IMAGE_SIZE) -> np.ndarray:
    """Class activation maps [N,size,size] in [0,1] from the last feature map [N,h,w,C] and the dense kernel [C,K].

    The dense bias only shifts the map by a constant, which the min-max normalisation removes.
    """
    kernel = np.asarray(dense_kernel, np.float32)
    idx = np.asarray(class_idx, np.int64).reshape(-1)
    features = np.asarray(features, np.float32)
    if kernel.ndim != 2 or features.ndim != 4 or kernel.shape[0] != features.shape[3]:
        raise ValueError(f"dense kernel {kernel.shape} does not fit features {features.shape}")
    if len(idx) != len(features):
        raise ValueError(f"{len(idx)} class indices for {len(features)} feature maps")
    return to_heatmaps(weighted_maps(features, kernel.T[idx]), size)


def method_for(waiting: int, preferred: str = AGENT_METHOD) -> str:
    """The explanation method for a verdict with `waiting` more reviews queued behind it: the model's `preferred`
    one (its card's), or beyond SHIFT_MAX_WAITING its one-pass form (cam, or cam-detail for shift-cam-detail)."""
    return preferred if waiting <= SHIFT_MAX_WAITING else ONE_PASS.get(preferred, preferred)


def shift_offsets(grid: int, size: int = IMAGE_SIZE) -> list[tuple[int, int]]:
    """The (dy, dx) pixel offsets shift-cam explains: SHIFT_STEPS thirds of a grid x grid map's cell, per axis."""
    if grid < 1 or size < 1:
        raise ValueError(f"grid {grid} and size {size} must be >= 1")
    return [(round(dy * size / grid / SHIFT_DIVISIONS), round(dx * size / grid / SHIFT_DIVISIONS))
            for dy in SHIFT_STEPS for dx in SHIFT_STEPS]


def shifted_crops(image: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """[n,h,w] float32 crops of image [h,w]: crop k is what the image shows at (dy, dx) = offsets[k] from its corner,
    the border mirrored (reflect-101, as the training shifts), so the content moves by (-dy, -dx)."""
    img = np.asarray(image, np.float32)
    img = img.reshape(img.shape[0], img.shape[1])
    h, w = img.shape
    pad = max((abs(v) for o in offsets for v in o), default=0)
    if pad >= min(h, w):
        raise ValueError(f"offsets up to {pad} px need an image larger than {h}x{w}")
    padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    return np.stack([padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w] for dy, dx in offsets])


def unshift_mean(maps: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Maps [n,h,w] of shifted_crops' crops moved back into the image's frame and averaged where they cover it: [h,w].

    Every pixel is covered by the (0, 0) crop at least, so no pixel is left empty.
    """
    m = np.asarray(maps, np.float32)
    n, h, w = m.shape
    if n != len(offsets):
        raise ValueError(f"{n} maps for {len(offsets)} offsets")
    pad = max((abs(v) for o in offsets for v in o), default=0)
    acc = np.zeros((h + 2 * pad, w + 2 * pad), np.float32)
    cnt = np.zeros_like(acc)
    for (dy, dx), one in zip(offsets, m, strict=True):
        acc[pad + dy:pad + dy + h, pad + dx:pad + dx + w] += one
        cnt[pad + dy:pad + dy + h, pad + dx:pad + dx + w] += 1.0
    return (acc / np.maximum(cnt, 1.0))[pad:pad + h, pad:pad + w]


def shift_cam_raw(features_of: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray, dense_kernel: np.ndarray,
                  class_idx: Sequence[int] | np.ndarray, shift: bool = True,
                  features: np.ndarray | None = None) -> np.ndarray:
    """Shift-averaged class maps [n,S,S] (ReLU'd, upsampled, not yet normalised) of model inputs tiles [n,S,S(,1)];
    with shift=False, each tile's one plain CAM.

    `features_of` maps raw float32 inputs [m,S,S,1] to the last feature map [m,h,w,C] with any runtime; the
    agent's backends and the lab's Keras model both come through here, so they explain alike. `features`, the
    tiles' own (unshifted) feature maps [n,h,w,C], saves their pass when the caller already ran it.
    """
    x = np.asarray(tiles, np.float32)
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2])
    kernel = np.asarray(dense_kernel, np.float32)
    idx = np.asarray(class_idx, np.int64).reshape(-1)
    if len(idx) != len(x):
        raise ValueError(f"{len(idx)} class indices for {len(x)} inputs")
    if features is not None and len(features) != len(x):
        raise ValueError(f"{len(features)} feature maps for {len(x)} inputs")
    size = x.shape[1]
    out = np.zeros(x.shape, np.float32)
    for i, tile in enumerate(x):
        # The unshifted pass comes first: its feature map tells the grid, and it is one of the shifted set.
        first = np.asarray(features_of(tile[None, :, :, None]) if features is None else features[i:i + 1],
                           np.float32)
        offsets = shift_offsets(first.shape[1], size) if shift else [(0, 0)]
        others = [o for o in offsets if o != (0, 0)]
        feats = first if not others else np.concatenate(
            [first, np.asarray(features_of(shifted_crops(tile, others)[..., None]), np.float32)])
        maps = weighted_maps(feats, np.repeat(kernel.T[[idx[i]]], len(feats), axis=0))
        up = np.stack([cv2.resize(np.maximum(m, 0.0), (size, size), interpolation=cv2.INTER_LINEAR) for m in maps])
        out[i] = np.maximum(unshift_mean(np.maximum(up, 0.0), [(0, 0), *others]), 0.0)
    return out


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


def blurred(images: np.ndarray) -> np.ndarray:
    """Each image [N,h,w] or [N,h,w,1] Gaussian-blurred with BLUR_SIGMA, as float32 of the same shape."""
    x = np.asarray(images, np.float32)
    out = [cv2.GaussianBlur(im.reshape(im.shape[0], im.shape[1]), (0, 0), BLUR_SIGMA) for im in x]
    return np.stack(out).reshape(x.shape) if out else x.copy()


def _smoothed(attr: np.ndarray) -> np.ndarray:
    """Per-pixel maps [N,h,w(,1)] as [N,h,w], each blurred with IG_SMOOTH_SIGMA and min-max normalised."""
    a = np.asarray(attr, np.float32)
    a = a.reshape(a.shape[0], a.shape[1], a.shape[2])
    return normalize_maps(np.stack([cv2.GaussianBlur(m, (0, 0), IG_SMOOTH_SIGMA) for m in a]) if len(a) else a)


def ig_heatmaps(images: np.ndarray, mean_grads: np.ndarray, baselines: np.ndarray) -> np.ndarray:
    """Integrated-gradient heatmaps [N,200,200]: |(x - baseline) * mean path gradient|, lightly smoothed."""
    return _smoothed(np.abs((np.asarray(images, np.float32) - baselines) * np.asarray(mean_grads, np.float32)))


def detail_maps(images: np.ndarray) -> np.ndarray:
    """The images' fine structure [N,h,w] in [0,1]: |x - blurred(x)|, lightly smoothed, as integrated gradients
    weigh it before the gradients (the same baseline and smoothing)."""
    x = np.asarray(images, np.float32)
    return _smoothed(np.abs(x - blurred(x)))


def smoothed(heat: np.ndarray, cell: float) -> np.ndarray:
    """Heatmaps [N,h,w] blurred with a Gaussian of SMOOTH_CELLS feature cells (`cell`: a cell's side in pixels, the
    model input's side over its feature map's) and min-max normalised (the "-smooth" methods)."""
    h = np.asarray(heat, np.float32)
    if cell <= 0:
        raise ValueError(f"cell {cell} must be > 0 pixels")
    return normalize_maps(np.stack([cv2.GaussianBlur(m, (0, 0), SMOOTH_CELLS * cell) for m in h]) if len(h) else h)


def refined(heat: np.ndarray, images: np.ndarray, how: str | None, cell: float) -> np.ndarray:
    """Heatmaps [N,h,w] in [0,1] refined as a method's form says (GRADIENT_FREE_FORMS): to the images' detail,
    smoothed over half a feature cell of `cell` pixels, or as they are (None)."""
    if how == "detail":
        return detail_refined(heat, images)
    if how == "smooth":
        return smoothed(heat, cell)
    return np.asarray(heat, np.float32)


def detail_refined(heat: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Heatmaps [N,h,w] in [0,1] refined to the images' own detail: heat^DETAIL_SHARPEN x detail_maps(images),
    min-max normalised (the "-detail" methods: shift-cam-detail on a shift-cam map, cam-detail on a CAM)."""
    h = np.asarray(heat, np.float32)
    d = detail_maps(images)
    if h.shape != d.shape:
        raise ValueError(f"heatmaps {h.shape} and images {d.shape} differ in shape")
    return normalize_maps(np.clip(h, 0.0, 1.0) ** DETAIL_SHARPEN * d)


def cam_ig_heatmaps(cam_maps: np.ndarray, ig_maps: np.ndarray) -> np.ndarray:
    """CAM x integrated gradients, min-max normalised: [N,200,200] each in [0,1] -> [N,200,200].

    The same idea as guided Grad-CAM (Selvaraju et al.): the coarse class map says which cell holds the evidence,
    the pixel-level attribution says where inside it. A 7x7 CAM alone can only peak at about 49 points, so on
    defects smaller than a cell (a blowhole) its maximum misses the mask even when the right cell lights up.
    """
    c = np.asarray(cam_maps, np.float32)
    g = np.asarray(ig_maps, np.float32)
    if c.shape != g.shape:
        raise ValueError(f"CAM maps {c.shape} and IG maps {g.shape} differ in shape")
    return normalize_maps(c * g)


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


def features_one_by_one(backend: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A loaded backend's probabilities [n,K] and last feature maps [n,h,w,C] of raw inputs [n,S,S,1], one input a
    call: batch 1 is the size every backend warmed, and explaining runs off the hot path."""
    outs = [backend.features(x[i:i + 1]) for i in range(len(x))]
    return (np.concatenate([np.asarray(p, np.float32)[:1] for p, _ in outs]),
            np.concatenate([np.asarray(f, np.float32)[:1] for _, f in outs]))


def tile_weighted(raw: np.ndarray, probs: np.ndarray, class_idx: int) -> np.ndarray:
    """A frame's per-tile raw class maps [k,S,S], each scaled by its tile's probability of the class ([k,K] probs).

    A tiling model decides a frame by one tile (geometry.combine) but the operator sees the whole plane. A tile the
    model calls good can still hold a stronger raw map for the defect class than the deciding tile (an edge, a
    polish line), and its peak would then stand for the verdict; weighted, the evidence shows where the model
    finds the class. On the Magnetic-tile held-out frames the published whole-frame map's pointing game went from
    75.8% to 83.9% (shift-cam-detail; shift-cam 62.9% -> 66.1%).
    """
    p = np.asarray(probs, np.float32)[:, int(class_idx)]
    return np.asarray(raw, np.float32) * p[:, None, None]


def frame_cam(backend: Any, image: np.ndarray, class_idx: int, method: str = AGENT_METHOD) -> np.ndarray:
    """The shift-averaged (method "cam": the plain; a "-detail" or "-smooth" method: refined) CAM of one frame's
    model input in [0,1], the input's own shape: [size,size], or a tiling model's whole plane with each tile's map
    put back where it came from (geometry.stitch).

    Raw class maps are stitched before the min-max, so a tile without evidence stays dark beside one with it, and
    each tile's map counts as much as the tile's own probability of the class (tile_weighted).
    """
    from agent.geometry import stitch, tiles

    if method not in GRADIENT_FREE:
        raise ValueError(f"the agent explains with {', '.join(GRADIENT_FREE)}, not {method!r}")
    shifted, how = GRADIENT_FREE_FORMS[method]
    size = int(backend.input_shape[0])
    parts = np.stack(tiles(image, size)).astype(np.float32)
    probs, feats = features_one_by_one(backend, parts[..., None])
    raw = shift_cam_raw(lambda x: features_one_by_one(backend, x)[1], parts, backend.cam_weights(),
                        [class_idx] * len(parts), shift=shifted, features=feats)
    plane = raw[0] if image.shape[:2] == (size, size) else stitch(tile_weighted(raw, probs, class_idx), image.shape[:2])
    return refined(normalize_maps(plane[None]), image[None], how, size / feats.shape[1])[0]


def snapshot(backend: Any, item: Any, v: Verdict, method: str = AGENT_METHOD) -> Explanation:
    """The explanation of one ok verdict: heatmap and overlay PNGs, computed with the backend that decided."""
    image = item.image
    cls = int(v.class_index or 0)
    heat = frame_cam(backend, image, cls, method)
    return Explanation(
        camera_id=v.camera_id, seq=v.seq, class_name=v.class_name or "", class_index=cls,
        confidence=float(v.confidence or 0.0), method=method, capture_ns=v.capture_ns or 0,
        agent_id=v.agent_id, epoch=v.epoch, heatmap_png=heatmap_png(heat), overlay_png=png(overlay(image, heat)),
    )


def task(backend: Any, item: Any, v: Verdict, folder: Path | None, keep: int,
         method: str = AGENT_METHOD) -> Explanation | None:
    """The explainer thread's work for one verdict: the snapshot, saved when a folder is set; None if it failed."""
    try:
        expl = snapshot(backend, item, v, method)
    except Exception as exc:  # an explanation is optional; it must never take the agent down
        log.error("explanation failed", error=f"{type(exc).__name__}: {exc}")
        return None
    if folder is not None:
        save(expl, Path(folder), keep)
    return expl


def save(e: Explanation, folder: Path, keep: int) -> None:
    """Write the snapshot's two PNGs into `folder` and keep only the newest `keep` snapshots there.

    Runs on the explainer thread: listing the folder must never stall the I/O loop.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{e.capture_ns}_{e.camera_id}_{e.seq}_{e.class_name}"
        (folder / f"{stem}_overlay.png").write_bytes(bytes(e.overlay_png))
        (folder / f"{stem}_heatmap.png").write_bytes(bytes(e.heatmap_png))
        files = sorted(folder.glob("*_overlay.png"))
        for old in files[: max(0, len(files) - keep)]:
            old.unlink(missing_ok=True)
            Path(str(old).replace("_overlay.png", "_heatmap.png")).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot write explanation", dir=str(folder), error=str(exc))
