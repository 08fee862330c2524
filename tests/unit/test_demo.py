"""Unit tests for the demo and benchmark launch helpers."""

from __future__ import annotations

from agent.cli.demo import free_endpoints


class TestFreeEndpoints:
    """free_endpoints picks loopback endpoints an agent can bind."""

    def test_distinct(self) -> None:
        """Every call returns n different ports, so frames and publish endpoints never collide."""
        for _ in range(200):
            eps = free_endpoints(3)
            assert len(set(eps)) == 3
            assert all(e.startswith("tcp://127.0.0.1:") and int(e.rsplit(":", 1)[1]) > 0 for e in eps)
