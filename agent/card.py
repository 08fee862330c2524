"""The model card: the one reader of a model's JSON card (classes, pass classes, input, self-test, explanation)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError
from agent.explain import AGENT_METHOD, GRADIENT_FREE
from agent.geometry import InputSpec, self_test_inputs

# How far a runtime's probabilities may stray from the card's on the self-test inputs: int8 and bf16 variants
# move softmax outputs by a few hundredths; a wrong or corrupt model moves them by tenths.
SELF_TEST_TOLERANCE = 0.15


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(model_path: Path) -> Path:
    """Where a model's card lives: beside it, same stem, .json."""
    return Path(model_path).with_suffix(".json")


@dataclass(frozen=True)
class ModelCard:
    """What the runtime needs from a card; `raw` keeps the rest (validation figures, training record)."""

    model_path: Path
    sha256: str
    classes: tuple[str, ...]
    pass_classes: tuple[str, ...]
    input: InputSpec
    raw: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        """The model's name: its file stem (tinydefectnet, magnetic-tile)."""
        return self.model_path.stem

    @property
    def model_id(self) -> str:
        """Name plus content hash, so every verdict names the exact weights that made it."""
        return f"{self.name}-{self.sha256[:12]}"

    def variant_id(self, backend: str, precision: str) -> str:
        """The model and the variant that decides, e.g. magnetic-tile-3f2a9c1d2e4f/litert-int8."""
        return f"{self.model_id}/{backend}-{precision}"

    @property
    def explain_method(self) -> str:
        """How the agent explains this model's verdicts: the card's `explanation.method` (`tdn audit
        --choose-method` writes it), shift-cam for a card without one."""
        return str((self.raw.get("explanation") or {}).get("method", AGENT_METHOD))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image of the model's input: [size, size, 1]."""
        return (self.input.size, self.input.size, 1)

    def check_self_test(self, probs: np.ndarray, tolerance: float = SELF_TEST_TOLERANCE,
                        expected: Any = None, source: str = "the card") -> str | None:
        """None when `probs` (the runtime's output on self_test_inputs) matches the card (or `expected`, a reduced
        precision's own output recorded by its gate at export); else what is wrong."""
        if expected is None:
            expected = self.raw.get("self_test", {}).get("expected_probs")
        if expected is None:
            return None  # cards written before self-tests existed: nothing to compare against
        exp = np.asarray(expected, np.float32)
        got = np.asarray(probs, np.float32)
        if got.shape != exp.shape:
            return f"self-test output shape {got.shape} != {source}'s {exp.shape}"
        worst = float(np.max(np.abs(got - exp)))
        if worst > tolerance:
            return f"self-test probabilities differ from {source} by {worst:.3f} (> {tolerance})"
        return None

    def self_test_inputs(self) -> np.ndarray:
        """The card's deterministic self-test batch, float32 [n, size, size, 1]."""
        n = len(self.raw.get("self_test", {}).get("expected_probs", [])) or 4
        return self_test_inputs(self.input.size, n)


def read(model_path: Path | str) -> ModelCard:
    """The card beside `model_path`, checked; ModelError naming the file and the problem otherwise."""
    model_path = Path(model_path)
    path = card_path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model {model_path} not found")
    if not path.is_file():
        raise ModelError(f"model card {path} not found (it is written beside the model by `tdn train`)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"model card {path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelError(f"model card {path}: expected a JSON object")
    return from_dict(raw, model_path)


def from_dict(raw: dict[str, Any], model_path: Path) -> ModelCard:
    """A ModelCard from the card's parsed JSON; the model file is hashed here."""
    where = card_path(model_path)
    classes = raw.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise ModelError(f"model card {where}: 'classes' must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise ModelError(f"model card {where}: 'classes' has duplicates")
    passes = raw.get("pass_classes", [])
    if not isinstance(passes, list) or not set(passes) <= set(classes):
        raise ModelError(f"model card {where}: 'pass_classes' must be a list of names from 'classes'")
    try:
        spec = InputSpec.from_card(raw.get("input") or {})
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model card {where}: bad 'input': {exc}") from None
    explanation = raw.get("explanation", {})
    if not isinstance(explanation, dict) or explanation.get("method", AGENT_METHOD) not in GRADIENT_FREE:
        raise ModelError(f"model card {where}: 'explanation.method' must be one of {', '.join(GRADIENT_FREE)}")
    return ModelCard(model_path=model_path, sha256=file_sha256(model_path), classes=tuple(classes),
                     pass_classes=tuple(passes), input=spec, raw=raw)


def read_dict(model_path: Path | str) -> dict[str, Any]:
    """The card's JSON as a dict, after the same checks as read() (for the lab's reports)."""
    return read(model_path).raw
