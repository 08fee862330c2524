"""The residual design prototype and the Keras 3 model built from one point of its design space."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

NUM_CLASSES = 6
INPUT_SHAPE = (200, 200, 1)
IMAGE_NORM_EPSILON = 25.0
NORMALIZATION = {
    "fixed": "inside the model: x/127.5 - 1",
    "image": f"inside the model: (x - mean) / sqrt(var + {IMAGE_NORM_EPSILON:g}), mean and var over the image's "
             "pixels (parameter-free LayerNormalization over h, w, c)",
}


@dataclass(frozen=True)
class Stage:
    """One residual stage: `blocks` blocks of `width` channels, the first with `stride`."""

    width: int
    blocks: int = 1
    stride: int = 2
    kernel: int = 3
    block: str = "basic"  # "basic" (two kxk convs) or "bottleneck" (1x1, kxk, 1x1 at width/expansion)


@dataclass(frozen=True)
class ArchSpec:
    """A point of the design space: a stem, heterogeneous residual stages, a GAP + dense head."""

    stem_width: int = 24
    stem_kernel: int = 4
    stem_stride: int = 4  # a patchify stem (kernel == stride) is cheap on 1-channel input
    stem_pool: bool = False
    stages: tuple[Stage, ...] = field(default_factory=tuple)
    name: str = "tinydefectnet"
    # Input normalisation inside the model: "fixed" is x/127.5 - 1 (the paper's); "image" takes each image to zero
    # mean and unit variance (a parameter-free LayerNormalization over h, w, c), so a tile's lighting and contrast,
    # which vary from shot to shot, are not something the few weights of a tiny net have to learn away.
    normalize: str = "fixed"

    def __post_init__(self) -> None:
        if self.normalize not in ("fixed", "image"):
            raise ValueError(f"unknown normalize {self.normalize!r}; expected fixed or image")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        stages = tuple(Stage(**s) for s in d.get("stages", ()))
        return cls(**{**d, "stages": stages})

    def key(self) -> str:
        """A stable string identity, used to resume a design search."""
        return json.dumps(self.to_dict(), sort_keys=True)


def build(spec: ArchSpec, *, batchnorm: bool = True, with_features: bool = False, num_classes: int = NUM_CLASSES,
          size: int = INPUT_SHAPE[0]) -> Any:
    """The Keras functional model: float32 [N,size,size,1] raw 0..255 in, softmax [N,num_classes] out.

    batchnorm=False builds the inference form (conv biases instead of BN), which fold_batchnorm fills.
    with_features=True adds the last feature map as a second output, for CAM explanations.
    """
    import keras
    from keras import layers

    def conv(x: Any, filters: int, kernel: int, stride: int, name: str, relu: bool = True) -> Any:
        x = layers.Conv2D(
            filters, kernel, stride, padding="same", use_bias=not batchnorm, name=name,
            kernel_initializer="he_normal",
        )(x)
        if batchnorm:
            x = layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=name + "_bn")(x)
        return layers.ReLU(name=name + "_relu")(x) if relu else x

    inp = keras.Input((size, size, 1), name="image")
    # Normalisation lives in the model so every runtime takes raw pixels.
    if spec.normalize == "image":
        # epsilon in gray levels squared: a flat image (sigma below ~5) is not blown up into its noise.
        x = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=IMAGE_NORM_EPSILON,
                                      name="normalize")(inp)
    else:
        x = layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")(inp)
    x = conv(x, spec.stem_width, spec.stem_kernel, spec.stem_stride, "stem")
    if spec.stem_pool:
        x = layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    for si, st in enumerate(spec.stages):
        for bi in range(st.blocks):
            stride = st.stride if bi == 0 else 1
            p = f"s{si + 1}b{bi + 1}"
            shortcut = x
            if stride != 1 or x.shape[-1] != st.width:
                shortcut = conv(x, st.width, 1, stride, p + "_proj", relu=False)
            if st.block == "bottleneck":
                mid = max(8, st.width // 4)
                y = conv(x, mid, 1, 1, p + "_c1")
                y = conv(y, mid, st.kernel, stride, p + "_c2")
                y = conv(y, st.width, 1, 1, p + "_c3", relu=False)
            else:
                y = conv(x, st.width, st.kernel, stride, p + "_c1")
                y = conv(y, st.width, st.kernel, 1, p + "_c2", relu=False)
            x = layers.Add(name=p + "_add")([shortcut, y])
            x = layers.ReLU(name=p + "_out")(x)
    features = x
    x = layers.GlobalAveragePooling2D(name="gap")(features)
    x = layers.Dense(num_classes, name="logits")(x)
    out = layers.Softmax(name="probs")(x)
    outputs = [out, features] if with_features else out
    return keras.Model(inp, outputs, name=spec.name)


def fold_batchnorm(trained: Any, spec: ArchSpec) -> Any:
    """An inference model without BatchNormalization: each BN folded into its conv's weights and bias.

    Folding removes a memory-bound pass per conv, which matters more than FLOPs on a 2-core CPU.
    """
    import numpy as np

    folded = build(spec, batchnorm=False, num_classes=int(trained.outputs[0].shape[-1]),
                   size=int(trained.inputs[0].shape[1]))
    for layer in folded.layers:
        if not layer.weights:
            continue
        src = trained.get_layer(layer.name)
        if layer.__class__.__name__ != "Conv2D":
            layer.set_weights(src.get_weights())
            continue
        (kernel,) = src.get_weights()
        bn = trained.get_layer(layer.name + "_bn")
        gamma, beta, mean, var = bn.get_weights()
        scale = gamma / np.sqrt(var + bn.epsilon)
        layer.set_weights([kernel * scale, beta - mean * scale])
    return folded


def count_macs(model: Any) -> int:
    """Multiply-adds of convolutions and dense layers at batch 1 (the MAC convention)."""
    import numpy as np

    macs = 0
    for layer in model.layers:
        cls = layer.__class__.__name__
        if cls == "Conv2D":
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            macs += int(h * w * kh * kw * cin * cout)
        elif cls == "Dense":
            macs += int(np.prod(layer.kernel.shape))
    return macs
