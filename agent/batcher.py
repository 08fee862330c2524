"""Dynamic micro-batching policy: when a batch forms, which frames are shed, and how far it is padded."""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

Clock = Callable[[], int]


def pad_to_compiled(n: int, sizes: Sequence[int]) -> int:
    """Return the smallest compiled batch size >= n (0 for n == 0); ValueError if none fits."""
    if n < 0:
        raise ValueError(f"batch size must be >= 0, got {n}")
    if n == 0:
        # An all-shed batch runs no inference, so it needs no compiled shape at all.
        return 0
    fitting = [s for s in sizes if s >= n]
    if not fitting:
        raise ValueError(f"no compiled batch size >= {n} in {tuple(sizes)}")
    return min(fitting)


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as a batch size is always a config mistake.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Batching knobs; batch_sizes are the shapes the model was compiled/warmed for."""

    max_batch_size: int
    max_queue_delay_us: int
    shed_deadline_ms: float
    queue_cap: int
    batch_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not _is_int(self.max_queue_delay_us) or self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be an int >= 0, got {self.max_queue_delay_us!r}")
        if (
            isinstance(self.shed_deadline_ms, bool)
            or not isinstance(self.shed_deadline_ms, int | float)
            or not math.isfinite(self.shed_deadline_ms)
            or self.shed_deadline_ms <= 0
        ):
            raise ValueError(f"shed_deadline_ms must be a finite number > 0, got {self.shed_deadline_ms!r}")
        if not _is_int(self.queue_cap) or self.queue_cap < self.max_batch_size:
            # A cap below one full batch would make the "queue full" trigger unreachable.
            raise ValueError(
                f"queue_cap must be an int >= max_batch_size ({self.max_batch_size}), got {self.queue_cap!r}"
            )
        sizes = self.batch_sizes
        if not isinstance(sizes, tuple) or not sizes:
            raise ValueError(f"batch_sizes must be a non-empty tuple, got {sizes!r}")
        if not all(_is_int(s) and s >= 1 for s in sizes):
            raise ValueError(f"batch_sizes must all be ints >= 1, got {sizes!r}")
        if any(a >= b for a, b in itertools.pairwise(sizes)):
            raise ValueError(f"batch_sizes must be strictly increasing, got {sizes!r}")
        if sizes[-1] != self.max_batch_size:
            # Smaller: a full batch has no shape to pad to. Larger: a shape that is never used.
            raise ValueError(f"batch_sizes must end at max_batch_size ({self.max_batch_size}), got {sizes!r}")

    @property
    def max_queue_delay_ns(self) -> int:
        """The batch timer in nanoseconds."""
        return self.max_queue_delay_us * 1_000

    @property
    def shed_deadline_ns(self) -> int:
        """The age limit in nanoseconds."""
        return round(self.shed_deadline_ms * 1_000_000)


@dataclass(frozen=True, slots=True)
class Pending(Generic[T]):
    """One accepted frame waiting for a batch; the payload is opaque to the policy."""

    payload: T
    camera_id: str
    seq: int
    # Camera's wall clock: only meaningful against the agent's wall clock, for age/shedding.
    capture_ns: int
    # Agent's monotonic clock at receipt: drives the batch timer, immune to NTP steps.
    received_ns: int


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """What poll() hands out: frames to infer (padded to a compiled size) and frames to shed."""

    run: list[Pending[T]]
    shed: list[Pending[T]]
    padded_size: int

    @property
    def padding(self) -> int:
        """Filler rows the model computes for nothing."""
        return self.padded_size - len(self.run)


@dataclass(slots=True)
class BatcherStats:
    """Counters since construction; accepted == inferred + shed + depth always holds."""

    batches_by_size: dict[int, int] = field(default_factory=dict)
    offered: int = 0
    refused: int = 0
    inferred: int = 0
    shed: int = 0
    depth: int = 0

    @property
    def accepted(self) -> int:
        """Offers that entered the queue."""
        return self.offered - self.refused


class MicroBatcher(Generic[T]):
    """Bounded FIFO with a Triton-style trigger (full or oldest waited long enough) plus age shedding."""

    def __init__(
        self,
        policy: BatchPolicy,
        monotonic_ns: Clock = time.monotonic_ns,
        wall_ns: Clock = time.time_ns,
    ) -> None:
        self.policy = policy
        self._monotonic_ns = monotonic_ns
        self._wall_ns = wall_ns
        self._queue: deque[Pending[T]] = deque()
        # Earliest capture_ns in the queue. Camera clocks differ, so FIFO order is not age order;
        # caching the minimum keeps poll() O(1) until some item is actually due for shedding.
        self._min_capture_ns: int | None = None
        self._stats = BatcherStats()

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        """True when offer() would refuse; the caller should stop reading its socket."""
        return len(self._queue) >= self.policy.queue_cap

    @property
    def space(self) -> int:
        """How many more items offer() would accept right now."""
        return self.policy.queue_cap - len(self._queue)

    @property
    def stats(self) -> BatcherStats:
        """A snapshot copy, safe to keep or publish."""
        s = self._stats
        return BatcherStats(
            batches_by_size=dict(s.batches_by_size),
            offered=s.offered,
            refused=s.refused,
            inferred=s.inferred,
            shed=s.shed,
            depth=len(self._queue),
        )

    def pending(self, payload: T, *, camera_id: str, seq: int, capture_ns: int) -> Pending[T]:
        """Wrap a payload, stamping received_ns from this batcher's own monotonic clock."""
        return Pending(payload, camera_id, seq, capture_ns, self._monotonic_ns())

    def offer(self, item: Pending[T]) -> bool:
        """Enqueue item; False (and nothing queued) when at queue_cap, which is the backpressure signal."""
        self._stats.offered += 1
        if self.full:
            self._stats.refused += 1
            return False
        self._queue.append(item)
        if self._min_capture_ns is None or item.capture_ns < self._min_capture_ns:
            self._min_capture_ns = item.capture_ns
        return True

    def next_deadline_ns(self, *, busy: bool = False) -> int | None:
        """Monotonic ns by which poll(busy=...) should next run (<= now: poll at once); None when empty.

        That is when the oldest item has waited max_queue_delay (not while busy, see poll), or earlier if a
        batch is already full or some item crosses the shed deadline first (converted from wall to monotonic
        time).
        """
        if not self._queue:
            return None
        now = self._monotonic_ns()
        if len(self._queue) >= self.policy.max_batch_size:
            return now
        assert self._min_capture_ns is not None
        # Age is "> shed_deadline", so the item becomes sheddable one nanosecond after this point.
        shed_at = now + self._min_capture_ns + self.policy.shed_deadline_ns + 1 - self._wall_ns()
        if busy:
            return shed_at
        return min(self._queue[0].received_ns + self.policy.max_queue_delay_ns, shed_at)

    def poll(self, *, busy: bool = False) -> Batch[T] | None:
        """Form a batch if one is due (full, or oldest waited max_queue_delay), shedding stale items first.

        busy: a batch is already running. Then only a full batch is due: a partial one would queue behind it
        as a small, inefficient batch, while waiting lets the frames arriving meanwhile join it.

        Also returns a shed-only batch as soon as any waiting item is over the shed deadline, so under
        overload stale frames get their verdict promptly instead of riding the batch timer.
        """
        return self._form(force=False, busy=busy)

    def expire(self) -> list[Pending[T]]:
        """Take out every item over the shed deadline now, without forming a run batch.

        The service calls this while inference is busy, so stale frames get their shed verdict promptly
        and fresh ones keep accumulating into the next full batch.
        """
        return self._shed_stale() if self._queue else []

    def flush(self) -> Iterator[Batch[T]]:
        """Drain everything on shutdown, ignoring the batch timer; stale items are still shed."""
        while (batch := self._form(force=True)) is not None:
            yield batch

    def _form(self, *, force: bool, busy: bool = False) -> Batch[T] | None:
        if not self._queue:
            return None
        shed = self._shed_stale()
        # The trigger is judged after shedding: a stale head must not drag fresh items out early,
        # and shed slots should not count toward a "full" batch.
        run: list[Pending[T]] = []
        if self._queue and (force or self._run_due(busy)):
            n = min(len(self._queue), self.policy.max_batch_size)
            run = [self._queue.popleft() for _ in range(n)]
            self._min_capture_ns = min((p.capture_ns for p in self._queue), default=None)
            self._stats.inferred += n
            self._stats.batches_by_size[n] = self._stats.batches_by_size.get(n, 0) + 1
        if not run and not shed:
            return None
        return Batch(run=run, shed=shed, padded_size=pad_to_compiled(len(run), self.policy.batch_sizes))

    def _run_due(self, busy: bool) -> bool:
        if len(self._queue) >= self.policy.max_batch_size:
            return True
        if busy:
            return False
        waited = self._monotonic_ns() - self._queue[0].received_ns
        return waited >= self.policy.max_queue_delay_ns

    def _shed_stale(self) -> list[Pending[T]]:
        assert self._min_capture_ns is not None
        now = self._wall_ns()
        limit = self.policy.shed_deadline_ns
        if now - self._min_capture_ns <= limit:
            return []
        shed: list[Pending[T]] = []
        keep: deque[Pending[T]] = deque()
        for item in self._queue:
            if now - item.capture_ns > limit:
                shed.append(item)
            else:
                keep.append(item)
        self._queue = keep
        self._min_capture_ns = min((p.capture_ns for p in keep), default=None)
        self._stats.shed += len(shed)
        return shed
