"""What one explanation costs the agent's explainer: its card's method against its one-pass fallback.

Loads the model on --backend as the agent does, takes --frames held-out images at their native sizes through the
card's input geometry, and times agent.explain.snapshot (the map, the overlay and both PNGs: the explainer
thread's whole work for a verdict) with each method, alternating frame by frame so all see the same host load.
Prints the median milliseconds a frame, the ratio of the card's method (what the agent publishes) to its one-pass
fallback (agent.explain.method_for), and how many explanations a second `explain_budget` allows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

# Always timed: plain cam and the default; the card's own method and its fallback join them when they are others.
METHODS = ("cam", "shift-cam")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .keras model (its card beside it)")
    p.add_argument("--data", help="the folder it was trained from (default: the model's shipped dataset)")
    p.add_argument("--backend", default="auto", help="agent backend (default: auto, the agent's own choice)")
    p.add_argument("--frames", type=int, default=20, help="held-out frames, spread over the split (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timings of each frame and method (default 3)")
    p.add_argument("--budget", type=float, default=0.05, help="explain_budget to convert into explanations a second")
    p.add_argument("--json", type=Path)


def _verdict(i: int, cls: int, name: str) -> Any:
    from protocol import Status, Verdict

    now = time.time_ns()
    return Verdict("bench", i, Status.OK, None, name, cls, 0.9, None, True, "bench", "bench", 1, now, now, now, now)


def run(args: argparse.Namespace) -> int:
    from agent.backends import from_settings
    from agent.card import read
    from agent.config import load
    from agent.explain import SHIFT_MAX_WAITING, method_for, snapshot
    from agent.geometry import InputSpec, tile_origins, to_input
    from agent.lab.bench.common import model_card_data
    from agent.lab.data import held_out, read_gray

    if args.frames < 1 or args.repeats < 1 or not 0 < args.budget <= 1:
        raise SystemExit("--frames and --repeats must be >= 1 and --budget in (0, 1]")
    model, data, card, ds = model_card_data(str(args.model), args.data)
    published = read(model).explain_method
    fallback = method_for(SHIFT_MAX_WAITING + 1, published)  # what the agent sends behind a queue of reviews
    methods = tuple(dict.fromkeys((*METHODS, fallback, published)))
    val = held_out(card, ds.samples)[1]
    chosen = [val[int(i)] for i in np.linspace(0, len(val) - 1, min(args.frames, len(val)))]
    spec = InputSpec.from_card(card.get("input", {}))
    planes = [to_input(read_gray(s.path), spec) for s in chosen]
    # The backend the agent would serve this model with (its settings' defaults: profile, artifacts, export).
    backend = from_settings(load(model_path=model, backend=args.backend))
    backend.load()
    backend.warmup((1,))
    size = int(backend.input_shape[0])
    tiles = [len(tile_origins(p.shape[:2], size)) for p in planes]
    ident = backend.identity()
    print(f"{model.name} on {ident.get('backend')} ({ident.get('precision', '')}), {len(planes)} held-out frames of "
          f"{data}, {np.mean(tiles):.1f} model inputs a frame", flush=True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i, (plane, s) in enumerate(zip(planes, chosen, strict=True)):
        item, v = SimpleNamespace(image=plane), _verdict(i, s.label, card["classes"][s.label])
        snapshot(backend, item, v, methods[0])  # an untimed first run: caches and lazily built runners
        for r in range(args.repeats):
            for m in methods if (i + r) % 2 == 0 else methods[::-1]:
                t0 = time.perf_counter()
                snapshot(backend, item, v, m)
                times[m].append(time.perf_counter() - t0)
    med = {m: float(np.median(t)) for m, t in times.items()}
    for m in methods:
        print(f"  {m:16s} median {med[m] * 1e3:7.2f} ms a frame (p90 {np.percentile(times[m], 90) * 1e3:.2f}); "
              f"at explain_budget {args.budget:g}: {args.budget / med[m]:.1f} explanations a second")
    ratio = med[published] / med[fallback]
    print(f"  {published} (the card's, what the agent publishes) / {fallback} (its fallback behind a queue of "
          f"reviews): {ratio:.2f}x (same run, alternating)")
    if args.json:
        args.json.write_text(json.dumps({
            "model": model.name, "backend": ident, "frames": len(planes), "tiles_per_frame": float(np.mean(tiles)),
            "published": published, "fallback": fallback, "median_ms": {m: med[m] * 1e3 for m in methods},
            "ratio": ratio, "budget": args.budget, "explanations_per_s": {m: args.budget / med[m] for m in methods}},
            indent=2) + "\n")
    return 0
