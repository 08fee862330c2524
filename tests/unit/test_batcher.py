"""Unit tests for the micro-batching policy, driven by a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.batcher import BatchPolicy, MicroBatcher, pad_to_compiled

MS = 1_000_000
US = 1_000
# Arbitrary, distinct epochs so a test that mixes up the two clocks fails loudly.
WALL_EPOCH = 1_700_000_000_000_000_000
MONO_EPOCH = 5_000_000_000


class FakeClock:
    """Monotonic and wall clocks that only move when a test says so."""

    def __init__(self) -> None:
        self.mono = MONO_EPOCH
        self.wall = WALL_EPOCH

    def monotonic_ns(self) -> int:
        return self.mono

    def wall_ns(self) -> int:
        return self.wall

    def advance(self, ns: int) -> None:
        self.mono += ns
        self.wall += ns


def make_policy(**overrides: object) -> BatchPolicy:
    kwargs: dict[str, object] = {
        "max_batch_size": 4,
        "max_queue_delay_us": 2_000,
        "shed_deadline_ms": 100.0,
        "queue_cap": 8,
        "batch_sizes": (1, 2, 4),
    }
    kwargs.update(overrides)
    return BatchPolicy(**kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Item:
    """A queued frame as the batcher sees it: an id and its monotonic receive time."""

    payload: str
    camera_id: str
    seq: int
    received_ns: int


def make_batcher(clock: FakeClock, **overrides: object) -> MicroBatcher[Item]:
    return MicroBatcher(make_policy(**overrides), monotonic_ns=clock.monotonic_ns)


def frame(clock: FakeClock, seq: int, camera: str = "cam0", age_ns: int = 0) -> Item:
    """A frame that reached the agent age_ns ago."""
    return Item(f"{camera}#{seq}", camera, seq, clock.mono - age_ns)


def seqs(items: list[Item]) -> list[int]:
    return [p.seq for p in items]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestPadToCompiled:
    def test_picks_smallest_fitting_size(self) -> None:
        """Each run size pads up to the next compiled size."""
        sizes = (1, 2, 4, 8, 16, 32)
        cases = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 8: 8, 9: 16, 17: 32, 32: 32}
        assert {n: pad_to_compiled(n, sizes) for n in cases} == cases

    def test_zero_needs_no_shape(self) -> None:
        """An empty run pads to 0."""
        assert pad_to_compiled(0, (1, 2, 4)) == 0

    def test_too_large_or_negative_raises(self) -> None:
        """Sizes beyond the largest compiled shape, or below zero, are errors."""
        with pytest.raises(ValueError, match="no compiled batch size"):
            pad_to_compiled(5, (1, 2, 4))
        with pytest.raises(ValueError, match=">= 0"):
            pad_to_compiled(-1, (1, 2, 4))


class TestBatchPolicy:
    def test_valid_policy_constructs(self) -> None:
        """A sensible policy is accepted and exposes nanosecond views."""
        p = make_policy()
        assert p.max_queue_delay_ns == 2 * MS
        assert p.shed_deadline_ns == 100 * MS

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("max_batch_size", 0),
            ("max_batch_size", True),
            ("max_queue_delay_us", -1),
            ("max_queue_delay_us", 1.5),
            ("shed_deadline_ms", 0),
            ("shed_deadline_ms", float("nan")),
            ("shed_deadline_ms", float("inf")),
            ("queue_cap", 3),
            ("batch_sizes", ()),
            ("batch_sizes", [1, 2, 4]),
            ("batch_sizes", (0, 2, 4)),
            ("batch_sizes", (1, 4, 2)),
            ("batch_sizes", (1, 2, 2, 4)),
            ("batch_sizes", (1, 2)),
            ("batch_sizes", (1, 2, 4, 8)),
        ],
    )
    def test_bad_value_raises_naming_field(self, field: str, value: object) -> None:
        """Every invalid knob raises ValueError whose message names that knob."""
        with pytest.raises(ValueError, match=field):
            make_policy(**{field: value})


class TestMicroBatcherTrigger:
    def test_batch_goes_when_full(self, clock: FakeClock) -> None:
        """Reaching max_batch_size forms a batch with no waiting at all."""
        b = make_batcher(clock)
        for i in range(3):
            assert b.offer(frame(clock, i))
        assert b.poll() is None
        assert b.offer(frame(clock, 3))
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.run) == [0, 1, 2, 3]
        assert batch.shed == []
        assert batch.padded_size == 4
        assert len(b) == 0

    def test_full_batch_takes_only_max(self, clock: FakeClock) -> None:
        """A deeper queue yields max_batch_size items and keeps the rest queued."""
        b = make_batcher(clock)
        for i in range(6):
            b.offer(frame(clock, i))
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.run) == [0, 1, 2, 3]
        assert len(b) == 2

    def test_batch_goes_when_oldest_waited_delay_not_before(self, clock: FakeClock) -> None:
        """A partial batch waits exactly max_queue_delay measured from the oldest item."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0))
        clock.advance(1 * MS)
        b.offer(frame(clock, 1))
        clock.advance(1 * MS - 1)
        assert b.poll() is None
        clock.advance(1)
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.run) == [0, 1]
        assert batch.padded_size == 2

    def test_zero_delay_runs_immediately(self, clock: FakeClock) -> None:
        """With max_queue_delay_us=0 a single item is batched at once."""
        b = make_batcher(clock, max_queue_delay_us=0)
        b.offer(frame(clock, 0))
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.run) == [0]
        assert batch.padded_size == 1

    def test_delay_uses_monotonic_not_wall_clock(self, clock: FakeClock) -> None:
        """A wall-clock jump (NTP step) does not fire the batch timer."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0))
        clock.wall -= 10 * MS
        assert b.poll() is None
        clock.mono += 2 * MS
        assert b.poll() is not None

    def test_empty_poll_returns_none(self, clock: FakeClock) -> None:
        """Polling an empty queue forms nothing."""
        assert make_batcher(clock).poll() is None


class TestMicroBatcherDeadline:
    def test_none_when_empty(self, clock: FakeClock) -> None:
        """An empty queue has no deadline, so the I/O loop may block on the socket."""
        assert make_batcher(clock).next_deadline_ns() is None

    def test_oldest_item_plus_delay(self, clock: FakeClock) -> None:
        """The deadline is the oldest item's receipt time plus max_queue_delay."""
        b = make_batcher(clock)
        first = clock.mono
        b.offer(frame(clock, 0))
        clock.advance(500 * US)
        b.offer(frame(clock, 1))
        assert b.next_deadline_ns() == first + 2 * MS

    def test_now_when_full(self, clock: FakeClock) -> None:
        """A full batch is due immediately."""
        b = make_batcher(clock)
        for i in range(4):
            b.offer(frame(clock, i))
        assert b.next_deadline_ns() == clock.mono

    def test_shed_deadline_comes_first_for_stale_arrival(self, clock: FakeClock) -> None:
        """With a batch timer longer than the deadline, the next deadline is when the item crosses the age limit."""
        b = make_batcher(clock, max_queue_delay_us=200_000)
        b.offer(frame(clock, 0, age_ns=99_500 * US))
        deadline = b.next_deadline_ns()
        assert deadline == clock.mono + 500 * US + 1
        clock.advance(500 * US)
        assert b.poll() is None
        clock.advance(1)
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.shed) == [0]

    def test_deadline_moves_to_next_oldest(self, clock: FakeClock) -> None:
        """After a batch, the deadline follows the new head of the queue."""
        b = make_batcher(clock)
        for i in range(4):
            b.offer(frame(clock, i))
        clock.advance(300 * US)
        second = clock.mono
        b.offer(frame(clock, 4))
        assert b.poll() is not None
        assert b.next_deadline_ns() == second + 2 * MS


class TestMicroBatcherBackpressure:
    def test_queue_cap_refuses(self, clock: FakeClock) -> None:
        """Offers beyond queue_cap return False and leave the queue untouched."""
        b = make_batcher(clock)
        for i in range(8):
            assert b.offer(frame(clock, i))
        assert b.full
        assert b.space == 0
        assert not b.offer(frame(clock, 8))
        assert len(b) == 8

    def test_a_message_of_several_images_goes_in_whole(self, clock: FakeClock) -> None:
        """beyond_cap (the images of one message read while there was space) may pass the cap; the queue is full
        until it is back under it, and space never goes below 0."""
        b = make_batcher(clock)
        for i in range(7):
            assert b.offer(frame(clock, i))
        for i in range(7, 11):
            assert b.offer(frame(clock, i), beyond_cap=True)
        assert (len(b), b.full, b.space) == (11, True, 0)
        assert not b.offer(frame(clock, 11))

    def test_space_recovers_after_batch(self, clock: FakeClock) -> None:
        """Forming a batch frees space for the caller to resume reading."""
        b = make_batcher(clock)
        for i in range(8):
            b.offer(frame(clock, i))
        assert b.poll() is not None
        assert not b.full
        assert b.space == 4


class TestMicroBatcherShedding:
    def test_old_item_shed_fresh_item_run(self, clock: FakeClock) -> None:
        """Only the item older than the deadline is shed; its fresh neighbour is inferred."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0, age_ns=101 * MS))
        b.offer(frame(clock, 1, age_ns=1 * MS))
        clock.advance(2 * MS)
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.shed) == [0]
        assert seqs(batch.run) == [1]
        assert batch.padded_size == 1

    def test_age_exactly_at_deadline_is_kept(self, clock: FakeClock) -> None:
        """Shedding needs age strictly greater than the deadline."""
        b = make_batcher(clock, max_queue_delay_us=0)
        b.offer(frame(clock, 0, age_ns=100 * MS))
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.run) == [0]
        assert batch.shed == []

    def test_shed_promptly_before_batch_timer(self, clock: FakeClock) -> None:
        """A stale item is shed at once, without waiting for the batch timer or the fresh items."""
        b = make_batcher(clock)
        b.offer(frame(clock, 1, age_ns=200 * MS))
        b.offer(frame(clock, 0, age_ns=1 * MS))
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.shed) == [1]
        assert batch.run == []
        assert batch.padded_size == 0
        assert [seqs(x.run) for x in b.flush()] == [[0]]

    def test_shed_items_do_not_count_toward_full(self, clock: FakeClock) -> None:
        """Four queued items of which two are stale are not a full batch of fresh work."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0, age_ns=200 * MS))
        b.offer(frame(clock, 2, age_ns=200 * MS))
        b.offer(frame(clock, 1))
        b.offer(frame(clock, 3))
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.shed) == [0, 2]
        assert batch.run == []
        assert len(b) == 2

    def test_shedding_is_by_receipt_across_cameras(self, clock: FakeClock) -> None:
        """Age comes from each frame's receipt on the agent's clock, whichever camera sent it."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0, camera="b", age_ns=150 * MS))
        b.offer(frame(clock, 0, camera="a"))
        b.offer(frame(clock, 1, camera="a"))
        clock.advance(2 * MS)
        batch = b.poll()
        assert batch is not None
        assert [(p.camera_id, p.seq) for p in batch.shed] == [("b", 0)]
        assert [(p.camera_id, p.seq) for p in batch.run] == [("a", 0), ("a", 1)]

    def test_waiting_item_ages_out(self, clock: FakeClock) -> None:
        """An item that was fresh on arrival is shed once it has waited past the deadline."""
        b = make_batcher(clock, max_queue_delay_us=500_000)
        b.offer(frame(clock, 0))
        clock.advance(100 * MS)
        assert b.poll() is None
        clock.advance(1)
        batch = b.poll()
        assert batch is not None
        assert seqs(batch.shed) == [0]


class TestMicroBatcherOrder:
    def test_fifo_order(self, clock: FakeClock) -> None:
        """Batches take items in arrival order across successive batches."""
        b = make_batcher(clock)
        for i in range(8):
            b.offer(frame(clock, i))
        first, second = b.poll(), b.poll()
        assert first is not None and second is not None
        assert seqs(first.run) == [0, 1, 2, 3]
        assert seqs(second.run) == [4, 5, 6, 7]

    def test_per_camera_seq_order_within_batch(self, clock: FakeClock) -> None:
        """Interleaved cameras keep each camera's seq ascending in the run, even after a shed gap."""
        b = make_batcher(clock, max_batch_size=8, queue_cap=8, batch_sizes=(1, 2, 4, 8))
        arrivals = [("a", 0, 150 * MS), ("b", 10, 0), ("a", 1, 0), ("b", 11, 0), ("a", 2, 0), ("b", 12, 0)]
        for cam, seq, age in arrivals:
            b.offer(frame(clock, seq, camera=cam, age_ns=age))
        clock.advance(2 * MS)
        batch = b.poll()
        assert batch is not None
        by_cam: dict[str, list[int]] = {}
        for p in batch.run:
            by_cam.setdefault(p.camera_id, []).append(p.seq)
        assert by_cam == {"a": [1, 2], "b": [10, 11, 12]}
        assert batch.padded_size == 8


class TestMicroBatcherFlush:
    def test_flush_drains_everything(self, clock: FakeClock) -> None:
        """flush() ignores the timer and empties the queue in max-sized FIFO batches."""
        b = make_batcher(clock)
        for i in range(7):
            b.offer(frame(clock, i))
        batches = list(b.flush())
        assert [seqs(x.run) for x in batches] == [[0, 1, 2, 3], [4, 5, 6]]
        assert [x.padded_size for x in batches] == [4, 4]
        assert len(b) == 0
        assert list(b.flush()) == []

    def test_flush_still_sheds_stale(self, clock: FakeClock) -> None:
        """Stale items are shed, not inferred, during the shutdown drain."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0, age_ns=200 * MS))
        b.offer(frame(clock, 1))
        batches = list(b.flush())
        assert len(batches) == 1
        assert batches[0].padded_size == 1
        assert seqs(batches[0].shed) == [0]
        assert seqs(batches[0].run) == [1]


class TestMicroBatcherStats:
    def test_counters_and_invariant(self, clock: FakeClock) -> None:
        """Stats count offers, refusals, sheds and batches by run size, and every accept is accounted for."""
        b = make_batcher(clock)
        for i in range(9):
            b.offer(frame(clock, i, age_ns=200 * MS if i == 0 else 0))
        first = b.poll()
        assert first is not None
        clock.advance(2 * MS)
        second = b.poll()
        assert second is not None
        s = b.stats
        assert (s.offered, s.refused, s.accepted) == (9, 1, 8)
        assert s.shed == 1
        assert s.inferred == 7
        assert s.batches_by_size == {4: 1, 3: 1}
        assert s.depth == 0
        assert s.accepted == s.inferred + s.shed + s.depth

    def test_snapshot_is_a_copy(self, clock: FakeClock) -> None:
        """Mutating a stats snapshot does not touch the batcher's counters."""
        b = make_batcher(clock)
        snap = b.stats
        snap.batches_by_size[4] = 99
        snap.shed = 99
        assert b.stats.batches_by_size == {}
        assert b.stats.shed == 0

    def test_depth_tracks_queue(self, clock: FakeClock) -> None:
        """depth reports the current queue length."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0))
        b.offer(frame(clock, 1))
        assert b.stats.depth == 2 == len(b)


class TestMicroBatcherBusy:
    """While a batch is already running, only a full batch is due; stale items are still shed."""

    def test_partial_batch_waits_while_busy(self, clock: FakeClock) -> None:
        """Past the batch timer a partial batch goes when idle, but not while busy."""
        b = make_batcher(clock)
        for i in range(2):
            b.offer(frame(clock, i))
        clock.advance(5 * MS)
        assert b.poll(busy=True) is None
        batch = b.poll()
        assert batch is not None and seqs(batch.run) == [0, 1]

    def test_full_batch_goes_while_busy(self, clock: FakeClock) -> None:
        """A full batch is due at once even while busy."""
        b = make_batcher(clock)
        for i in range(5):
            b.offer(frame(clock, i))
        batch = b.poll(busy=True)
        assert batch is not None and seqs(batch.run) == [0, 1, 2, 3]

    def test_busy_deadline_is_the_shed_deadline(self, clock: FakeClock) -> None:
        """While busy the next deadline ignores the batch timer and is when the oldest item goes stale."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0, age_ns=1 * MS))
        assert b.next_deadline_ns() == clock.mono + 1 * MS
        assert b.next_deadline_ns(busy=True) == clock.mono + 99 * MS + 1

    def test_stale_items_shed_while_busy(self, clock: FakeClock) -> None:
        """An item over the shed deadline comes out as shed even while busy."""
        b = make_batcher(clock)
        b.offer(frame(clock, 0, age_ns=150 * MS))
        b.offer(frame(clock, 1))
        batch = b.poll(busy=True)
        assert batch is not None and seqs(batch.shed) == [0] and batch.run == []
