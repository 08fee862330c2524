"""LiteRT (TFLite) with XNNPACK: fp32 or full-int8 exported models, one interpreter per batch size, no TensorFlow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.artifacts import ArtifactBackend
from agent.errors import BackendError


def litert_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ai_edge_litert") is not None


class LiteRTBackend(ArtifactBackend):
    """A .tflite with two outputs (probabilities, last feature map) run by ai-edge-litert's interpreter."""

    name = "litert"
    precisions = ("fp32", "int8")

    def artifact(self, precision: str) -> Path:
        return self.folder / f"litert-{precision}.tflite"

    def _runner(self, n: int, threads: int) -> Any:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise BackendError("litert: ai-edge-litert is not installed (pip install '.[litert]')") from None
        try:
            # The default op resolver applies the XNNPACK delegate (fp32 and int8 kernels) to every op it can.
            interp = Interpreter(model_path=str(self.artifact(self.precision)), num_threads=threads)
            inp = interp.get_input_details()[0]["index"]
            # One interpreter per batch size: switching sizes on one would reallocate tensors in the hot path.
            interp.resize_tensor_input(inp, [n, *self.input_shape], strict=False)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BackendError(f"litert: cannot load {self.artifact(self.precision)}: {exc}") from None
        outs = interp.get_output_details()
        if len(outs) != 2:
            raise BackendError(f"litert: {self.artifact(self.precision).name} has {len(outs)} outputs, expected 2 "
                               "(probabilities, feature map); rebuild with `tdn export --force`")
        # Output order is the converter's choice: the probabilities are the 2-D one.
        probs_i, feats_i = sorted((o["index"] for o in outs), key=lambda i: len(interp.get_tensor(i).shape))

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            interp.set_tensor(inp, batch)
            interp.invoke()
            return interp.get_tensor(probs_i), interp.get_tensor(feats_i)

        return run

    def identity(self) -> dict[str, str]:
        from importlib.metadata import version

        return self._identity(f"ai-edge-litert {version('ai-edge-litert')} (XNNPACK)")
