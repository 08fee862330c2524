"""The memory guard: its policy on plain numbers, and the connections it finds and drops on a real libzmq socket."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from agent.memguard import Drop, FrameConnections, MemoryGuard, Resident, Watch, release_large_blocks, trim
from agent.testing import wait_for
from tests.conftest import RawPeer

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestMemoryGuard:
    """When the guard acts, and whom it drops."""

    def test_not_due_at_or_under_the_limit(self) -> None:
        """A resident set at the limit is no reason to drop anyone; one byte over is."""
        guard = MemoryGuard(0, 100 * MiB, clock=Clock())
        assert not guard.due(100 * MiB)
        assert guard.due(100 * MiB + 1)

    def test_the_top_sender_is_dropped_alone(self) -> None:
        """The connection that received the most during the sample, over the burst, is the one dropped."""
        guard = MemoryGuard(0, 100 * MiB, clock=Clock())
        drop = guard.choose({3: 10 * MiB, 4: 50 * MiB, 5: 0}, {3: 10 * MiB + 300_000, 4: 58 * MiB, 5: 2 * MiB})
        assert drop == Drop((4,), "filling", 8 * MiB)

    def test_a_new_connection_counts_from_zero(self) -> None:
        """A connection that appeared during the sample counts all it received."""
        guard = MemoryGuard(0, 100 * MiB, clock=Clock())
        assert guard.choose({3: 0}, {3: 100, 7: 5 * MiB}) == Drop((7,), "filling", 5 * MiB)

    def test_nobody_sending_drops_every_connection(self) -> None:
        """Below the burst, the memory is held, not arriving: every connection goes, in descriptor order."""
        guard = MemoryGuard(0, 100 * MiB, burst_bytes=MiB, clock=Clock())
        drop = guard.choose({9: 5, 3: 0, 4: 5}, {9: 5, 3: MiB - 1, 4: 5})
        assert drop == Drop((3, 4, 9), "holding", MiB - 1)

    def test_no_connections_drops_nothing(self) -> None:
        """With no frame connection at all there is nobody to drop (the memory is the agent's own)."""
        assert MemoryGuard(0, MiB, clock=Clock()).choose({}, {}) == Drop((), "holding", 0)

    def test_quiet_while_the_memory_comes_back(self) -> None:
        """After acting, the guard waits settle_s before acting again, however high the resident set."""
        clock = Clock()
        guard = MemoryGuard(0, MiB, settle_s=0.25, clock=clock)
        guard.choose({}, {1: 10 * MiB})
        clock.now += 0.2
        assert not guard.due(10 * MiB)
        clock.now += 0.05
        assert guard.due(10 * MiB)

    def test_allowance_must_be_positive(self) -> None:
        """An allowance of 0 is a setting mistake (0 in the settings means off, and no guard is made)."""
        with pytest.raises(ValueError, match="allowance_bytes"):
            MemoryGuard(100 * MiB, 0)

    def test_memory_dropping_everyone_did_not_free_moves_the_base(self) -> None:
        """Every connection dropped and the memory still over after settling: it is the agent's, the base moves."""
        clock = Clock()
        guard = MemoryGuard(100 * MiB, 50 * MiB, clock=clock)
        assert guard.due(200 * MiB)
        assert guard.choose({3: 0}, {3: 10}).reason == "holding"
        clock.now += 1
        assert not guard.due(200 * MiB)  # rebased instead of dropping the cameras again
        assert guard.limit == 250 * MiB
        assert guard.due(251 * MiB)  # and it guards from there

    def test_memory_that_came_back_keeps_the_base(self) -> None:
        """After a drop that freed the memory, the next excess is a new one: dropped, not absorbed."""
        clock = Clock()
        guard = MemoryGuard(100 * MiB, 50 * MiB, clock=clock)
        guard.choose({3: 0}, {3: 10})
        clock.now += 1
        assert not guard.due(120 * MiB)  # back under
        assert guard.due(200 * MiB) and guard.limit == 150 * MiB

    def test_a_filling_peer_again_is_dropped_again(self) -> None:
        """A peer that refills after its drop is dropped again: only a holding drop that freed nothing rebases."""
        clock = Clock()
        guard = MemoryGuard(100 * MiB, 50 * MiB, clock=clock)
        guard.choose({3: 0}, {3: 8 * MiB})
        clock.now += 1
        assert guard.due(200 * MiB) and guard.limit == 150 * MiB

    def test_rebase_never_lowers_the_limit(self) -> None:
        """A base below the current one changes nothing."""
        guard = MemoryGuard(100 * MiB, 50 * MiB, clock=Clock())
        assert not guard.rebase(10 * MiB) and guard.limit == 150 * MiB
        assert guard.rebase(120 * MiB) and guard.limit == 170 * MiB


@pytest.fixture
def pull() -> Iterator[zmq.Socket[Any]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    sock.close(linger=0)
    ctx.term()


def endpoint(sock: zmq.Socket[Any]) -> str:
    return str(sock.getsockopt(zmq.LAST_ENDPOINT).decode())


def unfinished(ep: str, mib: int) -> RawPeer:
    """A peer that sent `mib` MiB of one message and holds it open."""
    peer = RawPeer(ep)
    peer.part(b"frame/held/", more=True)
    for _ in range(mib):
        peer.part(bytes(MiB), more=True)
    return peer


class TestFrameConnections:
    """The accepted connections on a real libzmq socket, found through /proc/self/fd, and dropped from outside."""

    def test_counts_what_each_peer_sent(self, pull: zmq.Socket[Any]) -> None:
        """Each connection's kernel count of received bytes; the listening socket is not a connection."""
        conns = FrameConnections(endpoint(pull))
        a, b = unfinished(endpoint(pull), 3), unfinished(endpoint(pull), 1)
        def both_in(r: dict[int, int]) -> dict[int, int] | None:
            n = sorted(r.values())
            return r if len(n) == 2 and n[0] > MiB and n[1] > 3 * MiB else None

        # libzmq reads as it is sent, and the kernel counts what arrived: wait until all of it has
        got = wait_for(lambda: both_in(conns.received()), 10, "two connections, all sent")
        assert sorted(n // MiB for n in got.values()) == [1, 3]
        a.close()
        b.close()

    def test_a_dropped_peer_is_closed(self, pull: zmq.Socket[Any]) -> None:
        """shutdown() from outside makes libzmq close the connection (and so free the unfinished message's parts:
        measured on the agent's own process in tests/integration/test_fuzz_agent.py::TestMemoryGuard)."""
        conns = FrameConnections(endpoint(pull))
        peer = unfinished(endpoint(pull), 16)
        fds = wait_for(lambda: (lambda r: r if r and max(r.values()) >= 16 * MiB else None)(conns.received()), 10,
                       "16 MiB received")
        (fd,) = fds
        assert conns.drop(fd) is not None
        assert peer.closed_by_agent(5)
        wait_for(lambda: conns.received() == {} or None, 5, "libzmq closed it")
        assert conns.drop(fd) is None  # gone: nothing to drop twice
        peer.close()

    def test_other_descriptors_are_never_dropped(self, pull: zmq.Socket[Any], tmp_path: Any) -> None:
        """A file, another socket's connection, or a closed descriptor: drop() leaves it alone."""
        other = zmq.Context.instance().socket(zmq.PULL)
        other.setsockopt(zmq.LINGER, 0)
        other.bind("tcp://127.0.0.1:*")
        peer = unfinished(endpoint(other), 1)
        conns = FrameConnections(endpoint(pull))
        with open(tmp_path / "f", "w") as f:
            assert conns.drop(f.fileno()) is None
        assert conns.received() == {}  # the other socket's connection is not ours
        assert conns.drop(10_000) is None
        assert not peer.closed_by_agent(0.3)
        peer.close()
        other.close(linger=0)

    def test_ipc_connections_are_found(self, tmp_path: Any) -> None:
        """ipc:// connections are found by their path; the kernel gives no byte count for them (0)."""
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.bind(f"ipc://{tmp_path}/frames")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"ipc://{tmp_path}/frames")
        push.send(b"x")
        assert sock.recv() == b"x"
        conns = FrameConnections(endpoint(sock))
        got = conns.received()
        assert list(got.values()) == [0]
        assert conns.drop(next(iter(got))) is not None
        for s in (push, sock):
            s.close(linger=0)
        ctx.term()

    def test_only_tcp_and_ipc(self) -> None:
        """inproc has no connection to drop: naming it is a mistake the agent avoids."""
        with pytest.raises(ValueError, match="inproc"):
            FrameConnections("inproc://frames")


class TestWatch:
    """The guard's look: read memory, sample, drop, report, and trim the heap after."""

    def test_over_the_limit_the_filling_peer_is_dropped_and_reported(self, pull: zmq.Socket[Any]) -> None:
        """A peer still sending while memory is over is dropped; on_drop hears its address and the reason."""
        seen: list[tuple[str, Drop, int]] = []
        watch = Watch(MemoryGuard(0, 1, burst_bytes=MiB), FrameConnections(endpoint(pull)),
                      lambda peer, drop, rss: seen.append((peer, drop, rss)), resident=lambda: 2)
        peer = unfinished(endpoint(pull), 1)

        def keep_sending() -> None:
            for _ in range(200):
                try:
                    peer.part(bytes(MiB), more=True)
                except OSError:  # dropped while its send buffer was full: libzmq no longer reads the connection
                    return
                if peer.reset:
                    return

        t = threading.Thread(target=keep_sending, daemon=True)
        t.start()
        wait_for(lambda: FrameConnections(endpoint(pull)).received() or None, 5, "the peer connected")
        assert watch.check() == 1
        t.join(10)
        assert peer.closed_by_agent(5)
        ((addr, drop, rss),) = seen
        assert addr.startswith("127.0.0.1:") and drop.reason == "filling" and rss == 2
        assert watch.check() == 0  # quiet while the memory comes back
        peer.close()

    def test_under_the_limit_nothing_happens(self, pull: zmq.Socket[Any]) -> None:
        """Under the limit, a look drops nobody and calls nothing."""
        watch = Watch(MemoryGuard(0, MiB), FrameConnections(endpoint(pull)), lambda *a: pytest.fail("dropped"),
                      resident=lambda: MiB)
        peer = unfinished(endpoint(pull), 1)
        assert watch.check() == 0
        assert not peer.closed_by_agent(0.2)
        peer.close()

    def test_while_a_model_loads_nothing_is_dropped_then_the_base_moves(self, pull: zmq.Socket[Any]) -> None:
        """Paused (a model loading beside the serving one), memory over the limit drops nobody; once the load
        ends, the limit moves up to the memory there is, and on_rebase hears it."""
        loading, rss, limits = [True], [300 * MiB], []
        watch = Watch(MemoryGuard(100 * MiB, 50 * MiB), FrameConnections(endpoint(pull)),
                      lambda *a: pytest.fail("dropped"), resident=lambda: rss[0], paused=lambda: loading[0],
                      on_rebase=limits.append)
        peer = unfinished(endpoint(pull), 1)
        assert watch.check() == 0
        loading[0] = False
        assert watch.check() == 0
        assert limits == [350 * MiB] and watch.guard.limit == 350 * MiB
        assert not peer.closed_by_agent(0.2)
        peer.close()

    def test_allocator_helpers_answer_on_glibc(self) -> None:
        """This platform is glibc: both allocator calls are taken (elsewhere they report False and do nothing)."""
        assert release_large_blocks() and isinstance(trim(), bool)
        assert Resident()() > MiB
