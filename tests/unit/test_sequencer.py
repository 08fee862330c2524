"""Tests for the per-camera release order of verdicts."""

from __future__ import annotations

import pytest

from agent.sequencer import Sequencer


class TestSequencer:
    """Verdicts leave in acceptance order per camera, each exactly once."""

    def test_in_order_completion_releases_immediately(self) -> None:
        """A verdict for the oldest owed frame is released at once."""
        s: Sequencer[str] = Sequencer()
        s.accept("cam1", 0)
        assert s.complete("cam1", 0, "v0") == ["v0"]
        assert s.outstanding == 0

    def test_early_verdict_waits_for_earlier_frames(self) -> None:
        """A shed verdict that overtakes an inferred one is held until the earlier one is done."""
        s: Sequencer[str] = Sequencer()
        for seq in (5, 6, 7):
            s.accept("cam1", seq)
        assert s.complete("cam1", 7, "v7") == []
        assert s.complete("cam1", 5, "v5") == ["v5"]
        assert s.complete("cam1", 6, "v6") == ["v6", "v7"]

    def test_cameras_are_independent(self) -> None:
        """One camera's slow frame never holds back another camera's verdicts."""
        s: Sequencer[str] = Sequencer()
        s.accept("cam1", 0)
        s.accept("cam2", 0)
        assert s.complete("cam2", 0, "b0") == ["b0"]
        assert s.outstanding == 1

    def test_duplicate_accept_is_refused(self) -> None:
        """A seq already owed a verdict cannot be accepted twice."""
        s: Sequencer[str] = Sequencer()
        assert s.accept("cam1", 3)
        assert not s.accept("cam1", 3)

    def test_second_verdict_raises(self) -> None:
        """Completing a frame twice is a bug, not a silent duplicate."""
        s: Sequencer[str] = Sequencer()
        s.accept("cam1", 0)
        s.accept("cam1", 1)
        s.complete("cam1", 1, "a")
        with pytest.raises(ValueError, match="no verdict is owed"):
            s.complete("cam1", 1, "b")

    def test_unknown_frame_raises(self) -> None:
        """A verdict for a frame never accepted is refused."""
        s: Sequencer[str] = Sequencer()
        with pytest.raises(ValueError):
            s.complete("cam9", 0, "x")

    def test_seq_reuse_after_release(self) -> None:
        """A camera restarting its seq at 0 after its frames were released is accepted again."""
        s: Sequencer[str] = Sequencer()
        s.accept("cam1", 0)
        s.complete("cam1", 0, "a")
        assert s.accept("cam1", 0)
