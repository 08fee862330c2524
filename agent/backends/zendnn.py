"""TensorFlow with AMD's ZenDNN plugin (zentf): switched on before TensorFlow's import and verified by its ops."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from agent.backends.tensorflow import TensorFlowBackend, plugin_loaded
from agent.errors import BackendError
from agent.hostinfo import cores, cpu_flags

# Read by TensorFlow core and the plugin when TensorFlow is imported; later changes have no effect.
SWITCHES = {"TF_ENABLE_ZENDNN_OPTS": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}
# The plugin's bf16 path (auto mixed precision: bf16 convolutions on avx512_bf16), also read at TensorFlow's import.
BF16_SWITCH = "TF_ZENDNN_PLUGIN_BF16"
# Agent setting -> the environment variable the installed plugin (or its bundled libiomp5/oneDNN) reads.
# How each was found and what became of the paper's Table 2 settings: ZENDNN.md beside this file.
KNOBS = {
    "zendnn_conv_weight_cache": "ZENDNNL_CONV_WEIGHT_CACHE",
    "zendnn_lru_cache_capacity": "ZENDNNL_LRU_CACHE_CAPACITY",
    "zendnn_primitive_cache_capacity": "ONEDNN_PRIMITIVE_CACHE_CAPACITY",
    "zendnn_kmp_affinity": "KMP_AFFINITY",
    "zendnn_kmp_blocktime": "KMP_BLOCKTIME",
}


def plugin_path() -> Path | None:
    """zentf's plugin library, found without importing TensorFlow."""
    for entry in sys.path:
        p = Path(entry) / "tensorflow-plugins" / "libamdcpu_plugin.so"
        if p.is_file():
            return p
    return None


def zendnn_installed() -> bool:
    """Whether zentf's plugin is installed (TensorFlow will load it on import)."""
    return plugin_path() is not None


def knob_env(knobs: dict[str, Any] | None) -> dict[str, str]:
    """Environment variables for the given agent-setting knobs; None values are left to the library."""
    env: dict[str, str] = {}
    for key, value in (knobs or {}).items():
        if key not in KNOBS:
            raise BackendError(f"unknown ZenDNN knob {key!r}; known: {', '.join(KNOBS)}")
        if value is not None:
            env[KNOBS[key]] = str(value)
    return env


class ZenDNNBackend(TensorFlowBackend):
    """The native TF backend's model and functions, with the graph rewritten to ZenDNN ops by the plugin."""

    name = "zendnn"

    def __init__(self, model_path: Any, threads: int = 0, precision: str = "auto",
                 knobs: dict[str, Any] | None = None, artifacts_dir: str | Path | None = None, *,
                 ungated: bool = False) -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise BackendError(f"backend zendnn runs fp32 and bf16, not {precision}; int8 runs on litert or openvino")
        super().__init__(model_path, threads)
        self.precision = "bf16" if precision == "bf16" else "fp32"  # auto is fp32: bf16 is asked for, gated
        self.env = knob_env(knobs)
        self.artifacts_dir = artifacts_dir
        self._ungated = ungated  # how `tdn export` measures bf16 for its gate

    def load(self) -> None:
        if self.precision == "bf16":
            if "avx512_bf16" not in cpu_flags():
                raise BackendError("zendnn bf16: this CPU has no native bf16 (avx512_bf16)")
            if not self._ungated:
                self.gate = self._require_gate()
        super().load()

    def _require_gate(self) -> dict[str, Any]:
        """bf16 serves only after `tdn export` measured it on the held-out split against fp32 and it passed."""
        from agent.backends.gate import passed_gate, read_gate
        from agent.backends.store import manifest_ok, model_dir

        folder = model_dir(self.artifacts_dir, self.model_path)
        rec = read_gate(folder, self.name, "bf16") if manifest_ok(folder) else None
        return passed_gate(rec, self.name, "bf16", f"zendnn bf16 has no accuracy gate record in {folder}; build it "
                           f"with `tdn export --model {self.model_path} --data NEU-DET` on this machine")

    def _import_tf(self) -> Any:
        bf16 = self.precision == "bf16"
        if "tensorflow" in sys.modules:
            wrong = {k: os.environ.get(k) for k, v in SWITCHES.items() if os.environ.get(k) != v}
            if (os.environ.get(BF16_SWITCH) == "1") != bf16:
                raise BackendError(f"zendnn {self.precision}: TensorFlow was already imported in this process "
                                   f"with{'out' if bf16 else ''} {BF16_SWITCH}=1; run it in its own process")
            if wrong:
                raise BackendError(
                    "zendnn: TensorFlow was already imported in this process without "
                    + " ".join(f"{k}={v}" for k, v in SWITCHES.items())
                    + " (they must be set before TensorFlow's import); run the zendnn backend in its own process"
                )
            return sys.modules["tensorflow"]
        if not zendnn_installed():
            raise BackendError("zendnn: the ZenDNN plugin is not installed (pip install '.[zendnn]', i.e. zentf)")
        n = str(self.threads or cores())
        # ZenDNN parallelises with the plugin's own OpenMP (libiomp5), which sizes its team from OMP_NUM_THREADS.
        os.environ.update({**SWITCHES, "OMP_NUM_THREADS": n, **self.env})
        if bf16:
            os.environ[BF16_SWITCH] = "1"
        else:
            os.environ.pop(BF16_SWITCH, None)  # an inherited switch must not turn an fp32 backend into bf16
        import tensorflow as tf

        return tf

    def _plugin_optimizers(self, tf: Any) -> None:
        # The plugin's graph rewrite is a plugin optimizer; a native backend loaded earlier may have turned it off.
        tf.config.optimizer.set_experimental_options({"use_plugin_optimizers": True})

    def _check_ops(self) -> None:
        if self.precision == "bf16" and not self.ops.get("Cast"):
            raise BackendError("zendnn bf16: the plugin's mixed-precision pass added no Cast ops; bf16 is not active")
        zen = sorted(op for op in self.ops if op.startswith("_Zen"))
        if not zen:
            raise BackendError(
                f"zendnn: the plugin did not rewrite the graph (ops: {', '.join(sorted(self.ops))}; plugin "
                f"{'loaded' if plugin_loaded() else 'not loaded'}); ZenDNN is not active"
            )

    def verification(self) -> str:
        """Evidence that ZenDNN serves: the plugin is mapped into the process and the graph ran on _Zen* ops."""
        zen = {op: c for op, c in self.ops.items() if op.startswith("_Zen")}
        return (f"plugin {'loaded' if plugin_loaded() else 'NOT loaded'}; ops "
                + ", ".join(f"{c}x{op}" for op, c in sorted(zen.items())))

    def identity(self) -> dict[str, str]:
        ident = super().identity()
        version = "?"
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("zentf")
        except Exception:  # metadata missing only in odd installs; the version is informational
            pass
        ident.update({
            "backend": self.name,
            "zentf": version,
            "zendnn": self.verification(),
            "env": " ".join(f"{k}={os.environ[k]}" for k in (*SWITCHES, BF16_SWITCH, "OMP_NUM_THREADS", *self.env)
                            if k in os.environ),
        })
        if self.gate:
            ident["gate"] = str(self.gate.get("decision", ""))
        return ident
