"""OPC UA server output (asyncua): per-camera result variables, ResultReady events and an Acknowledge queue."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.common.node import Node
from asyncua.crypto.permission_rules import USER_TYPES, SimpleRoleRuleset, User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.user_managers import UserManager

from simulators.common import is_loopback
from simulators.plc import uabinary
from simulators.plc.results import (
    DECISION_CODES,
    AckQueue,
    AgentStatus,
    CameraStatus,
    FailSafeEvent,
    Result,
    ServerThread,
    Update,
)

NAMESPACE = "urn:tinydefectnet:line"
APPLICATION_URI = "urn:tinydefectnet:line:plc-bridge"
ROLE_OPERATOR = "operator"  # may call Acknowledge
ROLE_VIEWER = "viewer"  # may browse, read and subscribe
ROLES = (ROLE_OPERATOR, ROLE_VIEWER)
PBKDF2_ITERATIONS = 200_000

_CALL = ua.NodeId(ua.Int32(ua.ObjectIds.CallRequest_Encoding_DefaultBinary))
_WRITE = ua.NodeId(ua.Int32(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary))
_READ_IDS = frozenset(ua.NodeId(ua.Int32(t)) for t in USER_TYPES) - {_CALL, _WRITE}

log = logging.getLogger("tdn.plc.opcua")


class OpcUaConfigError(Exception):
    """The OPC UA settings are unsafe or inconsistent (e.g. security None off loopback)."""


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """A users-file password hash: pbkdf2_sha256$ITERATIONS$SALT_HEX$HASH_HEX."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, encoded: str) -> bool:
    """Whether password matches a hash_password() string (constant-time compare)."""
    try:
        algo, iterations, salt, digest = encoded.split("$")
        if algo != "pbkdf2_sha256":
            return False
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


@dataclass(frozen=True)
class UserEntry:
    """One line of the users file."""

    name: str
    role: str
    password_hash: str


def load_users(path: Path) -> dict[str, UserEntry]:
    """Parse a users file (`name:role:hash` lines, '#' comments); it must not be readable by group/other."""
    mode = path.stat().st_mode
    if mode & 0o077:
        raise OpcUaConfigError(f"users file {path} has mode {stat.S_IMODE(mode):04o}; run: chmod 600 {path}")
    users: dict[str, UserEntry] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or parts[1] not in ROLES or not parts[2].startswith("pbkdf2_sha256$"):
            raise OpcUaConfigError(f"{path}:{n}: expected name:{'|'.join(ROLES)}:pbkdf2_sha256$... (hash_password)")
        users[parts[0]] = UserEntry(parts[0], parts[1], parts[2])
    return users


class BridgeUserManager(UserManager):
    """Username/password sessions from the users file; anonymous ones only when allowed (loopback, read-only)."""

    def __init__(self, users: dict[str, UserEntry], allow_anonymous: bool) -> None:
        self.users = users
        self.allow_anonymous = allow_anonymous
        self.refused = 0

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        """The session's user, or None (BadUserAccessDenied)."""
        if username is None:
            if self.allow_anonymous:
                return User(role=UserRole.Anonymous)
            self.refused += 1
            return None
        entry = self.users.get(username)
        if entry is None or password is None or not check_password(password, entry.password_hash):
            self.refused += 1
            return None
        return User(role=UserRole.User, name=f"{entry.role}:{entry.name}")


class RoleRules(SimpleRoleRuleset):
    """Who may do what: reads for every session, Acknowledge (Call) for operators only, no client writes."""

    def __init__(self) -> None:
        super().__init__()
        self.denied = 0

    def check_validity(self, user: User | None, action_type_id: ua.NodeId, body: Any) -> bool:
        if user is None:
            return False
        if action_type_id == _CALL:
            ok = user.role is UserRole.User and (user.name or "").startswith(ROLE_OPERATOR + ":")
        else:
            ok = action_type_id in _READ_IDS
        if not ok:
            self.denied += 1
        return ok


@dataclass
class OpcUaConfig:
    """Settings of the OPC UA output."""

    endpoint: str
    security: str = "auto"  # none | sign-encrypt | auto (sign-encrypt when a certificate is given)
    cert: Path | None = None
    key: Path | None = None
    trust_dir: Path | None = None
    users: Path | None = None
    ack_queue: int = 0  # per-camera Acknowledge queue length; 0: off


def _nid(name: str, idx: int) -> ua.NodeId:
    """A string NodeId in our namespace (clients can address it as ns=<idx>;s=<name>)."""
    return ua.NodeId(ua.String(name), ua.Int16(idx))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def check_config(cfg: OpcUaConfig) -> str:
    """The security mode to use ("none" or "sign-encrypt"); OpcUaConfigError for an unsafe or incomplete setup."""
    url = urlparse(cfg.endpoint)
    if url.scheme != "opc.tcp" or not url.hostname or not url.port:
        raise OpcUaConfigError(f"OPC UA endpoint {cfg.endpoint!r}: expected opc.tcp://HOST:PORT")
    mode = cfg.security
    if mode == "auto":
        mode = "sign-encrypt" if cfg.cert else "none"
    if mode == "none":
        if not is_loopback(url.hostname):
            raise OpcUaConfigError("OPC UA security None is allowed only on loopback; give --opcua-cert, "
                                   "--opcua-key and --opcua-trust-dir for Basic256Sha256 SignAndEncrypt")
    elif mode == "sign-encrypt":
        missing = [n for n, v in (("--opcua-cert", cfg.cert), ("--opcua-key", cfg.key),
                                  ("--opcua-trust-dir", cfg.trust_dir), ("--opcua-users", cfg.users)) if v is None]
        if missing:
            raise OpcUaConfigError(f"OPC UA SignAndEncrypt needs {', '.join(missing)}")
    else:
        raise OpcUaConfigError(f"unknown OPC UA security {mode!r} (none, sign-encrypt)")
    return mode


# Variables of a camera object: name -> (variant type, initial value).
CAMERA_VARS: dict[str, tuple[ua.VariantType, Any]] = {
    "ResultCounter": (ua.VariantType.UInt64, 0),
    "LastSeq": (ua.VariantType.UInt64, 0),
    "LastPartId": (ua.VariantType.String, ""),
    "LastDecision": (ua.VariantType.String, ""),
    "LastResultState": (ua.VariantType.Int32, 0),
    "LastClass": (ua.VariantType.String, ""),
    "LastClassIndex": (ua.VariantType.Int32, -1),
    "LastConfidence": (ua.VariantType.Double, 0.0),
    "LastModelId": (ua.VariantType.String, ""),
    "LastAgentEpoch": (ua.VariantType.UInt64, 0),
    "FailSafe": (ua.VariantType.Boolean, False),
    "FailSafeReason": (ua.VariantType.String, ""),
    "AgentLost": (ua.VariantType.Boolean, False),
    "PassCount": (ua.VariantType.UInt64, 0),
    "DivertCount": (ua.VariantType.UInt64, 0),
    "ReviewCount": (ua.VariantType.UInt64, 0),
    "FailSafeCount": (ua.VariantType.UInt64, 0),
    "LateCount": (ua.VariantType.UInt64, 0),
    "QueueCapacity": (ua.VariantType.UInt32, 0),
    "QueueLength": (ua.VariantType.UInt32, 0),
    "QueueOverflow": (ua.VariantType.UInt64, 0),
    "QueueOldestSeq": (ua.VariantType.Int64, -1),
    "QueueOldestDecision": (ua.VariantType.String, ""),
}
AGENT_VARS: dict[str, tuple[ua.VariantType, Any]] = {
    "State": (ua.VariantType.String, "unknown"),
    "Epoch": (ua.VariantType.UInt64, 0),
    "ModelId": (ua.VariantType.String, ""),
    "LastHeartbeatAge": (ua.VariantType.Double, 0.0),
    "Lost": (ua.VariantType.Boolean, False),
}
BRIDGE_VARS: dict[str, tuple[ua.VariantType, Any]] = {
    "State": (ua.VariantType.String, "starting"),
    "TotalResults": (ua.VariantType.UInt64, 0),
    "FailSafe": (ua.VariantType.Boolean, True),
    "AgentsUp": (ua.VariantType.UInt32, 0),
    "EventsDropped": (ua.VariantType.UInt64, 0),
}
# Fields of ResultReadyEventType (named after OPC 40100's ResultReadyEventType / ResultId / ResultState).
_V = ua.VariantType
EVENT_FIELDS: list[tuple[str, ua.VariantType]] = [
    ("CameraId", _V.String), ("ResultId", _V.String), ("Seq", _V.UInt64), ("PartId", _V.String),
    ("Decision", _V.String), ("ResultState", _V.Int32), ("ClassName", _V.String), ("Confidence", _V.Double),
    ("ModelId", _V.String), ("AgentEpoch", _V.UInt64), ("ResultCounter", _V.UInt64), ("PublishedNs", _V.Int64),
]


_new = object.__new__
_NULL = ua.VariantType.Null
_SEQUENCES = (list, tuple)  # array values take the checking constructor (dimensions)


def _variant(value: Any, vt: ua.VariantType) -> ua.Variant:
    """A scalar Variant without its dataclass __init__/__post_init__ (type guessing and checks): 0.14 us against 0.59
    us here, for each of 14 to 21 fields of every event and subscription at line rate. Only for a scalar value of
    a known, matching type."""
    v = _new(ua.Variant)
    v.Value, v.VariantType, v.Dimensions, v.is_array = value, vt, None, False
    return v


def _without_deepcopy(event: Any) -> None:
    """asyncua's Event.to_event_fields deep-copies every field of every event for every subscription (60% of the
    OPC UA thread at 5,000 results/s), re-resolves every select clause's name and builds each Variant through its
    checking constructor. _event assigns fresh values each time and nothing mutates them afterwards, so a queued
    event may share them; this one event object gets the same method without the copy, with the names resolved
    once per monitored item's select clauses and scalars wrapped directly."""
    # id(select clauses) -> (them, [(attribute name, its VariantType, or None to take the checking path)])
    resolved: dict[int, tuple[list[Any], list[tuple[str, ua.VariantType | None]]]] = {}

    def fields_of(select_clauses: list[Any]) -> list[tuple[str, ua.VariantType | None]]:
        known = resolved.get(id(select_clauses))
        if known is not None and known[0] is select_clauses:
            return known[1]
        out = []
        for s in select_clauses:
            name = (ua.AttributeIds(s.AttributeId).name if len(s.BrowsePath) == 0
                    else event.browse_path_to_attribute_name(s.BrowsePath))
            vt = event.data_types.get(name)
            out.append((name, vt if isinstance(vt, ua.VariantType) else None))
        if len(resolved) >= 1024:  # monitored items come and go with clients: keep the cache bounded
            resolved.clear()
        resolved[id(select_clauses)] = (select_clauses, out)
        return out

    def to_event_fields(select_clauses: list[Any]) -> list[ua.Variant]:
        fields = []
        for name, vt in fields_of(select_clauses):
            val = getattr(event, name, None)
            if val is None:
                fields.append(_variant(None, _NULL))
            elif isinstance(val, ua.Variant):
                fields.append(val)
            elif vt is None or isinstance(val, _SEQUENCES):
                fields.append(ua.Variant(val, event.data_types.get(name)))
            else:
                fields.append(_variant(val, vt))
        return fields

    event.to_event_fields = to_event_fields


class EventDrops:
    """Counts the events the server discards because a client's monitored-item queue is full.

    OPC UA discards the oldest event then, and asyncua does so silently (InternalSubscription.enqueue_event, 2.1.0:
    the [plc] pin): a client slower than the line, or one that asked for a small queue, loses results that nothing
    reports. The count is the bridge's `EventsDropped` variable and its report's `events_dropped`. Process-wide,
    like the server: the bridge runs one."""

    count = 0

    @classmethod
    def install(cls) -> None:
        """Wrap asyncua's event enqueue once per process (idempotent)."""
        from asyncua.server.internal_subscription import InternalSubscription

        original = InternalSubscription.enqueue_event
        if getattr(original, "tdn_counted", False):
            return

        async def enqueue_event(self: Any, mid: int, eventdata: ua.EventFieldList, maxsize: int) -> None:
            queued = self._triggered_events.get(mid)
            if maxsize and queued is not None and len(queued) >= maxsize:
                cls.count += 1  # asyncua pops the oldest to make room
            await original(self, mid, eventdata, maxsize)

        enqueue_event.tdn_counted = True  # type: ignore[attr-defined]
        InternalSubscription.enqueue_event = enqueue_event  # type: ignore[method-assign]


@dataclass
class _CameraNodes:
    obj: Node
    vars: dict[str, ua.NodeId]
    gen: Any  # the ResultReady event generator
    queue: AckQueue | None
    status: CameraStatus | None = None


class OpcUaOutput(ServerThread):
    """The OPC UA server in its own thread and event loop; deliver() hands it Updates without blocking."""

    name = "opcua"
    label = "OPC UA"

    def __init__(self, cfg: OpcUaConfig) -> None:
        self.cfg = cfg
        self.mode = check_config(cfg)
        users = load_users(cfg.users) if cfg.users else {}
        self.users = BridgeUserManager(users, allow_anonymous=self.mode == "none")
        self.rules = RoleRules()
        super().__init__()
        self._queue: asyncio.Queue[Update | None] | None = None
        self._written: dict[ua.NodeId, Any] = {}
        self.cameras: dict[str, _CameraNodes] = {}
        self.agents: dict[str, dict[str, ua.NodeId]] = {}
        self._agent_status: dict[str, AgentStatus] = {}
        self.events_sent = 0
        self._event_id = int(time.time()) << 32  # unique across restarts of the bridge, then +1 per event
        self.acks = 0
        self.ack_refused = 0
        self.bad_certificates = 0
        self.idx = 0

    # -- bridge thread --

    def deliver(self, update: Update) -> None:
        """Queue an update for the server's loop."""
        if self._queue is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._queue.put_nowait, update)

    def stop(self) -> None:
        """Stop serving (pending updates are applied first) and join the thread."""
        if self._queue is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._queue.put_nowait, None)
            self._thread.join(15)

    def stats(self) -> dict[str, Any]:
        """Counters for the bridge report."""
        return {"events": self.events_sent, "events_dropped": EventDrops.count, "acks": self.acks,
                "ack_refused": self.ack_refused,
                "users_refused": self.users.refused, "requests_denied": self.rules.denied,
                "certificates_refused": self.bad_certificates, "security": self.mode,
                "queue_overflow": {c: n.queue.overflowed for c, n in self.cameras.items() if n.queue}}

    # -- server thread --

    async def _validate(self, cert: Any, app: ua.ApplicationDescription) -> None:
        try:
            await self._validator.validate(cert, app)
        except Exception:
            self.bad_certificates += 1
            raise

    async def _setup(self) -> Server:
        server = Server(user_manager=self.users)
        await server.init()
        server.set_endpoint(self.cfg.endpoint)
        server.set_server_name("TinyDefectNet Line PLC bridge")
        await server.set_application_uri(APPLICATION_URI)
        if self.mode == "none":
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity], permission_ruleset=self.rules)
            server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
        else:
            assert self.cfg.cert and self.cfg.key and self.cfg.trust_dir
            await server.load_certificate(str(self.cfg.cert))
            await server.load_private_key(str(self.cfg.key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt],
                                       permission_ruleset=self.rules)
            server.set_identity_tokens([ua.UserNameIdentityToken])
            store = TrustStore([self.cfg.trust_dir], [])
            await store.load()
            # asyncua accepts any client certificate unless a validator is set: only the trust dir's get in.
            self._validator = CertificateValidator(
                CertificateValidatorOptions.TRUSTED | CertificateValidatorOptions.TIME_RANGE
                | CertificateValidatorOptions.URI | CertificateValidatorOptions.PEER_CLIENT, store)
            server.set_certificate_validator(self._validate)
        self.idx = await server.register_namespace(NAMESPACE)
        idx = self.idx
        root = await server.nodes.objects.add_object(_nid("TinyDefectNet", idx), f"{idx}:TinyDefectNet")
        self.root = root
        self.cameras_folder = await root.add_folder(_nid("Cameras", idx), f"{idx}:Cameras")
        self.agents_folder = await root.add_folder(_nid("Agents", idx), f"{idx}:Agents")
        bridge = await root.add_object(_nid("Bridge", idx), f"{idx}:Bridge")
        self.bridge_vars = {name: (await bridge.add_variable(_nid(f"Bridge/{name}", idx), f"{idx}:{name}",
                                                             val, varianttype=vt)).nodeid
                            for name, (vt, val) in BRIDGE_VARS.items()}
        self.result_type = await server.create_custom_event_type(
            idx, "ResultReadyEventType", ua.ObjectIds.BaseEventType,
            [(name, vt) for name, vt in EVENT_FIELDS])
        self.failsafe_type = await server.create_custom_event_type(
            idx, "FailSafeEventType", ua.ObjectIds.BaseEventType,
            [("Kind", ua.VariantType.String), ("Subject", ua.VariantType.String),
             ("Cameras", ua.VariantType.String)])
        self.failsafe_gen = await server.get_event_generator(self.failsafe_type, root.nodeid)
        self.server = server
        return server

    async def _main(self) -> None:
        uabinary.install()  # before the first event is encoded: asyncua resolves its list encoders once
        EventDrops.install()
        server = await self._setup()
        self._queue = asyncio.Queue()
        async with server:
            self._ready.set()
            ticker = asyncio.create_task(self._ticker())
            try:
                while True:
                    batch = [await self._queue.get()]
                    while not self._queue.empty():
                        batch.append(self._queue.get_nowait())
                    await self._apply([u for u in batch if u is not None])
                    if None in batch:
                        break
            finally:
                ticker.cancel()

    async def _ticker(self) -> None:
        """Heartbeat ages and dropped events move with time, not with updates."""
        while True:
            await asyncio.sleep(0.5)
            dropped = EventDrops.count
            if dropped != self._written.get(self.bridge_vars["EventsDropped"], 0):
                log.warning("OPC UA events dropped, %d in all: a client's monitored-item queue was full (the "
                            "server discards the oldest); a slow client misses results", dropped)
            await self._write(self.bridge_vars["EventsDropped"], dropped, ua.VariantType.UInt64)
            now = time.monotonic()
            for agent_id, status in self._agent_status.items():
                await self._write(self.agents[agent_id]["LastHeartbeatAge"], round(now - status.last_heartbeat, 3),
                                  ua.VariantType.Double)

    async def _write(self, nodeid: ua.NodeId, value: Any, vt: ua.VariantType) -> None:
        if self._written.get(nodeid, ...) == value:
            return  # unchanged: no data-change notification, no work
        self._written[nodeid] = value
        variant = ua.Variant(value, vt) if value is None or isinstance(value, _SEQUENCES) else _variant(value, vt)
        await self.server.write_attribute_value(nodeid, ua.DataValue(variant))

    async def _camera(self, camera_id: str) -> _CameraNodes:
        nodes = self.cameras.get(camera_id)
        if nodes is not None:
            return nodes
        idx = self.idx
        obj = await self.cameras_folder.add_object(_nid(f"Cameras/{camera_id}", idx), f"{idx}:{camera_id}")
        nvars = {}
        for name, (vt, val) in CAMERA_VARS.items():
            node = await obj.add_variable(_nid(f"Cameras/{camera_id}/{name}", idx), f"{idx}:{name}", val,
                                          varianttype=vt)
            nvars[name] = node.nodeid
        queue = AckQueue(self.cfg.ack_queue) if self.cfg.ack_queue > 0 else None

        async def acknowledge(parent: ua.NodeId, seq: ua.Variant) -> Any:
            return await self._acknowledge(camera_id, seq)

        arg = ua.Argument(Name="Seq", DataType=ua.NodeId(ua.Int32(ua.ObjectIds.UInt64)), ValueRank=-1,
                          Description=ua.LocalizedText("seq of the result taken; it and every older one leave"))
        out = ua.Argument(Name="Removed", DataType=ua.NodeId(ua.Int32(ua.ObjectIds.UInt32)), ValueRank=-1)
        await obj.add_method(_nid(f"Cameras/{camera_id}/Acknowledge", idx), f"{idx}:Acknowledge",
                             acknowledge, [arg], [out])
        gen = await self.server.get_event_generator(self.result_type, obj.nodeid)
        _without_deepcopy(gen.event)
        nodes = self.cameras[camera_id] = _CameraNodes(obj, nvars, gen, queue)
        if queue is not None:
            await self._write(nvars["QueueCapacity"], queue.capacity, ua.VariantType.UInt32)
        return nodes

    async def _acknowledge(self, camera_id: str, seq: ua.Variant | int) -> Any:
        nodes = self.cameras[camera_id]
        value = seq.Value if isinstance(seq, ua.Variant) else seq
        if nodes.queue is None or not isinstance(value, int):
            self.ack_refused += 1
            return _status(ua.StatusCodes.BadNotSupported if nodes.queue is None
                           else ua.StatusCodes.BadInvalidArgument)
        removed = nodes.queue.acknowledge(value)
        if removed == 0:
            self.ack_refused += 1
            return _status(ua.StatusCodes.BadInvalidArgument)
        self.acks += 1
        await self._write_queue(nodes)
        await self._write_failsafe(camera_id, nodes)
        return [ua.Variant(removed, ua.VariantType.UInt32)]

    async def _write_queue(self, nodes: _CameraNodes) -> None:
        q = nodes.queue
        if q is None:
            return
        oldest = q.oldest()
        await self._write(nodes.vars["QueueLength"], len(q.items), ua.VariantType.UInt32)
        await self._write(nodes.vars["QueueOverflow"], q.overflowed, ua.VariantType.UInt64)
        await self._write(nodes.vars["QueueOldestSeq"], oldest.seq if oldest else -1, ua.VariantType.Int64)
        await self._write(nodes.vars["QueueOldestDecision"], oldest.decision.value if oldest else "",
                          ua.VariantType.String)

    async def _write_failsafe(self, camera_id: str, nodes: _CameraNodes) -> None:
        reasons = list(nodes.status.reasons) if nodes.status else []
        if nodes.queue is not None and nodes.queue.full:
            reasons.append("ack_queue_full")  # the PLC stopped taking results: parts are unaccounted for
        await self._write(nodes.vars["FailSafe"], bool(reasons), ua.VariantType.Boolean)
        await self._write(nodes.vars["FailSafeReason"], ",".join(reasons), ua.VariantType.String)

    async def _event(self, nodes: _CameraNodes, r: Result) -> None:
        ev = nodes.gen.event
        ev.CameraId, ev.ResultId, ev.Seq, ev.PartId = r.camera_id, f"{r.camera_id}:{r.seq}", r.seq, r.part_id or ""
        ev.Decision, ev.ResultState, ev.ClassName = r.decision.value, DECISION_CODES[r.decision], r.class_name or ""
        ev.Confidence, ev.ModelId, ev.AgentEpoch = float(r.confidence or 0.0), r.model_id, r.epoch
        ev.ResultCounter, ev.PublishedNs = r.counter, r.published_ns or 0
        ev.Severity = 500 if r.decision.value == "fail_safe" else 100
        await self._trigger(nodes.gen, f"{r.camera_id} seq {r.seq} {r.decision.value}")
        self.events_sent += 1

    # States, queues, then events, in one pass: that order is what keeps a fail-safe from waiting on a backlog.
    async def _apply(self, updates: list[Update]) -> None:  # noqa: C901
        """Apply queued updates: states first (only the latest counts, so a fail-safe never waits behind a
        backlog of events), then every fail-safe and result event in order, letting clients in between."""
        if not updates:
            return
        cams: dict[str, CameraStatus] = {}
        agents: dict[str, AgentStatus] = {}
        for u in updates:
            cams.update((c.camera_id, c) for c in u.cameras)
            agents.update((a.agent_id, a) for a in u.agents)
        results = [r for u in updates for r in u.results]
        for r in results:
            nodes = await self._camera(r.camera_id)
            if nodes.queue is not None:
                nodes.queue.push(r)
        for cam in cams.values():
            nodes = await self._camera(cam.camera_id)
            nodes.status = cam
            await self._write_camera(nodes, cam)
        for agent in agents.values():
            await self._write_agent(agent)
        b = updates[-1].bridge
        await self._write(self.bridge_vars["State"], b.state, ua.VariantType.String)
        await self._write(self.bridge_vars["TotalResults"], b.total, ua.VariantType.UInt64)
        await self._write(self.bridge_vars["FailSafe"], b.fail_safe, ua.VariantType.Boolean)
        await self._write(self.bridge_vars["AgentsUp"], b.agents_up, ua.VariantType.UInt32)
        for u in updates:
            for event in u.events:
                await self._failsafe_event(event)
        for n, r in enumerate(results, 1):
            await self._event(self.cameras[r.camera_id], r)
            if n % 100 == 0:
                await asyncio.sleep(0)  # a backlog must not starve the clients' requests
        await asyncio.sleep(0)

    async def _trigger(self, gen: Any, message: str, when: datetime | None = None) -> None:
        """EventGenerator.trigger without its per-event uuid4 and local-time work (the hot path at line rate)."""
        ev = gen.event
        self._event_id += 1
        ev.EventId = _variant(self._event_id.to_bytes(8, "big"), ua.VariantType.ByteString)
        now = datetime.now(UTC)
        ev.Time = when or now
        ev.ReceiveTime = now
        ev.Message = ua.LocalizedText(message)
        await gen.isession.subscription_service.trigger_event(ev)

    async def _write_camera(self, nodes: _CameraNodes, cam: CameraStatus) -> None:
        v = nodes.vars
        U64, S = ua.VariantType.UInt64, ua.VariantType.String
        last = cam.last
        if last is not None:
            await self._write(v["LastSeq"], last.seq, U64)
            await self._write(v["LastPartId"], last.part_id or "", S)
            await self._write(v["LastDecision"], last.decision.value, S)
            await self._write(v["LastResultState"], DECISION_CODES[last.decision], ua.VariantType.Int32)
            await self._write(v["LastClass"], last.class_name or "", S)
            await self._write(v["LastClassIndex"], -1 if last.class_index is None else last.class_index,
                              ua.VariantType.Int32)
            await self._write(v["LastConfidence"], float(last.confidence or 0.0), ua.VariantType.Double)
            await self._write(v["LastModelId"], last.model_id, S)
            await self._write(v["LastAgentEpoch"], last.epoch, U64)
        counts = dict(cam.by_decision)
        for name, key in (("PassCount", "pass"), ("DivertCount", "divert"), ("ReviewCount", "review"),
                          ("FailSafeCount", "fail_safe")):
            await self._write(v[name], counts[key], U64)
        await self._write(v["LateCount"], cam.late, U64)
        await self._write(v["AgentLost"], cam.agent_lost, ua.VariantType.Boolean)
        await self._write_queue(nodes)
        await self._write_failsafe(cam.camera_id, nodes)
        # The counter goes last: a client that sees it move finds the Last* values already in place.
        await self._write(v["ResultCounter"], cam.counter, U64)

    async def _write_agent(self, agent: AgentStatus) -> None:
        nodes = self.agents.get(agent.agent_id)
        if nodes is None:
            idx = self.idx
            obj = await self.agents_folder.add_object(_nid(f"Agents/{agent.agent_id}", idx),
                                                      f"{idx}:{agent.agent_id}")
            nodes = self.agents[agent.agent_id] = {
                name: (await obj.add_variable(_nid(f"Agents/{agent.agent_id}/{name}", idx), f"{idx}:{name}",
                                              val, varianttype=vt)).nodeid
                for name, (vt, val) in AGENT_VARS.items()}
        self._agent_status[agent.agent_id] = agent
        await self._write(nodes["State"], agent.state, ua.VariantType.String)
        await self._write(nodes["Epoch"], agent.epoch, ua.VariantType.UInt64)
        await self._write(nodes["ModelId"], agent.model_id, ua.VariantType.String)
        await self._write(nodes["Lost"], agent.lost, ua.VariantType.Boolean)
        await self._write(nodes["LastHeartbeatAge"], round(time.monotonic() - agent.last_heartbeat, 3),
                          ua.VariantType.Double)

    async def _failsafe_event(self, event: FailSafeEvent) -> None:
        ev = self.failsafe_gen.event
        ev.Kind, ev.Subject, ev.Cameras = event.kind, event.subject, ",".join(event.cameras)
        ev.Severity = 100 if event.kind in ("agent_back", "agent_seen") else 800
        when = datetime.fromtimestamp(event.time_ns / 1e9, UTC)
        await self._trigger(self.failsafe_gen, f"{event.kind} {event.subject} {event.detail}", when)


def main(argv: list[str] | None = None) -> int:
    """`python -m simulators.plc.opcua NAME ROLE`: reads a password on stdin, prints a users-file line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in ROLES:
        print(f"usage: python -m simulators.plc.opcua NAME {{{','.join(ROLES)}}} < password", file=sys.stderr)
        return 2
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(f"{args[0]}:{args[1]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
