"""CurveZMQ for the agent's sockets: key files with checked permissions, a ZAP allow-list, counted denials."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from agent.errors import ConfigError
from agent.logging import get_logger

log = get_logger("agent.security")

# ZAP domains tell the authenticator which socket a handshake is for, so each can have its own policy.
FRAMES_DOMAIN = "tdn-frames"
PUBLISH_DOMAIN = "tdn-publish"
# Handshake outcomes the socket monitor reports. A ZAP denial (unknown key) arrives as FAILED_AUTH; a
# plaintext client at a CURVE socket never reaches ZAP and fails the mechanism check (FAILED_PROTOCOL).
_FAILED_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "unknown_key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake",
}
_SEEN_KEYS_MAX = 1024  # distinct denied keys logged by name; after that they are only counted


def secret_file_problem(path: Path, what: str = "secret key file", make: str = "tdn keygen") -> str | None:
    """Why `path` is not usable as a secret file (missing, not a regular file, group/other access), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{what} {path} does not exist (make one with `{make}`)"
    except OSError as exc:
        return f"{what} {path} cannot be read: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{what} {path} is not a regular file"
    if st.st_mode & 0o077:
        return (f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; group/other may access it, "
                f"run: chmod 600 {path}")
    return None


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `tdn keygen` .key_secret file; ConfigError (one line) on any problem."""
    problem = secret_file_problem(path)
    if problem:
        raise ConfigError(problem)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"secret key file {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{path} holds no secret-key (is it the public .key file?)")
    return public, secret


def load_token(path: Path) -> bytes:
    """The control token (first line of a 0600 file, 16..256 printable chars); ConfigError (one line) otherwise."""
    problem = secret_file_problem(path, "control token file", "tdn keygen --token FILE")
    if problem:
        raise ConfigError(problem)
    try:
        lines = path.read_text().splitlines()
        token = lines[0].strip() if lines else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"control token file {path}: {exc}") from None
    if not 16 <= len(token) <= 256 or not token.isprintable():
        raise ConfigError(f"control token file {path}: the first line must be 16..256 printable characters")
    return token.encode()


def make_token(path: Path) -> Path:
    """Write a new random control token to `path` (mode 0600, never over an existing file)."""
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; remove it first to replace the token") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def load_public(path: Path) -> bytes:
    """The z85 public key of a .key (or .key_secret) file; ConfigError on a problem."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"public key file {path}: {exc}") from None
    return public


def load_allowed(directory: Path) -> set[bytes]:
    """Public keys (z85) of every *.key file in `directory`; ConfigError if it is not a directory."""
    if not directory.is_dir():
        raise ConfigError(f"curve_allow_dir {directory} is not a directory")
    try:
        return set(zmq.auth.load_certificates(directory))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"curve_allow_dir {directory}: {exc}") from None


def check_settings(enabled: bool, secret: Path, allow_dir: Path) -> None:
    """Validate the CURVE settings at start-up (ConfigError); a no-op while CURVE is off."""
    if not enabled:
        return
    if not zmq.has("curve"):
        raise ConfigError("curve_enabled is set but this libzmq was built without CURVE")
    load_secret(secret)
    load_allowed(allow_dir)


class _KeyPolicy:
    """The ZAP credentials callback of one domain: an allow-list, or any key (encryption without admission)."""

    def __init__(self, allowed: set[bytes] | None, on_denied: Any) -> None:
        self.allowed = allowed
        self.on_denied = on_denied

    def callback(self, domain: str, key: bytes) -> bool:
        ok = self.allowed is None or key in self.allowed
        if not ok:
            self.on_denied(domain, key)
        return ok


@dataclass
class CurveServer:
    """The agent side of CURVE: one ZAP authenticator thread, policies per socket, handshake monitors."""

    secret_file: Path
    allow_dir: Path
    require_subscribers: bool
    public: bytes = b""
    _secret: bytes = field(default=b"", repr=False)  # never in a repr, a log line or a traceback's summary
    _auth: Any = None
    _monitors: dict[Any, str] = field(default_factory=dict)  # monitor socket -> socket name
    _logged_keys: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, ctx: zmq.Context[Any]) -> None:
        """Load the keys and start the ZAP handler; must run before any server socket binds."""
        from zmq.auth.thread import ThreadAuthenticator

        self.public, self._secret = load_secret(self.secret_file)
        allowed = load_allowed(self.allow_dir)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(FRAMES_DOMAIN, _KeyPolicy(allowed, self._log_denied))
        self._auth.configure_curve_callback(
            PUBLISH_DOMAIN, _KeyPolicy(allowed if self.require_subscribers else None, self._log_denied))
        # Never log key material: the public key of the agent is safe to print and helps pairing.
        log.info("curve on", allowed_keys=len(allowed), server_public_key=self.public.decode(),
                 require_subscribers=self.require_subscribers)

    def secure(self, sock: zmq.Socket[Any], name: str) -> None:
        """Make `sock` a CURVE server in its ZAP domain and monitor its failed handshakes; before bind()."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        # Only the PUB socket may admit any key; frames and control commands come from allow-listed peers.
        sock.zap_domain = (PUBLISH_DOMAIN if name == "publish" else FRAMES_DOMAIN).encode()
        mon = sock.get_monitor_socket(sum(_FAILED_EVENTS))  # a bit mask of the events above
        self._monitors[mon] = name

    @property
    def monitors(self) -> list[Any]:
        """Monitor sockets for the I/O thread's poller."""
        return list(self._monitors)

    def drain(self, mon: zmq.Socket[Any]) -> list[tuple[str, str]]:
        """(socket, reason) for each failed handshake waiting on `mon`."""
        from zmq.utils.monitor import recv_monitor_message

        out = []
        with contextlib.suppress(zmq.Again):
            while True:
                event = recv_monitor_message(mon, zmq.NOBLOCK)
                reason = _FAILED_EVENTS.get(int(event["event"]))
                if reason is None:
                    continue
                out.append((self._monitors[mon], reason))
        return out

    def _log_denied(self, domain: str, key: bytes) -> None:
        # Runs in the ZAP thread; one line per distinct key, so a retrying stranger cannot flood the log.
        with self._lock:
            if key in self._logged_keys or len(self._logged_keys) >= _SEEN_KEYS_MAX:
                return
            self._logged_keys.add(key)
        log.warning("curve key not allowed", domain=domain, client_public_key=key.decode(errors="replace"))

    def stop(self) -> None:
        """Close the monitors and stop the ZAP thread."""
        for mon, _ in list(self._monitors.items()):
            mon.close(linger=0)
        self._monitors.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def make_keypair(out: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (mode 0600) into `out`; refuses to overwrite either."""
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise ConfigError(f"{p} already exists; remove it first to replace the key")
    # The umask makes the secret file private from its first byte, not after a chmod.
    old = os.umask(0o077)
    try:
        zmq.auth.create_certificates(out, name)
    finally:
        os.umask(old)
    secret.chmod(0o600)
    public.chmod(0o644)
    return public, secret
