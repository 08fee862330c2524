"""TensorFlow with AMD's ZenDNN plugin (zentf): switched on before TensorFlow's import and verified by its ops."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from agent.backends.tensorflow import TensorFlowBackend, plugin_loaded
from agent.errors import BackendError
from agent.hostinfo import cores

# Read by TensorFlow core and the plugin when TensorFlow is imported; later changes have no effect.
SWITCHES = {"TF_ENABLE_ZENDNN_OPTS": "1", "TF_ENABLE_ONEDNN_OPTS": "0"}
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
                 knobs: dict[str, Any] | None = None) -> None:
        super().__init__(model_path, threads, precision)
        self.env = knob_env(knobs)

    def _import_tf(self) -> Any:
        if "tensorflow" in sys.modules:
            wrong = {k: os.environ.get(k) for k, v in SWITCHES.items() if os.environ.get(k) != v}
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
        import tensorflow as tf

        return tf

    def _plugin_optimizers(self, tf: Any) -> None:
        # The plugin's graph rewrite is a plugin optimizer; a native backend loaded earlier may have turned it off.
        tf.config.optimizer.set_experimental_options({"use_plugin_optimizers": True})

    def _check_ops(self) -> None:
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
            "env": " ".join(f"{k}={os.environ[k]}" for k in (*SWITCHES, "OMP_NUM_THREADS", *self.env)
                            if k in os.environ),
        })
        return ident
