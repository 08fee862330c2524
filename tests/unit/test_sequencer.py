"""Tests for the per-camera release order of verdicts."""

from __future__ import annotations

import pytest

from agent.sequencer import Sequencer


class TestSequencer:
    """Verdicts leave in acceptance order per camera, each exactly once."""

    def test_in_order_completion_releases_immediately(self) -> None:
        """A verdict for the oldest owed frame is released at once."""
        s: Sequencer[str] = Sequencer()
        t = s.admit("cam1")
        assert s.complete("cam1", t, "v0") == ["v0"]
        assert s.outstanding == 0

    def test_early_verdict_waits_for_earlier_frames(self) -> None:
        """A shed verdict that overtakes an inferred one is held until the earlier one is done."""
        s: Sequencer[str] = Sequencer()
        t5, t6, t7 = (s.admit("cam1") for _ in range(3))
        assert s.complete("cam1", t7, "v7") == []
        assert s.complete("cam1", t5, "v5") == ["v5"]
        assert s.complete("cam1", t6, "v6") == ["v6", "v7"]

    def test_cameras_are_independent(self) -> None:
        """One camera's slow frame never holds back another camera's verdicts."""
        s: Sequencer[str] = Sequencer()
        s.admit("cam1")
        t = s.admit("cam2")
        assert s.complete("cam2", t, "b0") == ["b0"]
        assert s.outstanding == 1

    def test_second_verdict_raises(self) -> None:
        """Completing a ticket twice is a bug, not a silent duplicate."""
        s: Sequencer[str] = Sequencer()
        s.admit("cam1")
        t = s.admit("cam1")
        s.complete("cam1", t, "a")
        with pytest.raises(ValueError, match="no verdict is owed"):
            s.complete("cam1", t, "b")

    def test_unknown_or_foreign_ticket_raises(self) -> None:
        """A ticket never issued, or issued to another camera, is refused."""
        s: Sequencer[str] = Sequencer()
        t = s.admit("cam1")
        with pytest.raises(ValueError):
            s.complete("cam9", 0, "x")
        with pytest.raises(ValueError):
            s.complete("cam2", t, "x")

    def test_reused_seq_gets_its_own_place(self) -> None:
        """Two frames of one camera carrying the same seq are two tickets, released in acceptance order."""
        s: Sequencer[str] = Sequencer()
        first, second = s.admit("cam1"), s.admit("cam1")
        assert s.complete("cam1", second, "repeat") == []
        assert s.complete("cam1", first, "original") == ["original", "repeat"]
        assert s.outstanding == 0
