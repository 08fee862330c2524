"""MQTT output (paho-mqtt 2.x): verdicts QoS 1, retained camera and bridge status, bounded outage buffer."""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from protocol import is_valid_id
from simulators.common import check_private, read_private
from simulators.plc.results import BridgeStatus, CameraStatus, FailSafeEvent, Update

DEFAULT_LINE_ID = "line1"
DEFAULT_BUFFER = 100_000  # verdict messages held across a broker outage (not yet acknowledged by the broker)
CONNECTED_HEADROOM = 4  # while connected, up to this many times the buffer may await PUBACKs
OFFLINE = json.dumps({"state": "offline"})
# json.dumps with any argument builds a new encoder for every call; one for every verdict message.
_compact_json = json.JSONEncoder(separators=(",", ":")).encode
_PUBACK_OK = mqtt.ReasonCode(mqtt.PacketTypes.PUBACK)  # what paho hands on_publish for a 3.1.1 PUBACK
_NO_PROPERTIES = mqtt.Properties(mqtt.PacketTypes.PUBACK)

log = logging.getLogger("tdn.plc.mqtt")


class MqttConfigError(Exception):
    """The MQTT settings are inconsistent, or a credentials file is unsafe or malformed."""


def read_credentials(path: Path) -> tuple[str, str]:
    """(username, password) from a file of two lines; it must not be readable by group/other."""
    try:
        lines = read_private(path, "credentials file").splitlines()
    except ValueError as exc:
        raise MqttConfigError(str(exc)) from None
    if len(lines) < 2 or not lines[0]:
        raise MqttConfigError(f"credentials file {path}: expected a username line and a password line")
    return lines[0], lines[1]


@dataclass
class MqttConfig:
    """Settings of the MQTT output."""

    url: str
    line_id: str = DEFAULT_LINE_ID
    credentials: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    buffer: int = DEFAULT_BUFFER
    client_id: str | None = None
    keepalive: int = 10


def topics(line_id: str, camera_id: str | None = None) -> dict[str, str]:
    """The topic tree: tdn/<line>/<camera>/verdict and /status, tdn/<line>/bridge/status."""
    base = f"tdn/{line_id}"
    out = {"bridge_status": f"{base}/bridge/status"}
    if camera_id is not None:
        out["verdict"] = f"{base}/{camera_id}/verdict"
        out["status"] = f"{base}/{camera_id}/status"
    return out


class ReadAheadClient(mqtt.Client):
    """A paho client that makes fewer system calls at line rate: it reads what the socket holds in one call and serves
    paho's small reads from it, and it wakes paho's network thread once for a batch of publishes.

    paho reads every packet as recv(1), recv(1), recv(rest): three system calls for each 4-byte PUBACK, the largest
    cost of its network thread at 5,000 verdicts/s. Bytes read ahead are dropped with the socket they came from. And
    each publish from another thread writes a byte to paho's wake-up socket; inside `batch()` the packets are queued
    as paho queues them and the byte is written once at the end. (paho 2.2.0's private methods: the version is
    pinned in the [plc] extra.)"""

    _READ_AHEAD = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._rbuf = b""  # before paho's __init__: it may close sockets, which clears this
        self._rpos = 0
        self._batching = False
        self._wake_owed = False
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Publishes inside wake the network thread once, when the block ends."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            if self._wake_owed:
                self._wake_owed = False
                wake = self._sockpairW
                if wake is not None:
                    with contextlib.suppress(OSError):  # full of wake-ups already, or closed by a reconnect
                        wake.send(mqtt.sockpair_data)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: mqtt.MQTTMessageInfo | None = None) -> mqtt.MQTTErrorCode:
        if not self._batching or self._thread is None or self._on_socket_register_write is not None:
            return super()._packet_queue(command, packet, mid, qos, info)
        # paho's own queuing in threaded mode, without the wake-up byte (batch() writes one at the end)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet),
                                 "packet": packet, "info": info})
        self._wake_owed = True
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(self._READ_AHEAD)  # BlockingIOError / OSError as paho expects them
            if not data:
                return data  # the broker closed the connection
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        out = self._rbuf[self._rpos:end]
        self._rpos = min(end, len(self._rbuf))
        return out

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> mqtt.MQTTErrorCode:
        # paho decodes every PUBACK into a new ReasonCode and Properties, which MQTT 3.1.1 does not have: about
        # half of its network thread's Python work at 4,000/s (py-spy --gil). A 3.1.1 PUBACK is the packet id
        # alone; anything else (a PUBCOMP, MQTT 5, a malformed length) takes paho's path, which raises as paho does.
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self._protocol != mqtt.MQTTv311 or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_OK, _NO_PROPERTIES)
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # paho stops after as many packets as it has messages in flight; what is left here would otherwise wait
        # for the socket's next readable event (a PINGRESP left behind could even cost the connection).
        while rc == mqtt.MQTT_ERR_SUCCESS and self._rpos < len(self._rbuf) and self._sock is not None:
            rc = super().loop_read(max_packets)
        return rc


class MqttOutput:
    """A paho client on its own network thread; verdicts beyond the in-flight bound are dropped and counted."""

    name = "mqtt"

    def __init__(self, cfg: MqttConfig) -> None:
        if not is_valid_id(cfg.line_id):
            raise MqttConfigError(f"invalid line id {cfg.line_id!r}")
        url = urlparse(cfg.url)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            raise MqttConfigError(f"MQTT url {cfg.url!r}: expected mqtt://HOST:PORT or mqtts://HOST:PORT")
        if url.username or url.password:
            raise MqttConfigError("MQTT credentials go in --mqtt-credentials FILE, never in the url")
        self.cfg = cfg
        self.host = url.hostname
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        client_id = cfg.client_id or f"tdn-bridge-{cfg.line_id}"
        self.client = ReadAheadClient(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=True)
        if cfg.credentials is not None:
            self.client.username_pw_set(*read_credentials(cfg.credentials))
        if self.tls:
            self._set_tls(cfg)
        elif cfg.ca_file or cfg.cert_file or cfg.key_file:
            raise MqttConfigError("MQTT TLS files given but the url is mqtt://; use mqtts://")
        self.bridge_topic = topics(cfg.line_id)["bridge_status"]
        self.client.will_set(self.bridge_topic, OFFLINE, qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)  # paho backs off exponentially between these
        # 0: no paho window. Ours (the buffer bound below) applies; paho's rescans every message in flight on every
        # PUBACK (_update_inflight), which at 1,000 in flight took most of its thread at 5,000 verdicts/s.
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)  # our own bound below applies to verdicts; status always goes
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = self._on_connect_fail
        self._lock = threading.Lock()
        self._unacked: set[int] = set()
        self._early: set[int] = set()
        self._status_mids: set[int] = set()  # retained statuses awaiting their PUBACK
        self.connected = threading.Event()
        self.sent = 0
        self.acked = 0
        self.dropped = 0
        self.connects = 0
        self.disconnects = 0
        self.refused = 0  # CONNACKs refusing us (a wrong password, an ACL)
        self.connect_errors = 0  # attempts that failed before MQTT: TCP refused, TLS verification failed...
        self.last_error = ""
        self._bridge: BridgeStatus | None = None
        self._cameras: dict[str, CameraStatus] = {}
        self._last_event: FailSafeEvent | None = None

    def _set_tls(self, cfg: MqttConfig) -> None:
        """TLS with the server certificate verified (against --mqtt-ca, else the system CAs) and its name checked."""
        if cfg.key_file and not cfg.cert_file:
            raise MqttConfigError("--mqtt-key needs --mqtt-cert (the client certificate it belongs to)")
        for option, path in (("--mqtt-ca", cfg.ca_file), ("--mqtt-cert", cfg.cert_file), ("--mqtt-key", cfg.key_file)):
            if path is not None:
                try:
                    path.open("rb").close()
                except OSError as exc:
                    raise MqttConfigError(f"{option} {path}: {exc.strerror}") from None
        if cfg.key_file is not None:
            # A private key others can read is a credential already leaked: refused like the password file.
            try:
                check_private(cfg.key_file, "--mqtt-key")
            except ValueError as exc:
                raise MqttConfigError(str(exc)) from None
        try:
            self.client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                                keyfile=str(cfg.key_file) if cfg.key_file else None,
                                cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: not PEM, a key that does not match
            files = ", ".join(str(f) for f in (cfg.ca_file, cfg.cert_file, cfg.key_file) if f)
            raise MqttConfigError(f"MQTT TLS files {files}: {exc}") from None

    def _failed(self, what: str, detail: str, hint: str) -> None:
        """A connection attempt that did not make it: counted, kept for the report, and logged (paho retries it)."""
        with self._lock:
            self.last_error = f"{what}: {detail}"
        log.warning("MQTT broker %s:%d %s: %s%s", self.host, self.port, what, detail, hint)

    # -- paho thread --

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            with self._lock:
                self.refused += 1
            auth = getattr(reason, "value", None) in (134, 135)  # bad user name or password, not authorized
            self._failed("refused the connection", str(reason),
                         " (check --mqtt-credentials and the broker's password file)" if auth else "")
            return
        self.connects += 1
        self.connected.set()
        # A fresh session: the broker may have restarted, so the retained states are published again.
        self._publish_status(force_cameras=True)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError` around the attempt, without the error: take it from there.
        exc = sys.exc_info()[1]
        with self._lock:
            self.connect_errors += 1
        hint = (" (check --mqtt-ca, and that the broker's certificate names the url's host)"
                if isinstance(exc, ssl.SSLCertVerificationError) else "")
        self._failed("cannot connect", str(exc) if exc is not None else "connection failed", hint)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.connected.is_set():  # paho also calls this after a refused CONNACK: that was never a connection
            self.disconnects += 1
        self.connected.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self.acked += 1
            elif mid in self._status_mids:
                self._status_mids.discard(mid)
            else:
                self._early.add(mid)  # PUBACK before deliver() recorded the mid (another thread)

    # -- bridge thread --

    def start(self) -> None:
        """Connect in the background (the bridge serves its other outputs while the broker is away)."""
        self.client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()

    def deliver(self, update: Update) -> None:
        """Publish the update's verdicts (QoS 1) and changed statuses (retained)."""
        with self.client.batch():
            self._publish_results(update)
        self._publish_states(update)

    def _publish_results(self, update: Update) -> None:
        for r in update.results:
            with self._lock:
                # The bound is for an outage; a connected broker gets headroom for bursts, but not without limit.
                limit = self.cfg.buffer if not self.connected.is_set() else CONNECTED_HEADROOM * self.cfg.buffer
                if len(self._unacked) >= limit:
                    self.dropped += 1  # over the bound: counted, and published in the bridge status
                    continue
            payload = _compact_json(r.to_dict())
            info = self.client.publish(f"tdn/{self.cfg.line_id}/{r.camera_id}/verdict", payload, qos=1)
            with self._lock:
                if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                    self.dropped += 1
                    continue
                self.sent += 1
                if info.mid in self._early:
                    self._early.discard(info.mid)
                    self.acked += 1
                else:
                    self._unacked.add(info.mid)

    def _publish_states(self, update: Update) -> None:
        for cam in update.cameras:
            old = self._cameras.get(cam.camera_id)
            self._cameras[cam.camera_id] = cam
            if old is None or (old.fail_safe, old.reasons, old.agent_lost) != (cam.fail_safe, cam.reasons,
                                                                               cam.agent_lost):
                self._camera_status(cam)
        if update.events:
            self._last_event = update.events[-1]
        old_bridge, self._bridge = self._bridge, update.bridge
        if old_bridge is None or update.events or (old_bridge.state, old_bridge.agents_up) != (
                update.bridge.state, update.bridge.agents_up):
            self._bridge_status()

    def _camera_status(self, cam: CameraStatus) -> None:
        body = {**cam.to_dict(), "time_ns": time.time_ns()}
        self._retained(topics(self.cfg.line_id, cam.camera_id)["status"], json.dumps(body))

    def _bridge_status(self) -> None:
        b = self._bridge
        with self._lock:
            buffered, dropped = len(self._unacked), self.dropped
        body: dict[str, Any] = {"state": b.state if b else "starting", "time_ns": time.time_ns(),
                                "dropped": dropped, "buffered": buffered}
        if b is not None:
            body.update(total=b.total, agents_up=b.agents_up, agents=b.agents, cameras=b.cameras,
                        fail_safe=b.fail_safe)
        if self._last_event is not None:
            e = self._last_event
            body["last_event"] = {"kind": e.kind, "subject": e.subject, "detail": e.detail,
                                  "cameras": list(e.cameras), "time_ns": e.time_ns}
        self._retained(self.bridge_topic, json.dumps(body))

    def _retained(self, topic: str, body: str) -> None:
        """Publish a retained status, but only while connected: paho sends what it queued offline after whatever
        _on_connect publishes, so an offline status would overwrite the fresh one at the broker with a stale one.
        (The state is stored before this check, and _on_connect reads it after setting `connected`: none is lost.)"""
        if not self.connected.is_set():
            return
        info = self.client.publish(topic, body, qos=1, retain=True)
        with self._lock:
            if info.mid in self._early:
                self._early.discard(info.mid)  # already acknowledged (PUBACK on the paho thread came first)
            else:
                self._status_mids.add(info.mid)

    def _publish_status(self, force_cameras: bool = False) -> None:
        self._bridge_status()
        if force_cameras:
            for cam in list(self._cameras.values()):
                self._camera_status(cam)

    def stop(self) -> None:
        """Say offline (retained), let queued messages go for up to 5 s, disconnect."""
        self.client.publish(self.bridge_topic, OFFLINE, qos=1, retain=True)
        deadline = time.monotonic() + 5
        while self.connected.is_set() and time.monotonic() < deadline:
            with self._lock:
                if not self._unacked:
                    break
            time.sleep(0.05)
        time.sleep(0.1)
        self.client.disconnect()
        self.client.loop_stop()

    def stats(self) -> dict[str, Any]:
        """Counters for the bridge report."""
        with self._lock:
            return {"sent": self.sent, "acked": self.acked, "buffered": len(self._unacked), "dropped": self.dropped,
                    "connects": self.connects, "disconnects": self.disconnects, "refused": self.refused,
                    "connect_errors": self.connect_errors, "last_error": self.last_error}
