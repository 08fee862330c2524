"""Tests for the pure parts of backend selection: the accuracy gate, tuning choice, profiles and names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import SUPPORTED, Choice, Variant, create, load_profile, parse, pick, profile_choice, variants
from agent.backends.gate import gate_decision, gate_record
from agent.errors import BackendError, ConfigError
from agent.lab.data import Sample, stratified_subset
from agent.lab.tune import select


def record(acc: float, fp32: float, agree: float, n: int = 1000) -> dict[str, Any]:
    return {"accuracy": acc, "fp32_accuracy": fp32, "agreement": agree, "n": n}


class TestGateDecision:
    """A reduced-precision variant passes only within 0.5 points and 1% changed decisions of fp32."""

    def test_passes_at_the_bounds(self) -> None:
        """Exactly 0.5 points lost and exactly 1% changed decisions still pass."""
        ok, why = gate_decision(record(0.945, 0.950, 0.99))
        assert ok and why.startswith("passes")

    def test_accuracy_drop_fails(self) -> None:
        """Losing more than 0.5 points fails, naming the loss."""
        ok, why = gate_decision(record(0.944, 0.950, 0.999))
        assert not ok and "loses 0.60 points" in why

    def test_changed_decisions_fail_even_without_accuracy_loss(self) -> None:
        """Changing more than 1% of top-1 decisions fails even when accuracy rises."""
        ok, why = gate_decision(record(0.960, 0.950, 0.985))
        assert not ok and "changes 1.50%" in why

    def test_record_measures_accuracy_and_agreement(self) -> None:
        """gate_record counts correct predictions of both models and their agreement."""
        rec = gate_record(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]))
        assert rec == {"accuracy": 0.5, "fp32_accuracy": 0.75, "agreement": 0.75, "n": 4}

    def test_record_rejects_mismatched_lengths(self) -> None:
        """Predictions and labels of different lengths are an error, not a silent broadcast."""
        with pytest.raises(ValueError):
            gate_record(np.zeros(3), np.zeros(4), np.zeros(4))


class TestStratifiedSubset:
    """Calibration and test subsets take every class equally."""

    def test_equal_share_per_class(self) -> None:
        """n=12 of six classes gives two of each, deterministically for a seed."""
        samples = [Sample(Path(f"{c}_{i}.jpg"), c) for c in range(6) for i in range(10)]
        sub = stratified_subset(samples, 12, seed=3)
        assert sorted(s.label for s in sub) == [c for c in range(6) for _ in range(2)]
        assert sub == stratified_subset(samples, 12, seed=3)


def row(backend: str, img_s: float, p99: float, threads: int = 2, **kw: Any) -> dict[str, Any]:
    return {"backend": backend, "precision": "fp32", "threads": threads, "knobs": {}, "batch_size": 1,
            "img_s": img_s, "p50_ms": p99 / 2, "p99_ms": p99, **kw}


class TestSelect:
    """tune picks the fastest configuration within the latency bound and the gate."""

    def test_fastest_within_bound(self) -> None:
        """A faster row over the bound loses to a slower one within it."""
        rows = [row("a", 900, 12.0), row("b", 500, 8.0), row("c", 300, 2.0)]
        chosen, meets = select(rows, 10.0)
        assert chosen is rows[1] and meets

    def test_gate_failures_and_errors_are_never_chosen(self) -> None:
        """Rows that failed the gate or errored are skipped."""
        rows = [row("a", 900, 1.0, gate_ok=False), row("b", 800, 1.0, error="boom"), row("c", 100, 1.0)]
        assert select(rows, 10.0)[0] is rows[2]

    def test_near_tie_counts_every_workers_threads(self) -> None:
        """Within 2% of the best, two single-threaded workers count as two threads, against one worker of one."""
        rows = [row("a", 1000, 5.0, threads=1, workers=2), row("a", 985, 5.0, threads=1, workers=1)]
        assert select(rows, 10.0)[0] is rows[1]
        rows = [row("a", 1000, 5.0, threads=1, workers=2), row("a", 900, 5.0, threads=1, workers=1)]
        assert select(rows, 10.0)[0] is rows[0]

    def test_near_tie_prefers_fewer_threads(self) -> None:
        """Within 2% of the best, the configuration with fewer threads wins."""
        rows = [row("a", 1000, 5.0, threads=2), row("a", 990, 5.0, threads=1)]
        assert select(rows, 10.0)[0] is rows[1]

    def test_nothing_within_bound_falls_back_to_lowest_latency(self) -> None:
        """When no row meets the bound the lowest-latency one is returned, flagged."""
        rows = [row("a", 900, 30.0), row("b", 100, 20.0)]
        chosen, meets = select(rows, 10.0)
        assert chosen is rows[1] and not meets
        assert select([], 10.0) == (None, False)


class TestProfile:
    """The tuning profile is used only for the model and host it was measured on."""

    def profile(self) -> dict[str, Any]:
        return {"model_sha256": "abc", "host": {"cpu_model": "cpu", "cores": 2},
                "choice": {"backend": "tensorflow", "precision": "fp32", "threads": 1, "knobs": {}}}

    def test_missing_profile_is_none(self, tmp_path: Path) -> None:
        """No file (or no path) means no profile."""
        assert load_profile(tmp_path / "none.json") is None and load_profile(None) is None

    @pytest.mark.parametrize("text", ["{not json", '{"choice": {"backend": "nope"}}', "[]",
                                      '{"choice": {"backend": "litert", "precision": "bf16"}}'])
    def test_malformed_profile_is_a_config_error(self, tmp_path: Path, text: str) -> None:
        """A broken or impossible profile is a one-line ConfigError."""
        p = tmp_path / "p.json"
        p.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_profile(p)
        assert "\n" not in str(err.value)

    def test_choice_for_matching_model_and_host(self, tmp_path: Path) -> None:
        """A profile of this model and host yields its choice."""
        p = tmp_path / "p.json"
        p.write_text(json.dumps(self.profile()))
        prof = load_profile(p)
        assert prof is not None
        choice, why = profile_choice(prof, "abc", "cpu", 2)
        assert choice == Choice("tensorflow", "fp32", 1, {}, "profile") and why == "ok"

    @pytest.mark.parametrize(("sha", "cpu", "cores", "needle"),
                             [("other", "cpu", 2, "another model"), ("abc", "amd", 2, "another host"),
                              ("abc", "cpu", 8, "another host")])
    def test_stale_profile_is_ignored(self, sha: str, cpu: str, cores: int, needle: str) -> None:
        """Another model's or another host's profile is ignored, with the reason."""
        choice, why = profile_choice(self.profile(), sha, cpu, cores)
        assert choice is None and needle in why


class TestNames:
    """Backend and precision names are parsed and checked before anything loads."""

    def test_parse(self) -> None:
        """backend:precision splits; a bare name has no precision."""
        assert parse("litert:int8") == ("litert", "int8") and parse("openvino") == ("openvino", None)

    def test_variants(self) -> None:
        """A comma list expands bare names to every precision the backend runs."""
        labels = [v.label for v in variants("openvino,litert:int8")]
        assert labels == [f"openvino:{p}" for p in SUPPORTED["openvino"]] + ["litert:int8"]
        assert variants("none") == []
        assert [v.label for v in variants("zendnn,zendnn:bf16")] == ["zendnn:fp32", "zendnn:bf16"]  # once each
        with pytest.raises(BackendError, match="unknown backend"):
            variants("nope")
        with pytest.raises(BackendError, match="no precision"):
            variants("zendnn:int8")

    @pytest.mark.parametrize(("name", "kwargs", "needle"),
                             [("nope", {}, "unknown backend"), ("litert", {"precision": "fp8"}, "unknown precision"),
                              ("tensorflow:bf16", {}, "no precision bf16"), ("litert:bf16", {}, "no precision bf16")])
    def test_create_rejects_bad_names(self, name: str, kwargs: dict[str, Any], needle: str) -> None:
        """create() raises a one-line BackendError without touching the model file."""
        with pytest.raises(BackendError, match=needle) as err:
            create(name, "/nonexistent.keras", **kwargs)
        assert "\n" not in str(err.value)


class TestAutoPick:
    """`auto` picks deterministically among close probe rates, and says why."""

    def test_close_rates_go_to_the_preferred_variant(self) -> None:
        """Within the tie margin the preference order decides, whichever measured fastest this time."""
        a, b = Variant("openvino", "int8"), Variant("litert", "fp32")
        for rates in ({a: 1000.0, b: 950.0}, {a: 950.0, b: 1000.0}):
            chosen, why = pick(rates)
            assert chosen == b and "within 10%" in why and "openvino:int8" in why

    def test_a_clear_winner_wins(self) -> None:
        """A variant more than the margin faster is chosen even if it is less preferred."""
        fast, slow = Variant("openvino", "int8"), Variant("litert", "fp32")
        assert pick({fast: 2000.0, slow: 1000.0})[0] == fast


class TestProbeCache:
    """A start reuses the first start's probe until the exported files, the host or the threads change."""

    @staticmethod
    def write(folder: Path, key: dict[str, Any], variant: str = "litert:fp32") -> Path:
        from agent.backends import PROBE_CACHE

        path = folder / PROBE_CACHE
        path.write_text(json.dumps({"key": key, "variant": variant, "why": "litert:fp32 (1 img/s)",
                                    "measured": "2026-12-02T00:00:00+0000"}))
        return path

    def test_same_key_gives_the_cached_choice(self, tmp_path: Path) -> None:
        """The cached variant comes back, with a reason that names the cache file."""
        from agent.backends import PROBE_CACHE, _cached_probe, _probe_key, installed

        if not installed("litert"):
            pytest.fail("the litert extra is part of the test install")
        (tmp_path / "litert-fp32.tflite").write_bytes(b"x")
        key = _probe_key(tmp_path, 1)
        choice = _cached_probe(self.write(tmp_path, key), _probe_key(tmp_path, 1))
        assert choice is not None and (choice.backend, choice.precision, choice.threads) == ("litert", "fp32", 1)
        assert PROBE_CACHE in choice.reason

    def test_a_new_file_threads_or_bad_cache_probe_again(self, tmp_path: Path) -> None:
        """A newly exported file, another thread count, an unknown variant or a corrupt file is no answer."""
        from agent.backends import _cached_probe, _probe_key

        (tmp_path / "litert-fp32.tflite").write_bytes(b"x")
        path = self.write(tmp_path, _probe_key(tmp_path, 0))
        assert _cached_probe(path, _probe_key(tmp_path, 2)) is None
        (tmp_path / "openvino-int8.xml").write_bytes(b"y")
        assert _cached_probe(path, _probe_key(tmp_path, 0)) is None
        path = self.write(tmp_path, _probe_key(tmp_path, 0), variant="tensorflow:fp32")
        assert _cached_probe(path, _probe_key(tmp_path, 0)) is None
        path.write_text("{not json")
        assert _cached_probe(path, _probe_key(tmp_path, 0)) is None


class TestFirstStartData:
    """Which labelled folder gates the first start's bf16/int8 export, and whether that export is still due."""

    @staticmethod
    def model(tmp_path: Path, data: str | None) -> Path:
        from tests.conftest import MODEL

        card = json.loads(MODEL.with_suffix(".json").read_text())
        card["training"] = {**card.get("training", {}), "data": data}
        (tmp_path / "m.json").write_text(json.dumps(card))
        (tmp_path / "m.keras").write_bytes(MODEL.read_bytes())
        return tmp_path / "m.keras"

    def test_the_setting_wins(self, tmp_path: Path) -> None:
        """TDN_EXPORT_DATA is used as given, whatever the card says."""
        from agent.backends import gate_data

        assert gate_data(self.model(tmp_path, "elsewhere"), tmp_path) == (tmp_path, "TDN_EXPORT_DATA")

    def test_the_cards_folder_relative_to_the_current_directory(self, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative training.data is found from the directory the agent runs in, and resolved."""
        from agent.backends import gate_data

        (tmp_path / "data" / "a").mkdir(parents=True)
        monkeypatch.chdir(tmp_path / "data")
        assert gate_data(self.model(tmp_path, "../data"), None) == ((tmp_path / "data").resolve(),
                                                                     "the model card's training.data")

    @pytest.mark.parametrize(("data", "needle"), [(None, "names no training data"),
                                                  ("/no/such/folder", "(/no/such/folder) is not here")])
    def test_no_folder_says_why(self, tmp_path: Path, data: str | None, needle: str) -> None:
        """A card without training.data, or naming a folder that is not on this machine, gives None and the reason."""
        from agent.backends import gate_data

        folder, why = gate_data(self.model(tmp_path, data), None)
        assert folder is None and needle in why

    def test_due_until_a_gate_or_the_marker_exists(self, tmp_path: Path) -> None:
        """Fresh artifacts are due; a gate record (tdn export --data) or the first start's marker ends that."""
        from agent.backends import FIRST_EXPORT, gated_export_due
        from agent.backends.store import model_dir

        model = self.model(tmp_path, None)
        folder = model_dir(tmp_path / "art", model)
        assert gated_export_due(model, tmp_path / "art")
        folder.mkdir(parents=True)
        (folder / "litert-fp32.tflite").write_bytes(b"x")
        assert gated_export_due(model, tmp_path / "art")
        (folder / "litert-int8.gate.json").write_text("{}")
        assert not gated_export_due(model, tmp_path / "art")
        (folder / "litert-int8.gate.json").unlink()
        (folder / FIRST_EXPORT).write_text("{}")
        assert not gated_export_due(model, tmp_path / "art")


class TestLayout:
    """Inference workers x runtime threads from the two settings, 0 meaning auto."""

    @pytest.mark.parametrize(("threads", "workers", "cores", "expected"), [
        (0, 0, 2, (2, 1)),  # the default: one single-threaded worker per core
        (0, 0, 1, (1, 1)),
        (2, 0, 2, (1, 2)),  # threads named alone: one worker of them, as TDN_THREADS always meant
        (1, 0, 4, (1, 1)),
        (0, 1, 4, (1, 4)),  # one worker named: every core's thread in it (the layout before workers)
        (0, 3, 2, (3, 1)),  # more workers than cores: still at least one thread each
        (3, 2, 2, (2, 3)),  # both named: as given
    ])
    def test_layout(self, threads: int, workers: int, cores: int, expected: tuple[int, int]) -> None:
        """Each combination resolves as the settings table says."""
        from agent.backends.base import layout

        assert layout(threads, workers, cores) == expected

    def test_tensorflow_refuses_several_workers_by_name(self, tmp_path: Path) -> None:
        """Several workers asked of TensorFlow by name are one clear error naming the runtimes that run them."""
        with pytest.raises(BackendError, match="needs litert or openvino") as err:
            create("tensorflow", tmp_path / "m.keras", workers=2)
        assert "\n" not in str(err.value)
