"""Hot swap under load: a SIGHUP mid-stream at a steady load; p99 while the model swaps against the steady p99.

Starts the agent, offers `--load` percent of the backend's measured capacity from `--cameras` camera simulators,
and halfway through names a copy of the model (a new model id) in <state_dir>/next-model and sends SIGHUP: the
agent loads, checks and warms it beside the running one, then swaps between batches. A subscriber in this process
records every verdict. It reports the steady p99 (before the SIGHUP), the p99 of the frames captured from the
SIGHUP until `--window-s` after the first verdict of the new model, their ratio (target <= 2), frames lost and
answered twice, and where model_id changes in each camera's seq order (target: at one point).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.lab.bench.common import percentile


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL
    from agent.lab import default_data

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", default=default_data(), help="NEU-DET folder the cameras replay (else synthetic)")
    p.add_argument("--backend", default="auto", help="the agent's backend (default: the agent's own, auto)")
    p.add_argument("--batch", type=int, default=16, help="the agent's max batch size")
    p.add_argument("--threads", type=int, default=0,
                   help="runtime threads of each inference worker (0: auto, as the agent)")
    p.add_argument("--load", type=float, default=50.0, help="offered load, percent of capacity")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the cameras send; the SIGHUP is halfway")
    p.add_argument("--window-s", type=float, default=2.0,
                   help="the swap window runs from the SIGHUP to this long after the new model's first verdict")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-swap"))
    p.add_argument("--json", type=Path)


def _collect(sub: Any, stop: threading.Event, rows: list[tuple[str, int, int, int, str, str]]) -> None:
    """(camera, seq, capture_ns, published_ns, model_id, status) of every verdict until stop is set."""
    import zmq

    from protocol import ProtocolError, decode_verdict

    while not stop.is_set():
        if not sub.poll(100, zmq.POLLIN):
            continue
        try:
            v = decode_verdict(sub.recv_multipart(copy=False))
        except ProtocolError:
            continue
        rows.append((v.camera_id, v.seq, v.capture_ns or 0, v.published_ns, v.model_id, v.status.value))


def _pct(lat_ns: list[int], q: float) -> float | None:
    """The q-th percentile of latencies in ns, as ms to 0.01."""
    p = percentile(lat_ns, q)
    return None if p is None else round(p / 1e6, 2)


def analyse(rows: list[tuple[str, int, int, int, str, str]], sent: int, hup_ns: int, window_s: float,
            settle_ns: int) -> dict[str, Any]:
    """The swap's figures from the recorded verdicts (pure: the unit tests feed it rows)."""
    seen: dict[tuple[str, int], int] = {}
    for cam, seq, *_ in rows:
        seen[(cam, seq)] = seen.get((cam, seq), 0) + 1
    old_id = next((r[4] for r in sorted(rows, key=lambda r: r[3]) if r[5] == "ok"), "")
    new_first = min((r[3] for r in rows if r[5] == "ok" and r[4].split("/")[0] != old_id.split("/")[0]),
                    default=None)
    window_end = (new_first or hup_ns) + int(window_s * 1e9)
    steady = [r[3] - r[2] for r in rows if settle_ns <= r[2] < hup_ns and r[2]]
    during = [r[3] - r[2] for r in rows if hup_ns <= r[2] <= window_end and r[2]]
    after = [r[3] - r[2] for r in rows if r[2] > window_end]
    changes = {}
    for cam in sorted({r[0] for r in rows}):
        ids = [r[4].split("/")[0] for r in sorted((r for r in rows if r[0] == cam and r[5] == "ok"),
                                                 key=lambda r: r[1])]
        changes[cam] = sum(1 for a, b in itertools.pairwise(ids) if a != b)
    p99_steady, p99_during = _pct(steady, 99), _pct(during, 99)
    return {
        "sent": sent, "verdicts": len(rows), "lost": sent - len(seen), "duplicates": sum(n - 1 for n in seen.values()),
        "by_status": {s: sum(1 for r in rows if r[5] == s) for s in sorted({r[5] for r in rows})},
        "old_model_id": old_id, "new_model_id": next((r[4] for r in rows if r[3] == new_first), None),
        "swap_after_hup_s": round((new_first - hup_ns) / 1e9, 3) if new_first else None,
        "model_id_changes_per_camera": changes,
        "steady": {"n": len(steady), "p50_ms": _pct(steady, 50), "p99_ms": p99_steady},
        "during": {"n": len(during), "p50_ms": _pct(during, 50), "p99_ms": p99_during, "max_ms": _pct(during, 100)},
        "after": {"n": len(after), "p50_ms": _pct(after, 50), "p99_ms": _pct(after, 99)},
        "p99_ratio": round(p99_during / p99_steady, 2) if p99_steady and p99_during else None,
    }


def run(args: argparse.Namespace) -> int:
    import zmq

    from agent.lab.bench.stream import capacity, served_variant
    from agent.serving import NEXT_MODEL_FILE
    from agent.testing import start_agent
    from protocol import VERDICT_PREFIX

    out: Path = args.out
    shutil.rmtree(out, ignore_errors=True)
    state = out / "state"
    state.mkdir(parents=True)
    # A copy under another name is another model id: the verdicts show which one decided.
    nxt = state / f"{args.model.stem}-next.keras"
    shutil.copyfile(args.model, nxt)
    shutil.copyfile(args.model.with_suffix(".json"), nxt.with_suffix(".json"))
    settings = {"backend": args.backend, "model_path": args.model, "max_batch_size": args.batch,
                "threads": args.threads, "queue_cap": 4 * args.batch, "state_dir": state, "explain_interval_s": 0}
    agent = start_agent(out / "agent.log", settings)
    backend = served_variant(agent.event("ready") or {}, args.backend)
    print(f"agent serving {backend}; measuring capacity (raw backend throughput) ...", flush=True)
    cap = capacity(backend, args.model, args.batch, threads=args.threads)
    fps = cap * args.load / 100 / args.cameras
    print(f"capacity {cap:,.0f} img/s at batch {args.batch}; offering {args.load:g}% = "
          f"{fps * args.cameras:,.0f} frames/s from {args.cameras} cameras", flush=True)
    ctx: zmq.Context[Any] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)  # the recorder must not drop: a drop would read as a lost frame
    sub.setsockopt(zmq.SUBSCRIBE, VERDICT_PREFIX)
    sub.connect(agent.publish)
    rows: list[tuple[str, int, int, int, str, str]] = []
    stop = threading.Event()
    recorder = threading.Thread(target=_collect, args=(sub, stop, rows), daemon=True)
    recorder.start()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        time.sleep(0.5)
        cmd = [sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames, "--cameras",
               str(args.cameras), "--fps", f"{fps:.3f}", "--report", str(out / "cams.json"), "--quiet",
               "--send-timeout-ms", "200", "--seed", "1"]
        if args.data:
            cmd += ["--source", args.data, "--shuffle"]
        cams = subprocess.Popen(cmd, env=env)
        t0 = time.monotonic()
        settle_ns = time.time_ns() + 2_000_000_000  # the cameras' start-up (imports, the folder) is not steady
        time.sleep(args.seconds / 2)
        (state / NEXT_MODEL_FILE).write_text(str(nxt))
        hup_ns = time.time_ns()
        agent.signal(signal.SIGHUP)
        print(f"SIGHUP at {time.monotonic() - t0:.1f} s", flush=True)
        time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
        cams.send_signal(signal.SIGINT)
        cams.wait(30)
        time.sleep(2.5)  # the last verdicts
        swapped = agent.event("model swapped")
        refused = agent.event("model refused")
    finally:
        stop.set()
        recorder.join(5)
        sub.close(0)
        ctx.term()
        agent.stop(30)
    sent = int(json.loads((out / "cams.json").read_text()).get("sent", 0))
    report = analyse(rows, sent, hup_ns, args.window_s, settle_ns)
    report.update({"capacity_img_per_s": round(cap, 1), "load_pct": args.load, "offered_img_per_s":
                   round(fps * args.cameras, 1), "backend": backend, "batch": args.batch,
                   "swapped": swapped is not None, "refused": refused})
    s, d = report["steady"], report["during"]
    print(f"swap logged: {swapped is not None}; first verdict of the new model {report['swap_after_hup_s']} s "
          f"after SIGHUP")
    print(f"sent {sent}, verdicts {report['verdicts']}, lost {report['lost']}, duplicates {report['duplicates']}, "
          f"model_id changes per camera {report['model_id_changes_per_camera']}")
    print(f"steady p50/p99 {s['p50_ms']}/{s['p99_ms']} ms (n={s['n']}); during the swap p50/p99 "
          f"{d['p50_ms']}/{d['p99_ms']} ms (n={d['n']}, max {d['max_ms']}); p99 ratio {report['p99_ratio']} "
          "(target <= 2)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    # The timeline, for a plot or a closer look: capture time after the SIGHUP (s), latency (ms), new model?
    timeline = [(round((r[2] - hup_ns) / 1e9, 4), round((r[3] - r[2]) / 1e6, 2), r[4] != report["old_model_id"])
                for r in sorted(rows, key=lambda r: r[2]) if r[2]]
    (out / "timeline.json").write_text(json.dumps(timeline) + "\n")
    ok = (report["lost"] == 0 and report["duplicates"] == 0 and swapped is not None
          and all(n == 1 for n in report["model_id_changes_per_camera"].values()))
    return 0 if ok else 1
