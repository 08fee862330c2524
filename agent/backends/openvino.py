"""OpenVINO on CPU: the exported IR compiled per batch size (static shapes), fp32, bf16 or NNCF int8; no TensorFlow."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.artifacts import ArtifactBackend
from agent.errors import BackendError


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


@cache
def _core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise BackendError("openvino: OpenVINO is not installed (pip install '.[openvino]')") from None
    return ov.Core()


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's CPU optimisation capabilities, e.g. FP32, BF16, INT8."""
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVINOBackend(ArtifactBackend):
    """OpenVINO IR with two outputs (probabilities, last feature map); bf16 is the fp32 IR with a precision hint."""

    name = "openvino"
    precisions = ("fp32", "bf16", "int8")

    def artifact(self, precision: str) -> Path:
        # bf16 is a compile-time choice (AMX/AVX512-BF16 kernels), not a different file.
        return self.folder / f"openvino-{'int8' if precision == 'int8' else 'fp32'}.xml"

    def supported_here(self, precision: str) -> bool:
        caps = cpu_capabilities()
        return {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}[precision] in caps

    def _runner(self, n: int, threads: int) -> Any:
        core = _core()
        try:
            model = core.read_model(str(self.artifact(self.precision)))
            model.reshape([n, *self.input_shape])  # static shapes let the CPU plugin pick kernels for exactly n
            config = {
                # Without the hint OpenVINO would run bf16 on AMX CPUs by default; fp32 must mean fp32.
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                # Pinned, every single-threaded compiled model of this process took the same core: two inference
                # workers ran at 101% CPU and 2,180 img/s (int8, batch 16, 2-core Zen 4); unpinned, 197% and 4,309.
                "ENABLE_CPU_PINNING": False,
            }
            compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise BackendError(f"openvino: cannot compile {self.artifact(self.precision)}: {exc}") from None
        if len(compiled.outputs) != 2:
            raise BackendError(f"openvino: {self.artifact(self.precision).name} has {len(compiled.outputs)} outputs, "
                               "expected 2 (probabilities, feature map); rebuild with `tdn export --force`")
        probs_i, feats_i = sorted(range(2), key=lambda i: len(compiled.outputs[i].get_partial_shape()))
        request = compiled.create_infer_request()

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            request.infer({0: batch}, share_inputs=True)
            # The request's output buffers are reused by the next call: copy out.
            return (np.array(request.get_output_tensor(probs_i).data),
                    np.array(request.get_output_tensor(feats_i).data))

        return run

    def identity(self) -> dict[str, str]:
        import openvino as ov

        return self._identity(f"openvino {ov.get_version()} (CPU)")
