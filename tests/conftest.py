"""Shared fixtures: the NEU-DET location, the shipped model, free ports and sockets closed with linger=0."""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from agent.testing import free_port  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "agent" / "models" / "tinydefectnet.keras"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def data_dir() -> Path:
    """NEU-DET from TDN_DATA (set by .ci/run); when set and missing, tests fail rather than skip."""
    env = os.environ.get("TDN_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "neu-det"
    if not path.is_dir():
        pytest.fail(f"NEU-DET folder {path} not found (TDN_DATA={env!r})")
    return path


def mt_data_dir() -> Path:
    """Magnetic-tile from TDN_MT_DATA (set by .ci/run); when set and missing, tests fail rather than skip."""
    env = os.environ.get("TDN_MT_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "magnetic-tile"
    if not path.is_dir():
        pytest.fail(f"Magnetic-tile folder {path} not found (TDN_MT_DATA={env!r})")
    return path


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The Magnetic-tile training pool (MT_<Class>/Imgs/<stem>.jpg + <stem>.png masks)."""
    return mt_data_dir()


@pytest.fixture(scope="session")
def neu_det() -> Path:
    """The NEU-DET training pool (IMAGES/, ANNOTATIONS/)."""
    return data_dir()


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The committed model (or TDN_MODEL_PATH, which agents started by tests inherit); missing is a failure."""
    model = Path(os.environ.get("TDN_MODEL_PATH", MODEL))
    if not model.is_file():
        pytest.fail(f"model {model} is missing")
    return model


@pytest.fixture(scope="session")
def shared_artifacts() -> Path:
    """The artifacts folder of the default state dir, for agents whose own state dir is private: the first start
    exports and gates the lean variants once (~25 s), not once per test."""
    from agent.config import default_artifacts_dir

    return default_artifacts_dir()


# A test that has not finished in this long is stuck: fail it with a traceback instead of stalling CI (pyzmq's
# suite does the same). Mark a longer test with @pytest.mark.hang_guard(seconds).
HANG_GUARD_S = 300


def _hang(signum: int, frame: object) -> None:
    raise TimeoutError("test still running after its hang guard; stuck (see the traceback)")


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """SIGALRM fails a stuck test (main thread only; the timers of the alarm are per process)."""
    marker = request.node.get_closest_marker("hang_guard")
    seconds = int(marker.args[0]) if marker else HANG_GUARD_S
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A private ZeroMQ context whose sockets are all closed with linger=0 at teardown."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class RawPeer:
    """ZMTP 3.0 written by hand (NULL mechanism, PUSH): it can claim any length, or never finish a message."""

    GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + bytes(31)
    READY = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 4) + b"PUSH"

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.reset = False
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(self.GREETING)
        self._read(64)
        self.sock.sendall(bytes([0x04, len(self.READY)]) + self.READY)
        flags, size = self._read(2)
        assert flags == 0x04 and self._read(size).startswith(b"\x05READY")

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the agent closed the connection during the handshake"
            out += chunk
        return out

    def part(self, body: bytes, more: bool, claimed: int | None = None) -> None:
        """One message part; `claimed` writes a long length field that the body does not have to match."""
        n = len(body) if claimed is None else claimed
        flags = int(more) | (0x02 if n > 255 or claimed is not None else 0)
        size = struct.pack(">Q", n) if flags & 0x02 else bytes([n])
        try:
            self.sock.sendall(bytes([flags]) + size)
            self.sock.sendall(body)
        except (ConnectionResetError, BrokenPipeError):
            self.reset = True  # the agent closed it while we were still writing

    def closed_by_agent(self, timeout_s: float = 10) -> bool:
        """Whether the agent closes the connection (within timeout_s) rather than waiting for more."""
        if self.reset:
            return True
        self.sock.settimeout(timeout_s)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
