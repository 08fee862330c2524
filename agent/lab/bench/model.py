"""Table 1 / Figure 4 on this host: ResNet-50 vs TinyDefectNet, throughput, batch-1 latency, accuracy.

All rows are timed in one run, alternately (round-robin over rows, several repetitions, medians), so the
ratios hold on a shared, noisy machine even where absolute times drift.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.lab.bench.common import markdown_table, median, time_lanes, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL
    from agent.lab import default_data

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", default=default_data(),
                   help="evaluate accuracy on the model card's held-out split of this folder (else: card value)")
    p.add_argument("--batch", type=int, default=64, help="batch size for throughput (paper: 1024)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per row (medians reported)")
    p.add_argument("--seconds", type=float, default=1.0, help="minimum duration of one timed repetition")
    p.add_argument("--backends", default="all",
                   help="comma list of backend variants besides native TF (e.g. zendnn,litert:int8), or all/none")
    p.add_argument("--resnet-eval", action="store_true", help="(not trained here) ResNet-50 accuracy is the paper's")
    p.add_argument("--out", type=Path, default=Path("runs/bench-model"))
    p.add_argument("--json", type=Path, help="also write the JSON rows here")


class Row:
    """One model x runtime to time: a forward callable for a batch size and its metadata."""

    def __init__(self, name: str, backend: str, precision: str, params: int | None, flops: int | None,
                 accuracy: float | None, forward: Any, note: str = "") -> None:
        self.name, self.backend, self.precision = name, backend, precision
        self.params, self.flops, self.accuracy = params, flops, accuracy
        self.forward = forward  # forward(x) -> probs for x of a prepared batch size
        self.note = note
        self.layout = ""  # "workers x threads" where the runtime runs side by side
        # A layout of several inference workers is timed with every lane inferring its own batch at once.
        self.lanes: Any = None  # the backend, when it has several lanes
        self.tput: list[float] = []
        self.lat1: list[float] = []


def _time(fn: Any, x: Any, min_s: float) -> float:
    """Seconds per call: calls repeated for at least min_s."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        el = time.perf_counter() - t0
        if el >= min_s:
            return el / n


def tf_rows(model_path: Path, card: dict[str, Any], acc: float | None) -> list[Row]:
    import keras
    import tensorflow as tf

    from agent.backends.tensorflow import TensorFlowBackend
    from agent.lab.model.flops import profiler_flops

    # The zentf plugin, when installed, disables TF's own remapper fusions in every process (see
    # agent/backends/ZENDNN.md); native rows must run without it, as the tensorflow backend does.
    tf.config.optimizer.set_experimental_options({"use_plugin_optimizers": False})
    resnet = keras.applications.ResNet50(weights=None, input_shape=(200, 200, 1), classes=6)
    rflops = profiler_flops(resnet)

    fns: dict[int, Any] = {}

    def resnet_forward(x: Any) -> Any:
        n = x.shape[0]
        if n not in fns:
            spec = tf.TensorSpec([n, 200, 200, 1], tf.float32)
            fns[n] = tf.function(lambda t: resnet(t, training=False)).get_concrete_function(spec)
        return fns[n](x).numpy()

    tiny = TensorFlowBackend(model_path)
    tiny.load()
    return [
        Row("ResNet-50", "tensorflow", "fp32", int(resnet.count_params()), rflops, 0.98, resnet_forward,
            "untrained here (2-core CPU); accuracy is the paper's 98%"),
        Row("TinyDefectNet", "tensorflow", "fp32", card.get("params"), card.get("flops"), acc,
            _backend_forward(tiny), "native TF (oneDNN)"),
    ]


def _backend_forward(backend: Any) -> Any:
    warmed: set[int] = set()

    def forward(x: Any) -> Any:
        n = x.shape[0]
        if n not in warmed:
            backend.warmup((n,))
            warmed.add(n)
        return backend.infer(x)

    return forward


def extra_rows(vs: list[Any], model_path: Path, card: dict[str, Any]) -> list[Row]:
    """In-process rows for backend variants that can share this process with TensorFlow.

    A runtime that runs side by side (agent.backends.base.layout) gets two rows: the agent's default layout (one
    single-threaded worker per core, every lane busy at once) and one worker with every core's thread, so the best
    raw figure is the best of either.
    """
    from agent.backends import REGISTRY
    from agent.hostinfo import cores

    rows = []
    for v in vs:
        # (threads, workers): the agent's default, and one worker of every core's thread.
        layouts = [(0, 0), (cores(), 1)] if REGISTRY[v.backend].lean and cores() > 1 else [(0, 0)]
        try:
            for threads, workers in layouts:
                b = v.create(str(model_path), threads, workers=workers)
                b.load()
                row = Row("TinyDefectNet", v.backend, v.precision, card.get("params"), card.get("flops"), None,
                          _backend_forward(b), v.label)
                row.layout = f"{b.workers} x {b.threads}"
                if b.workers > 1:
                    row.lanes = b
                rows.append(row)
        except Exception as exc:  # a missing runtime or artifact is a row note, not a crash
            print(f"skipping {v.label}: {exc}")
            continue
    return rows


def child_rows(vs: list[Any], args: argparse.Namespace, card: dict[str, Any]) -> list[dict[str, Any]]:
    """Variants that need their own process (ZenDNN: switched on before TensorFlow's import), timed after the rest."""
    import subprocess
    import sys

    out = []
    for v in vs:
        code = (f"from agent.lab.bench.model import standalone; standalone({v.label!r}, {str(args.model)!r}, "
                f"{args.batch}, {args.reps}, {args.seconds}, {args.data!r})")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
        if res.returncode != 0:
            print(f"skipping {v.label}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else '?'}")
            continue
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(params=card.get("params"), flops=card.get("flops"))
        out.append(row)
    return out


def standalone(label: str, model: str, batch: int, reps: int, seconds: float, data: str | None) -> None:
    """Child-process entry: time one variant like the in-process rows and print one JSON line."""
    from agent.backends import variants
    from agent.card import read_dict

    (v,) = variants(label)
    b = v.create(model)
    b.load()
    row = Row("TinyDefectNet", v.backend, v.precision, None, None, None, _backend_forward(b), v.label)
    if data:
        from agent.lab.bench.common import held_out

        card = read_dict(Path(model))
        row.accuracy = accuracy_of(row, card, *held_out(card, data), batch)
    _time_rows([row], batch, reps, seconds)
    print(json.dumps({"name": row.name, "backend": v.backend, "precision": v.precision, "img_per_s": median(row.tput),
                      "latency_ms_batch1": median(row.lat1), "accuracy": row.accuracy, "note": b.identity().get(
                          "runtime", v.label)}))


def _time_rows(rows: list[Row], batch: int, reps: int, seconds: float) -> None:
    """Round-robin timing: each repetition times every row once, so drift hits all rows alike."""
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    xb = rng.uniform(0, 255, (batch, 200, 200, 1)).astype(np.float32)
    x1 = xb[:1].copy()
    for r in rows:  # warm-up: compile both shapes
        r.forward(xb)
        r.forward(x1)
    bar = tqdm(total=reps * len(rows), desc="timing (round-robin)", leave=False)
    for _ in range(reps):
        for r in rows:
            # ResNet-50 takes seconds per batch here; one call is already a long enough sample.
            if r.lanes is not None:
                lat, wall = time_lanes(r.lanes, xb, seconds, min_calls=1)
                r.tput.append(len(lat) * batch / wall)
            else:
                r.tput.append(batch / _time(r.forward, xb, seconds if r.name != "ResNet-50" else 0.0))
            r.lat1.append(1000 * _time(r.forward, x1, seconds / 2))
            bar.update(1)
    bar.close()


def accuracy_of(row: Row, card: dict[str, Any], x: np.ndarray, y: np.ndarray, frame: np.ndarray | None,
                batch: int) -> float:
    """Top-1 accuracy over the images y labels; a tiling model's tiles (frame: each one's image) decide their image
    as in the agent (agent.geometry.frame_picks)."""
    from agent.decision import pass_mask_of
    from agent.geometry import frame_picks
    from agent.lab.export import predict_probs

    p = predict_probs(row.forward, x, batch)
    if frame is not None:
        p = p[frame_picks(p, frame, len(y), pass_mask_of(card.get("classes", ()), card.get("pass_classes", ())))]
    return float((p.argmax(1) == y).mean())


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from agent.card import read_dict
    from agent.lab.bench.common import held_out

    card = read_dict(args.model)
    val = None
    acc = card.get("validation", {}).get("accuracy")
    if args.data:
        val = held_out(card, args.data)
    from agent.backends import variants

    vs = variants(args.backends)
    rows = tf_rows(args.model, card, acc) + extra_rows([v for v in vs if v.backend != "zendnn"], args.model, card)
    if val is not None:
        for r in rows[1:]:
            r.accuracy = accuracy_of(r, card, *val, args.batch)
    _time_rows(rows, args.batch, args.reps, args.seconds)
    base = median(rows[0].tput)
    out_rows = []
    for r in rows:
        ips = median(r.tput)
        out_rows.append({
            "name": r.name, "backend": r.backend, "precision": r.precision, "batch": args.batch,
            "img_per_s": round(ips, 1), "latency_ms_batch1": round(median(r.lat1), 3),
            "accuracy": r.accuracy, "params": r.params, "flops": r.flops,
            "ratio_vs_resnet50_native": round(ips / base, 2), "note": r.note, "layout": r.layout,
        })
    for z in child_rows([v for v in vs if v.backend == "zendnn"], args, card):
        z.update(batch=args.batch, img_per_s=round(z["img_per_s"], 1),
                 latency_ms_batch1=round(z["latency_ms_batch1"], 3),
                 ratio_vs_resnet50_native=round(z["img_per_s"] / base, 2))
        z["note"] += " (own process, timed after the others)"
        out_rows.append(z)
    md = markdown_table(
        ["model", "backend", "precision", "workers x threads", f"img/s @{args.batch}", "batch-1 ms", "accuracy",
         "params", "FLOPs", "x ResNet-50"],
        [[o["name"], o["backend"], o["precision"], o.get("layout") or "1 x all", o["img_per_s"], o["latency_ms_batch1"],
          None if o["accuracy"] is None else f"{100 * o['accuracy']:.2f}%", f"{o['params']:,}" if o["params"] else None,
          f"{o['flops'] / 1e6:,.0f}M" if o["flops"] else None, f"{o['ratio_vs_resnet50_native']:.1f}x"]
         for o in out_rows],
    )
    acc_note = (f"accuracy: held-out split of {args.data} ({len(val[1])} images never trained on)"
                if val is not None else "accuracy: from the model card")
    md = f"{md}\n\n{acc_note}; ResNet-50 accuracy is the paper's (not trained here). A layout of several " \
         "workers is timed with every worker inferring its own batch at once (the agent's inference workers).\n" \
         f"command: tdn bench model --batch {args.batch} --reps {args.reps}"
    print(md)
    write_outputs(args.out, "bench-model", md, out_rows, args.json)
    _plot(out_rows, args.out / "bench-model.png", args.batch)
    print(f"wrote {args.out}/bench-model.md, .json, .png")
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['name']}\n{r['backend']} {r['precision']}" for r in rows]
    vals = [r["ratio_vs_resnet50_native"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    bars = ax.bar(labels, vals, color=["#888"] + ["#2a7"] * (len(rows) - 1))
    ax.bar_label(bars, [f"{v:.1f}x" for v in vals])
    ax.set_ylabel(f"throughput vs ResNet-50 native TF (batch {batch})")
    ax.set_title("TinyDefectNet speed-up on this host (one run)")
    plt.xticks(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
