"""Unit tests for the demo and benchmark launch helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.demo import _backend, free_endpoints


class TestFreeEndpoints:
    """free_endpoints picks loopback endpoints an agent can bind."""

    def test_distinct(self) -> None:
        """Every call returns n different ports, so frames and publish endpoints never collide."""
        for _ in range(200):
            eps = free_endpoints(3)
            assert len(set(eps)) == 3
            assert all(e.startswith("tcp://127.0.0.1:") and int(e.rsplit(":", 1)[1]) > 0 for e in eps)


class TestDemoBackend:
    """The demo's first-start hint asks the agent's settings which backend it will start with."""

    def test_flag_env_and_dotenv(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """--backend wins; else TDN_BACKEND; else a .env in the working directory; else auto."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.delenv("TDN_BACKEND", raising=False)
        assert _backend(None) == "auto"
        (tmp_path / ".env").write_text("TDN_BACKEND=litert\n")
        assert _backend(None) == "litert"
        monkeypatch.setenv("TDN_BACKEND", "tensorflow")
        assert _backend(None) == "tensorflow"
        assert _backend("openvino") == "openvino"

    def test_a_bad_setting_reads_as_auto(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A setting the agent will refuse does not stop the hint; the agent names it."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("TDN_EXPLAIN_INTERVAL_S", "-1")
        assert _backend(None) == "auto"
