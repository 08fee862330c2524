"""Unit tests for the sd_notify client against a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, with NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify.sock"
    # sun_path is limited to 108 bytes; a very deep tmp dir would fail here rather than mysteriously later.
    assert len(os.fsencode(path)) < 108
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strip any notify variables the test runner itself may have inherited from systemd."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_env")
class TestNotifierMessages:
    def test_ready_with_status(self, receiver: socket.socket) -> None:
        """ready() sends READY=1 and the status line in a single datagram."""
        n = Notifier()
        assert n.ready("serving 2 cameras")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 2 cameras"
        n.close()

    def test_ready_without_status(self, receiver: socket.socket) -> None:
        """ready() with no status sends only READY=1."""
        n = Notifier()
        assert n.ready()
        assert receiver.recv(4096) == b"READY=1"
        n.close()

    def test_stopping_watchdog_status(self, receiver: socket.socket) -> None:
        """stopping(), watchdog() and status() each send their exact assignment."""
        n = Notifier()
        assert n.stopping()
        assert n.watchdog()
        assert n.status("draining 3 frames")
        assert n.stopping("bye")
        assert receiver.recv(4096) == b"STOPPING=1"
        assert receiver.recv(4096) == b"WATCHDOG=1"
        assert receiver.recv(4096) == b"STATUS=draining 3 frames"
        assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=bye"
        n.close()

    def test_status_newlines_flattened(self, receiver: socket.socket) -> None:
        """A multi-line status cannot smuggle in extra assignments."""
        n = Notifier()
        assert n.status("line one\nREADY=1")
        assert receiver.recv(4096) == b"STATUS=line one READY=1"
        n.close()

    def test_abstract_namespace_socket(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A NOTIFY_SOCKET starting with '@' is sent to the abstract socket with a leading NUL."""
        name = f"tdn-test-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        try:
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            n = Notifier()
            assert n.watchdog()
            assert sock.recv(4096) == b"WATCHDOG=1"
            n.close()
        finally:
            sock.close()

    def test_explicit_environ_mapping(self, receiver: socket.socket) -> None:
        """An explicit environ mapping overrides os.environ."""
        n = Notifier(environ={})
        assert not n.enabled
        assert not n.ready()
        receiver.settimeout(0.05)
        with pytest.raises(TimeoutError):
            receiver.recv(4096)


@pytest.mark.usefixtures("clean_env")
class TestNotifierDisabledAndFailures:
    def test_noop_when_unset(self) -> None:
        """Without NOTIFY_SOCKET every call returns False and nothing raises."""
        n = Notifier()
        assert not n.enabled
        assert not n.ready("x")
        assert not n.stopping()
        assert not n.watchdog()
        assert not n.status("x")
        n.close()

    def test_unsupported_scheme_is_disabled(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A non-AF_UNIX address such as vsock: disables notification rather than failing."""
        monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
        assert not Notifier().enabled

    def test_send_error_returns_false(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A missing socket makes sends return False instead of raising."""
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
        n = Notifier()
        assert n.enabled
        assert not n.ready()
        assert not n.watchdog()
        n.close()


@pytest.mark.usefixtures("clean_env")
class TestNotifierWatchdogInterval:
    def test_half_of_watchdog_usec(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """WATCHDOG_USEC=10s gives a 5 s ping interval."""
        monkeypatch.setenv("WATCHDOG_USEC", "10000000")
        assert Notifier().watchdog_interval_s() == 5.0

    def test_matching_pid(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A WATCHDOG_PID equal to our pid keeps the interval."""
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert Notifier().watchdog_interval_s() == 1.5

    def test_other_pid_disables(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A WATCHDOG_PID naming another process means the watchdog is not ours."""
        monkeypatch.setenv("WATCHDOG_USEC", "3000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
        assert Notifier().watchdog_interval_s() is None

    @pytest.mark.parametrize("raw", [None, "", "0", "-5", "ten"])
    def test_absent_or_invalid_is_none(self, raw: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
        """Missing, zero, negative or non-numeric WATCHDOG_USEC yields None."""
        if raw is not None:
            monkeypatch.setenv("WATCHDOG_USEC", raw)
        assert Notifier().watchdog_interval_s() is None
