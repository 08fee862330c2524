"""systemd sd_notify protocol (READY/STOPPING/WATCHDOG/STATUS) over a datagram socket, no dependency."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def _socket_address(raw: str | None) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        # Abstract-namespace sockets are spelled with '@' in the environment but bound with a NUL.
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    # Other schemes (e.g. systemd 254+ "vsock:") are not AF_UNIX; treat as "not under systemd".
    return None


def _positive_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value > 0 else None


class Notifier:
    """Sends sd_notify messages when NOTIFY_SOCKET is set; every call is a harmless no-op otherwise."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET"))
        self._watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when a notify socket was configured."""
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send newline-joined KEY=VALUE assignments in one datagram; False if disabled or it failed."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A stalled service manager must not stall the frame loop; a dropped ping is the lesser harm.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (Type=notify leaves 'activating' only on this)."""
        return self.notify("READY=1", *self._status_line(status))

    def stopping(self, status: str | None = None) -> bool:
        """Tell systemd a clean shutdown has begun (the unit shows as deactivating)."""
        return self.notify("STOPPING=1", *self._status_line(status))

    def watchdog(self) -> bool:
        """Ping the watchdog; call at least every watchdog_interval_s() seconds from the main loop."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by `systemctl status`."""
        return self.notify(*self._status_line(text))

    def watchdog_interval_s(self) -> float | None:
        """Half of WATCHDOG_USEC in seconds (the ping period systemd recommends), or None if not ours."""
        if self._watchdog_usec is None:
            return None
        # WATCHDOG_PID guards against a child inheriting the variables and pinging for the wrong process.
        if self._watchdog_pid is not None and _positive_int(self._watchdog_pid) != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Release the socket; later calls reopen it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status_line(text: str | None) -> list[str]:
        if text is None:
            return []
        # A newline would end the assignment and let the rest be parsed as further (bogus) assignments.
        return ["STATUS=" + " ".join(text.splitlines())]
