"""Soak: the line at 80% of capacity for --minutes, sampling the agent's RSS and latency every few seconds.

Capacity is the raw backend throughput at the agent's batch size (as in `tdn bench stream`), measured in this run.
One agent process; cameras replay preloaded images (NEU-DET, else synthetic surfaces) from threads of this
process; a subscriber tracks every verdict like the PLC bridge does. Writes bench-soak.png (RSS and latency
over time), bench-soak.json and bench-soak.md. The figure to watch is the RSS growth between the first and the
last third of the run: a leak shows there, warm-up allocations do not.
"""

from __future__ import annotations

import argparse
import threading
import time
from itertools import cycle, islice
from pathlib import Path
from typing import Any

import numpy as np

from agent.lab.bench.common import markdown_table, percentile, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL
    from agent.lab import default_data

    p.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    p.add_argument("--load", type=float, default=80.0, help="offered load, percent of capacity")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", default=default_data(), help="NEU-DET folder the cameras replay (else synthetic)")
    p.add_argument("--backend", default="tensorflow")
    p.add_argument("--batch", type=int, default=16, help="the agent's max batch size")
    p.add_argument("--threads", type=int, default=0,
                   help="runtime threads of each inference worker (0: auto, as the agent)")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--console", action="store_true",
                   help="also run `tdn console` subscribed to the agent, with one page's event stream open, and "
                        "sample its RSS beside the agent's: the console's memory must stay flat too")
    p.add_argument("--out", type=Path, default=Path("runs/bench-soak"))
    p.add_argument("--json", type=Path)


def _shots(data: str | None, n: int = 300) -> list[Any]:
    from simulators.camera import Shot, list_images, read_gray, synthetic_shots

    if data:
        files = list_images(Path(data))
        pick = np.random.default_rng(0).permutation(len(files))[:n]
        return [Shot(read_gray(files[i][0]), files[i][1], files[i][0].name) for i in pick]
    return list(islice(synthetic_shots(0), n))


class _Listener:
    """Subscribes to verdicts and heartbeats on its own thread; feeds a LineTracker, keeps per-window latency."""

    def __init__(self, endpoint: str) -> None:
        from simulators.plc_bridge import LineTracker

        self.endpoint = endpoint
        self.tracker = LineTracker(first_seq=0)
        self.lock = threading.Lock()
        self.window_ms: list[float] = []
        self.all_ms: list[float] = []
        self.window_ok = self.window_shed = 0
        self.queue_depth = 0
        self.heartbeat = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-sub", daemon=True)

    def _run(self) -> None:
        import zmq

        from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, Heartbeat, ProtocolError, Status, Verdict, decode

        ctx: zmq.Context[Any] = zmq.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, VERDICT_PREFIX)
        sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_PREFIX)
        sub.connect(self.endpoint)
        try:
            while not self.stop.is_set():
                if not sub.poll(100):
                    with self.lock:
                        self.tracker.tick()
                    continue
                try:
                    msg = decode(sub.recv_multipart())
                except ProtocolError as exc:
                    with self.lock:
                        self.tracker.on_protocol_error(exc.reason)
                    continue
                with self.lock:
                    if isinstance(msg, Heartbeat):
                        self.tracker.on_heartbeat(msg)
                        self.queue_depth = msg.queue_depth
                        self.heartbeat.set()
                    elif isinstance(msg, Verdict):
                        self.tracker.on_verdict(msg)
                        # Latency of inferred verdicts; shed ones are counted apart (they sit at the deadline).
                        if msg.capture_ns and msg.status is Status.OK:
                            ms = (msg.published_ns - msg.capture_ns) / 1e6
                            self.window_ms.append(ms)
                            self.all_ms.append(ms)
                        self.window_ok += msg.status is Status.OK
                        self.window_shed += msg.status is Status.SHED
                    self.tracker.tick()
        finally:
            sub.close(linger=0)

    def take_window(self) -> tuple[list[float], int, int, int]:
        """(latencies ms, ok, shed, queue depth) since the previous call."""
        with self.lock:
            out = (self.window_ms, self.window_ok, self.window_shed, self.queue_depth)
            self.window_ms, self.window_ok, self.window_shed = [], 0, 0
        return out


def run(args: argparse.Namespace) -> int:
    import psutil
    import zmq

    from agent.lab.bench.stream import capacity, start_console, stop_console
    from agent.testing import start_agent
    from simulators.camera import Camera

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    print("measuring capacity (raw backend throughput) ...", flush=True)
    cap = capacity(args.backend, args.model, args.batch, threads=args.threads)
    offered = cap * args.load / 100
    print(f"capacity {cap:,.0f} img/s; offering {offered:,.0f} img/s ({args.load:g}%) for {args.minutes:g} min",
          flush=True)
    log = out / "agent.log"
    log.unlink(missing_ok=True)
    settings = {"backend": args.backend, "model_path": args.model, "max_batch_size": args.batch,
                "threads": args.threads, "queue_cap": 4 * args.batch, "metrics_port": 0}
    agent_proc = start_agent(log, settings)
    agent, frames, publish = agent_proc.proc, agent_proc.frames, agent_proc.publish
    samples: list[dict[str, Any]] = []
    listener = _Listener(publish)
    ctx: zmq.Context[Any] = zmq.Context()
    cameras: list[Any] = []
    console = start_console(publish, out) if args.console else None
    console_info: dict[str, Any] | None = None
    try:
        proc = psutil.Process(agent.pid)
        cproc = psutil.Process(console[0].pid) if console is not None else None
        listener.thread.start()
        listener.heartbeat.wait(10)
        shots = _shots(args.data)
        fps = offered / args.cameras
        cameras = [Camera(f"soak{i + 1}", cycle(shots[i::args.cameras]), endpoint=frames, fps=fps,
                          send_timeout_ms=200, context=ctx) for i in range(args.cameras)]
        workers = [threading.Thread(target=c.run, name=c.camera_id, daemon=True) for c in cameras]
        proc.cpu_percent(None)
        t0 = time.monotonic()
        for w in workers:
            w.start()
        end = t0 + args.minutes * 60
        sent_before = 0
        while time.monotonic() < end:
            time.sleep(min(args.interval, max(0.0, end - time.monotonic())))
            lat, ok, shed, depth = listener.take_window()
            sent = sum(c.stats.sent for c in cameras)
            t = time.monotonic() - t0
            span = t - (samples[-1]["t_s"] if samples else 0.0)
            samples.append({
                "t_s": round(t, 1), "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                "cpu_pct": round(proc.cpu_percent(None), 1), "sent_per_s": round((sent - sent_before) / span, 1),
                "ok_per_s": round(ok / span, 1), "shed": shed, "queue_depth": depth,
                "p50_ms": _r(percentile(lat, 50)), "p99_ms": _r(percentile(lat, 99)),
                **({"console_rss_mib": round(cproc.memory_info().rss / 2**20, 1)} if cproc is not None else {}),
            })
            sent_before = sent
            s = samples[-1]
            print(f"{s['t_s']:>7.0f} s  RSS {s['rss_mib']:7.1f} MiB  ok {s['ok_per_s']:7.1f}/s  p50 {s['p50_ms']} "
                  f"p99 {s['p99_ms']} ms  shed {shed}  CPU {s['cpu_pct']}%", flush=True)
        # Ending by count lets each camera flush every frame it counted as sent.
        for c in cameras:
            c.count = c.stats.next_seq - c.stats.first_seq
        for w in workers:
            w.join(10)
        time.sleep(3.0)  # last verdicts, and the gap timeout
    finally:
        if console is not None:
            console_info = stop_console(console)
        listener.stop.set()
        if listener.thread.is_alive():
            listener.thread.join(5)
        ctx.destroy(linger=0)
        agent_proc.stop(30)
    summary = _summary(args, cap, offered, samples, listener, cameras)
    if console_info is not None:
        summary["console"] = {**console_info, **_growth([x["console_rss_mib"] for x in samples], "rss")}
    md = _markdown(summary, samples)
    print(md)
    write_outputs(out, "bench-soak", md, {**summary, "samples": samples}, args.json)
    _plot(samples, summary, out / "bench-soak.png")
    return 0


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _summary(args: argparse.Namespace, cap: float, offered: float, samples: list[dict[str, Any]],
             listener: _Listener, cameras: list[Any]) -> dict[str, Any]:
    rss = [s["rss_mib"] for s in samples]
    r = listener.tracker.summary()
    sent = sum(c.stats.sent for c in cameras)
    return {
        "capacity_img_per_s": round(cap, 1), "load_pct": args.load, "offered_img_per_s": round(offered, 1),
        "minutes": args.minutes, "interval_s": args.interval, "backend": args.backend, "batch": args.batch,
        "threads": args.threads,
        **_growth(rss, "rss"),
        "latency_ms": {"p50": _r(percentile(listener.all_ms, 50)), "p99": _r(percentile(listener.all_ms, 99)),
                       "max": _r(max(listener.all_ms, default=None))},
        "sent": sent, "sent_per_s": round(sent / (args.minutes * 60), 1) if args.minutes else None,
        "queue_depth_median": float(np.median([x["queue_depth"] for x in samples])) if samples else None,
        "camera_timeouts": sum(c.stats.timed_out for c in cameras), "verdicts": r["verdicts"],
        "by_status": r["by_status"], "unaccounted": sent - r["verdicts"], "gaps": r["gaps"],
        "duplicates": r["duplicates"], "agent_restarts": r["agent_restarts"], "agent_lost": r["agent_lost"],
    }


def _growth(rss: list[float], key: str) -> dict[str, Any]:
    """Mean RSS of the first and the last third of the samples, their difference (a leak shows there) and the max."""
    third = max(1, len(rss) // 3)
    first, last = (float(np.mean(rss[:third])), float(np.mean(rss[-third:]))) if rss else (0.0, 0.0)
    return {f"{key}_first_third_mib": round(first, 1), f"{key}_last_third_mib": round(last, 1),
            f"{key}_growth_mib": round(last - first, 1), f"{key}_max_mib": max(rss, default=None)}


def _markdown(s: dict[str, Any], samples: list[dict[str, Any]]) -> str:
    head = markdown_table(
        ["minutes", "load", "offered/s", "sent/s", "queue (median)", "RSS first third MiB", "RSS last third MiB",
         "growth MiB", "p50 ms", "p99 ms", "verdicts", "shed", "unaccounted", "duplicates"],
        [[s["minutes"], f"{s['load_pct']:g}%", s["offered_img_per_s"], s["sent_per_s"], s["queue_depth_median"],
          s["rss_first_third_mib"], s["rss_last_third_mib"], s["rss_growth_mib"], s["latency_ms"]["p50"],
          s["latency_ms"]["p99"], s["verdicts"], s["by_status"].get("shed", 0), s["unaccounted"],
          s["duplicates"]]],
    )
    c = s.get("console")
    if c:
        head += (f"\n\nconsole: RSS {c['rss_first_third_mib']} -> {c['rss_last_third_mib']} MiB (first -> last third, "
                 f"{c['rss_growth_mib']:+} MiB, max {c['rss_max_mib']}); saw {c.get('verdicts_seen')} verdicts, "
                 f"dropped {c.get('dropped')}")
    return (f"soak: capacity {s['capacity_img_per_s']:,.0f} img/s ({s['backend']}, batch {s['batch']}), "
            f"{s['load_pct']:g}% offered, {len(samples)} samples every {s['interval_s']:g} s (sent/s below offered/s "
            f"with a full queue: the line saturated first)\n\n{head}\n\n"
            f"command: tdn bench soak --minutes {s['minutes']:g} --load {s['load_pct']:g} --backend {s['backend']} "
            f"--threads {s.get('threads', 0)}")


def _plot(samples: list[dict[str, Any]], s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [x["t_s"] / 60 for x in samples]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    a1.plot(t, [x["rss_mib"] for x in samples], "-", color="C0")
    a1.set_ylabel("agent RSS, MiB")
    a1.set_title(f"RSS growth first→last third: {s['rss_growth_mib']:+.1f} MiB")
    a2.plot(t, [x["p50_ms"] if x["p50_ms"] is not None else np.nan for x in samples], "-", label="p50")
    a2.plot(t, [x["p99_ms"] if x["p99_ms"] is not None else np.nan for x in samples], "-", label="p99")
    a2.set_ylabel("capture → ok verdict, ms")
    a2.legend()
    a3.plot(t, [x["ok_per_s"] for x in samples], "-", label="ok verdicts/s")
    a3.plot(t, [x["sent_per_s"] for x in samples], "--", color="gray", label="sent/s")
    a3.plot(t, [x["shed"] / s["interval_s"] for x in samples], "-", color="C3", label="shed/s")
    a3.set_ylabel("frames/s")
    a3.set_xlabel("minutes")
    a3.legend()
    fig.suptitle(f"TinyDefectNet Line soak at {s['load_pct']:g}% of capacity ({s['offered_img_per_s']:,.0f} img/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
