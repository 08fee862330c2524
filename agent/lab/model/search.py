"""Machine-driven design exploration: sample the residual prototype, keep the FLOP band, score by NetScore."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.lab.model.arch import ArchSpec, Stage
from agent.logging import get_logger

log = get_logger("agent.search")

# Multiples of 16 fill AVX-512 vectors; narrower layers waste most of each instruction.
WIDTHS = (32, 48, 64, 80, 96, 128, 160, 192, 256)
# (kernel, stride, pool): patchify stems, or a strided conv followed by max pooling.
STEMS = ((4, 4, False), (2, 2, False), (8, 8, False), (3, 2, True), (5, 2, True))


def analytic_macs(spec: ArchSpec, size: int = 200) -> tuple[int, int]:
    """MACs and parameters computed from the spec alone, to reject candidates before building them."""
    macs = params = 0

    def conv(h: int, cin: int, cout: int, k: int, s: int) -> int:
        nonlocal macs, params
        ho = -(-h // s)
        macs += ho * ho * k * k * cin * cout
        params += k * k * cin * cout + 4 * cout  # conv + BN
        return ho

    h = conv(size, 1, spec.stem_width, spec.stem_kernel, spec.stem_stride)
    if spec.stem_pool:
        h = -(-h // 2)
    c = spec.stem_width
    for st in spec.stages:
        for b in range(st.blocks):
            s = st.stride if b == 0 else 1
            if s != 1 or c != st.width:
                conv(h, c, st.width, 1, s)
            if st.block == "bottleneck":
                mid = max(8, st.width // 4)
                conv(h, c, mid, 1, 1)
                h2 = conv(h, mid, mid, st.kernel, s)
                conv(h2, mid, st.width, 1, 1)
            else:
                h2 = conv(h, c, st.width, st.kernel, s)
                conv(h2, st.width, st.width, st.kernel, 1)
            h, c = h2, st.width
    macs += c * 6
    params += c * 6 + 6
    return macs, params


def sample(rng: np.random.Generator) -> ArchSpec:
    """One random point of the design space: heterogeneous widths, depths, kernels and block types."""
    k, s, pool = STEMS[rng.integers(len(STEMS))]
    n_stages = int(rng.integers(3, 5))
    widths = sorted(int(w) for w in rng.choice(WIDTHS, n_stages, replace=True))
    reduction = s * (2 if pool else 1)
    stages = []
    for i, w in enumerate(widths):
        # The first stage keeps resolution when the stem already reduced by 4; the rest halve it.
        stride = 1 if (i == 0 and reduction >= 4) or (reduction >= 8 and i == 1) else 2
        stages.append(
            Stage(
                width=w,
                blocks=int(rng.choice([1, 1, 2])),
                stride=stride,
                kernel=int(rng.choice([3, 3, 5])),
                block=str(rng.choice(["basic", "basic", "bottleneck"])),
            )
        )
    stem_w = int(rng.choice([16, 32, 48]))
    return ArchSpec(stem_width=stem_w, stem_kernel=k, stem_stride=s, stem_pool=pool, stages=tuple(stages))


def candidates(
    seed: int, flop_target: float, tolerance: float, max_params: int, max_draws: int = 200_000
) -> Iterator[ArchSpec]:
    """Candidates whose analytic FLOPs (2 x MACs) fall in the band and whose parameters fit."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    for _ in range(max_draws):
        spec = sample(rng)
        macs, params = analytic_macs(spec)
        if abs(2 * macs - flop_target) > tolerance * flop_target or params > max_params:
            continue
        if spec.key() in seen:
            continue
        seen.add(spec.key())
        yield spec


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_search(
    data_root: str,
    log_path: Path,
    budget_minutes: float,
    epochs: int,
    seed: int,
    flop_target: float = 100e6,
    tolerance: float = 0.05,
    max_params: int = 430_000,
    min_speedup: float = 45.0,
) -> dict[str, Any] | None:
    """Train in-band candidates briefly on a fixed split until the budget ends; append JSON lines; resumable.

    Two indicator functions gate training: the paper's FLOP band, and ours, native-TF throughput at batch 64
    of at least `min_speedup` x ResNet-50's, measured on this host (ResNet-50 re-timed every 5 minutes).
    """
    from tqdm import tqdm

    from agent.lab.data import load_arrays, scan, stratified_split
    from agent.lab.model.flops import netscore
    from agent.lab.model.train import TrainConfig, evaluate, fit, set_seed

    done = {r["key"] for r in read_log(log_path)}
    samples = scan(data_root)
    train_s, val_s = stratified_split(samples, 0.2, seed)
    train = load_arrays(train_s, progress=True)
    val = load_arrays(val_s, progress=True)
    cfg = TrainConfig(epochs=epochs, patience=epochs, warmup_epochs=1, seed=seed)
    deadline = time.monotonic() + budget_minutes * 60
    log_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=round(budget_minutes * 60), desc="design search", unit="s", leave=False)
    start = time.monotonic()
    set_seed(seed)
    ref_ips, ref_at = 0.0, -1e9
    for i, spec in enumerate(candidates(seed, flop_target, tolerance, max_params)):
        if time.monotonic() >= deadline:
            break
        if spec.key() in done:
            continue
        if time.monotonic() - ref_at > 300:
            ref_ips, ref_at = resnet50_ips(), time.monotonic()
        row = screen(spec, ref_ips, flop_target, tolerance, min_speedup)
        if row["status"] == "screened":
            t0 = time.monotonic()
            trained, _ = fit(spec, train, val, cfg, quiet=True, desc=f"candidate {i}")
            acc, _, _ = evaluate(trained, *val)
            row.update(status="trained", val_accuracy=acc, train_seconds=round(time.monotonic() - t0, 1),
                       netscore=round(netscore(100 * acc, row["params"], row["macs"]), 3), epochs=epochs)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add(spec.key())
        log.info("candidate", **{k: v for k, v in row.items() if k not in ("key", "arch")})
        bar.n = min(bar.total, round(time.monotonic() - start))
        bar.refresh()
    bar.close()
    return best(read_log(log_path))


def screen(spec: ArchSpec, ref_ips: float, flop_target: float, tolerance: float, min_speedup: float
           ) -> dict[str, Any]:
    """A candidate's log row after both indicator functions: status rejected_flops, rejected_speed or screened."""
    from agent.lab.model.arch import build, count_macs, fold_batchnorm
    from agent.lab.model.flops import profiler_flops, within_band
    from agent.lab.model.speed import images_per_second

    model = build(spec)
    flops = profiler_flops(model)
    row: dict[str, Any] = {"key": spec.key(), "arch": spec.to_dict(), "flops": flops,
                           "macs": count_macs(model), "params": int(model.count_params())}
    if not within_band(flops, flop_target, tolerance):
        row["status"] = "rejected_flops"
        return row
    ips = images_per_second(fold_batchnorm(model, spec), 64)
    row.update(img_per_s=round(ips, 1), speedup_vs_resnet50=round(ips / ref_ips, 1))
    row["status"] = "rejected_speed" if row["speedup_vs_resnet50"] < min_speedup else "screened"
    return row


def resnet50_ips(batch: int = 64) -> float:
    """Native-TF images/s of the baseline, ResNet-50 at 200x200x1 with 6 classes."""
    import keras

    from agent.lab.model.speed import images_per_second

    return images_per_second(keras.applications.ResNet50(weights=None, input_shape=(200, 200, 1), classes=6),
                             batch, reps=3)


def run_finalists(data_root: str, log_path: Path, k: int, epochs: int, seed: int) -> dict[str, Any] | None:
    """Second phase: retrain the k best screened candidates for longer and re-score them (successive halving).

    Short screening runs barely separate candidates by accuracy, so NetScore alone would favour the fewest
    parameters; a longer run shows which small designs really learn the task.
    """
    from agent.lab.data import load_arrays, scan, stratified_split
    from agent.lab.model.arch import ArchSpec
    from agent.lab.model.flops import netscore
    from agent.lab.model.train import TrainConfig, evaluate, fit

    rows = read_log(log_path)
    done = {r["key"] for r in rows if r.get("status") == "finalist" and r.get("epochs") == epochs}
    # Finalists are the most accurate screened designs (ties: NetScore), so a design that learns slowly but
    # well is not lost to one that merely has fewer parameters.
    screened = sorted((r for r in rows if r.get("status") == "trained"),
                      key=lambda r: (-r["val_accuracy"], -r["netscore"]))[:k]
    todo = [r for r in screened if r["key"] not in done]
    if todo:
        samples = scan(data_root)
        train_s, val_s = stratified_split(samples, 0.2, seed)
        train, val = load_arrays(train_s, progress=True), load_arrays(val_s, progress=True)
        cfg = TrainConfig(epochs=epochs, patience=epochs, warmup_epochs=2, seed=seed)
        for i, r in enumerate(todo):
            t0 = time.monotonic()
            model, _ = fit(ArchSpec.from_dict(r["arch"]), train, val, cfg, desc=f"finalist {i + 1}/{len(todo)}")
            acc, _, _ = evaluate(model, *val)
            row = {**r, "status": "finalist", "epochs": epochs, "val_accuracy": acc,
                   "screen_val_accuracy": r["val_accuracy"], "train_seconds": round(time.monotonic() - t0, 1),
                   "netscore": round(netscore(100 * acc, r["params"], r["macs"]), 3)}
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("finalist", **{k2: v for k2, v in row.items() if k2 not in ("key", "arch")})
    return best(read_log(log_path))


def best(rows: list[dict[str, Any]], accuracy_tolerance: float = 0.005) -> dict[str, Any] | None:
    """The winner: the highest NetScore among the designs within `accuracy_tolerance` of the most accurate.

    Finalists (retrained longer) are judged if there are any, else the screened candidates. The accuracy floor
    is the paper's other constraint: NetScore alone rewards dropping parameters faster than it punishes error.
    """
    for status in ("finalist", "trained"):
        group = [r for r in rows if r.get("status") == status]
        if group:
            floor = max(r["val_accuracy"] for r in group) - accuracy_tolerance
            return max((r for r in group if r["val_accuracy"] >= floor), key=lambda r: r["netscore"])
    return None
