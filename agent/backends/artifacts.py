"""The lean base class: a backend serving the artifacts `tdn export` built, without importing TensorFlow."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import Backend, layout
from agent.backends.gate import passed_gate, read_gate
from agent.backends.store import KERNEL_FILE, artifacts_root, manifest_ok, model_dir
from agent.errors import BackendError
from agent.hostinfo import cores

# --- lean backends: serve an exported artifact without TensorFlow ---


class ArtifactBackend(Backend):
    """A backend serving artifacts exported by `tdn export`; never imports TensorFlow."""

    precisions: tuple[str, ...] = ("fp32",)

    def __init__(self, model_path: str | Path, threads: int = 0, precision: str = "auto",
                 artifacts_dir: str | Path | None = None, workers: int = 0) -> None:
        super().__init__(model_path, threads)
        # Resolved here, once: `threads` is each worker's from now on (identity(), the probes and the runners).
        self.workers, self.threads = layout(threads, workers, cores())
        if precision not in ("auto", *self.precisions):
            raise BackendError(f"backend {self.name} has no precision {precision!r}; "
                               f"choose auto or one of: {', '.join(self.precisions)}")
        self.requested = precision
        self.precision = precision
        self.artifacts_dir = artifacts_root(artifacts_dir)
        self.folder = Path()
        self.selected_by = ""
        self._kernel: np.ndarray | None = None
        self._runners: list[dict[int, Any]] = []  # per lane: batch size -> runner
        self._explain_runners: dict[int, Any] = {}
        self._explain_lock = threading.Lock()
        self._fresh = False

    # Each runtime provides these three.
    def artifact(self, precision: str) -> Path:
        raise NotImplementedError

    def supported_here(self, precision: str) -> bool:
        """Whether this CPU runs `precision` natively (else the runtime would emulate or ignore it)."""
        return True

    def _runner(self, n: int, threads: int) -> Any:
        """A callable batch [n,200,200,1] -> (probs, features), compiled for exactly n images."""
        raise NotImplementedError

    def exported(self, precision: str) -> bool:
        """Whether `tdn export` built `precision` for this model (and, below fp32, it passed the gate here)."""
        folder = model_dir(self.artifacts_dir, self.model_path)
        if not manifest_ok(folder):
            return False
        self.folder = folder
        if not self.artifact(precision).is_file():
            return False
        if precision == "fp32":
            return True
        rec = read_gate(folder, self.name, precision)
        return bool(rec and rec.get("passed")) and self.supported_here(precision)

    def open_ungated(self, precision: str) -> None:
        """Open an exported artifact without consulting the gate: how `tdn export` measures it for the gate."""
        self.read_card()
        self.folder = model_dir(self.artifacts_dir, self.model_path)
        self.precision = precision
        self._kernel = np.load(self.folder / KERNEL_FILE)

    def load(self) -> None:
        self.read_card()
        self.folder = model_dir(self.artifacts_dir, self.model_path)
        self._fresh = manifest_ok(self.folder)
        self.precision = self._resolve(self.requested)
        if not self._fresh or not self.artifact(self.precision).is_file():
            self._export_fp32()
        kernel = self.folder / KERNEL_FILE
        if not kernel.is_file():
            raise BackendError(f"{kernel} is missing; rebuild the artifacts with `tdn export --force`")
        self._kernel = np.load(kernel)
        # Fail at load, not at warm-up, if the runtime rejects the artifact; the runner then serves explanations.
        self._explain_runners[1] = self._runner(1, 1)

    def _resolve(self, requested: str) -> str:
        if requested != "auto":
            if requested != "fp32":
                self._require_gate(requested)
            return requested
        # Which precision is fastest depends on the CPU (int8 XNNPACK is slower than fp32 on this Xeon, OpenVINO's
        # bf16 on AMX is faster): measure the gated candidates briefly instead of presuming an order.
        candidates = [p for p in self.precisions if p != "fp32" and self.exported(p)]
        if not candidates:
            return "fp32"
        if self._fresh and self.artifact("fp32").is_file():
            candidates.append("fp32")
        rates = {p: self._probe_rate(p) for p in candidates}
        best = max(rates, key=lambda p: rates[p])
        self.selected_by = "precision probe: " + ", ".join(f"{p} {r:.0f} img/s" for p, r in rates.items())
        if best != "fp32":
            self.gate = read_gate(self.folder, self.name, best)
        return best

    def _probe_rate(self, precision: str, batch: int = 8, seconds: float = 0.2) -> float:
        saved, self.precision = self.precision, precision
        try:
            run = self._runner(batch, self.threads)
        finally:
            self.precision = saved
        x = np.zeros((batch, *self.input_shape), np.float32)
        run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(x)
            n += 1
        return n * batch / (time.perf_counter() - t0)

    def _require_gate(self, precision: str) -> None:
        if not self.supported_here(precision):
            raise BackendError(f"{self.name} {precision}: this CPU has no native {precision} support")
        rec = read_gate(self.folder, self.name, precision) if self._fresh else None
        self.gate = passed_gate(rec if self.artifact(precision).is_file() else None, self.name, precision,
                                f"{self.name} {precision} artifact not found in {self.folder}; build it with "
                                f"`tdn export --model {self.model_path} --data DIR` (DIR: the model's labelled images)")

    def _export_fp32(self) -> None:
        # fp32 needs no data: convert it now, in a child process, so this one never imports TensorFlow. `--data ""`
        # keeps the export from gating on its default dataset, which may be another model's (NEU-DET for a tile model).
        cmd = [sys.executable, "-m", "agent.lab.export", "--model", str(self.model_path), "--artifacts-dir",
               str(self.artifacts_dir), "--backends", self.name, "--precisions", "fp32", "--data", "", "--quiet"]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0 or not self.artifact("fp32").is_file():
            tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackendError(f"{self.name}: building the fp32 artifact failed ({tail}); run `tdn export`")

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        # Every lane gets its own runner of every size: compiled requests are not reentrant.
        while len(self._runners) < self.workers:
            self._runners.append({})
        for lane in self._runners:
            for n in batch_sizes:
                run = self._runner(n, self.threads)
                run(np.zeros((n, *self.input_shape), np.float32))
                lane[n] = run
        self.features(np.zeros((1, *self.input_shape), np.float32))

    def _run(self, batch: np.ndarray, lane: int) -> tuple[np.ndarray, np.ndarray]:
        runners = self._runners[lane] if lane < len(self._runners) else {}
        run = runners.get(len(batch))
        if run is None:
            raise ValueError(f"batch size {len(batch)} was not warmed up on lane {lane} (have {sorted(runners)})")
        out: tuple[np.ndarray, np.ndarray] = run(batch)
        return out

    def infer(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        return self._run(batch, lane)[0]

    def infer_pooled(self, batch: np.ndarray, lane: int = 0) -> tuple[np.ndarray, np.ndarray]:
        # The artifact computes the feature map with the probabilities anyway: pooling it costs one mean.
        probs, feats = self._run(batch, lane)
        return probs, np.asarray(feats, np.float32).mean(axis=(1, 2))

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Explanations run on another thread than infer(); runtimes' compiled requests are not reentrant, so
        # they get their own, single-threaded ones (off the hot path, and not competing with it for cores).
        with self._explain_lock:
            run = self._explain_runners.get(len(batch))
            if run is None:
                run = self._explain_runners[len(batch)] = self._runner(len(batch), 1)
            probs, feats = run(batch)
        return probs, feats

    def cam_weights(self) -> np.ndarray:
        if self._kernel is None:
            raise RuntimeError("load() first")
        return self._kernel

    def _identity(self, runtime: str) -> dict[str, str]:
        ident = {
            "backend": self.name,
            "runtime": runtime,
            "precision": self.precision,
            "threads": str(self.threads),
            "workers": str(self.workers),
            "artifact": str(self.artifact(self.precision).name),
        }
        if self.gate:
            ident["gate"] = str(self.gate.get("decision", ""))
        if self.selected_by:
            ident["selected_by"] = self.selected_by
        return ident
