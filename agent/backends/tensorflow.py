"""Native TensorFlow (oneDNN): one fixed-shape concrete function per batch size, never retraced."""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import numpy as np

from agent.backends.base import Backend
from agent.errors import BackendError, ModelError
from agent.hostinfo import cores


def graph_ops(fn: Any, x: Any) -> Counter[str]:
    """Op types TensorFlow actually ran for one call of `fn` (its partition graphs, after every rewrite).

    This is where a runtime rewrite shows: _MklNative* ops for oneDNN, _Zen* ops for the ZenDNN plugin.
    """
    from tensorflow.python.eager import context

    context.enable_graph_collection()
    try:
        fn(x)
        md = context.export_run_metadata()
    finally:
        context.disable_graph_collection()
    return Counter(n.op for fg in md.function_graphs for g in fg.partition_graphs for n in g.node)


def plugin_loaded() -> bool:
    """Whether TensorFlow loaded AMD's ZenDNN plugin (zentf's libamdcpu_plugin.so) into this process."""
    try:
        with open("/proc/self/maps") as f:
            return "libamdcpu_plugin.so" in f.read()
    except OSError:
        return False


class TensorFlowBackend(Backend):
    """Keras model run through per-size tf.function concrete functions."""

    name = "tensorflow"
    precisions = ("fp32",)

    def __init__(self, model_path: Any, threads: int = 0, precision: str = "auto") -> None:
        super().__init__(model_path, threads)
        if precision not in ("auto", *self.precisions):
            raise BackendError(
                f"backend {self.name} runs fp32 only, not {precision}; int8/bf16 run on litert or openvino "
                "(bf16 also on zendnn)"
            )
        self.precision = "fp32"
        self._fns: dict[int, Any] = {}
        self._pooled_fns: dict[int, Any] = {}
        self._feat_fn: Any = None
        self._kernel: np.ndarray | None = None
        self.ops: Counter[str] = Counter()
        self.selected_by = ""

    def _import_tf(self) -> Any:
        if "tensorflow" not in sys.modules:
            # zentf's plugin is loaded by every `import tensorflow`; 0 keeps TF core from announcing ZenDNN.
            os.environ["TF_ENABLE_ZENDNN_OPTS"] = "0"
        import tensorflow as tf

        return tf

    def _plugin_optimizers(self, tf: Any) -> None:
        # With zentf installed, its registered CPU optimizer config switches off TF's own remapper even when
        # ZenDNN is off, so oneDNN loses its conv+bias+add+relu fusions (ZENDNN.md). Native means without it.
        tf.config.optimizer.set_experimental_options({"use_plugin_optimizers": False})

    def load(self) -> None:
        self.read_card()
        tf = self._import_tf()
        import keras

        self._plugin_optimizers(tf)
        n = self.threads or cores()
        # Thread pools can only be sized before TensorFlow's first op; a second load keeps the first sizes.
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
        try:
            self.model = keras.saving.load_model(self.model_path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad file; all mean the same to the user.
            raise ModelError(f"cannot load model {self.model_path}: {exc}") from None
        gap = self.model.get_layer("gap")
        feats = keras.Model(self.model.inputs, [self.model.output, gap.input])
        self._feat_fn = tf.function(lambda x: feats(x, training=False), reduce_retracing=True)
        self._kernel = np.asarray(self.model.get_layer("logits").get_weights()[0], np.float32)

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        tf = self._import_tf()
        for n in batch_sizes:
            spec = tf.TensorSpec([n, *self.input_shape], tf.float32)
            fn = tf.function(lambda x: self.model(x, training=False)).get_concrete_function(spec)
            if not self.ops:
                # The first call compiles the graph; record what ran, to prove which kernels serve.
                self.ops = graph_ops(fn, tf.zeros([n, *self.input_shape]))
                self._check_ops()
            fn(tf.zeros([n, *self.input_shape])).numpy()
            self._fns[n] = fn
        self.features(np.zeros((1, *self.input_shape), np.float32))

    def _check_ops(self) -> None:
        zen = sorted(op for op in self.ops if op.startswith("_Zen"))
        if zen:
            raise BackendError(f"native TensorFlow was rewritten to ZenDNN ops ({', '.join(zen)}); "
                               "TensorFlow was imported with TF_ENABLE_ZENDNN_OPTS=1 in this process")

    def kernels(self) -> str:
        """Which kernel library the graph ran on, from the recorded op types."""
        if any(op.startswith("_Zen") for op in self.ops):
            return "ZenDNN"
        if any(op.startswith("_Mkl") for op in self.ops):
            return "oneDNN"
        return "Eigen" if self.ops else "unknown"

    def infer(self, batch: np.ndarray, lane: int = 0) -> np.ndarray:
        fn = self._fns.get(len(batch))
        if fn is None:
            raise ValueError(f"batch size {len(batch)} was not warmed up (have {sorted(self._fns)})")
        probs: np.ndarray = fn(batch).numpy()
        return probs

    def warmup_pooled(self, batch_sizes: tuple[int, ...]) -> None:
        # One concrete function per size with outputs [probs, GAP output], as infer() has: a retrace on the hot
        # path would cost hundreds of milliseconds and shed a batch.
        tf = self._import_tf()
        import keras

        pooled = keras.Model(self.model.inputs, [self.model.output, self.model.get_layer("gap").output])
        for n in batch_sizes:
            spec = tf.TensorSpec([n, *self.input_shape], tf.float32)
            fn = tf.function(lambda x: pooled(x, training=False)).get_concrete_function(spec)
            fn(tf.zeros([n, *self.input_shape]))
            self._pooled_fns[n] = fn

    def infer_pooled(self, batch: np.ndarray, lane: int = 0) -> tuple[np.ndarray, np.ndarray]:
        fn = self._pooled_fns.get(len(batch))
        if fn is None:
            raise ValueError(f"batch size {len(batch)} was not warmed up for pooled features")
        probs, pooled = fn(batch)
        return probs.numpy(), pooled.numpy()

    def features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs, feats = self._feat_fn(batch)
        return probs.numpy(), feats.numpy()

    def cam_weights(self) -> np.ndarray:
        if self._kernel is None:
            raise RuntimeError("load() first")
        return self._kernel

    def identity(self) -> dict[str, str]:
        tf = self._import_tf()
        import keras

        ident = {
            "backend": self.name,
            "runtime": f"tensorflow {tf.__version__} ({self.kernels()})",
            "keras": keras.__version__,
            "precision": self.precision,
            "threads": str(self.threads or cores()),
        }
        if self.selected_by:
            ident["selected_by"] = self.selected_by
        return ident
