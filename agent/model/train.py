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

from agent.data import Sample, file_list_hash, load_arrays, stratified_split
from agent.logging import get_logger
from agent.model.arch import ArchSpec, build, count_macs, fold_batchnorm
from agent.model.flops import profiler_flops
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


def set_seed(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Thread pools can only be sized before TensorFlow's first op; in a process that already ran one, keep them.
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(1)


def augment_fn(seed: int) -> Any:
    """Per-image augmentation suited to steel textures: the defects have no canonical orientation."""
    import tensorflow as tf

    pad = 12

    def aug(x: Any, y: Any) -> tuple[Any, Any]:
        x = tf.image.random_flip_left_right(x)
        x = tf.image.random_flip_up_down(x)
        x = tf.image.rot90(x, tf.random.uniform([], 0, 4, tf.int32))
        # Small shifts with mirrored borders keep the texture statistics at the edges.
        x = tf.pad(x, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        x = tf.image.random_crop(x, [200, 200, 1])
        mean = tf.reduce_mean(x)
        contrast = tf.random.uniform([], 0.75, 1.25)
        brightness = tf.random.uniform([], -25.0, 25.0)
        x = (x - mean) * contrast + mean + brightness
        x = x + tf.random.normal(tf.shape(x), 0.0, tf.random.uniform([], 0.0, 6.0))
        return tf.clip_by_value(x, 0.0, 255.0), y

    return aug


def make_dataset(x: np.ndarray, y: np.ndarray, batch: int, train: bool, seed: int) -> Any:
    import tensorflow as tf

    yo = np.eye(len(CLASSES), dtype=np.float32)[y]
    ds = tf.data.Dataset.from_tensor_slices((x, yo))
    if train:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(augment_fn(seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


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
) -> tuple[Any, dict[str, Any]]:
    """Train one model; return it (best val weights restored) and its history."""
    import keras

    set_seed(cfg.seed)
    model = build(spec)
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
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=cfg.patience, restore_best_weights=True, mode="max"
        ),
        EpochLog(cfg.epochs, desc, quiet),
    ]
    hist = model.fit(
        make_dataset(*train, cfg.batch_size, True, cfg.seed),
        validation_data=make_dataset(*val, 64, False, cfg.seed),
        epochs=cfg.epochs,
        callbacks=callbacks,
        verbose=0,
    )
    return model, hist.history


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
    model, hist = fit(spec, (xtr, ytr), (xva, yva), cfg)
    folded = fold_batchnorm(model, spec)
    acc, cm, pred = evaluate(folded, xva, yva)
    train_seconds = time.monotonic() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "tinydefectnet.keras"
    folded.save(model_path)
    flops = profiler_flops(folded)
    macs = count_macs(folded)
    from agent.model.flops import netscore

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
