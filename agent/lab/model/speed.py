"""Throughput of a Keras model in native TensorFlow: fixed-shape compiled function, warm-up, median of runs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np


def compiled_forward(model: Any, batch: int) -> Any:
    """A tf.function traced once for [batch,200,200,1], so timing never includes retracing."""
    import tensorflow as tf

    spec = tf.TensorSpec([batch, *model.inputs[0].shape[1:]], tf.float32)
    return tf.function(lambda x: model(x, training=False), jit_compile=False).get_concrete_function(spec)


def time_batches(fn: Any, x: Any, reps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of fn(x) for `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        r = fn(x)
        _ = r.numpy() if hasattr(r, "numpy") else r
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = fn(x)
        _ = r.numpy() if hasattr(r, "numpy") else r
        out.append(time.perf_counter() - t0)
    return out


def images_per_second(model: Any, batch: int = 64, reps: int = 5, seed: int = 0) -> float:
    """Median images/s of native-TF inference at `batch`."""
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(seed).uniform(0, 255, (batch, 200, 200, 1)).astype(np.float32))
    fn = compiled_forward(model, batch)
    return batch / statistics.median(time_batches(fn, x, reps))
