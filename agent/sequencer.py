"""Per-camera release order: verdicts leave in the order their frames were accepted, whatever finishes first."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

V = TypeVar("V")


class Sequencer(Generic[V]):
    """Holds finished verdicts until every frame the same camera had accepted before has one.

    Each accepted frame gets a ticket, so a camera that reuses a seq still gets each answer in its place; shed
    and rejected verdicts are ready sooner than inferred ones and would otherwise overtake them.
    """

    def __init__(self) -> None:
        self._order: dict[str, deque[int]] = {}
        self._done: dict[str, dict[int, V]] = {}
        self._owed: dict[int, str] = {}  # ticket -> camera, until its verdict is in
        self._next = 0

    def admit(self, camera_id: str) -> int:
        """Record that a frame of this camera was accepted and is owed exactly one verdict; returns its ticket."""
        self._next += 1
        self._owed[self._next] = camera_id
        self._order.setdefault(camera_id, deque()).append(self._next)
        self._done.setdefault(camera_id, {})
        return self._next

    def complete(self, camera_id: str, ticket: int, verdict: V) -> list[V]:
        """Store a ticket's verdict; return the verdicts of this camera that may now be published, in order."""
        if self._owed.get(ticket) != camera_id:
            raise ValueError(f"no verdict is owed for camera {camera_id!r} ticket {ticket}")
        del self._owed[ticket]
        done, order = self._done[camera_id], self._order[camera_id]
        done[ticket] = verdict
        out = []
        while order and order[0] in done:
            out.append(done.pop(order.popleft()))
        if not order:
            # Forget idle cameras so a long run with many camera ids does not grow without bound.
            del self._order[camera_id], self._done[camera_id]
        return out

    @property
    def outstanding(self) -> int:
        """Accepted frames still owed a verdict or held back behind one."""
        return sum(len(q) for q in self._order.values())
