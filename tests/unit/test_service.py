"""Unit tests for the agent's pure helpers: the backend output check."""

from __future__ import annotations

import numpy as np
import pytest

from agent.service import check_output


class TestCheckOutput:
    """check_output turns a runtime's misbehaviour into an error for the batch, never lost frames."""

    def test_trims_padding_rows(self) -> None:
        """A padded batch's extra rows are dropped; the real rows come back unchanged."""
        probs = np.full((8, 6), 1 / 6, np.float32)
        assert check_output(probs, 5).shape == (5, 6)

    @pytest.mark.parametrize(
        ("probs", "match"),
        [
            (np.full((3, 6), 1 / 6), "shape"),  # fewer rows than frames: some would get no verdict
            (np.full((4, 5), 0.2), "shape"),
            (np.full((4,), 0.2), "shape"),
            (np.array([[np.nan, 0, 0, 0, 0, 1]] * 4), "non-finite"),
            (np.array([[np.inf, 0, 0, 0, 0, 1]] * 4), "non-finite"),
        ],
    )
    def test_bad_output_is_an_error(self, probs: np.ndarray, match: str) -> None:
        """Short, misshapen or non-finite output raises ValueError naming the problem."""
        with pytest.raises(ValueError, match=match):
            check_output(probs, 4)
