"""The README documents every agent setting and leads with the two fresh-machine commands."""

from __future__ import annotations

from pathlib import Path

from agent import config

README = Path(__file__).resolve().parents[2] / "README.md"


class TestReadme:
    """What a line engineer reads first stays true as settings change."""

    def test_every_setting_documented(self) -> None:
        """Each TDN_ variable appears in the README's settings table."""
        text = README.read_text()
        missing = [env for env, _, _ in config.describe() if f"`{env}`" not in text]
        assert not missing, f"settings missing from README.md: {missing}"

    def test_leads_with_two_commands(self) -> None:
        """The first code block sets up and runs the demo, then the tests."""
        block = README.read_text().split("```bash", 1)[1].split("```", 1)[0]
        assert "tdn demo" in block and ".ci/run" in block
