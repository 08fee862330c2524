"""Per-camera release order: verdicts leave in the order their frames were accepted, whatever finishes first."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

V = TypeVar("V")


class Sequencer(Generic[V]):
    """Holds finished verdicts until every earlier accepted frame of the same camera has one.

    A camera's frames arrive over one connection in seq order, so acceptance order is seq order; shed and
    rejected verdicts are ready sooner than inferred ones and would otherwise overtake them.
    """

    def __init__(self) -> None:
        self._order: dict[str, deque[int]] = {}
        self._done: dict[str, dict[int, V]] = {}
        self._owed: dict[str, set[int]] = {}

    def accept(self, camera_id: str, seq: int) -> bool:
        """Record that a frame was accepted and is owed exactly one verdict; False if already owed one."""
        owed = self._owed.setdefault(camera_id, set())
        if seq in owed:
            return False
        owed.add(seq)
        self._order.setdefault(camera_id, deque()).append(seq)
        self._done.setdefault(camera_id, {})
        return True

    def complete(self, camera_id: str, seq: int, verdict: V) -> list[V]:
        """Store a verdict; return the verdicts of this camera that may now be published, in order."""
        owed = self._owed.get(camera_id, set())
        done = self._done.get(camera_id, {})
        if seq not in owed or seq in done:
            raise ValueError(f"no verdict is owed for camera {camera_id!r} seq {seq}")
        done[seq] = verdict
        order = self._order[camera_id]
        out = []
        while order and order[0] in done:
            head = order.popleft()
            owed.discard(head)
            out.append(done.pop(head))
        if not order:
            # Forget idle cameras so a long run with many camera ids does not grow without bound.
            del self._order[camera_id], self._done[camera_id], self._owed[camera_id]
        return out

    @property
    def outstanding(self) -> int:
        """Accepted frames still owed a verdict or held back behind one."""
        return sum(len(q) for q in self._order.values())
