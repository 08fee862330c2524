"""Dynamic micro-batching policy: when a batch forms, which frames are shed, and how far it is padded."""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T", bound="Queued")

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


class Queued(Protocol):
    """What the batcher needs of an item: when it arrived, on the agent's own monotonic clock."""

    @property
    def received_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Batch(Generic[T]):
    """What poll() hands out: frames to infer (padded to a compiled size) and frames to shed."""

    run: list[T]
    shed: list[T]
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

    def __init__(self, policy: BatchPolicy, monotonic_ns: Clock = time.monotonic_ns) -> None:
        self.policy = policy
        self._monotonic_ns = monotonic_ns
        # Age is judged on the agent's own receive time, never the camera's clock: a camera whose NTP offset
        # exceeds the deadline must not get every frame shed (SPEC section 7). So FIFO order is age order.
        self._queue: deque[T] = deque()
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
        return max(0, self.policy.queue_cap - len(self._queue))

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

    def offer(self, item: T, *, beyond_cap: bool = False) -> bool:
        """Enqueue item; False (and nothing queued) when at queue_cap, which is the backpressure signal.

        beyond_cap: the images of one message that carries several (SPEC 4.1) were read as a whole while there was
        space, so they all go in; the queue then stays full until it is back under the cap.
        """
        self._stats.offered += 1
        if self.full and not beyond_cap:
            self._stats.refused += 1
            return False
        self._queue.append(item)
        return True

    def next_deadline_ns(self, *, busy: bool = False) -> int | None:
        """Monotonic ns by which poll(busy=...) should next run (<= now: poll at once); None when empty.

        That is when the oldest item has waited max_queue_delay (not while busy, see poll), or earlier if a
        batch is already full or the oldest item crosses the shed deadline first.
        """
        if not self._queue:
            return None
        if len(self._queue) >= self.policy.max_batch_size:
            return self._monotonic_ns()
        # Age is "> shed_deadline", so the item becomes sheddable one nanosecond after this point.
        shed_at = self._queue[0].received_ns + self.policy.shed_deadline_ns + 1
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

    def expire(self) -> list[T]:
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
        run: list[T] = []
        if self._queue and (force or self._run_due(busy)):
            n = min(len(self._queue), self.policy.max_batch_size)
            run = [self._queue.popleft() for _ in range(n)]
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

    def _shed_stale(self) -> list[T]:
        oldest_ok = self._monotonic_ns() - self.policy.shed_deadline_ns
        shed: list[T] = []
        q = self._queue
        while q and q[0].received_ns < oldest_ok:
            shed.append(q.popleft())
        self._stats.shed += len(shed)
        return shed
