"""Tests for agent settings: defaults, environment, config files and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError


class TestSettings:
    """Settings are validated once, from every source, with a clear message."""

    def test_defaults_work_together(self) -> None:
        """The defaults bind distinct loopback endpoints and compile powers of two up to the max batch."""
        s = config.load()
        assert s.frames_endpoint != s.publish_endpoint
        assert s.batch_sizes == (1, 2, 4, 8, 16)

    def test_backend_precision_spelling(self) -> None:
        """backend litert:int8, as `tdn bench stream` spells it, is split into backend and precision."""
        s = config.load(backend="litert:int8")
        assert (s.backend, s.precision) == ("litert", "int8")
        with pytest.raises(ConfigError, match="litert runs fp32 or int8"):
            config.load(backend="litert", precision="bf16")
        with pytest.raises(ConfigError, match="choose one of"):
            config.load(backend="litert:bf16")

    def test_env_prefix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """TDN_* environment variables set values, lists as comma-separated text."""
        monkeypatch.setenv("TDN_MAX_BATCH_SIZE", "12")
        monkeypatch.setenv("TDN_PASS_CLASSES", "scratches,patches")
        s = config.load()
        assert s.max_batch_size == 12
        assert s.batch_sizes == (1, 2, 4, 8, 12)
        assert s.pass_classes == ["scratches", "patches"]

    def test_config_file_key_value(self, tmp_path: Path) -> None:
        """A KEY=VALUE file with TDN_ prefixes and comments is read."""
        f = tmp_path / "agent.env"
        f.write_text("# line PC 3\nTDN_AGENT_ID=line3\nshed_deadline_ms=100\n")
        s = config.load(f)
        assert (s.agent_id, s.shed_deadline_ms) == ("line3", 100.0)

    def test_config_file_json(self, tmp_path: Path) -> None:
        """A JSON object file is read, and explicit overrides win over it."""
        f = tmp_path / "agent.json"
        f.write_text('{"max_queue_delay_us": 500, "agent_id": "a"}')
        s = config.load(f, agent_id="b")
        assert (s.max_queue_delay_us, s.agent_id) == (500, "b")

    @pytest.mark.parametrize(
        ("overrides", "needle"),
        [
            ({"max_batch_size": "0"}, "max_batch_size"),
            ({"frames_endpoint": "http://x"}, "frames_endpoint"),
            ({"pass_classes": "rust"}, "unknown class 'rust'"),
            ({"queue_cap": "4", "max_batch_size": "8"}, "queue_cap"),
            ({"model_path": "/nonexistent/model.keras"}, "does not exist"),
            ({"agent_id": "bad id!"}, "agent_id"),
            ({"no_such_setting": "1"}, "no_such_setting"),
        ],
    )
    def test_bad_settings_are_one_clear_error(self, overrides: dict[str, str], needle: str) -> None:
        """Each bad value raises ConfigError naming the setting."""
        with pytest.raises(ConfigError) as err:
            config.load(**overrides)
        assert needle in str(err.value)
        assert "\n" not in str(err.value)

    def test_missing_config_file(self, tmp_path: Path) -> None:
        """A config file that does not exist is named in the error."""
        with pytest.raises(ConfigError, match="not found"):
            config.load(tmp_path / "nope.env")

    def test_describe_lists_every_setting(self) -> None:
        """--help and the README list every setting with its environment variable."""
        names = {env for env, _, _ in config.describe()}
        assert {"TDN_MAX_BATCH_SIZE", "TDN_SHED_DEADLINE_MS", "TDN_BACKEND"} <= names
        assert len(names) == len(config.AgentSettings.model_fields)
