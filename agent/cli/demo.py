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


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.lab.data import default_data

    p.add_argument("--data", default=default_data(), help="NEU-DET folder to replay (default: $TDN_DATA; "
                   "without one, synthetic surfaces)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the cameras run")
    p.add_argument("--fps", type=float, default=25.0, help="frames per second per camera")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--backend", default=None, help="agent backend (default: the agent's own default)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="logs, reports and explanation PNGs")
    p.add_argument("--json", type=Path, help="also write the summary here")


def free_endpoints(n: int = 2) -> list[str]:
    """n distinct free loopback TCP endpoints: all n sockets are held open while the ports are chosen, so the
    kernel cannot hand the same port out twice."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [f"tcp://127.0.0.1:{s.getsockname()[1]}" for s in socks]


def wait_ready(endpoint: str, proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> dict[str, Any]:
    """Block until the agent's heartbeat says ready; fail with its log tail if it dies or stalls."""
    import zmq

    from protocol import HEARTBEAT_PREFIX, AgentState, ProtocolError, decode_heartbeat

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_PREFIX)
    sub.connect(endpoint)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise TdnError(f"agent exited with code {proc.returncode} before ready; log tail:\n{tail}")
            if sub.poll(200):
                try:
                    hb = decode_heartbeat(sub.recv_multipart())
                except ProtocolError:
                    continue
                if hb.state is AgentState.READY:
                    return hb.to_dict()
        raise TdnError(f"agent not ready after {timeout_s:.0f} s; see {log_path}")
    finally:
        sub.close(linger=0)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    frames, publish = free_endpoints()
    py = sys.executable
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    agent_cmd = [py, "-m", "agent.cli", "agent", "--frames-endpoint", frames, "--publish-endpoint", publish,
                 "--explain-dir", str(out / "explanations"), "--log-json", "true", "--agent-id", "demo"]
    if args.backend:
        agent_cmd += ["--backend", args.backend]
    agent_log = out / "agent.log"
    print(f"starting the agent (log: {agent_log}) ...", flush=True)
    t0 = time.monotonic()
    with agent_log.open("wb") as alog:
        agent = subprocess.Popen(agent_cmd, stdout=alog, stderr=subprocess.STDOUT, env=env)
    procs: list[subprocess.Popen[bytes]] = [agent]
    try:
        hb = wait_ready(publish, agent, 180, agent_log)
        print(f"agent ready in {time.monotonic() - t0:.1f} s: {hb['backend'].get('runtime', '?')}, "
              f"model {hb['model_id']}", flush=True)
        bridge = subprocess.Popen(
            [py, "-m", "simulators.plc_bridge", "--endpoint", publish, "--report", str(out / "bridge.json"),
             "--timeout", str(args.seconds + 30)], env=env)
        procs.append(bridge)
        time.sleep(0.5)  # let the bridge subscribe before the first verdict (PUB has no history)
        cam_cmd = [py, "-m", "simulators.camera", "--endpoint", frames, "--cameras", str(args.cameras),
                   "--fps", str(args.fps), "--shuffle", "--report", str(out / "cameras.json"), "--quiet"]
        if args.data:
            cam_cmd += ["--source", args.data]
        cameras = subprocess.Popen(cam_cmd, env=env)
        procs.append(cameras)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and cameras.poll() is None and bridge.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        _stop_line(procs)
    summary = _summary(out, agent.returncode)
    _print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["unaccounted"] == 0 and agent.returncode == 0 else 1


def _stop_line(procs: list[subprocess.Popen[bytes]]) -> None:
    """Cameras first, then let the last verdicts arrive, then the bridge, then the agent (SIGTERM drains)."""
    agent, rest = procs[0], procs[1:]
    cameras = rest[1] if len(rest) > 1 else None
    bridge = rest[0] if rest else None
    if cameras is not None and cameras.poll() is None:
        cameras.send_signal(signal.SIGINT)
        _wait(cameras, 10)
    time.sleep(2.5)  # longer than the bridge's verdict timeout, so it settles every gap it will see
    if bridge is not None and bridge.poll() is None:
        bridge.send_signal(signal.SIGINT)
        _wait(bridge, 10)
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        _wait(agent, 20)


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
