"""Helpers the camera and PLC-bridge simulators share: endpoints, stop signals, sockets and JSON reports."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

DEFAULT_FRAMES_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_OUTPUT_ENDPOINT = "tcp://127.0.0.1:5556"


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM set `stop` instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        # Signal handlers can only be installed from the main thread (e.g. when a test calls main()).
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def close_socket(sock: zmq.Socket[Any], linger_ms: int = 0) -> None:
    """Close, waiting at most linger_ms for queued messages to go out (0: drop them, e.g. on a signal)."""
    sock.close(linger=linger_ms)


# --- link supervision: how fast a peer on a dead or unplugged line PC is given up (README "Failover") ---
# Nobody closes a TCP connection to a host that lost power or its cable: without these options a camera's PUSH
# keeps dealing that agent its share of the frames until its queue is full (SNDHWM plus the kernel send buffer,
# about 4 gray8 200x200 frames with camera.py's defaults, more with a larger --sndhwm), and TCP gives up only
# after about 15 minutes. With them the connection is dropped 1-1.25 s after the last answered PING. The price: an
# agent frozen for over 1 s (its process, or the whole PC) is given up too, and the frames queued to it fail safe
# as gaps. A crashed agent's kernel closes its connections itself, once the process is gone (freeing a large
# process takes 0.1-0.9 s; frames sent meanwhile die with it).
HEARTBEAT_IVL_MS = 250  # ZMQ_HEARTBEAT_IVL: a ZMTP PING every 250 ms (any ZMTP 3.1 peer answers; no agent change)
HEARTBEAT_TIMEOUT_MS = 1000  # ZMQ_HEARTBEAT_TIMEOUT: nothing heard 1 s after a PING: drop the connection
# ZMQ_HEARTBEAT_TTL is not set: it would make an agent that stops reading (its backpressure, while its queue is
# full) drop the camera after the TTL, and a PULL holds nothing for a vanished camera that would need freeing.
# ZMQ_TCP_MAXRT (TCP_USER_TIMEOUT on Linux): data unacknowledged for 3 s aborts the connection. The backstop for
# a send buffer that filled before the next PING was queued (that PING waits behind it, so its timer never starts):
# then the full queue already diverts frames to the other agents, and this discards its stale frames instead of
# delivering them minutes later when the link returns. Linux also applies it to a zero window (an agent that has
# read nothing for 3 s), so it is kept above the heartbeat timeout.
TCP_MAXRT_MS = 3000
RECONNECT_IVL_MS = 100  # ZMQ_RECONNECT_IVL: first retry after 100 ms, so a restarted agent is back at once
RECONNECT_IVL_MAX_MS = 1000  # ZMQ_RECONNECT_IVL_MAX: back off to one try a second while a host stays down
CONNECT_TIMEOUT_MS = 1000  # ZMQ_CONNECT_TIMEOUT: a SYN lost on a dead link is retried every second, not after 1-2 min
# ZMQ_TCP_KEEPALIVE is left at the OS default on purpose: keepalive probes only an idle connection (never one
# with frames pending) and in whole seconds, so the heartbeats above supersede it.


def set_link_options(sock: zmq.Socket[Any]) -> None:
    """Heartbeats, a TCP user timeout and reconnect pacing that give up a vanished peer in ~1 s (before connect)."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.TCP_MAXRT, TCP_MAXRT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)


def is_loopback(host: str) -> bool:
    """Whether binding or serving on `host` keeps a socket on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_private(path: Path, what: str) -> None:
    """ValueError naming the file if it cannot be read or group/other may access it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ValueError(f"{what} {path} has mode {stat.S_IMODE(mode):04o}; run: chmod 600 {path}")


def read_private(path: Path, what: str) -> str:
    """A secret's file contents; ValueError naming the file if unreadable or readable by group/other."""
    check_private(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None


def write_report(path: str | os.PathLike[str] | None, report: dict[str, Any]) -> None:
    """Write a JSON report atomically (readers never see half a file); no-op when path is None."""
    if path is None:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(target)


class CurveKeyError(Exception):
    """A CURVE key file is missing, unreadable, malformed or (a secret one) readable by group/other."""


CurveKeys = tuple[bytes, bytes, bytes]  # (our public, our secret, the agent's public), z85


def curve_client_keys(secret_file: Path | None, server_key_file: Path) -> CurveKeys:
    """Keys for a CURVE client of the agent; an ephemeral pair when no secret file is given."""
    if secret_file is None:
        public, secret = zmq.curve_keypair()
    else:
        try:
            check_private(secret_file, "secret key file")
        except ValueError as exc:
            raise CurveKeyError(str(exc)) from None
        try:
            public, secret_or_none = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            raise CurveKeyError(f"secret key file {secret_file}: {exc}") from None
        if not secret_or_none:
            raise CurveKeyError(f"{secret_file} holds no secret-key (is it the public .key file?)")
        secret = secret_or_none
    try:
        server, _ = zmq.auth.load_certificate(server_key_file)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"server key file {server_key_file}: {exc}") from None
    return public, secret, server


def make_curve_client(sock: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    """Make `sock` a CURVE client of the agent (before connect); no-op for plaintext (keys None)."""
    if keys is not None:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = keys


def add_curve_arguments(parser: Any) -> None:
    """--curve-secret / --curve-server-key, shared by the camera and the bridge."""
    parser.add_argument("--curve-secret", type=Path, default=None, metavar="FILE",
                        help="our CurveZMQ secret key file (tdn keygen; mode 0600); default: an ephemeral key")
    parser.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE",
                        help="the agent's public key file: turns CurveZMQ on")


def curve_options(args: Any) -> CurveKeys | None:
    """The keys --curve-secret/--curve-server-key ask for, None for plaintext; CurveKeyError if they can't be used."""
    if args.curve_server_key is None:
        if args.curve_secret is not None:
            raise CurveKeyError("--curve-secret needs --curve-server-key")
        return None
    return curve_client_keys(args.curve_secret, args.curve_server_key)


def curve_from_args(args: Any, parser: Any) -> CurveKeys | None:
    """curve_options, with a parser error for a bad combination or file."""
    try:
        return curve_options(args)
    except CurveKeyError as exc:
        parser.error(str(exc))
    return None  # unreachable: parser.error exits
