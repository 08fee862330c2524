"""systemd/agent.env.example lists every agent setting, with values the agent accepts."""

from __future__ import annotations

import re
from pathlib import Path

from agent import config

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "agent.env.example"
UNIT = EXAMPLE.parent / "tdn-agent.service"


class TestEnvExample:
    """The example environment file the install copies to /etc/tdn/agent.env."""

    def test_every_setting_listed(self) -> None:
        """Each TDN_ variable of describe() appears as a KEY= line (regenerate with .ci/env-example)."""
        listed = set(re.findall(r"^#?(TDN_[A-Z0-9_]+)=", EXAMPLE.read_text(), re.M))
        missing = [env for env, _, _ in config.describe() if env not in listed]
        assert not missing, f"missing from {EXAMPLE.name}: {missing}; run .ci/env-example"

    def test_no_unknown_settings(self) -> None:
        """No line names a setting the agent does not have (a renamed or removed one)."""
        known = {env for env, _, _ in config.describe()}
        listed = set(re.findall(r"^#?(TDN_[A-Z0-9_]+)=", EXAMPLE.read_text(), re.M))
        assert listed <= known, f"unknown settings in {EXAMPLE.name}: {sorted(listed - known)}"

    def test_values_load(self, tmp_path: Path) -> None:
        """Uncommenting every line that has a value gives settings the agent validates without error."""
        lines = [m.group(1) for m in re.finditer(r"^#(TDN_[A-Z0-9_]+=.+)$", EXAMPLE.read_text(), re.M)]
        env = tmp_path / "agent.env"
        env.write_text("\n".join(lines) + "\n")
        model = tmp_path / "m.keras"
        model.write_bytes(b"")
        s = config.load(env, model_path=str(model))
        assert s.metrics_addr == "127.0.0.1" and s.metrics_port == 9108 and not s.curve_enabled

    def test_unit_metrics_on_loopback(self) -> None:
        """The unit serves metrics on loopback only."""
        text = UNIT.read_text()
        assert "Environment=TDN_METRICS_ADDR=127.0.0.1" in text
        assert "Environment=TDN_METRICS_PORT=" in text
