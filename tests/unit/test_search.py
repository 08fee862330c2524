"""Tests for the design search's pure parts: the sampler, the analytic budget and the winner rule."""

from __future__ import annotations

import itertools

from agent.lab.model.flops import netscore
from agent.lab.model.search import analytic_macs, best, candidates


class TestCandidates:
    """Candidates honour the indicator function before anything is built."""

    def test_in_band_and_within_params(self) -> None:
        """Every yielded design has 2 x MACs within 5% of 100M and at most 430K parameters."""
        for spec in itertools.islice(candidates(0, 100e6, 0.05, 430_000), 20):
            macs, params = analytic_macs(spec)
            assert abs(2 * macs - 100e6) <= 5e6 and params <= 430_000

    def test_seeded(self) -> None:
        """The same seed gives the same candidates (a resumed search sees the same sequence)."""
        a = [s.key() for s in itertools.islice(candidates(3, 100e6, 0.05, 430_000), 5)]
        b = [s.key() for s in itertools.islice(candidates(3, 100e6, 0.05, 430_000), 5)]
        assert a == b


class TestWinner:
    """NetScore decides among designs within half a point of the best accuracy."""

    def test_netscore_formula(self) -> None:
        """Omega = 20 log10(a^2 / sqrt(p) / sqrt(m)) with p in millions and m in billions of MACs."""
        assert abs(netscore(100.0, 1_000_000, 1_000_000_000) - 80.0) < 1e-9

    def test_accuracy_floor_before_netscore(self) -> None:
        """A tiny design that is clearly less accurate loses to a larger accurate one; finalists win over screens."""
        rows = [
            {"status": "finalist", "val_accuracy": 0.99, "netscore": 100.0, "key": "a"},
            {"status": "finalist", "val_accuracy": 0.95, "netscore": 110.0, "key": "b"},
            {"status": "finalist", "val_accuracy": 0.987, "netscore": 103.0, "key": "c"},
            {"status": "trained", "val_accuracy": 1.0, "netscore": 200.0, "key": "d"},
        ]
        assert best(rows)["key"] == "c"
        assert best([r for r in rows if r["status"] == "trained"])["key"] == "d"
        assert best([]) is None
