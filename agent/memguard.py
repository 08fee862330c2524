"""Keeps the agent's resident memory under a bound by dropping the frame connection that is filling it."""

# Why this exists: libzmq limits the size of each message *part* (ZMQ_MAXMSGSIZE) but delivers a multipart message
# only whole (ZMTP 3.1 delivers messages atomically), so a peer can make it buffer any number of parts, and its
# high-water marks count whole messages. No socket option bounds that; closing the connection frees it. libzmq owns
# the connection's file descriptor, so the guard finds it through /proc/self/fd and shuts it down from outside:
# libzmq's I/O thread then sees the connection end, discards the unfinished message and frees its parts, and the
# camera reconnects as after any network fault.

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MiB = 1 << 20
# struct tcp_info (linux/tcp.h): tcpi_bytes_received, a u64 at byte 128 (Linux >= 4.1).
_TCP_INFO_LEN = 136
_BYTES_RECEIVED_AT = 128
# libzmq frees a dropped connection's parts on its I/O thread soon after the shutdown: trim the heap after that.
TRIM_AFTER_S = 0.05


@dataclass(frozen=True, slots=True)
class Drop:
    """Whom the guard drops and why: "filling" (it sent the most while memory was over) or "holding" (nobody is
    sending: the memory is held in unfinished or queued messages, which only dropping every connection frees)."""

    fds: tuple[int, ...]
    reason: str
    sent: int  # the most any connection received during the sample (bytes)


class MemoryGuard:
    """The policy: act when the resident set is `allowance` over its base, then wait `settle_s` for it to come back.

    Growth that is not the peers' is not fought: when dropping every connection left the memory over the limit, or
    a model was loaded beside the serving one, the base moves up to where the memory is (`rebase`).
    """

    def __init__(self, base_bytes: int, allowance_bytes: int, *, burst_bytes: int = MiB, settle_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if allowance_bytes <= 0:
            raise ValueError(f"allowance_bytes must be > 0, got {allowance_bytes}")
        self.allowance = allowance_bytes
        self.limit = base_bytes + allowance_bytes
        self.burst = burst_bytes
        self.settle_s = settle_s
        self.clock = clock
        self._quiet_until = float("-inf")
        self._last: Drop | None = None

    def due(self, rss: int) -> bool:
        """Whether `rss` calls for dropping a connection now (False, and a new base, when dropping did not help)."""
        if rss <= self.limit:
            self._last = None  # whatever was dropped last, the memory came back
            return False
        if self.clock() < self._quiet_until:
            return False
        if self._last is not None and self._last.reason == "holding":
            # Every connection went, and what they held with them: what is still here is the agent's own.
            self.rebase(rss)
            return False
        return True

    def rebase(self, rss: int) -> bool:
        """Move the base up to `rss` (never down); whether the limit rose."""
        self._last = None
        if rss + self.allowance <= self.limit:
            return False
        self.limit = rss + self.allowance
        return True

    def choose(self, before: Mapping[int, int], after: Mapping[int, int]) -> Drop:
        """Given bytes received per connection at two moments a few ms apart, whom to drop.

        A peer filling memory sends as fast as the link and the agent's I/O thread take it (hundreds of MB/s),
        a camera of 200x200 frames at 2,000/s 80 MB/s: the one that sent the most, and at least `burst_bytes`
        within the sample, is the culprit. When nobody sends that much, what is held sits in a message
        that will never be finished, or in complete ones the agent has not read yet; which connection holds it
        is not visible, so every frame connection goes (cameras reconnect; what they had in flight is failed
        safe by the bridges as a gap, SPEC 6).
        """
        self._quiet_until = self.clock() + self.settle_s
        sent = {fd: n - before.get(fd, 0) for fd, n in after.items()}
        top = max(sent, key=lambda fd: sent[fd], default=None)
        if top is not None and sent[top] >= self.burst:
            self._last = Drop((top,), "filling", sent[top])
        else:
            self._last = Drop(tuple(sorted(after)), "holding", sent[top] if top is not None else 0)
        return self._last


def release_large_blocks(threshold: int = 256 * 1024) -> bool:
    """Have glibc map every block of `threshold` bytes or more on its own, so freeing it returns it to the system.

    By default glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), after which
    16 MiB message parts come from its heaps and stay resident once freed: after a dropped peer the resident set
    would stay over the limit, and the guard would drop every camera. A 200x200 frame (40-120 KB) stays on the
    heap. False where this is not glibc.
    """
    return _glibc("mallopt", -3, threshold)  # -3: M_MMAP_THRESHOLD (malloc.h)


def trim() -> bool:
    """Give free heap pages back to the system (glibc's malloc_trim): smaller parts come from the heap, and what
    a dropped peer's parts leave there between live blocks is otherwise kept. False where this is not glibc."""
    return _glibc("malloc_trim", 0)


def _glibc(name: str, *args: int) -> bool:
    """Call one of glibc's allocator functions in this process; False where it has none (not glibc)."""
    import ctypes

    try:
        return bool(getattr(ctypes.CDLL(None), name)(*args))
    except (OSError, AttributeError):
        return False


class Resident:
    """This process's resident set size, read cheaply (one pread of /proc/self/statm)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __call__(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def close(self) -> None:
        os.close(self._fd)


class FrameConnections:
    """The connections libzmq accepted on the frame endpoint (tcp:// or ipc://), by file descriptor."""

    def __init__(self, endpoint: str) -> None:
        kind, _, where = endpoint.partition("://")
        if kind == "tcp":
            self.family: tuple[int, ...] = (socket.AF_INET, socket.AF_INET6)
            self.local: object = int(where.rsplit(":", 1)[1])
        elif kind == "ipc":
            self.family, self.local = (socket.AF_UNIX,), where
        else:
            raise ValueError(f"frame endpoint {endpoint!r}: only tcp:// and ipc:// are guarded")

    def _ours(self, fd: int) -> socket.socket | None:
        """A duplicate of `fd` when it is an accepted connection on the frame endpoint (close it after use)."""
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                return None
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            return None  # closed meanwhile
        try:
            if s.family in self.family and s.type == socket.SOCK_STREAM:
                name = s.getsockname()
                if (name[1] if s.family != socket.AF_UNIX else name) == self.local:
                    s.getpeername()  # the listening socket has none: OSError
                    return s
        except OSError:
            pass
        s.close()
        return None

    def received(self) -> dict[int, int]:
        """Bytes received so far by each connection (0 where the kernel does not say: ipc)."""
        out: dict[int, int] = {}
        for name in os.listdir("/proc/self/fd"):
            s = self._ours(int(name))
            if s is None:
                continue
            with s:
                n = 0
                if s.family != socket.AF_UNIX:
                    with contextlib.suppress(OSError):
                        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
                        if len(info) >= _TCP_INFO_LEN:
                            n = struct.unpack_from("=Q", info, _BYTES_RECEIVED_AT)[0]
                out[int(name)] = n
        return out

    def drop(self, fd: int) -> str | None:
        """Shut the connection down (libzmq closes and frees it); its peer's address, or None if it is gone."""
        s = self._ours(fd)  # checked again: the descriptor may have been closed and reused since it was sampled
        if s is None:
            return None
        with s:
            try:
                peer = s.getpeername()
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                return None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "ipc")


class Watch:
    """The guard's thread: every `interval_s` it reads the resident set; over the limit, it drops connections."""

    def __init__(self, guard: MemoryGuard, connections: FrameConnections,
                 on_drop: Callable[[str, Drop, int], None], *, interval_s: float = 0.02, sample_s: float = 0.01,
                 resident: Callable[[], int] | None = None, paused: Callable[[], bool] = lambda: False,
                 on_rebase: Callable[[int], None] = lambda limit: None) -> None:
        self.guard = guard
        self.connections = connections
        self.on_drop = on_drop  # (peer, verdict, rss): count and log; called on the guard's thread
        self.paused = paused  # while a model loads beside the serving one: its memory is not a peer's
        self.on_rebase = on_rebase  # (new limit): log it; called on the guard's thread
        self._was_paused = False
        self.interval_s = interval_s
        self.sample_s = sample_s
        self._resident = resident or Resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tdn-memguard", daemon=True)
        self._trim_at: float | None = None  # when to trim the heap after a drop (libzmq frees on its own thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if isinstance(self._resident, Resident):
            self._resident.close()

    def check(self) -> int:
        """One look: drop whom the guard chooses when memory is over; how many connections were dropped."""
        if self._trim_at is not None and self.guard.clock() >= self._trim_at:
            self._trim_at = None
            trim()
        rss = self._resident()
        if self.paused():
            self._was_paused = True
            return 0
        limit = self.guard.limit
        if self._was_paused:
            self._was_paused = False
            self.guard.rebase(rss)
        due = self.guard.due(rss)  # which may rebase too
        if self.guard.limit != limit:
            self.on_rebase(self.guard.limit)
        if not due:
            return 0
        before = self.connections.received()
        time.sleep(self.sample_s)
        verdict = self.guard.choose(before, self.connections.received())
        dropped = 0
        for fd in verdict.fds:
            peer = self.connections.drop(fd)
            if peer is not None:
                dropped += 1
                self.on_drop(peer, verdict, rss)
        self._trim_at = self.guard.clock() + TRIM_AFTER_S
        return dropped

    def _run(self) -> None:
        # time.sleep, not Event.wait: a timed Event.wait costs twice the CPU (1.05% against 0.58% of a core at
        # 100 a second), and stop() can wait one interval.
        while not self._stop.is_set():
            time.sleep(self.interval_s)
            self.check()
