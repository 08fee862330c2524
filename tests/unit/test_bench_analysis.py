"""Unit tests for the benches' pure parts: the hot-swap analysis, the variant the stream bench probes, the bridge
bench's CPU layout."""

from __future__ import annotations

import argparse
import os
from typing import Any

import pytest

from agent.lab.bench.bridge import _layout
from agent.lab.bench.stream import served_variant
from agent.lab.bench.swap import analyse

MS = 1_000_000
OLD, NEW = "tdn-aaaa/tensorflow-fp32", "tdn-next-bbbb/tensorflow-fp32"


def rows_for(cam: str, n: int, swap_at: int, base_ns: int, slow: frozenset[int] = frozenset()
             ) -> list[tuple[str, int, int, int, str, str]]:
    """One camera's verdicts: seq i captured at base + 10 ms * i, answered in 5 ms (50 ms for seqs in slow)."""
    out = []
    for i in range(n):
        cap = base_ns + 10 * MS * i
        out.append((cam, i, cap, cap + (50 if i in slow else 5) * MS, OLD if i < swap_at else NEW, "ok"))
    return out


class TestAnalyse:
    """Figures of a swap from the verdicts a subscriber recorded."""

    def test_clean_swap(self) -> None:
        """Nothing lost or doubled, one model change per camera, and the swap window's p99 against the steady one."""
        base = 10**18
        rows = rows_for("a", 400, 200, base, slow=frozenset({205})) + rows_for("b", 400, 210, base)
        r = analyse(rows, sent=800, hup_ns=base + 1900 * MS, window_s=0.2, settle_ns=base)
        assert r["lost"] == 0 and r["duplicates"] == 0
        assert r["model_id_changes_per_camera"] == {"a": 1, "b": 1}
        assert r["old_model_id"] == OLD and r["new_model_id"] == NEW
        assert r["swap_after_hup_s"] == 0.105  # a's seq 200: captured at 2000 ms, answered at 2005; SIGHUP at 1900
        assert r["steady"]["p99_ms"] == 5.0
        assert r["during"]["max_ms"] == 50.0 and r["p99_ratio"] is not None and r["p99_ratio"] > 2

    def test_lost_and_doubled(self) -> None:
        """A frame without a verdict counts lost, a verdict twice counts as a duplicate, a flip back as a change."""
        base = 10**18
        rows = rows_for("a", 10, 5, base)
        rows = [r for r in rows if r[1] != 3] + [rows[7]]
        rows.append(("a", 9, base + 90 * MS, base + 95 * MS, OLD, "ok"))  # seq 9 again, on the old model
        r = analyse(rows, sent=10, hup_ns=base + 40 * MS, window_s=0.0, settle_ns=base)
        assert r["lost"] == 1 and r["duplicates"] == 2
        assert r["model_id_changes_per_camera"]["a"] >= 2


class TestServedVariant:
    """The stream bench probes the capacity of the variant the agent serves, not of what was asked."""

    def test_from_model_id(self) -> None:
        """auto resolves to the backend:precision in the ready event's model_id; without one, the request stands."""
        assert served_variant({"model_id": "tinydefectnet-ff30e4330a01/litert-fp32"}, "auto") == "litert:fp32"
        assert served_variant({"model_id": "magnetic-tile-5caa3e37e399/openvino-int8"}, "auto") == "openvino:int8"
        assert served_variant({}, "tensorflow") == "tensorflow"


class TestFrameBench:
    """`tdn bench frame` times the path an ok verdict takes through the agent's own code."""

    def test_every_frame_is_decided(self, monkeypatch: Any) -> None:
        """The stand-in backend's output is decided (pass/divert, not refused or sent to review), 1 or 8 images a
        message: a bench whose verdicts were refused would time the wrong path (it once did: the card's OOD check
        needed pooled features the bench did not give)."""
        import collections

        import agent.line as line_mod
        from agent.config import DEFAULT_MODEL
        from agent.lab.bench.frame import measure

        decided: collections.Counter[str] = collections.Counter()
        original = line_mod.Line._decide

        def counting(self: Any, *args: Any) -> Any:
            out = original(self, *args)
            decided.update(v.decision.value for v in out)
            return out

        monkeypatch.setattr(line_mod.Line, "_decide", counting)
        for images in (1, 8):
            stages, n = measure(DEFAULT_MODEL, 256, 16, 200, 4, images)
            assert n == 256 and all(t > 0 for t in stages.values())
        assert sum(decided.values()) == 512 and decided.keys() <= {"pass", "divert"}


class TestBridgeLayout:
    """Where `tdn bench bridge` puts the bridge and what stands in for the plant."""

    def _args(self, bridge: str | None = None, clients: str | None = None) -> argparse.Namespace:
        return argparse.Namespace(bridge_cpus=bridge, clients_cpus=clients)

    def test_default_gives_the_bridge_the_last_cpu(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """On two or more CPUs the bridge gets the last one and everything else the rest; on one, nothing is pinned."""
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
        assert _layout(self._args()) == ("2", "0,1")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
        assert _layout(self._args()) == ("", "")

    def test_explicit_and_none(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Given CPUs are kept as they are, and 'none' leaves that side unpinned."""
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert _layout(self._args("0", "1")) == ("0", "1")
        assert _layout(self._args("none", "none")) == ("", "")
        assert _layout(self._args(clients="none")) == ("1", "")
