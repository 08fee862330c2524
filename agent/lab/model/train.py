"""Training TinyDefectNet on NEU-DET: seeded split, steel-texture augmentation, cosine LR, early stopping."""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.lab.data import Sample, box_mask, file_list_hash, load_arrays, stratified_split
from agent.lab.model.arch import ArchSpec, build, count_macs, fold_batchnorm
from agent.lab.model.flops import profiler_flops
from agent.logging import get_logger
from protocol import CLASSES

log = get_logger("agent.train")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    patience: int = 20
    warmup_epochs: int = 3
    seed: int = 0
    val_fraction: float = 0.2
    # Weight of the box-guided attention loss (0 = plain cross-entropy); see attention_loss.
    attention_weight: float = 0.0


def set_seed(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Thread pools can only be sized before TensorFlow's first op; in a process that already ran one, keep them.
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(1)


def augment_fn(seed: int) -> Any:
    """Per-image augmentation suited to steel textures: the defects have no canonical orientation.

    The input is the image stacked with its box mask as a second channel: the geometric steps move both, the
    photometric ones touch only the image, so the mask stays on the defect.
    """
    import tensorflow as tf

    pad = 12

    def aug(xm: Any, y: Any) -> tuple[Any, Any]:
        xm = tf.image.random_flip_left_right(xm)
        xm = tf.image.random_flip_up_down(xm)
        xm = tf.image.rot90(xm, tf.random.uniform([], 0, 4, tf.int32))
        # Small shifts with mirrored borders keep the texture statistics at the edges.
        xm = tf.pad(xm, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        xm = tf.image.random_crop(xm, [200, 200, 2])
        x, mask = xm[..., :1], xm[..., 1:]
        mean = tf.reduce_mean(x)
        contrast = tf.random.uniform([], 0.75, 1.25)
        brightness = tf.random.uniform([], -25.0, 25.0)
        x = (x - mean) * contrast + mean + brightness
        x = x + tf.random.normal(tf.shape(x), 0.0, tf.random.uniform([], 0.0, 6.0))
        return (tf.clip_by_value(x, 0.0, 255.0), mask), y

    return aug


def box_masks(samples: Sequence[Sample]) -> np.ndarray:
    """uint8 [N,200,200,1] union-of-boxes masks; an image without boxes gets all ones (nothing to guide)."""
    m = np.ones((len(samples), 200, 200, 1), np.uint8)
    for i, s in enumerate(samples):
        if s.boxes:
            m[i, :, :, 0] = box_mask(s.boxes, (200, 200))
    return m


def make_dataset(
    x: np.ndarray, y: np.ndarray, batch: int, train: bool, seed: int, masks: np.ndarray | None = None
) -> Any:
    """Batches of (image, one-hot); training batches are augmented and carry ((image, mask), one-hot)."""
    import tensorflow as tf

    yo = np.eye(len(CLASSES), dtype=np.float32)[y]
    if not train:
        return tf.data.Dataset.from_tensor_slices((x, yo)).batch(batch).prefetch(tf.data.AUTOTUNE)
    m = masks if masks is not None else np.ones(x.shape, np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((x, m, yo))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda xi, mi, yi: (tf.concat([xi, tf.cast(mi, tf.float32)], -1), yi))
    ds = ds.map(augment_fn(seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def attention_loss(features: Any, kernel: Any, y: Any, mask: Any) -> Any:
    """Box-guided attention: -log of the class map's spatial-softmax mass inside the defect boxes.

    With a GAP + dense head the true class's CAM is the last feature map times that class's dense weights; its
    spatial softmax is where the model "looks". Pushing that mass into NEU-DET's boxes (area-resized to the
    feature grid) teaches the model to decide from the defect, not from the plain steel or the zero-padded
    border, which is what the audit's pointing game measures. Zero when the boxes cover the whole image.
    """
    import tensorflow as tf

    cam = tf.einsum("nhwc,ck->nhwk", features, kernel)
    cam_true = tf.reduce_sum(cam * y[:, None, None, :], -1)
    shape = tf.shape(cam_true)
    n, cells = shape[0], shape[1] * shape[2]
    inside = tf.image.resize(mask, shape[1:3], method="area")
    logp = tf.nn.log_softmax(tf.reshape(cam_true, [n, cells]), -1)
    p_in = tf.reduce_sum(tf.exp(logp) * tf.reshape(inside, [n, cells]), -1)
    return -tf.reduce_mean(tf.math.log(p_in + 1e-6))


def guided(net: Any, cfg: TrainConfig) -> Any:
    """Wrap a built model so fit() minimises cross-entropy + attention_weight x attention_loss."""
    import keras
    import tensorflow as tf

    class Guided(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="guided")
            self.net = net
            self.feat = keras.Model(net.inputs, [net.outputs[0], net.get_layer("gap").input])
            self.dense = net.get_layer("logits")
            self.ce = keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing)
            self.loss_m = keras.metrics.Mean(name="loss")
            self.att_m = keras.metrics.Mean(name="attention")
            self.acc_m = keras.metrics.CategoricalAccuracy(name="accuracy")

        @property
        def metrics(self) -> list[Any]:
            return [self.loss_m, self.att_m, self.acc_m]

        def call(self, x: Any, training: bool = False) -> Any:
            return self.net(x, training=training)

        def train_step(self, data: Any) -> dict[str, Any]:
            (x, mask), y = data
            with tf.GradientTape() as tape:
                probs, feats = self.feat(x, training=True)
                att = attention_loss(feats, self.dense.kernel, y, mask)
                loss = self.ce(y, probs) + cfg.attention_weight * att
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply(grads, self.trainable_variables)
            self.loss_m.update_state(loss)
            self.att_m.update_state(att)
            self.acc_m.update_state(y, probs)
            return {m.name: m.result() for m in self.metrics}

        def test_step(self, data: Any) -> dict[str, Any]:
            x, y = data
            probs = self.net(x, training=False)
            self.loss_m.update_state(self.ce(y, probs))
            self.acc_m.update_state(y, probs)
            return {m.name: m.result() for m in (self.loss_m, self.acc_m)}

    return Guided()


class EpochLog:
    """A Keras callback that logs one line per epoch with a tqdm bar over epochs."""

    def __new__(cls, epochs: int, desc: str, quiet: bool = False) -> Any:
        import keras
        from tqdm import tqdm

        class _Cb(keras.callbacks.Callback):
            def on_train_begin(self, logs: Any = None) -> None:
                self.bar = tqdm(total=epochs, desc=desc, unit="epoch", disable=quiet, leave=False)
                self.t0 = time.monotonic()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                logs = logs or {}
                self.bar.update(1)
                self.bar.set_postfix(
                    loss=f"{logs.get('loss', 0):.3f}", val_acc=f"{logs.get('val_accuracy', 0):.4f}"
                )
                if not quiet:
                    log.info(
                        "epoch", epoch=epoch + 1, of=epochs, loss=round(float(logs.get("loss", 0)), 4),
                        acc=round(float(logs.get("accuracy", 0)), 4),
                        val_acc=round(float(logs.get("val_accuracy", 0)), 4),
                        seconds=round(time.monotonic() - self.t0, 1),
                    )

            def on_train_end(self, logs: Any = None) -> None:
                self.bar.close()

        return _Cb()


def fit(
    spec: ArchSpec,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    quiet: bool = False,
    desc: str = "training",
    masks: np.ndarray | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train one model; return it (best val weights restored) and its history.

    masks (box masks of the training images, see box_masks) feed the attention loss when
    cfg.attention_weight > 0.
    """
    import keras

    if cfg.attention_weight > 0 and masks is None:
        raise ValueError("attention_weight > 0 needs the training images' box masks")
    set_seed(cfg.seed)
    net = build(spec)
    model = guided(net, cfg)
    steps = int(np.ceil(len(train[0]) / cfg.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=cfg.lr / 10,
        decay_steps=max(1, steps * (cfg.epochs - cfg.warmup_epochs)),
        warmup_target=cfg.lr,
        warmup_steps=steps * cfg.warmup_epochs,
        alpha=0.01,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
    )
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=cfg.patience, restore_best_weights=True, mode="max"
        ),
        EpochLog(cfg.epochs, desc, quiet),
    ]
    hist = model.fit(
        make_dataset(*train, cfg.batch_size, True, cfg.seed, masks),
        validation_data=make_dataset(*val, 64, False, cfg.seed),
        epochs=cfg.epochs,
        callbacks=callbacks,
        verbose=0,
    )
    return net, hist.history


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, batch: int = 64) -> tuple[float, np.ndarray, np.ndarray]:
    """Top-1 accuracy, confusion matrix [true, pred] and predictions."""
    probs = model.predict(x, batch_size=batch, verbose=0)
    pred = probs.argmax(1)
    cm = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(cm, (y, pred), 1)
    return float((pred == y).mean()), cm, pred


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_and_ship(
    samples: Sequence[Sample],
    spec: ArchSpec,
    cfg: TrainConfig,
    out_dir: Path,
    data_root: str,
) -> dict[str, Any]:
    """Train on a stratified split, fold BN, write the .keras model and its JSON model card."""
    import keras
    import tensorflow as tf

    t0 = time.monotonic()
    train_s, val_s = stratified_split(samples, cfg.val_fraction, cfg.seed)
    log.info("split", train=len(train_s), val=len(val_s), seed=cfg.seed)
    xtr, ytr = load_arrays(train_s, progress=True)
    xva, yva = load_arrays(val_s, progress=True)
    model, hist = fit(spec, (xtr, ytr), (xva, yva), cfg, masks=box_masks(train_s))
    folded = fold_batchnorm(model, spec)
    acc, cm, pred = evaluate(folded, xva, yva)
    train_seconds = time.monotonic() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "tinydefectnet.keras"
    folded.save(model_path)
    flops = profiler_flops(folded)
    macs = count_macs(folded)
    from agent.lab.model.flops import netscore

    errors = [
        {"file": s.path.name, "true": CLASSES[int(t)], "pred": CLASSES[int(p)]}
        for s, t, p in zip(val_s, yva, pred, strict=True)
        if t != p
    ]
    card = {
        "name": "TinyDefectNet",
        "model_file": model_path.name,
        "model_sha256": file_sha256(model_path),
        "classes": list(CLASSES),
        "input": {"shape": [None, 200, 200, 1], "dtype": "float32", "range": "raw pixel values 0..255",
                  "normalization": "inside the model: x/127.5 - 1"},
        "output": {"shape": [None, len(CLASSES)], "meaning": "softmax probabilities in class order"},
        "architecture": spec.to_dict(),
        "params": int(folded.count_params()),
        "params_training_form": int(model.count_params()),
        "flops": flops,
        "flops_convention": "tf.compat.v1.profiler float_operation on the frozen inference graph, batch 1 "
                            "(2 per multiply-add)",
        "macs": macs,
        "netscore": round(netscore(100 * acc, folded.count_params(), macs), 2),
        "validation": {
            "accuracy": acc,
            "n": len(val_s),
            "errors": errors,
            "confusion_matrix": cm.tolist(),
            "method": f"stratified hold-out of {cfg.val_fraction:.0%} of {data_root} (seed {cfg.seed}); "
                      "these images were never trained on",
            "files_hash": file_list_hash(val_s),
        },
        "training": {
            "images": len(train_s),
            "files_hash": file_list_hash(train_s),
            "data": data_root,
            "seed": cfg.seed,
            "config": cfg.__dict__,
            "epochs_run": len(hist.get("loss", [])),
            "best_epoch": int(np.argmax(hist.get("val_accuracy", [0]))) + 1,
            "seconds": round(train_seconds, 1),
        },
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
        "batchnorm": "folded into conv weights for inference",
    }
    (out_dir / "tinydefectnet.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("shipped", model=str(model_path), val_accuracy=acc, params=card["params"], flops=flops,
             seconds=round(train_seconds))
    return card
