"""The backend interface: load, warm up every batch size, infer, and report identity; pre/post are pure."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError

IMAGE_SHAPE = (200, 200, 1)


def preprocess(images: list[np.ndarray], padded: int) -> np.ndarray:
    """Stack uint8 [200,200] images into float32 [padded,200,200,1]; rows past len(images) stay zero."""
    batch = np.zeros((padded, *IMAGE_SHAPE), np.float32)
    for i, img in enumerate(images):
        batch[i, :, :, 0] = img
    return batch


def postprocess(probs: np.ndarray, n: int) -> np.ndarray:
    """Drop the padding rows."""
    return np.asarray(probs[:n], np.float32)


def read_card(model_path: Path) -> dict[str, Any]:
    """The model card (JSON beside the model), or raise naming what is missing."""
    card_path = model_path.with_suffix(".json")
    if not model_path.is_file():
        raise ModelError(f"model {model_path} not found")
    if not card_path.is_file():
        raise ModelError(f"model card {card_path} not found (it is written beside the model by `tdn train`)")
    try:
        card: dict[str, Any] = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"model card {card_path}: invalid JSON ({exc})") from None
    return card


def model_id(model_path: Path) -> str:
    """Name plus content hash, so every verdict names the exact weights that made it."""
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]
    return f"tinydefectnet-{digest}"


class Backend(ABC):
    """One inference runtime. Call load(), then warmup(sizes), then infer() from one thread."""

    name = "base"

    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        self.model_path = Path(model_path)
        self.threads = threads
        self.model_id = ""
        self.card: dict[str, Any] = {}

    @abstractmethod
    def load(self) -> None:
        """Load the model (and build per-runtime artifacts)."""

    @abstractmethod
    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Compile and run every batch size once, so the hot path never compiles."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n,200,200,1] raw pixels (n a warmed size) -> softmax probabilities [n,6]."""

    @abstractmethod
    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and the last feature map, for CAM explanations (off the hot path)."""

    @abstractmethod
    def cam_weights(self) -> np.ndarray:
        """The dense head's kernel [C,6]: CAM weights of each class."""

    @abstractmethod
    def identity(self) -> dict[str, str]:
        """Runtime, versions, precision and threads, for the log, the heartbeat and benchmarks."""
