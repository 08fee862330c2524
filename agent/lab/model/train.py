"""Training TinyDefectNet on any dataset layout: balanced sampling, camera degradations, calibrated decisions."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.decision import pass_mask_of
from agent.geometry import InputSpec, self_test_inputs
from agent.lab.data import Dataset, Sample, box_mask, defect_mask, file_list_hash, load_arrays, stratified_split
from agent.lab.model.arch import NORMALIZATION, ArchSpec, build, count_macs, fold_batchnorm
from agent.lab.model.flops import profiler_flops
from agent.logging import get_logger

log = get_logger("agent.train")

SELF_TEST_ATOL = 1e-4  # fp32 runtimes agree with Keras to ~1e-6 on these inputs; quantised variants do not


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
    # Weight of the box/mask-guided attention loss (0 = plain cross-entropy); see attention_loss.
    attention_weight: float = 0.0
    # Class-balanced sampling exponent: a class's share of the draws is n_c^(1 - balance) (0 natural, 1 uniform).
    balance: float = 0.5
    # Line-camera degradations (agent.lab.degrade) as augmentation, each drawn with probability degrade_p.
    degrade: bool = True
    degrade_p: float = 0.25
    pass_classes: tuple[str, ...] = field(default=())
    # Start from a trained (BN-folded) model's weights and fine-tune the inference form directly; the dense head
    # is kept only when the class list is the same.
    init: str | None = None
    init_head: bool = False
    # The pass threshold lets at most this many validation defects pass (0: the lowest threshold with none).
    escape_budget: int = 0


def set_seed(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    # Thread pools can only be sized before TensorFlow's first op; in a process that already ran one, keep them.
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_inter_op_parallelism_threads(1)


def box_masks(samples: Sequence[Sample], spec: InputSpec | None = None, shapes: Sequence[tuple[int, int]] | None = None
              ) -> np.ndarray:
    """uint8 [N,size,size,1] defect masks (boxes or mask files); an image without a defect gets all ones."""
    spec = spec or InputSpec()
    n = spec.size
    m = np.ones((len(samples), n, n, 1), np.uint8)
    for i, s in enumerate(samples):
        if s.boxes and shapes is None and spec.size == 200:
            # NEU-DET's images are 200x200 already: draw the boxes straight, without reading the file again.
            m[i, :, :, 0] = box_mask(s.boxes, (n, n))
            continue
        d = defect_mask(s, spec, shapes[i] if shapes is not None else None)
        if d is not None:
            m[i, :, :, 0] = d
    return m


def sample_weights(y: np.ndarray, balance: float) -> np.ndarray:
    """Per-image draw probabilities giving class c a share proportional to n_c^(1 - balance)."""
    counts = np.bincount(y)
    w = counts[y].astype(np.float64) ** (-balance)
    out: np.ndarray = w / w.sum()
    return out


def augment_pool(images: np.ndarray, masks: np.ndarray) -> Any:
    """A one-process pool holding the training set, for agent.lab.degrade.augment_epoch (spawned: no TF in it)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from agent.lab.degrade import worker_init

    return ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=worker_init,
                               initargs=(images, masks))


def make_dataset(
    x: np.ndarray, y: np.ndarray, batch: int, train: bool, seed: int, masks: np.ndarray | None = None, *,
    n_classes: int | None = None, balance: float = 0.0, photometric: bool = True, degrade_p: float = 0.25,
) -> Any:
    """Batches of (image, one-hot); training batches are augmented and carry ((image, mask), one-hot).

    Training draws one epoch of len(x) indices at a time: a permutation when balance is 0, else a weighted draw
    with replacement (sample_weights), so rare classes are seen more often, each time differently augmented.
    Augmentation runs in numpy/OpenCV (agent.lab.degrade.augment) in a worker process, one epoch ahead.
    """
    import tensorflow as tf

    from agent.lab.degrade import augment_epoch

    k = n_classes or int(y.max()) + 1
    yo = np.eye(k, dtype=np.float32)[y]
    if not train:
        return tf.data.Dataset.from_tensor_slices((x.astype(np.float32), yo)).batch(batch).prefetch(tf.data.AUTOTUNE)
    size = x.shape[1]
    xu = np.clip(np.round(x[..., 0] if x.ndim == 4 else x), 0, 255).astype(np.uint8)
    mu = (masks[..., 0] if masks is not None else np.ones(xu.shape, np.uint8)).astype(np.uint8)
    weights = sample_weights(y, balance) if balance > 0 else None
    rng = np.random.default_rng(seed)
    pool = augment_pool(xu, mu)
    pending: list[Any] = []

    def submit() -> None:
        order = rng.permutation(len(xu)) if weights is None else rng.choice(len(xu), len(xu), p=weights)
        pending.append((order, pool.submit(augment_epoch, order, int(rng.integers(1 << 31)), photometric, degrade_p)))

    def batches() -> Any:
        # A separate process augments the next epoch while this one trains: augmenting in a thread of this
        # process fought the training loop for the GIL, which on a busy host cost more than the augmentation.
        if not pending:
            submit()
        order, fut = pending.pop(0)
        xs, ms = fut.result()
        submit()
        for start in range(0, len(order), batch):
            sl = slice(start, start + batch)
            yield ((xs[sl, :, :, None].astype(np.float32), ms[sl, :, :, None].astype(np.float32)),
                   yo[order[sl]])

    sig = ((tf.TensorSpec([None, size, size, 1], tf.float32), tf.TensorSpec([None, size, size, 1], tf.float32)),
           tf.TensorSpec([None, k], tf.float32))
    ds = tf.data.Dataset.from_generator(batches, output_signature=sig)
    return ds.prefetch(2)


def attention_loss(features: Any, kernel: Any, y: Any, mask: Any) -> Any:
    """Box/mask-guided attention: -log of the class map's spatial-softmax mass inside the defect.

    With a GAP + dense head the true class's CAM is the last feature map times that class's dense weights; its
    spatial softmax is where the model "looks". Pushing that mass into the defect (VOC boxes or pixel masks,
    area-resized to the feature grid, so a defect smaller than a cell still counts its share) teaches the model
    to decide from the defect, not from the plain surface or the border, which is what the audit's pointing game
    measures. Zero when the mask covers the whole image (defect-free images).
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
    n_classes: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train one model; return it (best val weights restored) and its history.

    masks (defect masks of the training images, see box_masks) feed the attention loss when
    cfg.attention_weight > 0.
    """
    import keras

    if cfg.attention_weight > 0 and masks is None:
        raise ValueError("attention_weight > 0 needs the training images' box masks")
    k = n_classes or int(max(train[1].max(), val[1].max())) + 1
    set_seed(cfg.seed)
    if cfg.init:
        net = build(spec, batchnorm=False, num_classes=k, size=int(train[0].shape[1]))
        init_from(net, cfg.init, cfg.init_head)
    else:
        net = build(spec, num_classes=k, size=int(train[0].shape[1]))
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
        make_dataset(*train, cfg.batch_size, True, cfg.seed, masks, n_classes=k,
                     balance=cfg.balance, photometric=cfg.degrade, degrade_p=cfg.degrade_p),
        validation_data=make_dataset(*val, 64, False, cfg.seed, n_classes=k),
        epochs=cfg.epochs,
        callbacks=callbacks,
        verbose=0,
    )
    return net, hist.history


def init_from(net: Any, path: str, head: bool) -> None:
    """Copy every layer's weights from a saved inference-form model of the same architecture (head optional)."""
    import keras

    src = keras.saving.load_model(path, compile=False)
    for layer in net.layers:
        if not layer.weights or (layer.name == "logits" and not head):
            continue
        w = src.get_layer(layer.name).get_weights()
        if [a.shape for a in w] != [a.shape for a in layer.get_weights()]:
            raise ValueError(f"--init {path}: layer {layer.name} has other shapes; same --arch needed")
        layer.set_weights(w)


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, batch: int = 64) -> tuple[float, np.ndarray, np.ndarray]:
    """Top-1 accuracy, confusion matrix [true, pred] and predictions."""
    probs = model.predict(x, batch_size=batch, verbose=0)
    pred = probs.argmax(1)
    k = probs.shape[1]
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    return float((pred == y).mean()), cm, pred


def evaluate_frames(model: Any, t: Any, pass_mask: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """evaluate() per frame for a tiling model: each frame's tiles combined as the agent combines them."""
    p, f = probs_and_pooled(model, t.x)
    p, _ = per_frame(p, f, t.frame, len(t.frame_y), pass_mask)
    pred = p.argmax(1)
    k = p.shape[1]
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (t.frame_y, pred), 1)
    return float((pred == t.frame_y).mean()), cm, pred


def _tiles_block(tr: Any, va: Any, train_s: Sequence[Sample], val_s: Sequence[Sample], classes: Sequence[str],
                 pass_label: int | None) -> dict[str, Any]:
    from agent.lab.data import TILE_MASK_SHARE, TILE_MIN_PIXELS

    return {
        "train_tiles": len(tr.y), "val_tiles": len(va.y),
        "per_frame": round(len(tr.y) / max(1, len(train_s)), 3),
        "train_tile_counts": {c: int((tr.y == i).sum()) for i, c in enumerate(classes)},
        "label_rule": (f"a tile of a defective image keeps the image's class when it holds >= {TILE_MASK_SHARE:.0%} "
                       f"of the image's mask pixels (and >= {TILE_MIN_PIXELS}); otherwise it is "
                       f"{classes[pass_label]!r} with an all-ones attention mask"
                       if pass_label is not None else "every tile keeps its image's class (no pass class)"),
        "early_stopping": "on the validation tiles' accuracy (tile labels); every card figure is per frame",
    }


_FORWARD: dict[int, Any] = {}


def probs_and_pooled(model: Any, x: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities [N,C] and the GAP-pooled last feature map [N,F] in one pass."""
    import keras
    import tensorflow as tf

    key = id(model)
    if key not in _FORWARD:
        sub = keras.Model(model.inputs, [model.outputs[0], model.get_layer("gap").output])
        size = int(model.inputs[0].shape[1])
        # One traced function per model, any batch size: no retracing for the last, smaller batch.
        _FORWARD[key] = tf.function(lambda b: sub(b, training=False),
                                    input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32)])
    fn = _FORWARD[key]
    ps, fs = [], []
    for i in range(0, len(x), batch):
        p, f = fn(tf.constant(x[i:i + batch], tf.float32))
        ps.append(p.numpy())
        fs.append(f.numpy())
    if not ps:
        return np.zeros((0, int(model.outputs[0].shape[-1])), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(ps), np.concatenate(fs)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def degraded_outputs(model: Any, x: np.ndarray, seed: int) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(probs, pooled) of the images under every degradation and severity, seeded per (kind, severity)."""
    from agent.lab.degrade import KINDS, SEVERITIES, apply_batch, named

    xu = np.clip(np.round(x[..., 0]), 0, 255).astype(np.uint8)
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for ki, kind in enumerate(KINDS):
        out[kind] = {}
        for si, sev in enumerate(SEVERITIES):
            xd = apply_batch(xu, named(kind, sev), seed + 100 * ki + si)
            out[kind][sev] = probs_and_pooled(model, xd[..., None].astype(np.float32))
    return out


def cross_check(model: Any, rule: Any, folders: Sequence[str], spec: InputSpec, n: int = 300) -> dict[str, Any]:
    """What the rule decides for images of other datasets (steel for a tile model and vice versa)."""
    from agent.decision import DECISIONS
    from agent.lab.data import load_dataset, load_frames, stratified_subset

    out: dict[str, Any] = {}
    for folder in folders:
        ds = load_dataset(folder)
        sub = stratified_subset(ds.samples, n, seed=0)
        x, _, frame = load_frames(sub, spec)
        p, f = probs_and_pooled(model, x)
        if frame is not None:
            p, f = per_frame(p, f, frame, len(sub), rule.pass_mask)
        dec, _, _, score = rule.decide(p, f if rule.needs_pooled else None)
        counts = {name: int((dec == i).sum()) for i, name in enumerate(DECISIONS)}
        out[_display_path(folder)] = {"n": len(sub), **counts, "review_share": counts["review"] / max(1, len(sub)),
                                      "median_ood_score": float(np.median(score))}
    return out


def _display_path(p: str) -> str:
    # Cards are committed: record data locations relative to the project, not this machine's root.
    try:
        return os.path.relpath(p, Path(__file__).resolve().parents[3])
    except ValueError:
        return p


def _outcomes(r: Any, p: np.ndarray, f: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    from agent.lab.calibrate import outcome

    dec, idx, _, _ = r.decide(p, f)
    return outcome(dec, idx, y, r.pass_mask)


def _cross_fit(ds: Dataset, cfg: TrainConfig, maha: Any, clean: tuple[np.ndarray, np.ndarray, np.ndarray],
               degraded: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Thresholds chosen on one half of validation, measured on the other, both ways.

    An honest estimate of what the in-sample figures promise on unseen images.
    """
    from agent.lab.calibrate import fit_rule, stratified_halves

    p_va, f_va, val_y = clean
    dp, df, dy = degraded
    halves = stratified_halves(val_y, cfg.seed)
    n_val = len(val_y)
    cross: dict[str, Any] = {}
    for name, (fit_i, test_i) in {"a_to_b": halves, "b_to_a": halves[::-1]}.items():
        dsel = np.concatenate([np.asarray(test_i) + j * n_val for j in range(len(dp) // n_val)])
        fsel = np.concatenate([np.asarray(fit_i) + j * n_val for j in range(len(dp) // n_val)])
        r_h, _ = fit_rule(ds.classes, cfg.pass_classes, p_va[fit_i], val_y[fit_i], f_va[fit_i], maha,
                          dp[fsel], dy[fsel], df[fsel], cfg.escape_budget)
        cross[name] = {"clean": _outcomes(r_h, p_va[test_i], f_va[test_i], val_y[test_i]),
                       "degraded": _outcomes(r_h, dp[dsel], df[dsel], dy[dsel])}
    return cross


def _calibration_block(rule: Any, temperature: float, p_va: np.ndarray, val_y: np.ndarray) -> dict[str, Any]:
    from agent.lab.calibrate import ECE_BINS, ece

    q_va = rule.calibrate(p_va)
    rows = np.arange(len(val_y))
    return {
        "method": "temperature scaling of the logits, fitted on the validation split by NLL (grid 0.05..20); "
                  "the runtime applies softmax(log(probs) / temperature)",
        "temperature": temperature,
        "ece_before": ece(p_va, val_y), "ece_after": ece(q_va, val_y), "ece_bins": ECE_BINS,
        "nll_before": float(-np.mean(np.log(np.maximum(p_va[rows, val_y], 1e-30)))),
        "nll_after": float(-np.mean(np.log(np.maximum(q_va[rows, val_y], 1e-30)))),
    }


def _how_chosen(has_pass: bool, budget: int = 0) -> dict[str, str]:
    from agent.lab.calibrate import REVIEW_GOAL

    return {
        "pass_threshold": (f"the lowest threshold with at most {budget} defect escapes (a defective validation image "
                           f"decided pass) on the clean validation split, i.e. the lowest false-reject rate at "
                           f"<= {budget} escapes (--escape-budget; the cross-fit applies the same budget to each "
                           "half); floor 0.5") if has_pass else "no pass class: every ok verdict is divert or review",
        "min_confidence": (f"the lowest floor sending >= {REVIEW_GOAL:.0%} of validation errors (clean images "
                           "and every degradation at every severity, agent.lab.degrade) to review, counting "
                           "errors already reviewed by the OOD and pass rules; floor 0.5"),
    }


def _ood_block(rule: Any, maha: Any, n_train: int) -> dict[str, Any]:
    from agent.lab.calibrate import OOD_QUANTILE, SHRINKAGE

    return {
        "method": "mahalanobis",
        "inputs": "pooled",
        "pooled": "GlobalAveragePooling2D of the last feature map (the 'gap' layer's output, the input of 'logits'); "
                  "equal to the mean over h,w of the feature map backends return for CAM",
        "score": "min over classes of (f - mean_c) P (f - mean_c) / F, P the shrunk tied precision; computed as "
                 "||f W - means_whitened_c||^2 / F with W W^T = P",
        "fitted_on": f"GAP features of the {n_train} clean training images; shrinkage {SHRINKAGE}",
        "threshold": rule.ood_threshold,
        "how_chosen": f"the {OOD_QUANTILE:.0%} quantile of the clean validation images' scores",
        "features": maha.features,
        "whiten": maha.whiten.tolist(),
        "means_whitened": maha.means.tolist(),
    }


def per_frame(p: np.ndarray, f: np.ndarray, frame: np.ndarray, n: int, pass_mask: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Tile rows (probs [T,C], pooled [T,F], frame index [T]) to one row per frame, by agent.geometry.combine."""
    from agent.geometry import frame_picks

    pick = frame_picks(p, frame, n, pass_mask)
    return p[pick], f[pick]


def fit_decisions(model: Any, ds: Dataset, cfg: TrainConfig, train_x: np.ndarray, train_y: np.ndarray,
                  val_x: np.ndarray, val_y: np.ndarray, frames: Any = None) -> tuple[Any, dict[str, Any]]:
    """Calibration, OOD model, thresholds (with a 2-fold cross-fit estimate) and outcomes under degradation.

    With `frames` (a tiling model's validation Tiles) val_x holds its tiles, the labels are frames.frame_y, and
    every figure is per frame: each frame's tiles combined as the agent combines them, then decided.
    """
    from agent.lab.calibrate import fit_mahalanobis, fit_rule

    _, f_tr = probs_and_pooled(model, train_x)
    p_va, f_va = probs_and_pooled(model, val_x)
    maha = fit_mahalanobis(f_tr, train_y, len(ds.classes))
    deg = degraded_outputs(model, val_x, cfg.seed)
    if frames is not None:
        pm = pass_mask_of(ds.classes, cfg.pass_classes)
        n = len(frames.frame_y)
        p_va, f_va = per_frame(p_va, f_va, frames.frame, n, pm)
        deg = {kd: {sv: per_frame(*deg[kd][sv], frames.frame, n, pm) for sv in deg[kd]} for kd in deg}
        val_y = frames.frame_y
    dp = np.concatenate([deg[kd][s][0] for kd in deg for s in deg[kd]])
    df = np.concatenate([deg[kd][s][1] for kd in deg for s in deg[kd]])
    dy = np.concatenate([val_y for kd in deg for _ in deg[kd]])
    rule, info = fit_rule(ds.classes, cfg.pass_classes, p_va, val_y, f_va, maha, dp, dy, df, cfg.escape_budget)
    decision = {
        "pass_threshold": rule.pass_threshold,
        "min_confidence": rule.min_confidence,
        "rule": ("OOD score > ood.threshold -> review; else argmax a pass class: pass if the calibrated "
                 "probability of the pass classes >= pass_threshold, else review; else argmax a defect class: "
                 "divert if its calibrated probability >= min_confidence, else review"),
        "how_chosen": _how_chosen(bool(cfg.pass_classes), cfg.escape_budget),
        "validation": _outcomes(rule, p_va, f_va, val_y),
        "validation_degraded": _outcomes(rule, dp, df, dy),
        "per_degradation": {kd: {s: _outcomes(rule, *deg[kd][s], val_y) for s in deg[kd]} for kd in deg},
        "cross_fit": _cross_fit(ds, cfg, maha, (p_va, f_va, val_y), (dp, df, dy)),
    }
    return rule, {"calibration": _calibration_block(rule, info["temperature"], p_va, val_y), "decision": decision,
                  "ood": _ood_block(rule, maha, len(train_y))}


def card_json(card: dict[str, Any]) -> str:
    """The card as indented JSON, with the OOD matrices one row per line (they hold ~16K numbers)."""
    ood = card.get("ood") or {}
    big = {k: ood[k] for k in ("whiten", "means_whitened") if k in ood}
    slim = {**card, "ood": {**ood, **{k: f"@@{k}@@" for k in big}}} if big else card
    text = json.dumps(slim, indent=2)
    for k, rows in big.items():
        body = ",\n".join("      " + json.dumps([float(f"{v:.7g}") for v in row]) for row in rows)
        text = text.replace(f'"@@{k}@@"', "[\n" + body + "\n    ]")
    return text + "\n"


def add_arguments(p: Any, models_dir: Path) -> None:
    """The options of `tdn train`."""
    from agent.lab import default_data

    p.add_argument("--data", default=default_data(), help="dataset folder (default: $TDN_DATA)")
    p.add_argument("--out", type=Path, default=models_dir, help="output folder")
    p.add_argument("--name", default="tinydefectnet", help="model name: writes <out>/<name>.keras and <name>.json")
    p.add_argument("--pass-class", action="append", metavar="NAME",
                   help="a defect-free class (repeatable); frames of it may be decided pass")
    p.add_argument("--arch", type=Path,
                   help="architecture JSON, or a model card (its architecture) (default: the design-search winner)")
    p.add_argument("--search-log", type=Path, default=models_dir / "design_search.jsonl")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--patience", type=int, default=25, help="early stopping patience in epochs")
    p.add_argument("--val-fraction", type=float, default=0.2, help="stratified hold-out share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-weight", type=float, default=0.5,
                   help="weight of the box/mask-guided attention loss, which pulls the class map into the annotated "
                        "defect (0 = plain cross-entropy; needs ANNOTATIONS/ or masks)")
    p.add_argument("--balance", type=float, default=0.5,
                   help="class-balanced sampling: class c's share of draws ~ n_c^(1 - balance); 0 natural, 1 uniform")
    p.add_argument("--no-degrade", action="store_true", help="no line-camera degradations in the augmentation")
    p.add_argument("--degrade-p", type=float, default=0.25,
                   help="probability of each photometric degradation per training image (default 0.25)")
    p.add_argument("--input-size", type=int, default=200, help="model input side")
    p.add_argument("--input-method", default="resize", choices=("resize", "letterbox", "tile"),
                   help="how frames of other sizes become the input (see agent/geometry.py)")
    p.add_argument("--interpolation", default="INTER_AREA", help="OpenCV interpolation flag name")
    p.add_argument("--ood-check", action="append", metavar="DIR",
                   help="another dataset whose images should end as review (recorded in the card; repeatable)")
    p.add_argument("--limit", type=int, help="use only N images per class (smoke runs)")
    p.add_argument("--init", help="fine-tune from this trained model (same --arch); its head is kept when the "
                                  "class lists match")
    p.add_argument("--warmup-epochs", type=int, default=3)
    p.add_argument("--escape-budget", type=int, default=0, metavar="N",
                   help="the pass threshold may let N validation defects pass, for a lower false-reject rate "
                        "(default 0: the lowest threshold with none)")


def _same_classes(model: str, classes: Sequence[str]) -> bool:
    card = Path(model).with_suffix(".json")
    return card.is_file() and tuple(json.loads(card.read_text()).get("classes", ())) == tuple(classes)


def train_command(args: Any) -> int:
    """`tdn train`: scan --data (any layout), train, fit the decision rule, write <out>/<name>.keras + card."""
    from agent.errors import TdnError
    from agent.lab.data import load_dataset
    from agent.lab.model.search import best, read_log

    if args.arch:
        arch = json.loads(Path(args.arch).read_text())
        # A model card names its architecture too: --arch agent/models/magnetic-tile.json reproduces that model's.
        spec = ArchSpec.from_dict(arch.get("architecture", arch) if isinstance(arch, dict) else arch)
    else:
        winner = best(read_log(args.search_log))
        if winner is None:
            raise TdnError(f"no trained candidate in {args.search_log}; run `tdn design-search` or pass --arch")
        spec = ArchSpec.from_dict(winner["arch"])
    ds = load_dataset(args.data)
    if args.limit:
        kept = [s for c in range(len(ds.classes)) for s in [x for x in ds.samples if x.label == c][: args.limit]]
        ds = Dataset(ds.root, ds.layout, ds.classes, tuple(sorted(kept, key=lambda s: s.path)))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                      seed=args.seed, val_fraction=args.val_fraction, attention_weight=args.attention_weight,
                      balance=args.balance, degrade=not args.no_degrade, degrade_p=args.degrade_p,
                      pass_classes=tuple(args.pass_class or ()),
                      warmup_epochs=args.warmup_epochs, init=args.init, escape_budget=args.escape_budget,
                      init_head=bool(args.init) and _same_classes(args.init, ds.classes))
    if cfg.attention_weight > 0 and not any(s.localised for s in ds.samples):
        raise TdnError(f"--attention-weight needs defect boxes (ANNOTATIONS/) or masks (<stem>.png beside "
                       f"<stem>.jpg); {args.data} has neither (pass --attention-weight 0)")
    ispec = InputSpec(size=args.input_size, method=args.input_method, interpolation=args.interpolation)
    card = train_and_ship(ds, spec, cfg, Path(args.out), _display_path(args.data), name=args.name,
                          input_spec=ispec, ood_check=args.ood_check or ())
    v = card["validation"]
    print(f"validation accuracy {v['accuracy']:.4f} on {v['n']} held-out images; params {card['params']:,}; "
          f"FLOPs {card['flops'] / 1e6:.1f}M; ECE {card['calibration']['ece_before']:.4f} -> "
          f"{card['calibration']['ece_after']:.4f}; wrote {Path(args.out) / (args.name + '.keras')}")
    if any(s.localised for s in ds.samples):
        # The heatmap method is chosen on the held-out defects' boxes or masks, by the audit that scores them.
        print(f"explanations: shift-cam until `tdn audit --model {Path(args.out) / (args.name + '.keras')} --data "
              f"{args.data} --split val --choose-method --write-card` picks the method for this model's defects")
    return 0


def _self_test_block(folded: Any, rule: Any, ispec: InputSpec) -> dict[str, Any]:
    """The card's self-test: what the model answers for seeded noise, which every runtime must reproduce."""
    st_in = self_test_inputs(ispec.size)
    st_probs = folded.predict(st_in, verbose=0)
    st_dec = rule.decide(st_probs, probs_and_pooled(folded, st_in)[1])[0]
    return {
        "inputs": f"agent.geometry.self_test_inputs({ispec.size}, 4) = np.random.default_rng(1234)"
                  f".integers(0, 256, (4, {ispec.size}, {ispec.size}, 1)).astype('float32')",
        "expected_probs": st_probs.astype(float).round(7).tolist(),
        "expected_class_index": st_probs.argmax(1).tolist(),
        "expected_decisions": [int(c) for c in st_dec],
        "atol": SELF_TEST_ATOL,
        "note": "atol holds for fp32 runtimes; int8/bf16 variants are checked by their accuracy gate instead",
    }


def _validation_block(acc: float, cm: np.ndarray, pred: np.ndarray, val_s: Sequence[Sample], yva: np.ndarray,
                      classes: Sequence[str], cfg: TrainConfig, data_root: str) -> dict[str, Any]:
    errors = [
        {"file": s.rel or s.path.name, "true": classes[int(t)], "pred": classes[int(p)]}
        for s, t, p in zip(val_s, yva, pred, strict=True)
        if t != p
    ]
    return {
        "accuracy": acc,
        "n": len(val_s),
        "errors": errors,
        "confusion_matrix": cm.tolist(),
        "method": f"stratified hold-out of {cfg.val_fraction:.0%} of {data_root} (seed {cfg.seed}); "
                  "these images were never trained on; early stopping, calibration and thresholds used them",
        "files_hash": file_list_hash(val_s),
    }


def _training_block(train_s: Sequence[Sample], cfg: TrainConfig, data_root: str, hist: dict[str, Any],
                    seconds: float) -> dict[str, Any]:
    return {
        "images": len(train_s),
        "files_hash": file_list_hash(train_s),
        "data": data_root,
        "seed": cfg.seed,
        "config": {**asdict(cfg), "pass_classes": list(cfg.pass_classes)},
        "init": None if not cfg.init else {"model": _display_path(cfg.init),
                                          "sha256": file_sha256(Path(cfg.init)), "head_kept": cfg.init_head},
        "imbalance": (f"class-balanced sampling: each epoch draws {len(train_s)} training images with "
                      f"replacement, class c's share proportional to n_c^(1 - {cfg.balance})"
                      if cfg.balance > 0 else "none (natural frequencies, one permutation per epoch)"),
        "augmentation": "flips, 90-degree turns, rotation up to 12 deg and shift up to 22 px (mirrored border), "
                        "then each of Gaussian blur, motion blur, noise, JPEG, brightness, contrast with "
                        f"probability {cfg.degrade_p} up to a little beyond 'strong' (agent.lab.degrade.augment)"
                        if cfg.degrade else "flips, 90-degree turns, rotation and shift",
        "epochs_run": len(hist.get("loss", [])),
        "best_epoch": int(np.argmax(hist.get("val_accuracy", [0]))) + 1,
        "seconds": round(seconds, 1),
    }


INPUT_FUNCTION = "agent.geometry.to_input(frame, InputSpec.from_card(card['input']))"


def _model_block(folded: Any, model: Any, spec: ArchSpec, ispec: InputSpec, acc: float, k: int) -> dict[str, Any]:
    """The card's input, output, architecture and cost entries."""
    from agent.lab.model.flops import netscore

    macs = count_macs(folded)
    return {
        "input": {"shape": [None, ispec.size, ispec.size, 1], "dtype": "float32", "range": "raw pixel values 0..255",
                  "normalization": NORMALIZATION[spec.normalize], **ispec.to_card(),
                  "function": INPUT_FUNCTION if ispec.method != "tile" else
                  f"agent.geometry.tiles({INPUT_FUNCTION}, {ispec.size}), combined by agent.geometry.combine"},
        "output": {"shape": [None, k], "meaning": "softmax probabilities in class order"},
        "architecture": spec.to_dict(),
        "params": int(folded.count_params()),
        "params_training_form": int(model.count_params()),
        "flops": profiler_flops(folded),
        "flops_convention": "tf.compat.v1.profiler float_operation on the frozen inference graph, batch 1 "
                            "(2 per multiply-add)",
        "macs": macs,
        "netscore": round(netscore(100 * acc, folded.count_params(), macs), 2),
    }


def _ship(tmp_model: Path, card: dict[str, Any], out_dir: Path, name: str) -> None:
    """Put the model and its card in place: others may be loading the shipped ones, so rename over them."""
    tmp_card = out_dir / f".{name}.tmp.json"
    tmp_card.write_text(card_json(card))
    os.replace(tmp_model, out_dir / f"{name}.keras")
    os.replace(tmp_card, out_dir / f"{name}.json")


def _checked(ds: Dataset | Sequence[Sample], cfg: TrainConfig, data_root: str) -> Dataset:
    """The dataset (a bare NEU-DET sample list is wrapped), its pass classes checked (DataError names the bad one)."""
    from agent.lab.data import NEU_CLASSES

    if not isinstance(ds, Dataset):
        ds = Dataset(Path(data_root), "neu-det", NEU_CLASSES, tuple(ds))
    bad = [c for c in cfg.pass_classes if c not in ds.classes]
    if bad:
        from agent.errors import DataError

        raise DataError(f"{data_root}: pass class {bad[0]!r} is not one of {list(ds.classes)}")
    return ds


def train_and_ship(
    ds: Dataset | Sequence[Sample],
    spec: ArchSpec,
    cfg: TrainConfig,
    out_dir: Path,
    data_root: str,
    *,
    name: str = "tinydefectnet",
    input_spec: InputSpec | None = None,
    ood_check: Sequence[str] = (),
) -> dict[str, Any]:
    """Train on a stratified split, fold BN, fit the decision rule, write the .keras model and its JSON card."""
    import keras
    import tensorflow as tf

    ds = _checked(ds, cfg, data_root)
    ispec = input_spec or InputSpec()
    t0 = time.monotonic()
    samples = list(ds.samples)
    k = len(ds.classes)
    train_s, val_s = stratified_split(samples, cfg.val_fraction, cfg.seed)
    log.info("split", train=len(train_s), val=len(val_s), seed=cfg.seed, classes=k)
    frames = tiles_block = None
    if ispec.method == "tile":
        from agent.lab.data import load_tiles

        # Tiles train (each labelled by how much of its image's defect it holds) and stop early on tile accuracy;
        # every figure on the card is per frame, the tiles combined as the agent combines them.
        pass_label = ds.classes.index(cfg.pass_classes[0]) if cfg.pass_classes else None
        tr = load_tiles(train_s, ispec, pass_label, progress=True)
        frames = load_tiles(val_s, ispec, pass_label, progress=True)
        xtr, ytr, masks = tr.x, tr.y, (tr.masks if cfg.attention_weight > 0 else None)
        xva, yva = frames.x, frames.y
        tiles_block = _tiles_block(tr, frames, train_s, val_s, ds.classes, pass_label)
    else:
        xtr, ytr = load_arrays(train_s, progress=True, spec=ispec)
        xva, yva = load_arrays(val_s, progress=True, spec=ispec)
        masks = box_masks(train_s, ispec) if cfg.attention_weight > 0 else None
    model, hist = fit(spec, (xtr, ytr), (xva, yva), cfg, masks=masks, n_classes=k)
    # A fine-tuned model (--init) is trained in its inference form already: there is no BN to fold.
    folded = model if cfg.init else fold_batchnorm(model, spec)
    if frames is not None:
        acc, cm, pred = evaluate_frames(folded, frames, pass_mask_of(ds.classes, cfg.pass_classes))
        yva = frames.frame_y
    else:
        acc, cm, pred = evaluate(folded, xva, yva)
    rule, blocks = fit_decisions(folded, ds, cfg, xtr, ytr, xva, yva, frames)
    if ood_check:
        blocks["ood"]["cross_dataset"] = cross_check(folded, rule, ood_check, ispec)
    train_seconds = time.monotonic() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{name}.keras"
    # Others load the shipped model while this runs: write beside it, then rename over it.
    tmp_model = out_dir / f".{name}.tmp.keras"
    folded.save(tmp_model)
    classes = list(ds.classes)
    card = {
        "name": name,
        "architecture_name": "TinyDefectNet",
        "model_file": model_path.name,
        "model_sha256": file_sha256(tmp_model),
        "classes": classes,
        "pass_classes": list(cfg.pass_classes),
        **_model_block(folded, model, spec, ispec, acc, k),
        **blocks,
        "self_test": _self_test_block(folded, rule, ispec),
        "validation": _validation_block(acc, cm, pred, val_s, yva, classes, cfg, data_root),
        "data": {"layout": ds.layout, "counts": ds.counts(), "images": len(samples)},
        "training": {**_training_block(train_s, cfg, data_root, hist, train_seconds),
                     **({"tiles": tiles_block} if tiles_block else {})},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version()},
        "batchnorm": "folded into conv weights for inference",
    }
    _ship(tmp_model, card, out_dir, name)
    log.info("shipped", model=str(model_path), val_accuracy=acc, params=card["params"], flops=card["flops"],
             seconds=round(train_seconds))
    return card
