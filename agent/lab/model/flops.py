"""FLOPs as TensorFlow's profiler counts the frozen inference graph at batch 1, plus the paper's indicator."""

from __future__ import annotations

from typing import Any

FLOP_TARGET = 100e6
FLOP_TOLERANCE = 0.05
MAX_PARAMS = 430_000


def profiler_flops(model: Any) -> int:
    """Float ops of the frozen inference graph at batch 1, counted by tf.compat.v1.profiler (2 per MAC)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, *model.inputs[0].shape[1:]], tf.float32)
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(fn)
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    info = tf.compat.v1.profiler.profile(graph=frozen.graph, options=opts)
    return int(info.total_float_ops)


def within_band(flops: float, target: float = FLOP_TARGET, tolerance: float = FLOP_TOLERANCE) -> bool:
    """The paper's indicator function: FLOPs within `tolerance` of `target`."""
    return abs(flops - target) <= tolerance * target


def netscore(accuracy_pct: float, params: int, macs: int) -> float:
    """NetScore (Wong 2019): 20 log10(a^2 / (sqrt(p) sqrt(m))), p in millions, m in billions of MACs."""
    import math

    p = params / 1e6
    m = macs / 1e9
    return 20 * math.log10(accuracy_pct**2 / (math.sqrt(p) * math.sqrt(m)))
