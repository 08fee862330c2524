"""The line under load: capacity measured first, then 25/50/100/150% of it offered by camera processes.

Capacity is the raw backend throughput at the agent's batch size, measured in this run: before the first step
and after every step, so each step is compared with the mean of the two probes around it (on a shared host the
backend's speed drifts by 10-20% within minutes). For each load the agent (one process for the whole run),
camera processes and a PLC bridge run for --seconds; the bridge reports verdicts/s, capture-to-verdict latency
and statuses, and psutil the CPU of the agent, the cameras and the bridge.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.lab.bench.common import cpu_seconds, markdown_table, pinner, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL, AgentSettings
    from agent.lab import default_data

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--data", default=default_data(), help="NEU-DET folder the cameras replay (else synthetic)")
    p.add_argument("--backend", default="auto",
                   help="the agent's backend (default: the agent's own default, auto; the capacity probe then runs "
                        "the variant the agent chose)")
    # The agent's own defaults, so the bench measures what `tdn agent` with no flags serves.
    agent_default = {k: f.default for k, f in AgentSettings.model_fields.items()}
    p.add_argument("--batch", type=int, default=agent_default["max_batch_size"], help="the agent's max batch size")
    p.add_argument("--threads", type=int, default=agent_default["threads"],
                   help="runtime threads of each inference worker (0: auto, as the agent)")
    p.add_argument("--workers", type=int, default=agent_default["workers"],
                   help="the agent's inference workers (0: auto, as the agent: one single-threaded worker per core "
                        "on litert/openvino, or 1 when --threads is set)")
    p.add_argument("--delay-us", type=int, default=agent_default["max_queue_delay_us"],
                   help="the agent's max queue delay")
    p.add_argument("--deadline-ms", type=float, default=agent_default["shed_deadline_ms"],
                   help="the agent's shed deadline")
    p.add_argument("--loads", default="25,50,100,150", help="offered load, percent of capacity")
    p.add_argument("--seconds", type=float, default=15.0, help="duration of each load step")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--images", type=int, default=1,
                   help="images per camera message, stacked like a line-scan camera's strip, each answered by its "
                        "own verdict (SPEC 4.1; default 1: one image a message)")
    p.add_argument("--sim-cpus", default="",
                   help="pin the camera and bridge processes to these CPUs (e.g. 0), so that they take their "
                        "CPU from one core the way cameras on their own hardware would take none (default: unpinned)")
    p.add_argument("--agent-cpus", default="",
                   help="pin the agent, and the capacity probe it is compared with, to these CPUs (default: unpinned)")
    p.add_argument("--console", action="store_true",
                   help="run every load twice, without and with `tdn console` subscribed (and one page's event "
                        "stream open), and report both side by side: the console must not slow the line")
    p.add_argument("--out", type=Path, default=Path("runs/bench-stream"))
    p.add_argument("--json", type=Path)


def capacity(backend_name: str, model: Path, batch: int, seconds: float = 3.0, threads: int = 0,
             cpus: str = "", workers: int = 0) -> float:
    """Raw backend images/s at `batch` in the agent's layout (each inference worker a thread inferring on its own
    lane, nothing else running), in a child process so the agent later gets the CPU alone."""
    code = (
        "import numpy as np\n"
        "from agent.backends import create\n"
        "from agent.lab.bench.common import time_lanes\n"
        f"b=create({backend_name!r},{str(model)!r},{threads},workers={workers});b.load();b.warmup(({batch},))\n"
        f"x=np.random.default_rng(0).uniform(0,255,({batch},200,200,1)).astype(np.float32)\n"
        f"lat,wall=time_lanes(b,x,{seconds})\n"
        f"print(len(lat)*{batch}/wall)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         preexec_fn=pinner(cpus))
    if out.returncode != 0:
        from agent.errors import TdnError

        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise TdnError(f"capacity probe ({backend_name}) failed: {last}")
    return float(out.stdout.strip().splitlines()[-1])


def start_console(publish: str, out: Path) -> tuple[subprocess.Popen[bytes], Any, str]:
    """`tdn console` on a free loopback port, subscribed to the agent, with one client reading its event stream."""
    import threading
    import urllib.request

    from agent.testing import free_port, wait_for

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "console", "--endpoint", publish, "--listen",
                             f"127.0.0.1:{port}", "--state-dir", str(out / "console"), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            return urllib.request.urlopen(url + "/api/summary", timeout=1).status == 200
        except OSError:
            return False

    wait_for(up, 60, "the console")

    def read_events() -> None:  # what an open page costs the console: the event stream, read as it comes
        try:
            with urllib.request.urlopen(url + "/api/events", timeout=60) as r:
                while r.read(4096):
                    pass
        except OSError:
            pass

    threading.Thread(target=read_events, daemon=True).start()
    return proc, None, url


def stop_console(console: tuple[subprocess.Popen[bytes], Any, str]) -> dict[str, Any]:
    """The console's own counts (verdicts it saw, drops) and RSS, then stop it."""
    import urllib.request

    import psutil

    proc, _, url = console
    info: dict[str, Any] = {}
    try:
        summary = json.loads(urllib.request.urlopen(url + "/api/summary", timeout=5).read())
        info = {"verdicts_seen": sum(c.get("verdicts", 0) for c in summary.get("cameras", {}).values()),
                "dropped": summary.get("console", {}).get("dropped"),
                "rss_mib": round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)}
    except OSError:
        info = {"error": "console did not answer"}
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    return info


def _console_pairs(rows: list[dict[str, Any]]) -> str:
    """Each load without and with the console, side by side: throughput ratio and p99 of both."""
    lines = ["with the console attached (same run, same agent; each load measured without, then with):"]
    for plain, attached in zip(rows[::2], rows[1::2], strict=True):
        ratio = attached["verdicts_per_s"] / plain["verdicts_per_s"] if plain["verdicts_per_s"] else float("nan")
        c = attached["console"] or {}
        lines.append(f"- {plain['load_pct']:g}%: ok verdicts/s {plain['verdicts_per_s']:,.0f} -> "
                     f"{attached['verdicts_per_s']:,.0f} ({ratio:.3f}x); p99 {plain['p99_ms']} -> "
                     f"{attached['p99_ms']} ms; the console saw {c.get('verdicts_seen')} verdicts, dropped "
                     f"{c.get('dropped')}, RSS {c.get('rss_mib')} MiB")
    return "\n".join(lines)


def _tree(pid: int) -> list[Any]:
    """A process and its children (the camera simulator may fork one process per camera)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def served_variant(ready: dict[str, Any], requested: str) -> str:
    """backend:precision the agent serves, from its ready event's model_id (name-hash/litert-fp32 -> litert:fp32)."""
    variant = str(ready.get("model_id", "")).rpartition("/")[2]
    backend, _, precision = variant.partition("-")
    return f"{backend}:{precision}" if backend and precision else requested


def run(args: argparse.Namespace) -> int:
    import psutil

    from agent.testing import start_agent
    from protocol import MAX_DIM

    # The cameras replay 200x200 NEU-DET (or synthetic) images: a strip is at most MAX_DIM rows.
    if not 1 <= args.images <= MAX_DIM // 200:
        raise SystemExit(f"--images must be 1..{MAX_DIM // 200} for the bench's 200x200 images")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = out / "agent.log"
    log.unlink(missing_ok=True)
    settings = {"backend": args.backend, "model_path": args.model, "max_batch_size": args.batch,
                "threads": args.threads, "workers": args.workers, "queue_cap": 4 * args.batch,
                "max_queue_delay_us": args.delay_us,
                "shed_deadline_ms": args.deadline_ms}
    cpus = [int(c) for c in args.agent_cpus.split(",")] if args.agent_cpus else None
    agent_proc = start_agent(log, settings, cpus=cpus)
    agent, frames, publish = agent_proc.proc, agent_proc.frames, agent_proc.publish
    # Capacity is probed on the variant the agent serves: with auto, the one it chose (its model_id says which).
    backend = served_variant(agent_proc.event("ready") or {}, args.backend)
    ident = agent_proc.event("model serving") or {}
    layout = f"{ident.get('workers', '1')} worker(s) x {ident.get('threads', '?')} thread(s)"
    print(f"agent serving {backend}, {layout}; measuring capacity (raw backend throughput) ...", flush=True)

    def probe() -> float:
        c = capacity(backend, args.model, args.batch, threads=args.threads, cpus=args.agent_cpus,
                     workers=args.workers)
        print(f"capacity: {c:,.0f} img/s at batch {args.batch} ({backend})", flush=True)
        return c

    caps = [probe()]
    results: list[dict[str, Any]] = []
    try:
        proc = psutil.Process(agent.pid)
        steps = [(float(x), c) for x in args.loads.split(",") for c in ((False, True) if args.console else (False,))]
        for load, with_console in steps:
            offered = caps[-1] * load / 100
            fps = offered / args.cameras
            tag = f"load{load:g}" + ("-console" if with_console else "")
            console = start_console(publish, out / tag) if with_console else None
            bridge = subprocess.Popen(
                [py, "-m", "simulators.plc_bridge", "--endpoint", publish, "--report", str(out / f"{tag}-bridge.json"),
                 "--quiet", "--timeout", str(args.seconds + 20)], env=env, preexec_fn=pinner(args.sim_cpus))
            time.sleep(0.8)
            cam_cmd = [py, "-m", "simulators.camera", "--endpoint", frames, "--cameras", str(args.cameras),
                       "--fps", f"{fps:.3f}", "--report", str(out / f"{tag}-cams.json"), "--quiet",
                       "--send-timeout-ms", "200", "--seed", str(int(load)), "--images", str(args.images),
                       # The agent runs through every step and remembers each camera's recent seqs: a camera
                       # starting again at 0 would be refused as duplicate_seq.
                       "--start-seq", str(len(results) * 10_000_000)]
            if args.data:
                cam_cmd += ["--source", args.data, "--shuffle"]
            t0 = time.monotonic()
            cams = subprocess.Popen(cam_cmd, env=env, preexec_fn=pinner(args.sim_cpus))
            # CPU shares over the second half of the step, when the cameras have decoded their folder and send.
            time.sleep(args.seconds / 2)
            procs = {"agent": [proc], "cameras": _tree(cams.pid), "bridge": _tree(bridge.pid)}
            before = {k: cpu_seconds(v) for k, v in procs.items()}
            t_half = time.monotonic()
            time.sleep(args.seconds / 2)
            spent = time.monotonic() - t_half
            cpu_share = {k: round(100 * (cpu_seconds(v) - before[k]) / spent, 1) for k, v in procs.items()}
            cpu = cpu_share["agent"]
            rss = proc.memory_info().rss / 2**20
            cams.send_signal(signal.SIGINT)
            cams.wait(30)
            wall = time.monotonic() - t0
            time.sleep(2.5)  # last verdicts, and the bridge's verdict timeout
            bridge.send_signal(signal.SIGINT)
            bridge.wait(30)
            console_info = stop_console(console) if console is not None else None
            caps.append(probe())  # the agent idles meanwhile: its queue is empty and no camera sends
            cap = (caps[-2] + caps[-1]) / 2
            br = json.loads((out / f"{tag}-bridge.json").read_text())
            cm = json.loads((out / f"{tag}-cams.json").read_text())
            by = br.get("by_status", {})
            v = br.get("verdicts", 0)
            lat = br.get("latency_ms", {})
            # Rates over the cameras' own sending window: it excludes their start-up (imports, decoding the folder),
            # when nothing is offered yet. Every sent frame gets its verdict, so ok/window is the delivered rate.
            elapsed = float(cm.get("seconds") or wall)
            results.append({
                "load_pct": load, "capacity_img_per_s": round(cap, 1), "offered_img_per_s": round(offered, 1),
                "sent_img_per_s": round(cm.get("sent", 0) / elapsed, 1),
                "verdicts_per_s": round(by.get("ok", 0) / elapsed, 1),
                "all_verdicts_per_s": round(v / elapsed, 1),
                "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"), "max_ms": lat.get("max"),
                "shed_share": round(by.get("shed", 0) / v, 4) if v else None,
                "send_seconds": round(elapsed, 2), "sent": cm.get("sent"), "camera_timeouts": cm.get("timed_out"),
                "verdicts": v,
                "unaccounted": cm.get("sent", 0) - v, "gaps": br.get("gaps"), "duplicates": br.get("duplicates"),
                "agent_cpu_pct": round(cpu, 1), "cameras_cpu_pct": cpu_share["cameras"],
                "bridge_cpu_pct": cpu_share["bridge"], "agent_rss_mib": round(rss, 1),
                "console": console_info,
            })
            r = results[-1]
            step = f"{load:>5g}%" + (" +console" if with_console else "")
            print(f"{step}: capacity {cap:,.0f}/s offered {offered:,.0f}/s sent {r['sent_img_per_s']:,.0f}/s -> "
                  f"ok verdicts {r['verdicts_per_s']:,.0f}/s, p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms, "
                  f"shed {r['shed_share']}, unaccounted {r['unaccounted']}", flush=True)
    finally:
        agent_proc.stop(30)
    summary = {"capacity_probes_img_per_s": [round(c, 1) for c in caps], "batch": args.batch,
               "backend": args.backend, "served": backend,
               "threads": args.threads, "workers": args.workers, "layout": layout, "deadline_ms": args.deadline_ms,
               "cameras": args.cameras, "images_per_message": args.images,
               "rows": results}
    md = markdown_table(
        ["load", "capacity/s", "offered/s", "sent/s", "ok verdicts/s", "% of capacity", "p50 ms", "p99 ms", "shed",
         "unaccounted", "CPU % agent / cameras / bridge"],
        [[f"{r['load_pct']:g}%" + (" +console" if r["console"] else ""), r["capacity_img_per_s"],
          r["offered_img_per_s"], r["sent_img_per_s"],
          r["verdicts_per_s"], f"{100 * r['verdicts_per_s'] / r['capacity_img_per_s']:.0f}%", r["p50_ms"],
          r["p99_ms"], r["shed_share"], r["unaccounted"],
          f"{r['agent_cpu_pct']:g} / {r['cameras_cpu_pct']:g} / {r['bridge_cpu_pct']:g}"] for r in results],
    )
    pins = "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("sim_cpus", args.sim_cpus),
                                                                ("agent_cpus", args.agent_cpus)) if v)
    md = (f"capacity probes {', '.join(f'{c:,.0f}' for c in caps)} img/s ({backend}, batch {args.batch}, "
          f"{layout}), before the first step and after each; a step's capacity is the mean "
          f"of the two around it\n\n{md}\n\ncommand: tdn bench stream --backend {args.backend} --batch {args.batch} "
          f"--threads {args.threads} --workers {args.workers} --delay-us {args.delay_us} --seconds {args.seconds:g} "
          f"--loads {args.loads} --cameras {args.cameras} --images {args.images}{pins}"
          f"\n\nCPU % is of one core ({os.cpu_count()} here), over the second half of each step")
    if args.console:
        md += "\n\n" + _console_pairs(results)
    print(md)
    write_outputs(out, "bench-stream", md, summary, args.json)
    _plot(results, out / "bench-stream.png", args.deadline_ms)
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, deadline: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = [r["load_pct"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(loads, [r["p50_ms"] or np.nan for r in rows], "o-", label="p50")
    a1.plot(loads, [r["p99_ms"] or np.nan for r in rows], "s-", label="p99")
    a1.axhline(deadline, color="r", ls=":", label="shed deadline")
    a1.set_xlabel("offered load, % of capacity")
    a1.set_ylabel("capture → verdict, ms")
    a1.set_yscale("log")
    a1.legend()
    a2.plot(loads, [r["verdicts_per_s"] for r in rows], "o-", label="ok verdicts/s")
    a2.plot(loads, [r["offered_img_per_s"] for r in rows], "--", color="gray", label="offered")
    a2.plot(loads, [r["capacity_img_per_s"] for r in rows], "k:", label="capacity (probed around each step)")
    a2.set_xlabel("offered load, % of capacity")
    a2.set_ylabel("images/s")
    a2.legend()
    fig.suptitle("TinyDefectNet Line: latency and throughput vs load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
