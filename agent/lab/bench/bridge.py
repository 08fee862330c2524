"""Bridge: the PLC bridge with OPC UA, Modbus/TCP and MQTT all on, fed synthetic verdicts over ZeroMQ.

Four figures, each against its target: results lost at --rate verdicts/s across --cameras cameras for --seconds
(every output counted by its own client: asyncua TotalResults and ResultReady events, a Modbus read of HR 0-1,
mosquitto_sub lines), and whether every output caught up within KEPT_UP_S of the last send; OPC UA ResultReady event
latency from the verdict's publish to the client's receipt at --latency-rate verdicts/s; and fail-safe propagation,
from the bridge's own detection of a lost agent (the time in its FailSafe event) to each output's client seeing it.
The OPC UA client selects the result's fields (--event-fields), and the bridge runs on its own CPU, apart from the
synthetic agent, the clients and mosquitto that stand in for the plant (--bridge-cpus, --clients-cpus); each one's
CPU share is reported. Needs the [plc] extra and mosquitto.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from agent.lab.bench.common import cpu_seconds, markdown_table, percentile, pinner, write_outputs

# A result that reaches the PLC more than this after the last one was sent is no use to a line: the outputs must be
# caught up within it for the bridge to count as keeping up.
KEPT_UP_S = 1.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=5000.0, help="verdicts/s for the throughput phase")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the throughput phase")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--latency-rate", type=float, default=1000.0, help="verdicts/s for the latency phase")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--publishing-interval-ms", type=float, default=10.0,
                   help="the OPC UA client's requested publishing interval: events wait up to this long in the "
                        "server's subscription, so it is part of the latency measured")
    p.add_argument("--event-fields", default="result",
                   help="the OPC UA client's select clause: 'result' (the ResultReadyEventType's own fields, with "
                        "EventId and Time: what a PLC acting on results reads), 'all' (every field of the type, "
                        "BaseEventType's generic ones too: asyncua's default filter), or a comma list of field names "
                        "(PublishedNs among them: it times the latency)")
    p.add_argument("--heartbeat-timeout", type=float, default=1.0, help="the bridge's agent-lost timeout, s")
    p.add_argument("--bridge-cpus", default=None,
                   help="pin the bridge to these CPUs (comma-separated; default: the last CPU when there are two or "
                        "more; 'none': unpinned)")
    p.add_argument("--clients-cpus", default=None,
                   help="pin what stands in for the rest of the plant (the synthetic agent and the OPC UA and Modbus "
                        "clients in this process, mosquitto, mosquitto_sub) to these CPUs (default: every other CPU; "
                        "'none': unpinned). The bridge is measured, not its load generators: unpinned, they take "
                        "its CPU on a small host. Each one's CPU share is reported either way.")
    p.add_argument("--out", type=Path, default=Path("runs/bench-bridge"))
    p.add_argument("--json", type=Path)


def _layout(args: argparse.Namespace) -> tuple[str, str]:
    """(bridge CPUs, clients CPUs) as comma lists, '' for unpinned: by default the bridge gets the last CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    auto = len(cpus) >= 2

    def pick(value: str | None, default: list[int]) -> str:
        if value is None:
            return ",".join(map(str, default)) if auto else ""
        return "" if value == "none" else value

    return pick(args.bridge_cpus, cpus[-1:]), pick(args.clients_cpus, cpus[:-1])


class _CpuMeter:
    """CPU seconds of named processes between start() and stop(), as % of one core."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        import psutil

        self.procs = {name: [psutil.Process(pid) for pid in ids] for name, ids in pids.items()}
        self.percent: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._c0 = {name: cpu_seconds(procs) for name, procs in self.procs.items()}

    def stop(self) -> None:
        dt = time.monotonic() - self._t0
        self.percent = {name: round(100 * (cpu_seconds(procs) - self._c0[name]) / dt, 1)
                        for name, procs in self.procs.items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pace(agent: Any, cameras: list[str], rate: float, seconds: float, seq0: int) -> int:
    """Publish round-robin over cameras at `rate`/s for `seconds`; returns how many were sent."""
    sent, start, tick = 0, time.monotonic(), 0.005
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            agent.send(cameras[sent % len(cameras)], seq0 + sent // len(cameras))
            sent += 1
        time.sleep(tick)
    return sent


class _Events:
    """asyncua subscription handler: ResultReady events with their receipt time; data changes of FailSafe."""

    def __init__(self) -> None:
        self.events: list[tuple[int, int]] = []  # (received_ns, published_ns)
        self.failsafe_at: dict[str, int] = {}

    def event_notification(self, event: Any) -> None:
        self.events.append((time.time_ns(), int(event.PublishedNs)))

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        if val is True:
            self.failsafe_at.setdefault(str(node.nodeid.Identifier), time.time_ns())


async def _event_filter(etype: Any, fields: str) -> Any:
    """The client's EventFilter: asyncua's default for the type (all fields, an OfType where clause), its select
    clause cut to `fields` ('all', 'result' or names) in that order."""
    from asyncua.common.events import get_filter_from_event_type

    from simulators.plc.opcua import EVENT_FIELDS

    evfilter = await get_filter_from_event_type([etype])
    if fields == "all":
        return evfilter
    keep = [name for name, _ in EVENT_FIELDS] + ["EventId", "Time"] if fields == "result" else fields.split(",")
    have = {s.BrowsePath[-1].Name: s for s in evfilter.SelectClauses if s.BrowsePath}
    unknown = [name for name in keep if name not in have]
    if unknown or "PublishedNs" not in keep:
        raise SystemExit(f"--event-fields: {', '.join(unknown) or 'PublishedNs missing'}; the type has "
                         f"{', '.join(have)}")
    evfilter.SelectClauses = [have[name] for name in keep]
    return evfilter


async def _measure(args: argparse.Namespace, agent: Any, cams: list[str], ua_url: str, mb_port: int,
                   mqtt_port: int, sub_file: Path, meter: _CpuMeter) -> dict[str, Any]:
    from asyncua import Client
    from pymodbus.client import AsyncModbusTcpClient

    from simulators.plc.opcua import NAMESPACE

    out: dict[str, Any] = {}
    # A loaded server answers late; that is measured, not a failure (asyncua's 1 s health probe would disconnect).
    client = Client(ua_url, timeout=30, watchdog_intervall=30)
    mb = AsyncModbusTcpClient("127.0.0.1", port=mb_port)
    await mb.connect()
    async with client:
        idx = await client.get_namespace_index(NAMESPACE)
        etype = await client.nodes.root.get_child(["0:Types", "0:EventTypes", "0:BaseEventType",
                                                    f"{idx}:ResultReadyEventType"])
        cam_nodes = [client.get_node(f"ns={idx};s=Cameras/{c}") for c in cams]
        handler = _Events()
        sub = await client.create_subscription(args.publishing_interval_ms, handler)
        evfilter = await _event_filter(etype, args.event_fields)
        for node in cam_nodes:
            await sub.subscribe_events(node, etype, evfilter=evfilter, queuesize=100_000)
        total_node = client.get_node(f"ns={idx};s=Bridge/TotalResults")

        async def totals() -> dict[str, int]:
            regs = (await mb.read_holding_registers(0, count=2, device_id=1)).registers
            with sub_file.open("rb") as f:
                mqtt_lines = sum(1 for line in f if b"/verdict " in line)
            return {"opcua_total": int(await total_node.read_value()), "modbus_total": regs[0] << 16 | regs[1],
                    "mqtt_received": mqtt_lines, "opcua_events": len(handler.events)}

        # 1. Throughput: every result must reach every output.
        t0 = time.monotonic()
        meter.start()
        sent = await asyncio.to_thread(_pace, agent, cams, args.rate, args.seconds, 0)
        achieved = sent / (time.monotonic() - t0)
        deadline = time.monotonic() + 120
        got = await totals()
        caught_up: dict[str, float] = {}  # per output: seconds after the last send until it showed every result
        while True:
            after = round(time.monotonic() - t0 - args.seconds, 2)
            caught_up.update((k, after) for k, v in got.items() if v >= sent and k not in caught_up)
            if time.monotonic() >= deadline or min(got.values()) >= sent:
                break
            await asyncio.sleep(0.25)
            got = await totals()
        meter.stop()
        drained_s = time.monotonic() - t0 - args.seconds
        lag = max(caught_up.values()) if len(caught_up) == len(got) else None
        out["throughput"] = {"sent": sent, "offered_rate": args.rate, "achieved_rate": round(achieved, 1),
                             "drain_s": round(drained_s, 2), "caught_up_s": caught_up, "lag_s": lag,
                             "kept_up": lag is not None and lag <= KEPT_UP_S, **got,
                             "lost": {k: sent - v for k, v in got.items()}, "cpu_percent": meter.percent}
        # 2. Event latency at a lower rate.
        handler.events.clear()
        seq0 = -(-sent // len(cams))  # the next seq of every camera: a skipped one would be a gap, failed safe
        n = await asyncio.to_thread(_pace, agent, cams, args.latency_rate, args.latency_seconds, seq0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(handler.events) < n:
            await asyncio.sleep(0.2)
        # A fail-safe result (a gap) has no publish time: it is counted, not timed.
        lat = [(r - p) / 1e6 for r, p in handler.events if p > 0]
        out["latency"] = {"rate": args.latency_rate, "sent": n, "events": len(handler.events),
                          "untimed": len(handler.events) - len(lat), "p50_ms": _round(percentile(lat, 50)),
                          "p90_ms": _round(percentile(lat, 90)), "p99_ms": _round(percentile(lat, 99)),
                          "max_ms": round(max(lat), 3) if lat else None}
        # 3. Fail-safe propagation: silence the heartbeats; the bridge declares the agent lost.
        fs_nodes = [client.get_node(f"ns={idx};s=Cameras/{c}/FailSafe") for c in cams]
        fs_sub = await client.create_subscription(10, handler)
        await fs_sub.subscribe_data_change(fs_nodes)
        seen = await _mqtt_watch(mqtt_port, cams)
        modbus_at: dict[str, int] = {}
        agent.beating.clear()
        deadline = time.monotonic() + args.heartbeat_timeout + 10
        while time.monotonic() < deadline and (len(modbus_at) < len(cams) or len(handler.failsafe_at) < len(cams)
                                               or len(seen.at) < len(cams)):
            regs = (await mb.read_holding_registers(16, count=16 * len(cams), device_id=1)).registers
            now = time.time_ns()
            for i, c in enumerate(cams):
                if regs[16 * i] & 0b0100:
                    modbus_at.setdefault(c, now)
            await asyncio.sleep(0.005)
        detected = seen.detected_ns
        seen.stop()
        out["failsafe"] = {
            "detected_ns": detected,
            "opcua_s": _spread(handler.failsafe_at.values(), detected),
            "modbus_s": _spread(modbus_at.values(), detected),
            "mqtt_s": _spread(seen.at.values(), detected),
            "cameras_seen": {"opcua": len(handler.failsafe_at), "modbus": len(modbus_at), "mqtt": len(seen.at)},
        }
    mb.close()
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _spread(times: Any, detected: int | None) -> float | None:
    """Slowest camera's delay after the bridge's detection, s."""
    ts = list(times)
    if not ts or detected is None:
        return None
    return round((max(ts) - detected) / 1e9, 4)


class _MqttWatch:
    """A paho subscriber to the camera and bridge statuses, noting when each camera turns fail-safe."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.at: dict[str, int] = {}
        self.detected_ns: int | None = None

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _mqtt_watch(port: int, cams: list[str]) -> _MqttWatch:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-watch")
    watch = _MqttWatch(client)
    ready = threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        now = time.time_ns()
        body = json.loads(msg.payload)
        if msg.topic.endswith("/bridge/status"):
            ev = body.get("last_event") or {}
            if ev.get("kind") == "agent_lost":
                watch.detected_ns = ev["time_ns"]
        elif body.get("fail_safe") and "agent_lost" in body.get("reasons", []):
            watch.at.setdefault(body["camera_id"], now)

    def on_connect(c: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe([(f"tdn/line1/{cam}/status", 1) for cam in cams] + [("tdn/line1/bridge/status", 1)])
        ready.set()

    client.on_message, client.on_connect = on_message, on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    await asyncio.to_thread(ready.wait, 10)
    await asyncio.sleep(0.5)  # retained messages of the current (healthy) state arrive first
    return watch


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> int:
    from simulators.plc.synthetic import SyntheticAgent

    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists() or not shutil.which("mosquitto_sub"):
        print("bench bridge needs mosquitto and mosquitto_sub (apt-get install mosquitto mosquitto-clients)",
              file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tdn-bench-bridge-"))
    mqtt_port, ua_port, mb_port = _free_port(), _free_port(), _free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    cams = [f"cam{i + 1}" for i in range(args.cameras)]
    procs: list[subprocess.Popen[Any]] = []
    bridge_cpus, clients_cpus = _layout(args)
    own_cpus = os.sched_getaffinity(0)
    if clients_cpus:  # before the synthetic agent and the clients start their threads: they inherit it
        os.sched_setaffinity(0, {int(c) for c in clients_cpus.split(",")})
    agent = SyntheticAgent(f"tcp://127.0.0.1:{_free_port()}", heartbeat_s=0.2)
    try:
        procs.append(subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=pinner(clients_cpus)))
        _wait(lambda: _open(mqtt_port), 10, "mosquitto")
        sub_file = tmp / "mqtt.txt"
        with sub_file.open("wb") as f:
            procs.append(subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt_port), "-q", "1",
                                           "-t", "tdn/line1/+/verdict", "-v"], stdout=f,
                                          preexec_fn=pinner(clients_cpus)))
        cmd = [sys.executable, "-m", "simulators.plc_bridge", "--endpoint", agent.endpoint, "--quiet",
               "--heartbeat-timeout", str(args.heartbeat_timeout), "--opcua-endpoint",
               f"opc.tcp://127.0.0.1:{ua_port}", "--modbus-endpoint", f"127.0.0.1:{mb_port}", "--mqtt-url",
               f"mqtt://127.0.0.1:{mqtt_port}", "--report", str(tmp / "bridge.json")]
        for c in cams:
            cmd += ["--camera", c]
        with (out / "bridge.log").open("wb") as log:
            bridge = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pinner(bridge_cpus))
        procs.append(bridge)
        _wait(lambda: _open(ua_port) and _open(mb_port), 30, "the bridge's OPC UA and Modbus ports")
        time.sleep(1.0)  # heartbeats reach the bridge (PUB keeps no history)
        print(f"bridge up; {args.rate:,.0f} verdicts/s over {len(cams)} cameras for {args.seconds:g} s ...",
              flush=True)
        meter = _CpuMeter({"bridge": [bridge.pid], "clients": [os.getpid()],
                           "mosquitto": [procs[0].pid, procs[1].pid]})
        res = asyncio.run(_measure(args, agent, cams, f"opc.tcp://127.0.0.1:{ua_port}", mb_port, mqtt_port,
                                   sub_file, meter))
    finally:
        agent.close()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        os.sched_setaffinity(0, own_cpus)
    res["cpu"] = _cpu()
    res["pinning"] = {"bridge": bridge_cpus or "unpinned", "clients": clients_cpus or "unpinned"}
    res["command"] = "tdn bench bridge " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("rate", "seconds", "cameras", "latency_rate", "latency_seconds", "publishing_interval_ms",
                 "event_fields", "heartbeat_timeout", "bridge_cpus", "clients_cpus") and v is not None)
    tp, lat, fs = res["throughput"], res["latency"], res["failsafe"]
    worst_lost = max(tp["lost"].values())
    slowest = max((v for v in (fs["opcua_s"], fs["modbus_s"], fs["mqtt_s"]) if v is not None), default=None)
    rows = [
        ["results lost (worst output)", f"{worst_lost} of {tp['sent']:,} at {tp['achieved_rate']:,.0f}/s", "0",
         "yes" if worst_lost == 0 else "NO"],
        ["  per output", ", ".join(f"{k} {v}" for k, v in tp["lost"].items()), "", ""],
        ["kept up: every output caught up after the last send", f"{tp['lag_s']} s" if tp["lag_s"] is not None
         else "not within 120 s", f"<= {KEPT_UP_S:g} s", "yes" if tp["kept_up"] else "NO"],
        ["  per output", ", ".join(f"{k} {v} s" for k, v in tp["caught_up_s"].items()), "", ""],
        ["  CPU, % of one core", ", ".join(f"{k} {v}" for k, v in tp["cpu_percent"].items())
         + f" (bridge on CPUs {res['pinning']['bridge']}, the rest on {res['pinning']['clients']})", "", ""],
        ["OPC UA event latency p99", f"{lat['p99_ms']} ms (p50 {lat['p50_ms']}, p90 {lat['p90_ms']}) at "
         f"{lat['rate']:,.0f}/s",
         "<= 20 ms", "yes" if lat["p99_ms"] is not None and lat["p99_ms"] <= 20 else "NO"],
        ["fail-safe propagation", f"OPC UA {fs['opcua_s']} s, Modbus {fs['modbus_s']} s, MQTT {fs['mqtt_s']} s",
         "<= 1 s", "yes" if slowest is not None and slowest <= 1 else "NO"],
    ]
    table = markdown_table(["figure", "measured", "target", "met"], rows)
    md = f"# tdn bench bridge\n\n`{res['command']}` on {res['cpu']}\n\n{table}\n"
    print(md)
    write_outputs(out, "bench-bridge", md, res, args.json)
    return 0 if worst_lost == 0 and tp["kept_up"] else 1
