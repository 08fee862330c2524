"""Unit tests for the model card reader's explanation method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import card as cards
from agent.errors import ModelError


def write(tmp_path: Path, **extra: Any) -> Path:
    """A model file (any bytes: the reader only hashes it) and a minimal card beside it."""
    model = tmp_path / "m.keras"
    model.write_bytes(b"weights")
    (tmp_path / "m.json").write_text(json.dumps({"classes": ["ok", "dent"], "pass_classes": ["ok"], **extra}))
    return model


class TestExplainMethod:
    def test_a_card_without_a_block_is_explained_with_shift_cam(self, tmp_path: Path) -> None:
        """Cards written before `tdn audit --choose-method` keep what the agent always published."""
        assert cards.read(write(tmp_path)).explain_method == "shift-cam"

    @pytest.mark.parametrize("method", ["shift-cam-detail", "shift-cam-smooth", "shift-cam", "cam", "cam-detail"])
    def test_the_cards_method_is_the_agents(self, tmp_path: Path, method: str) -> None:
        """explanation.method names how the agent explains this model."""
        assert cards.read(write(tmp_path, explanation={"method": method})).explain_method == method

    @pytest.mark.parametrize("block", [{"method": "cam-ig"}, {"method": "magic"}, ["shift-cam"]])
    def test_a_method_no_backend_computes_is_one_clear_error(self, tmp_path: Path, block: Any) -> None:
        """A gradient method, an unknown name or a malformed block stops the load, naming the card and the key."""
        with pytest.raises(ModelError, match=r"m\.json: 'explanation\.method' must be one of cam, cam-detail"):
            cards.read(write(tmp_path, explanation=block))
