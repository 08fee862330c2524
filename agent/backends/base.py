"""The backend interface: load, warm up every batch size, infer, and report identity; pre/post are pure."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from agent.geometry import InputSpec

# Until load() reads the card: the default model input (agent/geometry.py is its one home).
IMAGE_SHAPE = (InputSpec().size, InputSpec().size, 1)


def preprocess(images: list[Any], padded: int) -> np.ndarray:
    """Stack uint8 [S,S] model inputs into float32 [padded,S,S,1]; rows past len(images) stay zero."""
    h, w = images[0].shape[:2] if images else IMAGE_SHAPE[:2]
    batch = np.zeros((padded, h, w, 1), np.float32)
    for i, img in enumerate(images):
        batch[i, :, :, 0] = img
    return batch


class BatchBuffers:
    """Reused float32 batch arrays for one thread: a fresh 2.5 MB np.zeros per batch costs page faults every time.

    Two per shape, alternating, so a runtime still reading the previous batch's input is never overwritten.
    """

    def __init__(self) -> None:
        self._pool: dict[tuple[int, int, int], list[tuple[np.ndarray, int]]] = {}
        self._turn = 0

    def fill(self, images: list[Any], padded: int) -> np.ndarray:
        """float32 [padded,S,S,1] holding `images` (uint8 [S,S]) in its first rows and zeros after them."""
        h, w = images[0].shape[:2] if images else IMAGE_SHAPE[:2]
        key = (padded, h, w)
        pool = self._pool.setdefault(key, [])
        self._turn ^= 1
        if len(pool) < 2:
            pool.append((np.zeros((padded, h, w, 1), np.float32), 0))
        slot = min(self._turn, len(pool) - 1)
        batch, used = pool[slot]
        n = len(images)
        for i, img in enumerate(images):
            batch[i, :, :, 0] = img  # row by row beats np.stack here: no uint8 temporary, one pass each
        if used > n:
            batch[n:used] = 0.0  # rows a previous, fuller batch left behind
        pool[slot] = (batch, n)
        return batch


def postprocess(probs: np.ndarray, n: int) -> np.ndarray:
    """Drop the padding rows."""
    return np.asarray(probs[:n], np.float32)


def layout(threads: int, workers: int, n_cores: int) -> tuple[int, int]:
    """(inference workers, runtime threads each) for a runtime that runs instances side by side; 0 means auto.

    By default one single-threaded worker per core: two batches run at once, one per core, instead of one batch
    split across the cores, whose pieces the runtime's pool must synchronise and wait for. On a 2-core Zen 4,
    `litert:int8` at batch 16 cost 669 core-ms per 100 images with 1 worker x 2 threads at 30% duty, against 595
    with 2 x 1, and `openvino:int8` 663 against 542 (README "The line under load").
    """
    if workers == 0:
        # Threads named alone keep their old meaning, one worker of that many (TDN_THREADS=1: one inference thread).
        workers = 1 if threads else max(1, n_cores)
    if threads == 0:
        threads = max(1, n_cores // workers)
    return workers, threads


class Backend(ABC):
    """One inference runtime. Call load(), then warmup(sizes), then infer() from one thread per lane.

    A lane is one inference worker's own runtime instance (`workers` of them); runtimes whose compiled requests
    are not reentrant keep one per lane, so `workers` threads may infer at once, each on its own lane.
    """

    name = "base"

    def __init__(self, model_path: str | Path, threads: int = 0) -> None:
        self.model_path = Path(model_path)
        self.threads = threads
        self.workers = 1
        self.model_id = ""
        self.card: dict[str, Any] = {}
        self.input_shape: tuple[int, int, int] = IMAGE_SHAPE  # [S,S,1] from the card, once load() read it
        self.precision = "fp32"  # what runs, once resolved from the requested precision at load()
        self.selected_by = ""  # why `auto` chose this backend or precision, when it did
        self.gate: dict[str, Any] | None = None  # a reduced precision's gate record (agent.backends.gate)

    def read_card(self) -> None:
        """Read the model card (ModelError if missing or bad): classes, input size, and the id verdicts carry."""
        from agent import card

        c = card.read(self.model_path)
        self.card, self.model_id, self.input_shape = c.raw, c.model_id, c.input_shape

    def infer_any(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for any number of rows, one warmed batch-1 call per row (self-tests, not the hot path)."""
        return np.concatenate([np.asarray(self.infer(batch[i:i + 1]))[:1] for i in range(len(batch))])

    def warmup_pooled(self, batch_sizes: tuple[int, ...]) -> None:
        """Prepare infer_pooled() at every batch size (a decision rule with an OOD score calls it per batch)."""
        for n in batch_sizes:
            self.infer_pooled(np.zeros((n, *self.input_shape), np.float32))

    def infer_pooled(self, batch: np.ndarray, lane: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and the GAP-pooled last feature map [n,C], for decision rules with an OOD score."""
        probs, feats = self.features(batch)
        return probs, np.asarray(feats, np.float32).mean(axis=(1, 2))

    @abstractmethod
    def load(self) -> None:
        """Load the model (and build per-runtime artifacts)."""

    @abstractmethod
    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Compile and run every batch size once, so the hot path never compiles."""

    @abstractmethod
    def infer(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        """float32 [n,S,S,1] raw pixels (n a warmed size) -> softmax probabilities [n,classes], on `lane`."""

    @abstractmethod
    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and the last feature map, for CAM explanations (off the hot path)."""

    @abstractmethod
    def cam_weights(self) -> np.ndarray:
        """The dense head's kernel [C,6]: CAM weights of each class."""

    @abstractmethod
    def identity(self) -> dict[str, str]:
        """Runtime, versions, precision and threads, for the log, the heartbeat and benchmarks."""
