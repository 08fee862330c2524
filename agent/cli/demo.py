"""The demo line: one agent, two cameras replaying NEU-DET (or synthetic surfaces) and a PLC bridge, live."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import TdnError
from agent.testing import start_agent, wait_ready


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tinydefectnet",
                   help="a shipped model (tinydefectnet: NEU-DET steel; magnetic-tile: tiles with a pass class) or "
                        "a .keras path")
    p.add_argument("--data", default=None, help="folder to replay (default: the model's dataset beside the "
                   "checkout, $TDN_DATA for NEU-DET; without one, synthetic steel surfaces)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the cameras run")
    p.add_argument("--fps", type=float, default=25.0, help="frames per second per camera")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--backend", default=None, help="agent backend (default: the agent's own default)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="logs, reports and explanation PNGs")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--console", action="store_true",
                   help="also run the operator console (tdn console) on a free loopback port and print its URL")


def free_endpoints(n: int = 2) -> list[str]:
    """n distinct free loopback TCP endpoints: all n sockets are held open while the ports are chosen, so the
    kernel cannot hand the same port out twice."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]


def model_and_data(name: str, data: str | None) -> tuple[Path, str | None]:
    """The model file a --model names, and the folder to replay (its shipped dataset when --data is not given)."""
    from agent.config import MODELS_DIR
    from agent.lab import REPO_DATA, default_data

    path = Path(name) if name.endswith(".keras") else MODELS_DIR / f"{name}.keras"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.keras")))
        raise TdnError(f"model {name!r} not found (shipped: {shipped}; or give a .keras path)")
    if data is None:
        if path.stem == "magnetic-tile":
            mt = REPO_DATA.parent / "magnetic-tile"
            data = os.environ.get("TDN_MT_DATA") or (str(mt) if mt.is_dir() else None)
        else:
            data = default_data()
    return path, data


def _backend(given: str | None) -> str:
    """The backend the demo's agent starts with: --backend, else the agent's own settings (TDN_BACKEND, .env,
    else auto); a bad setting reads as auto here, and the agent names it when it refuses to start."""
    from agent.config import load

    try:
        return load(backend=given).backend
    except TdnError:
        return given or "auto"


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    model, data = model_and_data(args.model, args.data)
    settings = {"explain_dir": out / "explanations", "agent_id": "demo", "backend": args.backend,
                "model_path": model}
    agent_log = out / "agent.log"
    agent_log.unlink(missing_ok=True)
    print(f"starting the agent (log: {agent_log}) ...", flush=True)
    if _backend(args.backend) == "auto" and not _exported(model):
        print("  first start: exporting the lean artifacts (int8/bf16 gated when the model's images are here); "
              "about half a minute on 2 cores, each step in the agent's log", flush=True)
    t0 = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # The agent's default: it reads no frame until a bridge subscribed, so the bridge sees every verdict.
        agent = start_agent(agent_log, {**settings, "ready_subscribers": None}, wait="publishing")
        procs.append(agent.proc)
        publish = agent.publish
        bridge = subprocess.Popen(
            [py, "-m", "simulators.plc_bridge", "--endpoint", publish, "--report", str(out / "bridge.json"),
             "--timeout", str(args.seconds + 30)], env=env)
        procs.append(bridge)
        if args.console:
            procs.append(_start_console(py, env, publish, out))
        frames = wait_ready(agent).frames
        ready = agent.event("ready") or {}
        print(f"agent ready in {time.monotonic() - t0:.1f} s: model {ready.get('model_id', '?')}", flush=True)
        cam_cmd = [py, "-m", "simulators.camera", "--endpoint", frames, "--cameras", str(args.cameras),
                   "--fps", str(args.fps), "--shuffle", "--report", str(out / "cameras.json"), "--quiet"]
        if data:
            cam_cmd += ["--source", data]
        cameras = subprocess.Popen(cam_cmd, env=env)
        procs.append(cameras)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and cameras.poll() is None and bridge.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        if procs:
            _stop_line(procs)
    code = procs[0].returncode if procs else 1
    summary = _summary(out, code)
    _print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["unaccounted"] == 0 and code == 0 else 1


def _start_console(py: str, env: dict[str, str], publish: str, out: Path) -> subprocess.Popen[bytes]:
    """The operator console beside the line; it stops with the demo (its review items stay in out/console)."""
    port = free_endpoints(1)[0].rsplit(":", 1)[1]
    # The demo's agent publishes no review decision yet: queue its least sure verdicts so the review page fills.
    cmd = [py, "-m", "agent.console", "--endpoint", publish, "--listen", f"127.0.0.1:{port}",
           "--state-dir", str(out / "console"), "--review-below", "0.8", "--quiet"]
    with (out / "console.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"operator console: http://127.0.0.1:{port}/ (log: {out / 'console.log'})", flush=True)
    return proc


def _stop_line(procs: list[subprocess.Popen[bytes]]) -> None:
    """Cameras first, then let the last verdicts arrive, then the bridge, then the agent (SIGTERM drains)."""
    agent, rest = procs[0], procs[1:]
    consoles = [p for p in rest if "agent.console" in list(map(str, p.args))]  # type: ignore[arg-type]
    rest = [p for p in rest if p not in consoles]
    cameras = rest[1] if len(rest) > 1 else None
    bridge = rest[0] if rest else None
    if cameras is not None and cameras.poll() is None:
        cameras.send_signal(signal.SIGINT)
        _wait(cameras, 10)
    time.sleep(2.5)  # longer than the bridge's verdict timeout, so it settles every gap it will see
    if bridge is not None and bridge.poll() is None:
        bridge.send_signal(signal.SIGINT)
        _wait(bridge, 10)
    for console in consoles:
        if console.poll() is None:
            console.send_signal(signal.SIGINT)
            _wait(console, 10)
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        _wait(agent, 20)


def _exported(model: Path) -> bool:
    from agent.backends.store import manifest_ok, model_dir
    from agent.config import default_artifacts_dir

    return manifest_ok(model_dir(default_artifacts_dir(), model))


def _wait(p: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _read(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _summary(out: Path, agent_code: int | None) -> dict[str, Any]:
    cams = _read(out / "cameras.json")
    br = _read(out / "bridge.json")
    sent = int(cams.get("sent", 0))
    verdicts = int(br.get("verdicts", 0))
    snaps = len(list((out / "explanations").glob("*_overlay.png"))) if (out / "explanations").is_dir() else 0
    return {
        "frames_sent": sent,
        "camera_send_timeouts": cams.get("timed_out", 0),
        "verdicts": verdicts,
        "by_status": br.get("by_status", {}),
        "by_decision": br.get("by_decision", {}),
        "unaccounted": sent - verdicts,
        "gaps": br.get("gaps"),
        "duplicates": br.get("duplicates"),
        "accuracy": br.get("accuracy"),
        "latency_ms": br.get("latency_ms", {}),
        "rejects_fail_safe": br.get("rejects"),
        "explanation_snapshots": snaps,
        "agent_exit_code": agent_code,
        "fps_achieved": cams.get("fps_achieved"),
        "out": str(out),
    }


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="TinyDefectNet Line: demo summary", show_header=True)
    t.add_column("measure")
    t.add_column("value", justify="right")
    lat = s["latency_ms"] or {}
    acc = s["accuracy"]
    rows = [
        ("frames sent by cameras", f"{s['frames_sent']}"),
        ("verdicts received by the bridge", f"{s['verdicts']}"),
        ("  by status", ", ".join(f"{k} {v}" for k, v in sorted(s["by_status"].items())) or "-"),
        ("  by decision", ", ".join(f"{k} {v}" for k, v in s["by_decision"].items()) or "-"),
        ("unaccounted frames", f"{s['unaccounted']}"),
        ("gaps / duplicates", f"{s['gaps']} / {s['duplicates']}"),
        ("accuracy vs ground truth", "-" if acc is None else f"{100 * acc:.2f}%"),
        ("capture->verdict p50 / p99 / max", "/".join(f"{lat.get(k, float('nan')):.1f}" for k in ("p50", "p99", "max"))
         + " ms"),
        ("explanation snapshots saved", f"{s['explanation_snapshots']} in {s['out']}/explanations"),
        ("agent exit code", f"{s['agent_exit_code']}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
