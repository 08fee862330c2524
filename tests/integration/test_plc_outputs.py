"""The bridge's OPC UA, Modbus/TCP and MQTT outputs, read by independent clients: asyncua, mbpoll, mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from asyncua.common.events import get_filter_from_event_type
from asyncua.crypto import cert_gen
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulators.plc.opcua import NAMESPACE, hash_password
from simulators.plc.synthetic import SyntheticAgent, make_verdict
from tests.conftest import free_port

pytestmark = pytest.mark.integration

LOCAL = "127.0.0.1"
# asyncua's client probes the server every second and drops the session on a slow answer; CI machines are busy.
UA_WATCHDOG_S = 30.0
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"  # Debian installs it in sbin


def wait_for(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll cond() until truthy (returned) or fail after timeout: the hang guard of every wait here.

    A client error while polling (a node not created yet, a server still starting) counts as not yet.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except (TimeoutError, ua.UaError, OSError, AssertionError) as exc:
            last = exc
        if last and not isinstance(last, BaseException):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOCAL, port)) == 0


# --- mosquitto ---


class Broker:
    """A real mosquitto on a free loopback port, with persistence so a restart keeps queued QoS-1 messages."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / "mosquitto"
        self.dir.mkdir(exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} {LOCAL}\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {self.dir}/\nmax_queued_messages 100000\n"
                             f"log_dest file {self.dir}/log\n"
                             # As root mosquitto would switch to its own user, which cannot write in tmp_path.
                             + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # SIGTERM: mosquitto saves its persistence file
            self.proc.wait(10)
        wait_for(lambda: not port_open(self.port), 5, "mosquitto to close its port")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A mosquitto started for the test and stopped after it."""
    b = Broker(tmp_path)
    yield b
    while _SUBSCRIBERS:
        _SUBSCRIBERS.pop().close()
    if b.proc is not None and b.proc.poll() is None:
        b.proc.kill()
        b.proc.wait(10)


class Subscriber:
    """mosquitto_sub on a topic filter at QoS 1, its lines collected by a thread as (qos, topic, payload)."""

    def __init__(self, port: int, topic: str, *, client_id: str | None = None) -> None:
        cmd = ["mosquitto_sub", "-h", LOCAL, "-p", str(port), "-t", topic, "-q", "1", "-F", "%q %t %p"]
        if client_id:
            cmd += ["-i", client_id, "-c"]  # persistent session: the broker queues for it while it is away
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        _SUBSCRIBERS.append(self)  # stopped by the broker fixture even when the test fails
        self.lines: list[tuple[int, str, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            qos, topic, payload = line.rstrip("\n").split(" ", 2)
            self.lines.append((int(qos), topic, payload))

    def on(self, topic: str) -> list[tuple[int, str, str]]:
        return [x for x in list(self.lines) if x[1] == topic]

    def verdict_seqs(self, topic: str) -> set[int]:
        return {json.loads(p)["seq"] for _, t, p in list(self.lines) if t == topic}

    def last_json(self, topic: str) -> dict[str, Any] | None:
        msgs = self.on(topic)
        return json.loads(msgs[-1][2]) if msgs and msgs[-1][2].startswith("{") else None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


_SUBSCRIBERS: list[Subscriber] = []


# --- Modbus (mbpoll) ---


def mbpoll_read(port: int, start: int, count: int) -> list[int]:
    """Holding registers start..start+count-1 of unit 1, read once by mbpoll (16-bit, hex display)."""
    out = subprocess.run(["mbpoll", "-m", "tcp", "-a", "1", "-0", "-1", "-o", "2", "-t", "4:hex", "-r", str(start),
                          "-c", str(count), "-p", str(port), LOCAL], capture_output=True, text=True, timeout=20)
    values = [int(v, 16) for v in re.findall(r"^\[\d+\]:\s+0x([0-9A-Fa-f]+)", out.stdout, re.M)]
    assert len(values) == count, f"mbpoll read failed: {out.stdout[-500:]} {out.stderr[-500:]}"
    return values


def mbpoll_u32(port: int, start: int) -> int:
    """A 32-bit register pair read by mbpoll as one integer, high word first (-B)."""
    out = subprocess.run(["mbpoll", "-m", "tcp", "-a", "1", "-0", "-1", "-o", "2", "-t", "4:int", "-B", "-r",
                          str(start), "-c", "1", "-p", str(port), LOCAL], capture_output=True, text=True, timeout=20)
    found = re.findall(r"^\[\d+\]:\s+(-?\d+)", out.stdout, re.M)
    assert found, f"mbpoll read failed: {out.stdout[-500:]}"
    return int(found[0])


def mbpoll_write(port: int, address: int, *values: int) -> subprocess.CompletedProcess[str]:
    """Write holding registers with mbpoll; returncode != 0 when the server answered an exception."""
    return subprocess.run(["mbpoll", "-m", "tcp", "-a", "1", "-0", "-1", "-o", "2", "-t", "4", "-r", str(address),
                           "-p", str(port), LOCAL, *map(str, values)], capture_output=True, text=True, timeout=20)


# --- OPC UA (asyncua client) ---


async def _read(url: str, names: list[str], client: Client | None = None) -> dict[str, Any]:
    c = client or Client(url, watchdog_intervall=UA_WATCHDOG_S)
    async with c:
        idx = await c.get_namespace_index(NAMESPACE)
        return {n: await c.get_node(f"ns={idx};s={n}").read_value() for n in names}


def ua_read(url: str, *names: str) -> dict[str, Any]:
    """Values of our nodes by string id (e.g. Cameras/cam1/ResultCounter), over a fresh anonymous session."""
    return asyncio.run(_read(url, list(names)))


# --- the bridge ---


class Bridge:
    """`tdn plc-bridge` as a subprocess with the outputs asked for."""

    def __init__(self, tmp: Path, endpoint: str, *args: str, opcua: bool = True, modbus: bool = True,
                 mqtt_port: int | None = None, timeout: float = 120) -> None:
        self.opcua_port = free_port() if opcua else None
        self.modbus_port = free_port() if modbus else None
        self.report = tmp / "bridge.json"
        self.log = tmp / "bridge.log"
        cmd = [sys.executable, "-m", "simulators.plc_bridge", "--endpoint", endpoint, "--quiet", "--timeout",
               str(timeout), "--report", str(self.report), *args]
        if self.opcua_port:
            cmd += ["--opcua-endpoint", self.opcua_url]
        if self.modbus_port:
            cmd += ["--modbus-endpoint", f"{LOCAL}:{self.modbus_port}"]
        if mqtt_port:
            cmd += ["--mqtt-url", f"mqtt://{LOCAL}:{mqtt_port}"]
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        for port in (self.opcua_port, self.modbus_port):
            if port:
                wait_for(lambda p=port: port_open(p) or self.proc.poll() is not None, 30, "bridge to listen")
                assert self.proc.poll() is None, self.log.read_text()

    @property
    def opcua_url(self) -> str:
        return f"opc.tcp://{LOCAL}:{self.opcua_port}"

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.log.read_text()[-3000:]
        return json.loads(self.report.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def bridges() -> Iterator[list[Bridge]]:
    """Bridges a test starts, killed at teardown if still running."""
    started: list[Bridge] = []
    yield started
    for b in started:
        b.kill()


@pytest.fixture
def synth() -> Iterator[Callable[..., SyntheticAgent]]:
    """Synthetic agents (ZeroMQ PUB + heartbeats) closed at teardown."""
    made: list[SyntheticAgent] = []

    def make(**kw: Any) -> SyntheticAgent:
        a = SyntheticAgent(f"tcp://{LOCAL}:{free_port()}", **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


class TestEndToEnd:
    """The real agent and camera through the bridge to all three outputs."""

    def test_360_frames_reach_opcua_modbus_and_mqtt(self, start_agent: Any, broker: Broker, bridges: list[Bridge],
                                                   tmp_path: Path) -> None:
        """360 frames: asyncua reads ResultCounter 360, mbpoll reads HR 0-1 = 360, mosquitto_sub gets 360 QoS-1."""
        agent = start_agent()
        sub = Subscriber(broker.port, "tdn/line1/#")
        bridge = Bridge(tmp_path, agent.publish, "--camera", "cam1", mqtt_port=broker.port)
        bridges.append(bridge)
        assert bridge.modbus_port and bridge.opcua_port
        wait_for(lambda: sub.on("tdn/line1/bridge/status"), 15, "retained bridge status")
        # Start-up is a fail-safe condition: the configured camera is fail-safe until its first verdict.
        start = ua_read(bridge.opcua_url, "Cameras/cam1/FailSafe", "Cameras/cam1/FailSafeReason")
        assert start == {"Cameras/cam1/FailSafe": True, "Cameras/cam1/FailSafeReason": "startup"}
        wait_for(lambda: mbpoll_read(bridge.modbus_port, 4, 1)[0] >= 1, 15, "agent heartbeat at the bridge")
        cams = subprocess.run([sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames, "--count",
                               "360", "--fps", "60", "--quiet"], capture_output=True, text=True, timeout=120)
        assert cams.returncode == 0, cams.stderr
        topic = "tdn/line1/cam1/verdict"
        wait_for(lambda: len(sub.verdict_seqs(topic)) >= 360, 60, "360 MQTT verdicts")
        values = ua_read(bridge.opcua_url, "Cameras/cam1/ResultCounter", "Cameras/cam1/FailSafe",
                         "Cameras/cam1/LastModelId", "Agents/agent1/State", "Bridge/TotalResults")
        assert values["Cameras/cam1/ResultCounter"] == 360
        assert values["Bridge/TotalResults"] == 360
        assert values["Cameras/cam1/FailSafe"] is False
        assert values["Cameras/cam1/LastModelId"]
        assert values["Agents/agent1/State"] == "ready"
        assert mbpoll_u32(bridge.modbus_port, 0) == 360
        hr = mbpoll_read(bridge.modbus_port, 0, 2)
        assert (hr[0] << 16) | hr[1] == 360
        cam_block = mbpoll_read(bridge.modbus_port, 16, 16)
        assert (cam_block[1] << 16 | cam_block[2]) == 360  # the camera's own counter
        assert cam_block[0] & 0b0100 == 0  # not fail-safe
        msgs = sub.on(topic)
        assert {q for q, _, _ in msgs} == {1}
        assert sub.verdict_seqs(topic) == set(range(360))
        first = json.loads(msgs[0][2])
        assert first["decision"] in ("pass", "divert", "review") and first["camera_id"] == "cam1"
        status = sub.last_json("tdn/line1/cam1/status")
        assert status is not None and status["fail_safe"] is False
        report = bridge.stop()
        assert report["verdicts"] == 360 and report["gaps"] == 0
        assert report["outputs"]["mqtt"]["dropped"] == 0
        # A clean stop leaves the retained bridge status saying offline.
        wait_for(lambda: (s := sub.last_json("tdn/line1/bridge/status")) and s["state"] == "offline", 10,
                 "offline bridge status after stop")
        sub.close()


class TestFailSafeEverywhere:
    """Killing the agent mid-stream turns fail-safe on in all three outputs within the documented timeout."""

    def test_agent_killed(self, start_agent: Any, broker: Broker, bridges: list[Bridge], tmp_path: Path) -> None:
        """SIGKILL the agent: OPC UA FailSafe, the Modbus fail-safe/agent-lost bits and the MQTT status all flip."""
        agent = start_agent()
        sub = Subscriber(broker.port, "tdn/line1/#")
        bridge = Bridge(tmp_path, agent.publish, "--camera", "cam1", "--heartbeat-timeout", "1.5",
                        mqtt_port=broker.port)
        bridges.append(bridge)
        assert bridge.modbus_port
        wait_for(lambda: mbpoll_read(bridge.modbus_port, 4, 1)[0] >= 1, 15, "agent heartbeat at the bridge")
        cams = subprocess.Popen([sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames, "--count",
                                 "3000", "--fps", "50", "--quiet"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: mbpoll_read(bridge.modbus_port, 0, 2)[1] >= 50, 30, "50 results before the kill")
            assert ua_read(bridge.opcua_url, "Cameras/cam1/FailSafe")["Cameras/cam1/FailSafe"] is False
            agent.proc.kill()
            killed = time.monotonic()
            # Documented: heartbeat timeout (1.5 s here, 3 s default) + 1 s propagation to every output.
            limit = 1.5 + 1.0 + 1.0  # + the poll period of these independent clients
            wait_for(lambda: ua_read(bridge.opcua_url, "Cameras/cam1/FailSafe")["Cameras/cam1/FailSafe"], limit,
                     "OPC UA FailSafe")
            t_ua = time.monotonic() - killed
            block = wait_for(lambda: (b := mbpoll_read(bridge.modbus_port, 16, 1))[0] & 0b1100 == 0b1100 and b,
                             limit, "Modbus fail-safe + agent-lost bits")
            assert block[0] & 0b0001 == 0  # not ready
            assert mbpoll_read(bridge.modbus_port, 2, 1)[0] & 0b1000  # bridge: no agent up
            status = wait_for(lambda: (s := sub.last_json("tdn/line1/cam1/status")) and s["fail_safe"]
                              and s["agent_lost"] and s, limit, "MQTT camera status fail-safe")
            assert "agent_lost" in status["reasons"]
            reason = ua_read(bridge.opcua_url, "Cameras/cam1/FailSafeReason")["Cameras/cam1/FailSafeReason"]
            assert "agent_lost" in reason
            bstatus = sub.last_json("tdn/line1/bridge/status")
            assert bstatus is not None and bstatus["state"] == "fail_safe" and bstatus["agents_up"] == 0
            assert t_ua <= limit
        finally:
            cams.kill()
            cams.wait(10)
        # The bridge dying (no clean disconnect) makes the broker publish its last will.
        bridge.kill()
        wait_for(lambda: (s := sub.last_json("tdn/line1/bridge/status")) and s["state"] == "offline", 10,
                 "last-will offline status")
        sub.close()


def _users_file(tmp: Path) -> Path:
    users = tmp / "users"
    users.write_text(f"op:operator:{hash_password('op-secret')}\nvi:viewer:{hash_password('vi-secret')}\n")
    users.chmod(0o600)
    return users


async def _call_ack(url: str, cam: str, seq: int, user: str | None = None, password: str | None = None) -> Any:
    c = Client(url, watchdog_intervall=UA_WATCHDOG_S)
    if user:
        c.set_user(user)
        c.set_password(password or "")
    async with c:
        idx = await c.get_namespace_index(NAMESPACE)
        obj = c.get_node(f"ns={idx};s=Cameras/{cam}")
        return await obj.call_method(f"{idx}:Acknowledge", ua.Variant(seq, ua.VariantType.UInt64))


class TestAcknowledgeHandshake:
    """The per-camera result queue: full is fail-safe, Acknowledge(seq) by an operator clears it."""

    def test_full_queue_fails_safe_and_ack_clears(self, synth: Any, bridges: list[Bridge], tmp_path: Path) -> None:
        """4 unacknowledged results fill a 4-deep queue (FailSafe, ack_queue_full); operator acks clear it."""
        agent = synth()
        bridge = Bridge(tmp_path, agent.endpoint, "--opcua-ack-queue", "4", "--opcua-users",
                        str(_users_file(tmp_path)), modbus=False)
        bridges.append(bridge)
        url = bridge.opcua_url
        wait_for(lambda: ua_read(url, "Bridge/AgentsUp")["Bridge/AgentsUp"] == 1, 15, "synthetic agent seen")
        for seq in range(3):
            agent.send("cam1", seq)
        q = "Cameras/cam1/"
        wait_for(lambda: ua_read(url, q + "QueueLength")[q + "QueueLength"] == 3, 10, "3 queued")
        assert ua_read(url, q + "FailSafe")[q + "FailSafe"] is False
        agent.send("cam1", 3)
        got = wait_for(lambda: (v := ua_read(url, q + "FailSafe", q + "FailSafeReason", q + "QueueLength",
                                             q + "QueueOldestSeq"))[q + "FailSafe"] and v, 10, "queue-full FailSafe")
        assert got[q + "FailSafeReason"] == "ack_queue_full" and got[q + "QueueLength"] == 4
        assert got[q + "QueueOldestSeq"] == 0
        agent.send("cam1", 4)  # overflows: counted, and the camera stays fail-safe
        wait_for(lambda: ua_read(url, q + "QueueOverflow")[q + "QueueOverflow"] == 1, 10, "overflow counted")
        # Anonymous and viewer sessions may read but not acknowledge.
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            asyncio.run(_call_ack(url, "cam1", 1))
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            asyncio.run(_call_ack(url, "cam1", 1, "vi", "vi-secret"))
        with pytest.raises(ua.UaStatusCodeError):
            asyncio.run(_call_ack(url, "cam1", 1, "op", "wrong-password"))
        with pytest.raises(ua.UaStatusCodeError, match="BadInvalidArgument"):
            asyncio.run(_call_ack(url, "cam1", 99, "op", "op-secret"))  # not queued
        assert asyncio.run(_call_ack(url, "cam1", 1, "op", "op-secret")) == 2  # seqs 0 and 1 leave
        after = ua_read(url, q + "FailSafe", q + "FailSafeReason", q + "QueueLength", q + "QueueOldestSeq")
        assert after == {q + "FailSafe": False, q + "FailSafeReason": "", q + "QueueLength": 2, q + "QueueOldestSeq": 2}
        report = bridge.stop()
        stats = report["outputs"]["opcua"]
        assert stats["acks"] == 1 and stats["requests_denied"] >= 2 and stats["users_refused"] >= 1


async def _watch_events(url: str, agent: SyntheticAgent, n: int) -> tuple[list[Any], list[Any], list[Any]]:
    """Subscribe to ResultReady events of cam1 (every field, and a second time with three selected) and FailSafe
    events of the bridge, publish n verdicts, then go quiet."""

    class Handler:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def event_notification(self, event: Any) -> None:
            self.events.append(event)

    results, failsafes, few = Handler(), Handler(), Handler()
    async with Client(url, watchdog_intervall=UA_WATCHDOG_S) as c:
        idx = await c.get_namespace_index(NAMESPACE)
        types = ["0:Types", "0:EventTypes", "0:BaseEventType"]
        rtype = await c.nodes.root.get_child([*types, f"{idx}:ResultReadyEventType"])
        ftype = await c.nodes.root.get_child([*types, f"{idx}:FailSafeEventType"])
        sub = await c.create_subscription(20, results)
        await sub.subscribe_events(c.get_node(f"ns={idx};s=Cameras/cam1"), rtype, queuesize=10_000)
        # A PLC selects the fields it acts on: the server resolves each monitored item's own select clause.
        evfilter = await get_filter_from_event_type([rtype])
        evfilter.SelectClauses = [s for s in evfilter.SelectClauses
                                  if s.BrowsePath and s.BrowsePath[-1].Name in ("Seq", "ResultState", "EventId")]
        fewsub = await c.create_subscription(20, few)
        await fewsub.subscribe_events(c.get_node(f"ns={idx};s=Cameras/cam1"), rtype, evfilter=evfilter,
                                      queuesize=10_000)
        fsub = await c.create_subscription(20, failsafes)
        await fsub.subscribe_events(c.get_node(f"ns={idx};s=TinyDefectNet"), ftype, queuesize=100)
        for seq in range(n):
            agent.send("cam1", seq)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and min(len(results.events), len(few.events)) < n:
            await asyncio.sleep(0.1)
        agent.beating.clear()  # the bridge declares the agent lost: a FailSafe event
        while time.monotonic() < deadline + 10 and not any(e.Kind == "agent_lost" for e in failsafes.events):
            await asyncio.sleep(0.1)
    return results.events, failsafes.events, few.events


class TestOpcUaEvents:
    """Every result is an OPC UA ResultReady event; fail-safe events are FailSafe events."""

    def test_one_event_per_result(self, synth: Any, bridges: list[Bridge], tmp_path: Path) -> None:
        """200 verdicts -> 200 ResultReady events in seq order with their fields; agent lost -> a FailSafe event."""
        agent = synth()
        bridge = Bridge(tmp_path, agent.endpoint, "--camera", "cam1", "--heartbeat-timeout", "1", modbus=False)
        bridges.append(bridge)
        wait_for(lambda: ua_read(bridge.opcua_url, "Bridge/AgentsUp")["Bridge/AgentsUp"] == 1, 15, "agent seen")
        results, failsafes, few = asyncio.run(_watch_events(bridge.opcua_url, agent, 200))
        assert [e.Seq for e in results] == list(range(200))
        assert [e.ResultCounter for e in results] == list(range(1, 201))
        e = results[7]
        assert (e.CameraId, e.ResultId, e.PartId, e.Decision, e.ResultState) == ("cam1", "cam1:7", "cam1-7",
                                                                                 "divert", 2)
        assert e.ClassName == "inclusion" and e.ModelId == "synthetic" and e.PublishedNs > 0
        assert e.Confidence == pytest.approx(0.57) and e.AgentEpoch == 1
        # BaseEventType's own fields, as asyncua's checking constructor would have typed them.
        assert e.Severity == 100 and e.Message.Text == "cam1 seq 7 divert" and e.SourceName == "cam1"
        assert e.Time.tzinfo is not None and e.ReceiveTime >= e.Time
        ids = [r.EventId for r in results]
        assert all(isinstance(i, bytes) and len(i) == 8 for i in ids) and len(set(ids)) == 200
        # The PLC that selected three fields gets those, with the same values, for every result.
        assert [(f.Seq, f.ResultState, f.EventId) for f in few] == [(r.Seq, r.ResultState, r.EventId)
                                                                   for r in results]
        assert not hasattr(few[7], "PartId")
        lost = [f for f in failsafes if f.Kind == "agent_lost"]
        assert lost and lost[0].Subject == "synth" and lost[0].Cameras == "cam1"


async def _slow_client(url: str, agent: SyntheticAgent, n: int, queue: int) -> list[Any]:
    """A client with a small event queue and a long publishing interval: n results arrive between two publishes."""

    class Handler:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def event_notification(self, event: Any) -> None:
            self.events.append(event)

    got = Handler()
    async with Client(url, watchdog_intervall=UA_WATCHDOG_S) as c:
        idx = await c.get_namespace_index(NAMESPACE)
        rtype = await c.nodes.root.get_child(["0:Types", "0:EventTypes", "0:BaseEventType",
                                              f"{idx}:ResultReadyEventType"])
        sub = await c.create_subscription(3000, got)
        await sub.subscribe_events(c.get_node(f"ns={idx};s=Cameras/cam1"), rtype, queuesize=queue)
        for seq in range(n):
            agent.send("cam1", seq)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not got.events:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
    return got.events


class TestOpcUaEventDrops:
    """Events a slow client's queue cannot hold are counted, not lost without a trace."""

    def test_a_full_queue_is_counted(self, synth: Any, bridges: list[Bridge], tmp_path: Path) -> None:
        """50 results into a queue of 5 between two publishes: 5 delivered (the newest), 45 dropped, counted in
        Bridge/EventsDropped and in the report; a fast client meanwhile (the other tests) drops none."""
        agent = synth()
        bridge = Bridge(tmp_path, agent.endpoint, "--camera", "cam1", modbus=False)
        bridges.append(bridge)
        wait_for(lambda: ua_read(bridge.opcua_url, "Bridge/AgentsUp")["Bridge/AgentsUp"] == 1, 15, "agent seen")
        assert ua_read(bridge.opcua_url, "Bridge/EventsDropped")["Bridge/EventsDropped"] == 0
        events = asyncio.run(_slow_client(bridge.opcua_url, agent, 50, 5))
        assert [e.Seq for e in events] == list(range(45, 50))  # discard-oldest: the newest five remain
        wait_for(lambda: ua_read(bridge.opcua_url, "Bridge/EventsDropped")["Bridge/EventsDropped"] == 45, 5,
                 "the drop count")
        assert bridge.stop()["outputs"]["opcua"]["events_dropped"] == 45


class TestMqttReadAhead:
    """The MQTT output reads the broker's packets many to a system call, and loses none of them."""

    def test_every_puback_and_pingresp_handled(self, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        """2,000 QoS-1 verdicts in one update wake paho's thread once, are all acknowledged in far fewer socket
        reads without paho's PUBACK decoder, and keepalive holds while idle."""
        import paho.mqtt.client as mqtt

        from simulators.plc.mqtt import MqttConfig, MqttOutput
        from simulators.plc.results import ResultModel

        reads = [0]
        plain = mqtt.Client._sock_recv

        def counted(self: Any, bufsize: int) -> bytes:
            reads[0] += 1
            return plain(self, bufsize)

        monkeypatch.setattr(mqtt.Client, "_sock_recv", counted)
        decoded = [0]
        decode_puback = mqtt._packet.decode_puback  # type: ignore[attr-defined]

        def counted_decode(*args: Any) -> Any:
            decoded[0] += 1
            return decode_puback(*args)

        monkeypatch.setattr(mqtt._packet, "decode_puback", counted_decode)  # type: ignore[attr-defined]
        pings = [0]
        send_pingreq = mqtt.Client._send_pingreq

        def counted_ping(self: Any) -> Any:
            pings[0] += 1
            return send_pingreq(self)

        monkeypatch.setattr(mqtt.Client, "_send_pingreq", counted_ping)
        out = MqttOutput(MqttConfig(f"mqtt://{LOCAL}:{broker.port}", keepalive=1, client_id="read-ahead"))
        out.start()
        try:
            wait_for(out.connected.is_set, 10, "the MQTT output to connect")

            class CountedWake:
                """paho's wake-up socket, counting the bytes written to it."""

                def __init__(self, sock: socket.socket) -> None:
                    self.sock, self.sends = sock, 0

                def send(self, data: bytes) -> int:
                    self.sends += 1
                    return self.sock.send(data)

                def close(self) -> None:
                    self.sock.close()

            wake = CountedWake(out.client._sockpairW)  # type: ignore[arg-type]
            out.client._sockpairW = wake  # type: ignore[assignment]
            model = ResultModel(["cam1"], outputs=[out])
            for seq in range(2000):
                model.on_verdict(make_verdict("cam1", seq), "new")
            model.flush()
            wait_for(lambda: out.stats()["acked"] == 2000, 30, "2,000 PUBACKs")
            # The batch's one, the camera's and the bridge's retained statuses, and one per keepalive PINGREQ (1 s
            # keepalive: a busy host spends longer than that on the 2,000 PUBACKs).
            assert wake.sends <= 3 + pings[0], (wake.sends, pings[0])
            assert reads[0] < 1000  # paho alone: three reads a PUBACK
            assert decoded[0] == 0  # every 3.1.1 PUBACK took the packet-id path, none paho's decoder
            time.sleep(3.5)  # > 3 keepalives: each PINGRESP must be read, or paho drops the connection
            stats = out.stats()
            assert out.connected.is_set() and stats["disconnects"] == 0 and stats["dropped"] == 0
        finally:
            out.stop()


class TestBrokerRestart:
    """A broker outage mid-stream: the bounded buffer delivers what it held, and the overflow count is published."""

    def test_restart_within_and_over_the_bound(self, synth: Any, broker: Broker, bridges: list[Bridge],
                                               tmp_path: Path) -> None:
        """100 before, 120 during (bound 50: 70 dropped), 100 after: 250 delivered, dropped=70 published."""
        agent = synth()
        sub = Subscriber(broker.port, "tdn/line1/#", client_id="plant-historian")
        bridge = Bridge(tmp_path, agent.endpoint, "--mqtt-buffer", "50", opcua=False, mqtt_port=broker.port)
        bridges.append(bridge)
        assert bridge.modbus_port
        wait_for(lambda: mbpoll_read(bridge.modbus_port, 4, 1)[0] == 1, 15, "synthetic agent seen")
        topic = "tdn/line1/cam1/verdict"
        for seq in range(100):
            agent.send("cam1", seq)
        wait_for(lambda: len(sub.verdict_seqs(topic)) == 100, 20, "100 verdicts before the outage")
        broker.stop()
        for seq in range(100, 220):
            agent.send("cam1", seq)
        wait_for(lambda: mbpoll_read(bridge.modbus_port, 0, 2)[1] == 220, 10, "bridge took all 220")
        broker.start()
        wait_for(lambda: (s := sub.last_json("tdn/line1/bridge/status")) and s.get("dropped") == 70, 40,
                 "drop count published after the outage")
        for seq in range(220, 320):
            agent.send("cam1", seq)
        wait_for(lambda: len(sub.verdict_seqs(topic)) >= 250, 40, "buffered + later verdicts")
        seqs = sub.verdict_seqs(topic)
        assert set(range(100)) <= seqs and set(range(220, 320)) <= seqs
        assert seqs & set(range(100, 150)) == set(range(100, 150))  # the 50 within the bound came through
        assert not seqs & set(range(150, 220))  # the 70 over the bound were dropped, and said so
        report = bridge.stop()
        assert report["outputs"]["mqtt"]["dropped"] == 70
        assert report["outputs"]["mqtt"]["connects"] >= 2
        sub.close()


def _make_cert(tmp: Path, name: str, uri: str, server: bool = False, key_dir: Path | None = None) -> tuple[Path, Path]:
    key = cert_gen.generate_private_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")], [usage])
    cpath, kpath = tmp / f"{name}.der", (key_dir or tmp) / f"{name}.pem"
    cpath.write_bytes(cert.public_bytes(Encoding.DER))
    kpath.write_bytes(cert_gen.dump_private_key_as_pem(key))
    kpath.chmod(0o600)
    return cpath, kpath


async def _secure_read(url: str, cert: Path, key: Path, server_cert: Path, uri: str, user: str, password: str,
                       ack: bool = False) -> Any:
    c = Client(url, timeout=5, watchdog_intervall=UA_WATCHDOG_S)
    c.application_uri = uri
    c.set_user(user)
    c.set_password(password)
    await c.set_security(SecurityPolicyBasic256Sha256, str(cert), str(key), server_certificate=str(server_cert),
                         mode=ua.MessageSecurityMode.SignAndEncrypt)
    async with c:
        idx = await c.get_namespace_index(NAMESPACE)
        if ack:
            obj = c.get_node(f"ns={idx};s=Cameras/cam1")
            return await obj.call_method(f"{idx}:Acknowledge", ua.Variant(0, ua.VariantType.UInt64))
        return await c.get_node(f"ns={idx};s=Bridge/State").read_value()


class TestOpcUaSecurity:
    """Basic256Sha256 SignAndEncrypt with a trust directory: untrusted clients and role-less calls are refused."""

    def test_untrusted_certificate_and_missing_role_refused(self, synth: Any, bridges: list[Bridge],
                                                            tmp_path: Path) -> None:
        """A trusted client reads; an untrusted one is refused; a viewer's Acknowledge is denied; None is gone."""
        trust = tmp_path / "trusted"
        trust.mkdir()
        srv_cert, srv_key = _make_cert(tmp_path, "bridge", "urn:tinydefectnet:line:plc-bridge", server=True)
        good_cert, good_key = _make_cert(trust, "plc", "urn:test:plc", key_dir=tmp_path)  # trust dir: certs only
        bad_dir = tmp_path / "untrusted"
        bad_dir.mkdir()
        bad_cert, bad_key = _make_cert(bad_dir, "intruder", "urn:test:intruder")
        agent = synth()
        bridge = Bridge(tmp_path, agent.endpoint, "--camera", "cam1", "--opcua-cert", str(srv_cert), "--opcua-key",
                        str(srv_key), "--opcua-trust-dir", str(trust), "--opcua-users", str(_users_file(tmp_path)),
                        "--opcua-ack-queue", "2", modbus=False)
        bridges.append(bridge)
        url = bridge.opcua_url
        state = asyncio.run(_secure_read(url, good_cert, good_key, srv_cert, "urn:test:plc", "vi", "vi-secret"))
        assert state in ("starting", "ready", "fail_safe")
        with pytest.raises(Exception) as refused:
            asyncio.run(_secure_read(url, bad_cert, bad_key, srv_cert, "urn:test:intruder", "op", "op-secret"))
        assert "BadCertificate" in repr(refused.value) or "BadSecurityChecksFailed" in repr(refused.value) \
            or isinstance(refused.value, (ConnectionError, TimeoutError, asyncio.TimeoutError))
        with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
            asyncio.run(_secure_read(url, good_cert, good_key, srv_cert, "urn:test:plc", "vi", "vi-secret",
                                     ack=True))
        with pytest.raises(Exception):  # noqa: B017 - no None endpoint at all: asyncua fails to find/open it
            ua_read(url, "Bridge/State")
        report = bridge.stop()
        stats = report["outputs"]["opcua"]
        assert stats["security"] == "sign-encrypt"
        assert stats["certificates_refused"] >= 1 and stats["requests_denied"] >= 1

    def test_security_none_refused_off_loopback(self, tmp_path: Path) -> None:
        """Security None on a non-loopback address is a start-up error, not a silently open server."""
        out = subprocess.run([sys.executable, "-m", "simulators.plc_bridge", "--opcua-endpoint",
                              "opc.tcp://0.0.0.0:4840", "--timeout", "1", "--quiet"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2
        assert "only on loopback" in out.stderr


class TestModbusBadInput:
    """Read-only writes, garbage acks and malformed frames get exceptions and are counted; serving goes on."""

    def test_garbage_is_refused_and_counted(self, synth: Any, bridges: list[Bridge], tmp_path: Path) -> None:
        """Each bad request gets a Modbus exception (or is dropped if unframeable); a good ack still works after."""
        agent = synth()
        bridge = Bridge(tmp_path, agent.endpoint, "--camera", "cam1", opcua=False)
        bridges.append(bridge)
        port = bridge.modbus_port
        assert port
        wait_for(lambda: mbpoll_read(port, 4, 1)[0] == 1, 15, "synthetic agent seen")
        for seq in range(5):
            agent.send("cam1", seq)
        wait_for(lambda: mbpoll_read(port, 16, 3)[2] == 5, 10, "5 results in the camera block")
        assert mbpoll_read(port, 16, 1)[0] & 0b10  # new-result bit: not yet acknowledged
        refused = [
            mbpoll_write(port, 0, 1234),  # total counter: read-only
            mbpoll_write(port, 16 + 5, 2),  # decision register: read-only
            mbpoll_write(port, 16 + 8, 9),  # ack of a result that does not exist yet
            mbpoll_write(port, 16 + 16 + 8, 0),  # ack register of a camera slot not in use
        ]
        for res in refused:
            assert res.returncode != 0, res.stdout
        assert "Illegal data" in refused[0].stdout + refused[0].stderr
        # Raw frames mbpoll cannot send: an unsupported function, a read past the map, and pure garbage.
        with socket.create_connection((LOCAL, port), timeout=3) as s:
            s.sendall(bytes.fromhex("000100000006" "01" "01" "0000" "0008"))  # FC1 read coils
            assert s.recv(64)[7] == 0x81
            s.sendall(bytes.fromhex("000200000006" "01" "03" "FFF0" "0010"))  # FC3 beyond the map
            assert s.recv(64)[7:9] == bytes([0x83, 0x02])
            s.sendall(bytes.fromhex("000300000006" "01" "03" "0000" "0000"))  # FC3 count 0: malformed
            assert s.recv(64)[7] & 0x80  # an exception answer (pymodbus reports it under function 0)
        with socket.create_connection((LOCAL, port), timeout=3) as s:
            s.sendall(os.urandom(7) + b"\xff" * 64)  # not Modbus at all
            s.settimeout(1)
            with contextlib.suppress(TimeoutError, ConnectionError):
                s.recv(64)  # the server may answer or drop the connection; it must keep serving others
        exceptions = mbpoll_read(port, 6, 2)
        assert (exceptions[0] << 16 | exceptions[1]) >= 7
        ok = mbpoll_write(port, 16 + 8, 5)  # acknowledge the 5th result: the new-result bit clears
        assert ok.returncode == 0, ok.stdout
        assert mbpoll_read(port, 16, 1)[0] & 0b10 == 0
        agent.send("cam1", 5)
        wait_for(lambda: mbpoll_read(port, 16, 1)[0] & 0b10, 10, "new result after the ack")
        report = bridge.stop()
        stats = report["outputs"]["modbus"]
        assert stats["rejected"]["read_only"] == 2 and stats["rejected"]["bad_ack"] == 1
        assert stats["acks"] == 1
