"""Shared bench helpers: output folder, markdown tables, JSON, and the held-out images of the model card."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(out: Path, stem: str, markdown: str, data: Any, json_path: Path | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown + "\n")
    text = json.dumps(data, indent=2, default=float) + "\n"
    (out / f"{stem}.json").write_text(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)


def cpu_seconds(procs: Sequence[Any]) -> float:
    """User + system CPU seconds of live psutil processes (one that has exited counts 0)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def pinner(cpus: str) -> Any:
    """A preexec_fn pinning a child process to the comma-separated CPUs, or None for no pinning."""
    if not cpus:
        return None
    mask = {int(c) for c in cpus.split(",")}
    return lambda: os.sched_setaffinity(0, mask)


def percentile(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def held_out(card: dict[str, Any], data: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The model card's validation split of `data` (agent.lab.data.held_out), through the card's input geometry:
    inputs, labels, and each input's image for a tiling model (agent.lab.data.load_frames)."""
    from agent.geometry import InputSpec
    from agent.lab.data import check_classes, load_dataset, load_frames
    from agent.lab.data import held_out as split

    ds = load_dataset(data)
    check_classes(card, ds)
    _, val, _ = split(card, list(ds.samples))
    return load_frames(val, InputSpec.from_card(card.get("input", {})), progress=True)


def model_card_data(model_arg: str, data_arg: str | None) -> tuple[Path, str, dict[str, Any], Any]:
    """A bench's --model and --data resolved: the model file, its dataset folder (the shipped one when --data is not
    given), its card, and the scanned dataset, checked against the card's classes."""
    from agent.cli.demo import model_and_data
    from agent.lab.data import check_classes, load_dataset

    model, data = model_and_data(model_arg, data_arg)
    if data is None:
        raise SystemExit("--data: no dataset folder given and none found beside the checkout")
    card = json.loads(model.with_suffix(".json").read_text())
    ds = load_dataset(data)
    check_classes(card, ds)
    return model, data, card, ds


def time_lanes(backend: Any, x: np.ndarray, seconds: float, min_calls: int = 8) -> tuple[list[float], float]:
    """Every lane of a loaded, warmed `backend` inferring x at once, each in its own thread (the agent's inference
    workers), for `seconds` and at least `min_calls` calls a lane: the seconds of each call, and the wall time."""
    import threading
    import time

    lats: list[list[float]] = [[] for _ in range(backend.workers)]
    t0 = time.perf_counter()

    def run(lane: int) -> None:
        lat = lats[lane]
        while time.perf_counter() - t0 < seconds or len(lat) < min_calls:
            t = time.perf_counter()
            backend.infer(x, lane)
            lat.append(time.perf_counter() - t)

    workers = [threading.Thread(target=run, args=(lane,)) for lane in range(backend.workers)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [v for per_lane in lats for v in per_lane], time.perf_counter() - t0
