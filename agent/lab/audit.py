"""`tdn audit`: do the heatmaps point at the annotated defects (VOC boxes or pixel masks), and do those pixels count?"""

from __future__ import annotations

import argparse
import base64
import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.config import DEFAULT_MODEL
from agent.decision import pass_mask_of
from agent.errors import ConfigError, DataError, ModelError
from agent.explain import (
    AGENT_METHOD,
    BLUR_SIGMA,
    GRADIENT_FREE,
    IMAGE_SIZE,
    METHODS,
    ONE_PASS,
    blurred,
    heatmap_u8,
    overlay,
    png,
    to_heatmaps,
)
from agent.geometry import InputSpec, frame_picks, tile_origins, to_input
from agent.lab.data import (
    NEU_CLASSES,
    Box,
    Dataset,
    Sample,
    box_mask,
    check_classes,
    defect_mask,
    held_out,
    load_arrays,
    load_dataset,
    read_gray,
)
from agent.lab.explain import BackendExplainer, Explainer
from agent.logging import get_logger

log = get_logger("agent.lab.audit")

FRACS = (0.05, 0.10, 0.20)
CONFIDENCE_FLOOR = 0.5  # Lin et al.'s impact counts a drop of the original class below this as a change
GAP = 4  # pixels between panels of a grid row
CAPTION = 18  # height of a grid row's caption band


# The Keras model's explainer (every method), or a serving backend's (the gradient-free ones).
AnyExplainer = Explainer | BackendExplainer
# What `--choose-method` picks among for a card: the shifted methods (shift-cam first, so it wins a tie); their
# one-pass forms are the fallbacks under a backlog (agent.explain.ONE_PASS), not choices.
PUBLISHABLE = tuple(ONE_PASS)


# --- metrics: pure -------------------------------------------------------------------------------------------


def pointing_hit(heatmap: np.ndarray, boxes: Sequence[Box]) -> bool:
    """Pointing game: is the heatmap's maximum inside one of the boxes? An all-zero map points nowhere."""
    h = np.asarray(heatmap)
    if not boxes or not (h > 0).any():
        return False
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    return bool(box_mask(boxes, (h.shape[0], h.shape[1]))[r, c])


def energy_in_boxes(heatmap: np.ndarray, boxes: Sequence[Box]) -> float:
    """Share of the heatmap's mass inside the union of the boxes (0 for an all-zero map)."""
    h = np.maximum(np.asarray(heatmap, np.float64), 0.0)
    total = h.sum()
    if total <= 0 or not boxes:
        return 0.0
    return float(h[box_mask(boxes, (h.shape[0], h.shape[1]))].sum() / total)


def pointing_hit_region(heatmap: np.ndarray, region: np.ndarray, tolerance: int = 0) -> bool:
    """Pointing game against a pixel mask: is the maximum inside it, or within `tolerance` pixels of it?"""
    h = np.asarray(heatmap)
    if not region.any() or not (h > 0).any():
        return False
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    point = np.zeros(region.shape, bool)
    point[r, c] = True
    return near_region(region, point, tolerance)


def near_region(region: np.ndarray, points: np.ndarray, tolerance: int = 0) -> bool:
    """Is any True pixel of `points` inside region, or within `tolerance` pixels (Euclidean) of it?"""
    if tolerance <= 0:
        return bool((region & points).any())
    # Exact Euclidean distance of every pixel to the region's nearest pixel.
    dist = cv2.distanceTransform((~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return bool((dist[points] <= tolerance).any())


@lru_cache(maxsize=8)
def grid_peaks(grid: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Bool [size,size]: the pixels where a grid x grid map peaked on one cell has its maximum after to_heatmaps.

    A bilinearly upsampled map is a convex blend of its cells, so it peaks at (or, at the border, on a band
    around) a cell centre: a 7x7 class map can point at about 49 places, whatever the model learned.
    """
    onehots = np.zeros((grid * grid, grid, grid), np.float32)
    cells = np.arange(grid * grid)
    onehots[cells, cells // grid, cells % grid] = 1.0
    maps = to_heatmaps(onehots, size)
    peaks = (maps >= maps.max(axis=(1, 2), keepdims=True)).any(axis=0)
    peaks.setflags(write=False)
    return peaks


def pointing_reachable(region: np.ndarray, grid: int, tolerance: int = 0) -> bool:
    """Could any grid x grid map point inside region (or within tolerance pixels of it)? The pointing game's
    ceiling for that heatmap resolution."""
    if not region.any():
        return False
    peaks = grid_peaks(grid, region.shape[0])
    if region.shape != peaks.shape:
        raise ValueError(f"region {region.shape} is not {peaks.shape}")
    return near_region(region, peaks, tolerance)


def energy_in_region(heatmap: np.ndarray, region: np.ndarray) -> float:
    """Share of the heatmap's mass inside a bool mask (0 for an all-zero map)."""
    h = np.maximum(np.asarray(heatmap, np.float64), 0.0)
    total = h.sum()
    return float(h[region].sum() / total) if total > 0 and region.any() else 0.0


def box_area_share(boxes: Sequence[Box], shape: tuple[int, int] = (200, 200)) -> float:
    """Share of the image the union of the boxes covers: what a uniform heatmap scores on energy_in_boxes."""
    return float(box_mask(boxes, shape).mean())


def top_mask(heatmap: np.ndarray, frac: float) -> np.ndarray:
    """Bool mask of exactly round(frac * pixels) pixels with the highest heatmap values."""
    h = np.asarray(heatmap).ravel()
    k = round(frac * h.size)
    mask = np.zeros(h.size, bool)
    if k > 0:
        # argpartition is O(n) and deterministic for a given map; ties at the threshold are broken arbitrarily.
        mask[np.argpartition(-h, k - 1)[:k]] = True
    return mask.reshape(np.shape(heatmap))


def _apply(image: np.ndarray, mask: np.ndarray, fill: float | np.ndarray) -> np.ndarray:
    out = np.array(image, copy=True)
    out[mask] = fill[mask] if isinstance(fill, np.ndarray) else fill
    return out


def mask_top(image: np.ndarray, heatmap: np.ndarray, frac: float, fill: float | np.ndarray) -> np.ndarray:
    """A copy of image [h,w] or [h,w,1] with its top-frac heatmap pixels replaced by fill (scalar or image)."""
    return _apply(image, top_mask(heatmap, frac), fill)


def mask_random(image: np.ndarray, frac: float, rng: np.random.Generator, fill: float | np.ndarray) -> np.ndarray:
    """A copy of image with round(frac * pixels) uniformly random pixels replaced by fill: the control."""
    h, w = np.shape(image)[:2]
    k = round(frac * h * w)
    mask = np.zeros(h * w, bool)
    mask[rng.choice(h * w, size=k, replace=False)] = True
    return _apply(image, mask.reshape(h, w), fill)


def neutral_fill(image: np.ndarray, mode: str = "mean") -> float | np.ndarray:
    """What masked pixels become: the image mean, or ("blur") a heavily blurred copy of the image."""
    if mode == "mean":
        return float(np.mean(image))
    if mode == "blur":
        return blurred(np.asarray(image, np.float32)[None])[0]
    raise ValueError(f"unknown fill {mode!r}; expected 'mean' or 'blur'")


def decision_changed(orig_class: int, probs: np.ndarray) -> tuple[bool, bool]:
    """(impact, flipped): the argmax left orig_class, or (impact only) its probability fell below 0.5."""
    flipped = int(np.argmax(probs)) != orig_class
    return flipped or float(probs[orig_class]) < CONFIDENCE_FLOOR, flipped


def interleave_by_class(samples: Sequence[Sample]) -> list[Sample]:
    """Samples reordered round-robin over classes, so a --limit prefix covers every class evenly."""
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out: list[Sample] = []
    for i in range(max((len(v) for v in by_class.values()), default=0)):
        out += [group[i] for _, group in sorted(by_class.items()) if i < len(group)]
    return out


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


# --- the audit -----------------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    """What the audit learned about one image."""

    index: int
    file: str
    label: int
    pred: int
    confidence: float
    boxes: tuple[Box, ...]
    hit: bool | None = None
    energy: float | None = None
    share: float | None = None
    impact: dict[str, bool] = field(default_factory=dict)  # "top5", "random5@seed0", ...
    flipped: dict[str, bool] = field(default_factory=dict)
    reachable: bool | None = None  # could any map at the explainer's grid hit it (None: pixel-level method)


def _key(frac: float) -> str:
    return f"{round(frac * 100)}"


def measure_batch(
    explainer: AnyExplainer,
    images: np.ndarray,
    samples: Sequence[Sample],
    first_index: int,
    *,
    target: str,
    fill: str,
    seeds: int,
    use_boxes: bool,
    regions: Sequence[np.ndarray | None] | None = None,
    tolerance: int = 0,
) -> tuple[list[ImageResult], np.ndarray]:
    """Explain a batch, score its heatmaps against the boxes (or regions: defect masks in input coordinates), and
    re-run the masked variants in one go."""
    class_idx = [s.label for s in samples] if target == "true" else None
    probs, heat = explainer.explain(images, class_idx)
    preds = probs.argmax(1)
    explained = np.array(class_idx) if class_idx is not None else preds
    results: list[ImageResult] = []
    variants: list[np.ndarray] = []
    tags: list[tuple[int, str]] = []
    for j, s in enumerate(samples):
        r = ImageResult(first_index + j, s.path.name, s.label, int(preds[j]), float(probs[j, preds[j]]), s.boxes)
        region, tol = (regions[j], tolerance) if regions is not None else (None, 0)
        if regions is None and s.boxes:
            # VOC boxes are a region too; their pointing game has always been "the maximum inside a box".
            region = box_mask(s.boxes, heat[j].shape)
        if use_boxes and region is not None:
            r.hit = pointing_hit_region(heat[j], region, tol)
            r.energy = energy_in_region(heat[j], region)
            r.share = float(region.mean())
            if explainer.grid is not None:
                r.reachable = pointing_reachable(region, explainer.grid, tol)
        f = neutral_fill(images[j], fill)
        for frac in FRACS:
            variants.append(mask_top(images[j], heat[j], frac, f))
            tags.append((j, f"top{_key(frac)}"))
            for seed in range(seeds):
                # Seeded by (seed, image) so results do not depend on batch size or order.
                rng = np.random.default_rng([seed, r.index])
                variants.append(mask_random(images[j], frac, rng, f))
                tags.append((j, f"random{_key(frac)}@{seed}"))
        results.append(r)
    masked_probs = explainer.predict(np.stack(variants)) if variants else np.zeros((0, explainer.kernel.shape[1]))
    for (j, tag), p in zip(tags, masked_probs, strict=True):
        # The decision being tested is the one the heatmap explains: the prediction, or the true class.
        impact, flipped = decision_changed(int(explained[j]), p)
        results[j].impact[tag] = impact
        results[j].flipped[tag] = flipped
    return results, heat


def _rates(results: Sequence[ImageResult], attr: str, seeds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Impact (or flip) rates per masking, random ones averaged over seeds, plus the seeds' std."""
    rates: dict[str, float] = {}
    std: dict[str, float] = {}
    if not results:
        return rates, std
    for frac in FRACS:
        k = _key(frac)
        rates[f"top{k}"] = float(np.mean([getattr(r, attr)[f"top{k}"] for r in results]))
        if seeds:  # --seeds 0 skips the random control rather than reporting NaN
            per_seed = [np.mean([getattr(r, attr)[f"random{k}@{s}"] for r in results]) for s in range(seeds)]
            rates[f"random{k}"] = float(np.mean(per_seed))
            std[f"random{k}"] = float(np.std(per_seed))
    return rates, std


def summarize(results: Sequence[ImageResult], seeds: int, use_boxes: bool,
              classes: Sequence[str] = NEU_CLASSES) -> dict[str, Any]:
    """Overall and per-class metrics of an audit as a JSON-ready dict (classes: the model card's)."""

    def block(rs: Sequence[ImageResult]) -> dict[str, Any]:
        boxed = [r for r in rs if r.hit is not None]
        d: dict[str, Any] = {
            "n": len(rs),
            "accuracy": _mean([r.pred == r.label for r in rs]),
            "pointing_game": _mean([bool(r.hit) for r in boxed]) if use_boxes else None,
            # The best any heatmap at the method's grid could score on these defects (None: pixel-level).
            "pointing_ceiling": (_mean([bool(r.reachable) for r in boxed])
                                 if use_boxes and boxed and all(r.reachable is not None for r in boxed) else None),
            "energy_in_boxes": _mean([r.energy or 0.0 for r in boxed]) if use_boxes else None,
            "box_area_share": _mean([r.share or 0.0 for r in boxed]) if use_boxes else None,
            "n_with_boxes": len(boxed),
        }
        d["impact"], _ = _rates(rs, "impact", seeds)
        return d

    overall = block(results)
    impact, impact_std = _rates(results, "impact", seeds)
    flips, _ = _rates(results, "flipped", seeds)
    cm = np.zeros((len(classes), len(classes)), np.int64)
    for r in results:
        cm[r.label, r.pred] += 1
    return {
        **overall,
        "impact": impact,
        "impact_random_std": impact_std,
        "decision_flip": flips,
        "confusion_matrix": cm.tolist(),
        "per_class": {c: block([r for r in results if r.label == i]) for i, c in enumerate(classes)},
        "errors": [
            {"file": r.file, "true": classes[r.label], "pred": classes[r.pred], "confidence": round(r.confidence, 4)}
            for r in results
            if r.pred != r.label
        ],
    }


# --- pictures and the report ---------------------------------------------------------------------------------


def render_row(gray: np.ndarray, heatmap: np.ndarray, boxes: Sequence[Box], caption: str,
               region: np.ndarray | None = None, tolerance: int = 0) -> np.ndarray:
    """One grid row, BGR uint8: input | heatmap overlay | input with boxes or the mask outline (green) and the
    heatmap's maximum."""
    g = np.round(np.clip(np.asarray(gray, np.float32).reshape(heatmap.shape), 0, 255)).astype(np.uint8)
    left = cv2.cvtColor(g, cv2.COLOR_GRAY2BGR)
    mid = overlay(g, heatmap)
    right = left.copy()
    for x0, y0, x1, y1 in boxes:
        cv2.rectangle(right, (int(x0) - 1, int(y0) - 1), (int(x1) - 1, int(y1) - 1), (0, 220, 0), 1)
    if region is not None:
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(right, contours, -1, (0, 220, 0), 1)
    if (heatmap > 0).any():
        r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        hit = pointing_hit_region(heatmap, region, tolerance) if region is not None else pointing_hit(heatmap, boxes)
        colour = (0, 220, 0) if hit else (0, 0, 255)
        cv2.drawMarker(right, (int(c), int(r)), colour, cv2.MARKER_CROSS, 14, 2)
        cv2.drawMarker(mid, (int(c), int(r)), (255, 255, 255), cv2.MARKER_CROSS, 14, 1)
    h, w = g.shape
    row = np.full((h + CAPTION, 3 * w + 2 * GAP, 3), 255, np.uint8)
    for i, panel in enumerate((left, mid, right)):
        row[CAPTION:, i * (w + GAP) : i * (w + GAP) + w] = panel
    cv2.putText(row, caption[:90], (2, CAPTION - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return row


def stack_rows(rows: Sequence[np.ndarray], title: str) -> np.ndarray:
    """Rows under a header naming the columns."""
    width = rows[0].shape[1]
    header = np.full((CAPTION + 4, width, 3), 235, np.uint8)
    cv2.putText(header, title[:100], (2, CAPTION - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    gap = np.full((GAP, width, 3), 255, np.uint8)
    parts = [header]
    for r in rows:
        parts += [r, gap]
    return np.vstack(parts)


def _caption(r: ImageResult, classes: Sequence[str] = NEU_CLASSES) -> str:
    verdict = "ok" if r.pred == r.label else "WRONG"
    point = "" if r.hit is None else (" | hit" if r.hit else " | miss")
    energy = "" if r.energy is None else f" | E={r.energy:.2f}/{r.share:.2f}"
    return f"{r.file}: {classes[r.pred]} {r.confidence:.2f} ({verdict}){point}{energy}"


def _b64(img: np.ndarray) -> str:
    return base64.b64encode(png(img)).decode("ascii")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _report_head(s: dict[str, Any]) -> list[str]:
    e = html.escape
    b = s.get("backend", "keras")
    runtime = ("the Keras fp32 model" if b == "keras"
               else f"{b.get('backend')} {b.get('precision')} ({b.get('runtime')})")
    return [
        "<!doctype html><html><head><meta charset='utf-8'><title>TinyDefectNet explanation audit</title><style>",
        "body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}img{display:block;margin:.3em 0}.note{color:#555;font-size:90%}",
        "</style></head><body>",
        "<h1>TinyDefectNet explanation audit</h1>",
        f"<p>Model <code>{e(str(s['model']))}</code>, data <code>{e(str(s['data']))}</code> "
        f"(split <b>{e(s['split'])}</b>), method <b>{e(s['method'])}</b> on layer <code>{e(s['layer'])}</code>, "
        f"heatmaps of the <b>{'predicted' if s['target'] == 'pred' else 'true'}</b> class, computed by "
        f"<b>{e(runtime)}</b>; "
        f"{s['n']} images in {s['seconds']:.1f} s.</p>",
        "<h2>Overall</h2><table><tr><th>metric</th><th>value</th><th>uninformative heatmap</th></tr>",
        f"<tr><td>accuracy</td><td>{_pct(s['accuracy'])}</td><td></td></tr>",
        f"<tr><td>pointing game (max inside a box)</td><td>{_pct(s['pointing_game'])}</td>"
        f"<td>{_pct(s['box_area_share'])} (random point)</td></tr>",
        f"<tr><td>pointing ceiling (the best any map at the method's grid could score)</td>"
        f"<td>{_pct(s['pointing_ceiling'])}</td><td></td></tr>",
        f"<tr><td>energy in boxes</td><td>{_pct(s['energy_in_boxes'])}</td>"
        f"<td>{_pct(s['box_area_share'])} (box area share)</td></tr></table>",
    ]


def _report_impact(s: dict[str, Any]) -> list[str]:
    parts = [
        "<h2>Decision impact</h2><p class='note'>Share of images whose decision changes (argmax leaves the "
        f"explained class, or its probability drops below {CONFIDENCE_FLOOR}) when the top-k% heatmap pixels "
        f"are replaced by the {html.escape(s['fill'])} fill, against k% random pixels ({s['seeds']} seeds; ± is "
        "the std over seeds). Lin et al. 2019. Random pixels are scattered, top pixels contiguous: the control "
        "measures how much any k% perturbation hurts.</p>",
        "<table><tr><th>k</th><th>top-k impact</th><th>random-k impact</th><th>top-k flip</th>"
        "<th>random-k flip</th></tr>",
    ]
    for frac in FRACS:
        k = _key(frac)
        parts.append(
            f"<tr><td>{k}%</td><td>{_pct(s['impact'].get('top' + k))}</td>"
            f"<td>{_pct(s['impact'].get('random' + k))} ± {_pct(s['impact_random_std'].get('random' + k))}</td>"
            f"<td>{_pct(s['decision_flip'].get('top' + k))}</td>"
            f"<td>{_pct(s['decision_flip'].get('random' + k))}</td></tr>"
        )
    parts.append(
        "</table><h2>Per class</h2><table><tr><th>class</th><th>n</th><th>accuracy</th><th>pointing game</th>"
        "<th>pointing ceiling</th><th>energy in boxes</th><th>box area share</th><th>top-10% impact</th>"
        "<th>random-10% impact</th></tr>"
    )
    for c, d in s["per_class"].items():
        parts.append(
            f"<tr><td>{html.escape(c)}</td><td>{d['n']}</td><td>{_pct(d['accuracy'])}</td>"
            f"<td>{_pct(d['pointing_game'])}</td><td>{_pct(d['pointing_ceiling'])}</td>"
            f"<td>{_pct(d['energy_in_boxes'])}</td>"
            f"<td>{_pct(d['box_area_share'])}</td><td>{_pct(d['impact'].get('top10'))}</td>"
            f"<td>{_pct(d['impact'].get('random10'))}</td></tr>"
        )
    return parts


def _report_errors(s: dict[str, Any], error_rows: list[tuple[ImageResult, np.ndarray]]) -> list[str]:
    e = html.escape
    parts = [f"<h2>Misclassified images ({len(s['errors'])})</h2>"]
    if not s["errors"]:
        return [*parts, "<p>None.</p>"]
    parts.append("<table><tr><th>file</th><th>true</th><th>predicted</th><th>confidence</th></tr>")
    for err in s["errors"]:
        parts.append(
            f"<tr><td>{e(err['file'])}</td><td>{e(err['true'])}</td><td>{e(err['pred'])}</td>"
            f"<td>{err['confidence']:.3f}</td></tr>"
        )
    parts.append("</table>")
    for r, row in error_rows:
        parts.append(f"<img alt='{e(r.file)}' src='data:image/png;base64,{_b64(row)}'>")
    if len(error_rows) < len(s["errors"]):
        parts.append(f"<p class='note'>Pictures of the first {len(error_rows)} errors only.</p>")
    return parts


def write_report(
    out: Path,
    summary: dict[str, Any],
    class_grids: dict[str, np.ndarray],
    error_rows: list[tuple[ImageResult, np.ndarray]],
) -> Path:
    """A single-file HTML report with every picture embedded as a base64 PNG."""
    parts = [*_report_head(summary), *_report_impact(summary)]
    parts.append(
        "</table><p class='note'>Grid columns: input | heatmap overlay | ground-truth boxes (green) with the "
        "heatmap maximum (green cross: inside a box, red: outside). E = energy in boxes / box area share.</p>"
    )
    parts.append("<h2>Samples per class</h2>")
    for c, grid in class_grids.items():
        parts.append(f"<h3>{html.escape(c)}</h3><img alt='{html.escape(c)}' src='data:image/png;base64,{_b64(grid)}'>")
    parts.extend(_report_errors(summary, error_rows))
    parts.append("</body></html>\n")
    path = out / "report.html"
    path.write_text("".join(parts))
    return path


# --- command line --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tdn audit`."""
    from agent.lab import default_data

    parser.add_argument(
        "--data",
        default=default_data(),
        help="dataset folder: NEU-DET (IMAGES/ + ANNOTATIONS/), or one folder per class with <stem>.png masks "
        "(default: $TDN_DATA, else ../shared/neu-det)",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Keras model (default: the shipped one)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        help="heatmap method (default: what the agent publishes for this model, its card's explanation.method, else "
        f"{AGENT_METHOD}: the CAMs of the input moved by thirds of a feature cell, averaged; shift-cam-detail puts "
        "that map's peak on the image's fine structure; cam is one plain CAM, and gradcam gives the same maps for "
        "the GAP + dense head; cam-ig refines the CAM to pixels with integrated gradients; the report's pointing "
        "ceiling is what any map at the method's grid could score)",
    )
    parser.add_argument(
        "--choose-method",
        action="store_true",
        help=f"score each method the agent can publish ({', '.join(PUBLISHABLE)}) by the pointing game on --split "
        "(use val) and print them; with --write-card, record the best in the model card's explanation block, which "
        "the agent reads at its next start or reload",
    )
    parser.add_argument("--write-card", action="store_true",
                        help="with --choose-method: write the choice and its figures into the model card")
    parser.add_argument(
        "--whole-frame",
        action="store_true",
        help="a tiling model's pointing game on the map the agent publishes for the whole frame (agent.explain."
        "frame_cam over every tile, on --backend, default tensorflow) against the frame's whole mask, instead of "
        "the deciding tile's map against the mask inside it; pointing only",
    )
    parser.add_argument(
        "--backend",
        help="audit the maps a serving backend computes (auto, or a name such as litert:int8 or openvino:bf16, as "
        "the agent's --backend takes; missing lean variants are exported and gated first, as at the agent's first "
        "start) instead of the Keras fp32 model: the probabilities, the decisions and the heatmaps are then the ones "
        "the agent publishes (the gradient-free methods only)",
    )
    parser.add_argument("--layer", help="conv layer for gradcam/gradcampp (default: the last feature map)")
    parser.add_argument(
        "--target",
        choices=("pred", "true"),
        default="pred",
        help="explain the predicted class (default) or the true one",
    )
    parser.add_argument(
        "--split",
        choices=("all", "val", "train"),
        default="all",
        help="audit every image, or only the model card's held-out (val) or training part",
    )
    parser.add_argument("--limit", type=int, help="audit only N images, spread evenly over the classes")
    parser.add_argument(
        "--no-boxes",
        action="store_true",
        help="annotation-free metrics only (accuracy, impact): for folders without ANNOTATIONS/",
    )
    parser.add_argument(
        "--fill",
        choices=("mean", "blur"),
        default="blur",
        # Blur removes the masked detail without adding any: mean-valued pixels scattered at random are themselves
        # salt-and-pepper noise, which flips this model's decisions about as often as masking the defect does.
        help="what masked pixels become: a blurred copy (default) or the image mean",
    )
    parser.add_argument("--tolerance", type=int, default=0,
                        help="pointing game: a maximum within this many input pixels of the defect counts as a hit "
                             "(default 0: inside it; Zhang et al. 2016 use 15)")
    parser.add_argument("--seeds", type=int, default=3, help="random-mask repetitions (default: 3)")
    parser.add_argument("--per-class", type=int, default=4, help="sample rows per class in the grids (default: 4)")
    parser.add_argument("--max-error-images", type=int, default=200, help="cap on error pictures (all are listed)")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--out", type=Path, default=Path("runs/audit"), help="report folder (default: runs/audit)")
    parser.add_argument("--json", type=Path, help="also write the metrics as JSON to FILE")


def serving_explainer(model: Path, name: str, method: str, pass_classes: Sequence[int]
                      ) -> tuple[BackendExplainer, dict[str, str]]:
    """The backend `name` loads `model` as the agent would (its settings' defaults), and its explainer and identity."""
    from agent.backends import from_settings
    from agent.config import load

    if not model.is_file():
        raise ModelError(f"model file {model} not found; train one with `tdn train` or pass --model")
    backend = from_settings(load(model_path=model, backend=name))
    backend.load()
    backend.warmup((1,))
    return BackendExplainer(backend, method, pass_classes), backend.identity()


def load_model(path: Path) -> Any:
    """The Keras model at path, or ModelError."""
    if not path.is_file():
        raise ModelError(f"model file {path} not found; train one with `tdn train` or pass --model")
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises a zoo of types for a corrupt or foreign file
        raise ModelError(f"{path}: cannot load the Keras model ({type(exc).__name__}: {exc})") from exc


def select_split(samples: list[Sample], model_path: Path, split: str) -> list[Sample]:
    """The model card's held-out or training part of the samples (agent.lab.data.held_out, strict)."""
    if split == "all":
        return samples
    card_path = model_path.with_suffix(".json")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"--split {split} needs the model card {card_path} with its split ({exc})") from exc
    train, val, _ = held_out(card, samples, strict=True)
    return val if split == "val" else train


def _scan(data: str | None, no_boxes: bool) -> Dataset:
    if not data:
        raise DataError("no dataset folder: pass --data DIR or set TDN_DATA")
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} not found")
    ds = load_dataset(root)
    if not no_boxes and not any(s.localised for s in ds.samples):
        raise DataError(
            f"{root}: no ANNOTATIONS/ folder (VOC boxes) and no <stem>.png masks, so nothing for the pointing game "
            "and energy metrics; pass --no-boxes to audit accuracy and decision impact only"
        )
    return ds


def _check_args(args: argparse.Namespace) -> None:
    for name, least in (("batch", 1), ("seeds", 0), ("per_class", 0), ("max_error_images", 0)):
        if getattr(args, name) < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {least}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    if args.layer and args.method not in ("gradcam", "gradcampp"):
        raise ConfigError(f"--layer needs --method gradcam or gradcampp ({args.method} has a fixed input)")
    if args.write_card and not args.choose_method:
        raise ConfigError("--write-card records what --choose-method chose; pass both")
    if (args.choose_method or args.whole_frame) and args.no_boxes:
        raise ConfigError("--choose-method and --whole-frame score the pointing game: they need the boxes or masks "
                          "--no-boxes drops")
    if args.whole_frame and args.choose_method:
        raise ConfigError("--whole-frame scores one method; --choose-method compares them on the deciding tiles")
    if args.whole_frame and args.method not in GRADIENT_FREE:
        raise ConfigError(f"--whole-frame scores what the agent publishes: {', '.join(GRADIENT_FREE)}, not "
                          f"{args.method}")
    if args.backend and args.method not in GRADIENT_FREE:
        raise ConfigError(f"--backend explains with {', '.join(GRADIENT_FREE)}, not {args.method} (a serving "
                          "backend has no gradients)")


def _select(args: argparse.Namespace) -> tuple[list[Sample], tuple[str, ...], InputSpec, np.ndarray]:
    """The audited samples, the card's classes, its input geometry and which classes pass."""
    ds = _scan(args.data, args.no_boxes)
    card_path = args.model.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if card:
        check_classes(card, ds)
    classes = tuple(card.get("classes", ds.classes))
    spec = InputSpec.from_card(card.get("input", {}))
    samples = select_split(list(ds.samples), args.model, args.split)
    if args.limit is not None:
        samples = sorted(interleave_by_class(samples)[: args.limit], key=lambda s: s.path)
    return samples, classes, spec, pass_mask_of(classes, card.get("pass_classes", ()))


def deciding_tiles(explainer: AnyExplainer, chunk: Sequence[Sample], spec: InputSpec, pass_mask: np.ndarray,
                   use_boxes: bool) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """A tiling model's audit inputs: per image, the tile that decides it in the agent (agent.geometry.frame_picks),
    and the part of its defect region inside that tile (empty when the defect lies in other tiles: a miss)."""
    grays = [read_gray(s.path) for s in chunk]
    planes = [to_input(g, spec) for g in grays]
    origins = [tile_origins(p.shape, spec.size) for p in planes]
    rows = np.stack([p[oy:oy + spec.size, ox:ox + spec.size] for p, o in zip(planes, origins, strict=True)
                     for oy, ox in o])[..., None].astype(np.float32)
    frame = np.repeat(np.arange(len(chunk)), [len(o) for o in origins])
    picks = frame_picks(explainer.predict(rows), frame, len(chunk), pass_mask)
    regions: list[np.ndarray | None] = []
    for i, s in enumerate(chunk):
        m = defect_mask(s, spec, (grays[i].shape[0], grays[i].shape[1])) if use_boxes else None
        oy, ox = origins[i][picks[i] - int(np.searchsorted(frame, i))]
        regions.append(None if m is None else m[oy:oy + spec.size, ox:ox + spec.size])
    return rows[picks], regions


Kept = dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]]  # index -> (gray, heatmap, region)


def _measure_all(args: argparse.Namespace, explainer: AnyExplainer, samples: list[Sample], spec: InputSpec,
                 wanted: set[int], pass_mask: np.ndarray) -> tuple[list[ImageResult], Kept]:
    """Every sample measured in batches; the pictures of the wanted ones and of the first errors kept.

    A tiling model is audited on each image's deciding tile: the row its verdict carries."""
    from tqdm import tqdm

    use_boxes = not args.no_boxes
    keep: Kept = {}
    results: list[ImageResult] = []
    kept_errors = 0
    with tqdm(total=len(samples), desc=f"audit ({args.method})", unit="img", disable=None) as bar:
        for start in range(0, len(samples), args.batch):
            chunk = samples[start : start + args.batch]
            regions: list[np.ndarray | None]
            if spec.method == "tile":
                images, regions = deciding_tiles(explainer, chunk, spec, pass_mask, use_boxes)
            else:
                images, _ = load_arrays(chunk, spec=spec)
                # Boxes and masks are moved into input coordinates by the same geometry as the image.
                regions = [defect_mask(s, spec) if use_boxes else None for s in chunk]
            rs, heat = measure_batch(explainer, images, chunk, start, target=args.target, fill=args.fill,
                                     seeds=args.seeds, use_boxes=use_boxes, regions=regions,
                                     tolerance=args.tolerance)
            for j, r in enumerate(rs):
                is_shown_error = r.pred != r.label and kept_errors < args.max_error_images
                kept_errors += is_shown_error
                if r.index in wanted or is_shown_error:
                    keep[r.index] = (images[j, :, :, 0].astype(np.uint8), heatmap_u8(heat[j]), regions[j])
            results += rs
            bar.update(len(chunk))
    return results, keep


def _pictures(args: argparse.Namespace, results: list[ImageResult], keep: Kept, shown: dict[int, list[int]],
              classes: tuple[str, ...], boxes_drawable: bool
              ) -> tuple[dict[str, np.ndarray], list[tuple[ImageResult, np.ndarray]]]:
    """The per-class grids and the error rows, also written as PNGs into --out."""
    out: Path = args.out
    use_boxes = not args.no_boxes
    title = f"input | {args.method} overlay | boxes + heatmap max"

    def row(r: ImageResult) -> np.ndarray:
        gray, h8, region = keep[r.index]
        boxes = r.boxes if use_boxes and boxes_drawable else ()
        return render_row(gray, h8.astype(np.float32) / 255.0, boxes, _caption(r, classes),
                          region if use_boxes else None, args.tolerance)

    class_grids: dict[str, np.ndarray] = {}
    for c, idxs in sorted(shown.items()):
        if not idxs:  # --per-class 0: no sample grids
            continue
        grid = stack_rows([row(results[i]) for i in idxs], f"{classes[c]}: {title}")
        class_grids[classes[c]] = grid
        (out / f"samples_{classes[c]}.png").write_bytes(png(grid))
    error_rows = [(r, row(r)) for r in results if r.pred != r.label and r.index in keep][: args.max_error_images]
    for old in out.glob("errors_*.png"):
        old.unlink()  # a rerun with fewer errors must not leave stale pages behind
    for page, i in enumerate(range(0, len(error_rows), 16)):
        grid = stack_rows([rr for _, rr in error_rows[i : i + 16]], f"misclassified: {title}")
        (out / f"errors_{page + 1:02d}.png").write_bytes(png(grid))
    return class_grids, error_rows


def published_method(model: Path) -> str:
    """The method the agent publishes for `model`: its card's (agent.card), shift-cam for a model without a card."""
    from agent import card as cards

    return cards.read(model).explain_method if cards.card_path(model).is_file() else AGENT_METHOD


def _explainer(args: argparse.Namespace, pass_classes: Sequence[int]) -> tuple[AnyExplainer, dict[str, str]]:
    """The Keras model's explainer for args.method, or the serving backend's (with its identity) under --backend."""
    if args.backend:
        return serving_explainer(args.model, args.backend, args.method, pass_classes)
    return Explainer(load_model(args.model), args.method, layer=args.layer, batch=args.batch,
                     pass_classes=pass_classes), {}


def choose_method(args: argparse.Namespace) -> dict[str, Any]:
    """`--choose-method`: the pointing game of each method the agent can publish, and the card's explanation block
    naming the best (the first listed on a tie: shift-cam, the one a card without a block gets)."""
    samples, classes, spec, pass_mask = _select(args)
    pass_classes = np.flatnonzero(pass_mask).tolist()
    scores: dict[str, dict[str, Any]] = {}
    n = 0
    for method in PUBLISHABLE:
        # Pointing only: no random masks, no pictures.
        margs = argparse.Namespace(**{**vars(args), "method": method, "seeds": 0})
        explainer, _ = _explainer(margs, pass_classes)
        results, _ = _measure_all(margs, explainer, samples, spec, set(), pass_mask)
        s = summarize(results, 0, True, classes)
        n = s["n_with_boxes"]
        scores[method] = {"pointing_game": s["pointing_game"],
                          "per_class": {c: b["pointing_game"] for c, b in s["per_class"].items() if b["n_with_boxes"]}}
    if not n:
        raise DataError(f"{args.data}: no image of --split {args.split} has a defect box or mask to point at")
    best = max(PUBLISHABLE, key=lambda m: (scores[m]["pointing_game"], -PUBLISHABLE.index(m)))
    return {
        "method": best,
        "how_chosen": f"the highest pointing game over {n} localised images of the {args.split} split "
                      f"(`tdn audit --choose-method`, tolerance {args.tolerance} px, "
                      f"{args.backend or 'the Keras fp32 model'}); {PUBLISHABLE[0]} on a tie",
        "pointing_game": scores,
    }


def write_explanation(model: Path, block: dict[str, Any]) -> Path:
    """Put `block` into the model card as its "explanation", replacing the card in one rename."""
    from agent.card import card_path
    from agent.lab.model.train import card_json

    path = card_path(model)
    raw = json.loads(path.read_text())
    raw["explanation"] = block
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(card_json(raw))
    tmp.replace(path)
    return path


def whole_frame(args: argparse.Namespace) -> dict[str, Any]:
    """`--whole-frame`: the pointing game of the maps the agent publishes for whole frames (agent.explain.frame_cam
    on a serving backend, for the class of the frame's deciding tile) against each frame's whole defect mask."""
    from tqdm import tqdm

    from agent.explain import features_one_by_one, frame_cam
    from agent.geometry import combine, tiles

    samples, classes, spec, pass_mask = _select(args)
    if spec.method != "tile":
        raise ConfigError(f"--whole-frame is for a tiling model; {args.model} takes one {spec.method} input a frame, "
                          "which the plain audit already scores whole")
    explainer, ident = serving_explainer(args.model, args.backend or "tensorflow", args.method, [])
    hits: dict[int, list[bool]] = {}
    for s in tqdm([s for s in samples if s.localised], desc="whole frames", unit="frame", disable=None):
        gray = read_gray(s.path)
        region = defect_mask(s, spec, (gray.shape[0], gray.shape[1]))
        if region is None:  # a good part's empty mask: nothing to point at
            continue
        plane = to_input(gray, spec)
        probs, _ = features_one_by_one(explainer.backend, np.stack(tiles(plane, spec.size))[..., None].astype(
            np.float32))
        cls = int(probs[combine(probs, pass_mask)].argmax())
        heat = frame_cam(explainer.backend, plane, cls, args.method)
        hits.setdefault(s.label, []).append(pointing_hit_region(heat, region, args.tolerance))
    every = [h for v in hits.values() for h in v]
    if not every:
        raise DataError(f"{args.data}: no image of --split {args.split} has a defect mask to point at")
    return {"model": str(args.model), "split": args.split, "method": args.method, "whole_frame": True,
            "backend": ident, "pointing_tolerance_px": args.tolerance, "n_with_boxes": len(every),
            "pointing_game": _mean(every),
            "per_class": {classes[c]: {"n_with_boxes": len(v), "pointing_game": _mean(v)}
                          for c, v in sorted(hits.items())}}


def _choose(args: argparse.Namespace) -> int:
    block = choose_method(args)
    for method, score in block["pointing_game"].items():
        per = ", ".join(f"{c} {v:.1%}" for c, v in score["per_class"].items())
        mark = "  <- chosen" if method == block["method"] else ""
        print(f"{method:18s} {score['pointing_game']:.1%}  ({per}){mark}")
    if args.write_card:
        log.info("card written", card=str(write_explanation(args.model, block)), method=block["method"])
    return 0


def run(args: argparse.Namespace) -> int:
    """Audit the heatmaps of every labelled image in --data and write the report (and --json)."""
    t0 = time.monotonic()
    if args.method is None:
        args.method = published_method(args.model)
    _check_args(args)
    if args.choose_method:
        return _choose(args)
    if args.whole_frame:
        summary = whole_frame(args)
        per = ", ".join(f"{c} {v['pointing_game']:.1%}" for c, v in summary["per_class"].items())
        print(f"{args.method} on whole frames: {summary['pointing_game']:.1%} of {summary['n_with_boxes']} ({per})")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    use_boxes = not args.no_boxes
    samples, classes, spec, pass_mask = _select(args)
    explainer, backend = _explainer(args, np.flatnonzero(pass_mask).tolist())
    log.info("audit", data=str(args.data), images=len(samples), method=args.method, split=args.split,
             backend=backend.get("backend", "keras"), precision=backend.get("precision"))

    shown: dict[int, list[int]] = {}  # class -> indices of its first --per-class samples
    for i, s in enumerate(samples):
        if len(shown.setdefault(s.label, [])) < args.per_class:
            shown[s.label].append(i)
    results, keep = _measure_all(args, explainer, samples, spec, {i for v in shown.values() for i in v}, pass_mask)
    summary = summarize(results, args.seeds, use_boxes, classes)
    summary["localisation"] = ("none" if not use_boxes else
                               "VOC boxes" if any(s.boxes for s in samples) else "pixel masks")
    summary["pointing_tolerance_px"] = args.tolerance
    args.out.mkdir(parents=True, exist_ok=True)
    # Boxes are drawn as rectangles only where images were not resized; otherwise the moved mask's outline shows.
    boxes_drawable = not any(s.mask is not None for s in samples) and spec.size == 200
    class_grids, error_rows = _pictures(args, results, keep, shown, classes, boxes_drawable)
    summary = {
        "model": str(args.model),
        "data": str(args.data),
        "split": args.split,
        "method": args.method,
        # Which runtime computed the maps: the Keras fp32 model, or the serving backend's identity.
        "backend": backend or "keras",
        "layer": explainer.layer,
        "target": args.target,
        # What IG integrates, so a figure says which variant of the method it measured.
        **({"ig_target": "class logit minus the pass classes' mean" if explainer.pass_classes else "class logit",
            "ig_baseline": f"the image blurred, sigma {BLUR_SIGMA:g}"} if "ig" in args.method else {}),
        "fill": args.fill,
        "seeds": args.seeds,
        **summary,
    }
    summary["seconds"] = round(time.monotonic() - t0, 2)
    report = write_report(args.out, summary, class_grids, error_rows)
    summary["seconds"] = round(time.monotonic() - t0, 2)  # the report is part of the job
    summary["report"] = str(report)
    (args.out / "audit.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("audited", n=summary["n"], accuracy=summary["accuracy"], pointing_game=summary["pointing_game"],
             pointing_ceiling=summary["pointing_ceiling"], energy_in_boxes=summary["energy_in_boxes"],
             box_area_share=summary["box_area_share"],
             impact=summary["impact"], errors=len(summary["errors"]), seconds=summary["seconds"], report=str(report))
    return 0
