"""Failover across line PCs: two agents on network-namespace hosts share one camera and lose one host mid-stream."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent import testing
from agent.config import AgentSettings
from agent.security import make_keypair
from agent.service import RCVBUF_BYTES
from agent.testing import AgentProcess, wait_for
from protocol import HEARTBEAT_PREFIX, VERDICT_PREFIX, Heartbeat, ProtocolError, Verdict, decode
from simulators.camera import SNDBUF_BYTES
from simulators.common import CurveKeys, curve_client_keys, make_curve_client

pytestmark = pytest.mark.integration

# 5 frames/s to each agent while both are up: slow enough that filling the queue to a dead agent (SNDHWM and kernel
# buffers, about 14 frames) would take over 2.5 s, so a switch within 2 s is the heartbeats' doing. The camera runs
# until the test stops it.
FPS = 10.0
FAULT_AFTER_SEQ = 20  # frames (2 s) before the first fault; A answers 10 before each fault
FRAME_BYTES = 200 * 200 + 200  # a synthetic gray8 frame and its header
FRAMES_PORT, PUBLISH_PORT = 5555, 5556
# What the camera can have queued to one agent: its SNDHWM, set here above the camera's default (2) so that the
# queue outlasts the heartbeat timeout, plus the kernel buffers of the connection, the camera's SNDBUF and the
# agent's RCVBUF (Linux doubles both).
CAMERA_SNDHWM = 10
KERNEL_BUFFER_BYTES = 2 * (SNDBUF_BYTES + RCVBUF_BYTES)
# The agents: the shipped model on plain TensorFlow (no backend probe) with batches of up to 4, which load in about
# half the time of the defaults on 2 cores; the failover does not depend on the backend.
# One intra-op thread each: two agents share 2 cores.
AGENT_SETTINGS = {"backend": "tensorflow", "max_batch_size": 4, "threads": 1, "metrics_port": 0,
                  "explain_interval_s": 0}
# Frames the dead agent itself held die with it too: its RCVHWM pipe, its batch queue (what arrives within the
# 250 ms shed deadline) and two batches of up to 4 in flight.
AGENT_HELD = AgentSettings.model_fields["rcvhwm"].default + math.ceil(0.25 * FPS / 2) + 2 * 4
LOST_BOUND = CAMERA_SNDHWM + math.ceil(KERNEL_BUFFER_BYTES / FRAME_BYTES) + AGENT_HELD
SWITCH_TARGET_S = 2.0

_runs = itertools.count()


def _ip() -> str | None:
    return shutil.which("ip", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _netns_missing() -> str | None:
    """Why `ip netns` cannot be used here, or None."""
    ip = _ip()
    if ip is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    result = subprocess.run([ip, "netns", "list"], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        return f"`ip netns` is not supported here: {result.stderr.strip() or f'exit {result.returncode}'}"
    return None


# --- the namespaced line PCs ---


@dataclass
class Host:
    """A line PC: a network namespace joined to the root namespace by a veth pair (a /30 of 10.231.0.0/16)."""

    ns: str
    root_if: str  # the "switch port" end, in the root namespace
    address: str  # the host's address, on eth0 inside its namespace
    agent_id: str
    agent: AgentProcess | None = None

    @property
    def frames(self) -> str:
        return f"tcp://{self.address}:{FRAMES_PORT}"

    @property
    def publish(self) -> str:
        return f"tcp://{self.address}:{PUBLISH_PORT}"


class Network:
    """Creates namespaces and veth pairs and removes every one of them at close(), whatever happened."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.namespaces: list[str] = []
        self.links: list[str] = []

    def run(self, *args: str) -> str:
        result = subprocess.run([self.ip, *args], capture_output=True, text=True, timeout=15)
        if result.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()} (this test needs root: CAP_NET_ADMIN)")
        return result.stdout

    def free_subnet(self) -> int:
        """A third octet of 10.231.x.0/24 with no address on this machine (tried from one derived from the pid)."""
        used = self.run("-4", "-o", "addr", "show")
        start = os.getpid() % 200 + 20
        for octet in (start + i for i in range(200)):
            octet = 20 + (octet - 20) % 220
            if f"10.231.{octet}." not in used:
                return octet
        raise RuntimeError("no free 10.231.x.0/24 for the test hosts")

    def add_host(self, tag: str, index: int, octet: int) -> Host:
        letter = "ab"[index]
        ns, root_if = f"tdn-fo-{tag}-{letter}", f"tfo{tag}{letter}"[-15:]
        base = 4 * index  # 10.231.octet.0/30 for host a, .4/30 for host b
        self.run("netns", "add", ns)
        self.namespaces.append(ns)
        self.run("link", "add", root_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self.links.append(root_if)
        self.run("addr", "add", f"10.231.{octet}.{base + 1}/30", "dev", root_if)
        self.run("link", "set", root_if, "up")
        self.run("-n", ns, "addr", "add", f"10.231.{octet}.{base + 2}/30", "dev", "eth0")
        self.run("-n", ns, "link", "set", "eth0", "up")
        self.run("-n", ns, "link", "set", "lo", "up")  # the agent's metrics server listens on 127.0.0.1
        return Host(ns, root_if, f"10.231.{octet}.{base + 2}", f"agent{letter.upper()}")

    def close(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run([self.ip, "netns", "del", ns], capture_output=True, timeout=15)
        for link in self.links:  # in case a process kept the namespace alive
            subprocess.run([self.ip, "link", "del", link], capture_output=True, timeout=15)


@pytest.fixture
def hosts(shipped_model: Path) -> Iterator[list[Host]]:
    """Two line PCs; their agents are killed and their namespaces and veths removed at teardown, even on failure."""
    missing = _netns_missing()
    if missing is not None:
        pytest.skip(f"failover across line PCs needs network namespaces: {missing}")
    ip = _ip()
    assert ip is not None
    net = Network(ip)
    made: list[Host] = []
    try:
        tag = f"{os.getpid()}{next(_runs) % 10}"
        octet = net.free_subnet()
        made += [net.add_host(tag, 0, octet), net.add_host(tag, 1, octet)]
        yield made
    finally:
        for host in made:
            if host.agent is not None:
                host.agent.kill()
        net.close()
        leftover = net.run("netns", "list")
        assert not any(ns in leftover for ns in net.namespaces), f"namespaces left behind: {leftover}"


# --- keys, processes and observers ---


@dataclass
class Keys:
    """One agent key pair for both hosts (a camera names one server key), and allow-listed camera and bridge."""

    agent_public: Path
    agent_secret: Path
    allow_dir: Path
    camera_secret: Path
    bridge_secret: Path


def make_keys(tmp: Path) -> Keys:
    pub, sec = make_keypair(tmp / "agent", "agent")
    allow = tmp / "allowed"
    allow.mkdir()
    _, cam = make_keypair(tmp / "cam", "cam1")
    _, bridge = make_keypair(tmp / "bridge", "bridge1")
    for secret in (cam, bridge):
        shutil.copy(secret.with_suffix(".key"), allow)
    return Keys(pub, sec, allow, cam, bridge)


class Recorder(threading.Thread):
    """Our own SUB on both agents: every verdict per seq (with the agent that sent it) and the last heartbeats."""

    def __init__(self, endpoints: list[str], keys: CurveKeys | None) -> None:
        super().__init__(daemon=True)
        self.endpoints, self.keys = endpoints, keys
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.verdicts: dict[int, list[Verdict]] = {}
        self.heartbeats: dict[str, tuple[float, Heartbeat]] = {}
        self.last_verdict_at = 0.0
        self.invalid: list[str] = []

    def run(self) -> None:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # never drop: the counts are the assertions
        make_curve_client(sock, self.keys)
        for prefix in (VERDICT_PREFIX, HEARTBEAT_PREFIX):
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        for endpoint in self.endpoints:
            sock.connect(endpoint)
        try:
            while not self.halt.is_set():
                if not sock.poll(100):
                    continue
                try:
                    msg = decode(sock.recv_multipart())
                except ProtocolError as exc:  # counted and asserted on, never a dead recorder thread
                    self.invalid.append(exc.reason)
                    continue
                now = time.monotonic()
                with self.lock:
                    if isinstance(msg, Verdict):
                        self.verdicts.setdefault(msg.seq, []).append(msg)
                        self.last_verdict_at = now
                    elif isinstance(msg, Heartbeat):
                        self.heartbeats[msg.agent_id] = (now, msg)
        finally:
            sock.close()

    def by_agent(self) -> dict[str, set[int]]:
        with self.lock:
            out: dict[str, set[int]] = {}
            for seq, verdicts in self.verdicts.items():
                for v in verdicts:
                    out.setdefault(v.agent_id, set()).add(seq)
            return out

    def heartbeat(self, agent_id: str) -> tuple[float, Heartbeat] | None:
        with self.lock:
            return self.heartbeats.get(agent_id)

    def close(self) -> None:
        self.halt.set()
        self.join(5)
        self.ctx.term()


class Bridge:
    """simulators.plc_bridge on both agents; its event lines (gap, agent_seen, agent_lost) read as they come."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.lock:
                self.lines.append((time.monotonic(), line.rstrip("\n")))

    def events(self, kind: str) -> list[tuple[float, str]]:
        with self.lock:
            return [(t, line) for t, line in self.lines if line.startswith(f"bridge: {kind} ")]

    def gap_seqs(self) -> dict[int, float]:
        """seq -> when the bridge announced it failed safe."""
        out: dict[int, float] = {}
        for t, line in self.events("gap"):
            match = re.search(r" seq (\d+) fail-safe", line)
            assert match, line
            out[int(match.group(1))] = t
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(5)


# --- one failover run ---


@dataclass
class Fault:
    """One loss of host A: when, which frames died with it, and how long the camera and the bridge took."""

    kind: str  # "kill" or "link_down"
    at_ns: int  # wall clock (the camera's capture_ns clock: same machine)
    at_mono: float
    lost: set[int] = field(default_factory=set)
    switch_s: float = 0.0  # fault -> the first frame after which every frame went to the survivor
    failsafe_s: float = 0.0  # fault -> the bridge has failed safe every lost frame
    parity_a: set[int] = field(default_factory=set)  # seq % 2 of A's frames before the fault

    def line(self, curve: bool) -> str:
        return (f"failover {self.kind} curve={'on' if curve else 'off'}: switch {self.switch_s:.3f} s, lost "
                f"{len(self.lost)} (bound {LOST_BOUND}) {sorted(self.lost)}, all failed safe "
                f"{self.failsafe_s:.2f} s after the fault")


@dataclass
class Outcome:
    """What one run measured: the camera's report, both faults, our verdict record and the bridge's report."""

    curve: bool
    camera: dict[str, Any]
    faults: list[Fault]
    by_agent: dict[str, set[int]]
    capture: dict[int, int]
    bridge: dict[str, Any]
    gap_seqs: set[int]
    survivor_counters: dict[str, int]
    invalid: list[str]  # messages our subscriber could not decode
    collateral: set[int]  # lost outside any fault's window (a camera gave up a frozen survivor): still failed safe
    restart_ns: int  # when agent A was restarted after the kill (2**63: never)


def _start_agents(hosts: list[Host], tmp: Path, extra: dict[str, Any]) -> None:
    ip = _ip()
    assert ip is not None

    def start(host: Host) -> AgentProcess:
        settings = {"frames_endpoint": host.frames, "publish_endpoint": host.publish, "agent_id": host.agent_id,
                    **AGENT_SETTINGS, **extra}
        log = tmp / f"{host.agent_id}-{time.monotonic_ns()}.log"
        return testing.start_agent(log, settings, ready_timeout_s=120, prefix=[ip, "netns", "exec", host.ns])

    with ThreadPoolExecutor(len(hosts)) as pool:  # both load the model at once: half the wait
        futures = [(host, pool.submit(start, host)) for host in hosts]
        errors = []
        for host, future in futures:
            try:
                host.agent = future.result()
            except Exception as exc:  # the other agent is still recorded, so the fixture kills it
                errors.append(exc)
        if errors:
            raise errors[0]


def _send_ns(seq: int, capture: dict[int, int]) -> int:
    """When the camera sent `seq`: its own capture_ns, or extrapolated from the nearest seq that got a verdict."""
    nearest = min(capture, key=lambda s: abs(s - seq))
    return capture[nearest] + round((seq - nearest) * 1e9 / FPS)


def run_failover(hosts: list[Host], tmp: Path, keys: Keys | None, kinds: tuple[str, ...]) -> Outcome:
    """Stream to both agents and lose host A once per kind ("kill", then a restart; "link_down"); measure each."""
    a, b = hosts
    ip = _ip() or "ip"
    agent_curve: dict[str, Any] = {}
    camera_curve: list[str] = []
    bridge_curve: list[str] = []
    observer_keys = None
    if keys is not None:
        agent_curve = {"curve_enabled": "true", "curve_server_secret": keys.agent_secret,
                       "curve_allow_dir": keys.allow_dir}
        camera_curve = ["--curve-secret", str(keys.camera_secret), "--curve-server-key", str(keys.agent_public)]
        bridge_curve = ["--curve-secret", str(keys.bridge_secret), "--curve-server-key", str(keys.agent_public)]
        observer_keys = curve_client_keys(keys.bridge_secret, keys.agent_public)
    _start_agents(hosts, tmp, agent_curve)

    recorder = Recorder([a.publish, b.publish], observer_keys)
    recorder.start()
    bridge = Bridge([sys.executable, "-m", "simulators.plc_bridge", "--endpoint", a.publish, "--endpoint",
                     b.publish, "--first-seq", "0", "--timeout", "100", "--interval", "60",
                     "--report", str(tmp / "bridge.json"), *bridge_curve])
    camera: subprocess.Popen[str] | None = None
    faults: list[Fault] = []
    restart_ns = 2**63

    def a_streaming(since_ns: int, frames: int) -> bool:
        with recorder.lock:
            fresh = [s for s, vs in recorder.verdicts.items()
                     if vs[0].agent_id == a.agent_id and (vs[0].capture_ns or 0) > since_ns]
        return len(fresh) >= frames

    def highest() -> int:
        with recorder.lock:
            return max(recorder.verdicts, default=-1)

    try:
        wait_for(lambda: recorder.heartbeat(a.agent_id) and recorder.heartbeat(b.agent_id), 10,
                 "heartbeats from both agents through the veths")
        wait_for(lambda: len(bridge.events("agent_seen")) >= 2, 15, "the bridge hearing both agents")
        camera = subprocess.Popen(
            [sys.executable, "-m", "simulators.camera", "--endpoint", a.frames, "--endpoint", b.frames,
             "--camera-id", "cam1", "--sndhwm", str(CAMERA_SNDHWM), "--fps", str(FPS), "--quiet",
             "--report", str(tmp / "camera.json"),
             *camera_curve], text=True, stderr=subprocess.PIPE)
        wait_for(lambda: a_streaming(0, FAULT_AFTER_SEQ // 2) and highest() >= FAULT_AFTER_SEQ, 20,
                 f"verdicts from both agents up to seq {FAULT_AFTER_SEQ}")
        for kind in kinds:
            if kind == "kill":
                # The agent on host A crashes (SIGKILL; `ip netns exec` exec'd it, so this is its pid).
                faults.append(Fault("kill", time.time_ns(), time.monotonic()))
                assert a.agent is not None
                a.agent.kill()
                # systemd restarts it; the camera reconnects by itself (RECONNECT_IVL, up to RECONNECT_IVL_MAX).
                restart_ns = time.time_ns()
                _start_agents([a], tmp, agent_curve)
                wait_for(functools.partial(a_streaming, restart_ns, FAULT_AFTER_SEQ // 2), 20,
                         "the camera back on agent A")
            else:
                # Host A is unplugged: its agent keeps running, but nothing reaches it and nothing gets out.
                mono = time.monotonic()
                subprocess.run([ip, "-n", a.ns, "link", "set", "eth0", "down"], check=True, timeout=10)
                faults.append(Fault("link_down", time.time_ns(), mono))  # by now nothing crosses the link
        last = highest()
        wait_for(lambda: highest() >= last + FAULT_AFTER_SEQ + FPS, 20, "the survivor alone for a while")
        camera.send_signal(signal.SIGINT)
        _, err = camera.communicate(timeout=30)
        assert camera.returncode == 0, err
        cam = json.loads((tmp / "camera.json").read_text())

        # The survivor has published a verdict for every frame it took, and we hold every one of them.
        def survivor_done() -> Heartbeat | None:
            beat = recorder.heartbeat(b.agent_id)
            if beat is None or beat[0] < recorder.last_verdict_at:
                return None
            counters = beat[1].counters
            published = len(recorder.by_agent().get(b.agent_id, set()))
            return beat[1] if counters["received"] == counters["published"] == published else None

        survivor = wait_for(survivor_done, 10, "the survivor's last verdicts")
        seen = recorder.by_agent()
        lost = set(range(cam["attempted"])) - set().union(*seen.values())
        wait_for(lambda: set(bridge.gap_seqs()) >= lost, 10, f"the bridge failing safe seqs {sorted(lost)}")
        # An unplugged host goes silent: "agent lost" after 3 s. A killed one is usually back, with a new epoch,
        # before that: "agent restart" (also "lost" when the restart took longer than 3 s).
        wait_for(lambda: len(bridge.events("agent_lost")) >= kinds.count("link_down")
                 and len(bridge.events("agent_restart")) >= kinds.count("kill"), 6, "the bridge's alarms")
        gaps = bridge.gap_seqs()
    finally:
        if camera is not None and camera.poll() is None:
            camera.kill()
            camera.wait(5)
        bridge.stop()
        recorder.close()

    with recorder.lock:
        capture = {seq: vs[0].capture_ns for seq, vs in recorder.verdicts.items() if vs[0].capture_ns is not None}
    # Each fault's frames: from the previous restart (or the start) to the next one.
    edges = [0, *([restart_ns] if restart_ns < 2**63 else []), 2**63]
    for fault, (start_ns, end_ns) in zip(faults, itertools.pairwise(edges), strict=True):
        # What the fault took: sent from 1 s before it (queued to A when it died) to its switch deadline.
        window = (max(start_ns, fault.at_ns - 10**9), min(end_ns, fault.at_ns + round((SWITCH_TARGET_S + 0.5) * 1e9)))
        fault.lost = {s for s in lost if window[0] <= _send_ns(s, capture) < window[1]}
        if fault.lost:
            fault.switch_s = max(0.0, (_send_ns(max(fault.lost) + 1, capture) - fault.at_ns) / 1e9)
            fault.failsafe_s = max(gaps[s] for s in fault.lost) - fault.at_mono
        # A's frames once both connections were up (after the first frame each got in this span) until the fault.
        span = {agent: sorted(s for s in seqs if start_ns <= capture[s] < fault.at_ns) for agent, seqs in seen.items()}
        if span.get(a.agent_id) and span.get(b.agent_id):
            both_up = max(span[a.agent_id][0], span[b.agent_id][0])
            fault.parity_a = {s % 2 for s in span[a.agent_id] if s > both_up}
    return Outcome(keys is not None, cam, faults, seen, capture, json.loads((tmp / "bridge.json").read_text()),
                   set(gaps), dict(survivor.counters), recorder.invalid,
                   lost - set().union(*(f.lost for f in faults)), restart_ns)


def check(outcome: Outcome, survivor: str, victim: str) -> None:
    """The failover promises, each an assertion."""
    for fault in outcome.faults:
        print("\n" + fault.line(outcome.curve), end="")
    r = outcome.bridge
    print(f"\n  verdicts {dict((k, len(v)) for k, v in outcome.by_agent.items())}, bridge gaps {r['gaps']} "
          f"duplicates {r['duplicates']} late {r['late']}, agent_lost {r['agent_lost']} restarts "
          f"{r['agent_restarts']}; camera {outcome.camera['attempted']} frames, {outcome.camera['timed_out']} "
          f"timed out")
    if outcome.collateral:
        print(f"  also lost, outside the faults: {sorted(outcome.collateral)} (a survivor froze for over 1 s)")
    lost = set().union(outcome.collateral, *(f.lost for f in outcome.faults))
    assert len(outcome.collateral) <= LOST_BOUND
    assert outcome.camera["timed_out"] == 0, "the camera itself dropped frames"
    assert not outcome.invalid and not r["protocol_errors"], (outcome.invalid, r["protocol_errors"])
    # The lost frames are exactly the ones the bridge failed safe, each once; no verdict was counted twice.
    assert outcome.gap_seqs == lost, (sorted(outcome.gap_seqs), sorted(lost))
    assert r["gaps"] == len(lost) and r["pending"] == 0
    assert r["duplicates"] == 0 and r["late"] == 0
    assert r["verdicts"] == outcome.camera["attempted"] - len(lost) == sum(map(len, outcome.by_agent.values()))
    kinds = [f.kind for f in outcome.faults]
    assert r["agent_lost"] >= kinds.count("link_down") and r["agent_restarts"] == kinds.count("kill")
    assert r["agents"][victim]["lost"] and not r["agents"][survivor]["lost"]
    # Shed verdicts are answers too (B may shed while A's restart loads the CPU); nothing is refused.
    assert outcome.survivor_counters["rejected"] == 0
    victim_seqs, survivor_seqs = outcome.by_agent[victim], outcome.by_agent[survivor]
    # After a kill, the survivor is alone until the restarted agent answers its first frame.
    back_ns = min((t for s, t in outcome.capture.items() if s in outcome.by_agent[victim] and t > outcome.restart_ns),
                  default=2**63)
    untils = [back_ns if f.kind == "kill" else 2**63 for f in outcome.faults]
    for fault, until in zip(outcome.faults, untils, strict=True):
        # The lost host answered nothing sent after its fault; every frame after the switch went to the survivor.
        after = [s for s, t in outcome.capture.items() if fault.at_ns < t < until]
        assert not [s for s in after if s in victim_seqs], f"{fault.kind}: the lost host answered after the fault"
        switched = [s for s in after if outcome.capture[s] > fault.at_ns + fault.switch_s * 1e9]
        assert len(switched) >= FPS and set(switched) <= survivor_seqs
        # The frames lost all died with host A: the camera dealt round-robin, and they carry A's parity.
        assert len(fault.parity_a) == 1, f"{fault.kind}: frames did not alternate between the agents"
        assert {s % 2 for s in fault.lost} <= fault.parity_a, sorted(fault.lost)
        assert len(fault.lost) <= LOST_BOUND
        assert fault.switch_s <= SWITCH_TARGET_S, f"{fault.kind}: the switch took {fault.switch_s:.2f} s"


class TestFailover:
    """One camera and one bridge on agents A and B; host A is lost twice mid-stream and B takes over each time."""

    def test_kill_then_link_down(self, hosts: list[Host], tmp_path: Path) -> None:
        """SIGKILL of agent A, its restart, then host A unplugged: B takes over within 2 s, lost frames fail safe."""
        outcome = run_failover(hosts, tmp_path, None, ("kill", "link_down"))
        check(outcome, hosts[1].agent_id, hosts[0].agent_id)
        assert hosts[0].agent is not None and hosts[0].agent.alive(), "agent A should still run, unreachable"

    def test_link_down_curve(self, hosts: list[Host], tmp_path: Path) -> None:
        """Host A unplugged with CurveZMQ on every socket (heartbeats run inside CURVE): the same promises."""
        outcome = run_failover(hosts, tmp_path, make_keys(tmp_path / "keys"), ("link_down",))
        check(outcome, hosts[1].agent_id, hosts[0].agent_id)
