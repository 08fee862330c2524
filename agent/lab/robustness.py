"""`tdn robustness`: accuracy and pass/divert/review under line-camera degradations on the card's held-out split."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ConfigError, ModelError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "tinydefectnet.keras"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `tdn robustness`."""
    from agent.lab import default_data
    from agent.lab.degrade import KINDS, SEVERITIES

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .keras model (its card beside it)")
    p.add_argument("--data", default=default_data(), help="the dataset folder the model was trained from")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="the card's held-out split (default) or every image")
    p.add_argument("--limit", type=int, help="only about N images, every class equally (smoke runs)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma list of degradations")
    p.add_argument("--severities", default=",".join(SEVERITIES), help="comma list of severities")
    p.add_argument("--seed", type=int, default=0, help="seed of the random parts (direction, sign, noise)")
    p.add_argument("--json", type=Path, help="write the results as JSON to FILE")
    p.add_argument("--plot", type=Path, default=Path("runs/robustness/robustness.png"),
                   help="accuracy vs severity per degradation, PNG (default: runs/robustness/robustness.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _pick(spec: str, known: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if bad or not items:
        raise ConfigError(f"unknown {what} {bad[0] if bad else spec!r}; choose from: {', '.join(known)}")
    return items


def load(model_path: Path) -> tuple[Any, dict[str, Any]]:
    """The Keras model and its card, or ModelError."""
    card_path = model_path.with_suffix(".json")
    if not model_path.is_file():
        raise ModelError(f"model file {model_path} not found")
    if not card_path.is_file():
        raise ModelError(f"model card {card_path} not found")
    card: dict[str, Any] = json.loads(card_path.read_text())
    import keras

    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelError(f"{model_path}: cannot load the Keras model ({type(exc).__name__}: {exc})") from exc
    return model, card


def measure(model: Any, card: dict[str, Any], x: np.ndarray, y: np.ndarray, kinds: list[str], severities: list[str],
            seed: int, progress: bool = False, frame: np.ndarray | None = None) -> dict[str, Any]:
    """Outcome (agent.lab.calibrate.outcome) of the clean images and of each kind x severity.

    With `frame` (a tiling model: x holds tiles, frame says whose), each tile is degraded, and every image is
    decided by its deciding tile, as the agent decides it (agent.lab.model.train.per_frame).
    """
    from tqdm import tqdm

    from agent.decision import DecisionRule
    from agent.lab.calibrate import outcome
    from agent.lab.degrade import KINDS, apply_batch, named
    from agent.lab.model.train import per_frame, probs_and_pooled

    rule = DecisionRule.from_card(card)
    xu = np.clip(np.round(x[..., 0]), 0, 255).astype(np.uint8)

    def run(images: np.ndarray) -> dict[str, Any]:
        p, f = probs_and_pooled(model, images[..., None].astype(np.float32))
        if frame is not None:
            p, f = per_frame(p, f, frame, len(y), rule.pass_mask)
        dec, idx, _, _ = rule.decide(p, f if rule.needs_pooled else None)
        return outcome(dec, idx, y, rule.pass_mask)

    results: dict[str, Any] = {}
    with tqdm(total=1 + len(kinds) * len(severities), desc="robustness", unit="set", disable=not progress) as bar:
        results["clean"] = run(xu)
        bar.update(1)
        for kind in kinds:
            results[kind] = {}
            for sev in severities:
                # Same seeds as training's validation under degradation, so figures line up with the card.
                k_i, s_i = KINDS.index(kind), ("mild", "moderate", "strong").index(sev)
                results[kind][sev] = run(apply_batch(xu, named(kind, sev), seed + 100 * k_i + s_i))
                bar.update(1)
    return results


def summarize(results: dict[str, Any], kinds: list[str], severities: list[str]) -> dict[str, Any]:
    """Mean accuracy over the degraded sets, the worst mild one, and the share of their errors that end as review."""
    cells = [results[k][s] for k in kinds for s in severities]
    errors = sum(c["errors"] for c in cells)
    reviewed = sum(c["errors_reviewed"] for c in cells)
    out: dict[str, Any] = {
        "clean_accuracy": results["clean"]["accuracy"],
        "mean_degraded_accuracy": float(np.mean([c["accuracy"] for c in cells])) if cells else None,
        "errors_under_degradation": errors,
        "errors_reviewed_share": reviewed / errors if errors else None,
    }
    if "mild" in severities:
        mild = {k: results[k]["mild"]["accuracy"] for k in kinds}
        worst = min(mild, key=lambda k: mild[k])
        out["worst_mild"] = {"kind": worst, "accuracy": mild[worst]}
    if "escapes" in results["clean"]:
        out["escapes_under_degradation"] = sum(c["escapes"] for c in cells)
        out["defective_under_degradation"] = sum(c["defective"] for c in cells)
    return out


def table(results: dict[str, Any], kinds: list[str], severities: list[str]) -> str:
    """A markdown table: accuracy and errors reviewed per degradation and severity."""
    from agent.lab.bench.common import markdown_table

    def cell(o: dict[str, Any]) -> str:
        share = o["errors_reviewed_share"]
        rev = "-" if share is None else f"{100 * share:.0f}%"
        esc = f", {o['escapes']} esc" if "escapes" in o else ""
        return f"{100 * o['accuracy']:.1f}% ({o['errors']} err, {rev} rev{esc})"

    rows = [["clean", cell(results["clean"]), *["" for _ in severities[1:]]]]
    rows += [[k, *[cell(results[k][s]) for s in severities]] for k in kinds]
    return markdown_table(["degradation", *severities], rows)


def plot(results: dict[str, Any], kinds: list[str], severities: list[str], path: Path, title: str) -> Path:
    """Accuracy vs severity, one line per degradation, clean as severity 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    xs = list(range(len(severities) + 1))
    clean = 100 * results["clean"]["accuracy"]
    for k in kinds:
        ax.plot(xs, [clean, *[100 * results[k][s]["accuracy"] for s in severities]], marker="o", label=k)
    ax.set_xticks(xs, ["clean", *severities])
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write --json and the plot."""
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from agent.errors import DataError
    from agent.geometry import InputSpec
    from agent.lab.data import check_classes, held_out, load_dataset, load_frames, stratified_subset
    from agent.lab.degrade import KINDS, SEVERITIES

    t0 = time.monotonic()
    kinds = _pick(args.kinds, KINDS, "degradation")
    severities = _pick(args.severities, SEVERITIES, "severity")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    if not args.data:
        raise DataError("no dataset folder: pass --data DIR or set TDN_DATA")
    model, card = load(Path(args.model))
    ds = load_dataset(args.data)
    check_classes(card, ds)
    samples, how = list(ds.samples), "every image"
    if args.split == "val":
        _, samples, how = held_out(card, samples)
    if args.limit:
        samples = stratified_subset(samples, args.limit, seed=args.seed)
        how += f", a stratified subset of {len(samples)}"
    spec = InputSpec.from_card(card["input"])
    progress = not args.quiet and sys.stderr.isatty()
    x, y, frame = load_frames(samples, spec, progress=progress)
    results = measure(model, card, x, y, kinds, severities, args.seed, progress, frame)
    summary = summarize(results, kinds, severities)
    out = {"model": str(args.model), "data": str(args.data), "images": how, "n": len(samples), "seed": args.seed,
           "summary": summary, "results": results, "seconds": round(time.monotonic() - t0, 1)}
    title = f"{card.get('name', Path(args.model).stem)}: accuracy under degradation ({len(samples)} images)"
    png = plot(results, kinds, severities, Path(args.plot), title)
    out["plot"] = str(png)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if not args.quiet:
        print(table(results, kinds, severities))
        s = summary
        mild = s.get("worst_mild")
        share = s["errors_reviewed_share"]
        print(f"images: {how}; clean {100 * s['clean_accuracy']:.2f}%; mean under degradation "
              f"{100 * s['mean_degraded_accuracy']:.2f}%"
              + (f"; worst mild {mild['kind']} {100 * mild['accuracy']:.1f}%" if mild else "")
              + ("" if share is None else f"; errors ending as review {100 * share:.1f}%")
              + f"; plot {png}; {out['seconds']:.0f} s")
    return 0
