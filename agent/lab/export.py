"""Build every backend artifact of a model (LiteRT fp32/int8, OpenVINO fp32/int8, the bf16 gate) into the
artifacts folder, cached by the model's sha256; each variant is measured on held-out NEU-DET images against the
fp32 Keras model and the result (the accuracy gate) is stored beside it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendError, TdnError

EVAL_BATCH = 16
LEAN = ("litert", "openvino")
ALL_PRECISIONS = ("fp32", "bf16", "int8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL, default_artifacts_dir
    from agent.lab import default_data

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .keras model (its card beside it)")
    p.add_argument("--data", default=default_data(),
                   help="the model's labelled images (NEU-DET, NEU-CLS or a class-per-folder tree): int8 calibration "
                   "(training split) and the gate (held-out split); default $TDN_DATA, else ../shared/neu-det")
    p.add_argument("--artifacts-dir", type=Path, default=default_artifacts_dir(),
                   help="artifacts root (default: $TDN_ARTIFACTS_DIR, else <state dir>/artifacts)")
    p.add_argument("--backends", default=",".join(LEAN), help="comma list of litert, openvino")
    p.add_argument("--precisions", default=",".join(ALL_PRECISIONS), help="comma list of fp32, bf16, int8")
    p.add_argument("--calibration", type=int, default=240, help="training images for int8 calibration")
    p.add_argument("--threads", type=int, default=0, help="threads while measuring (0: all cores)")
    p.add_argument("--force", action="store_true", help="rebuild even what the cache already holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    p.add_argument("--progress-lines", action="store_true",
                   help="print one line per finished step (what the agent logs when it exports on its first start)")


@dataclass
class Step:
    """One unit of work: skipped when its output already exists (unless --force)."""

    label: str
    output: Path | None
    fn: Callable[[], None]


class Exporter:
    """Builds one model's artifacts in order; holds the Keras model and the labelled arrays between steps."""

    def __init__(self, args: argparse.Namespace) -> None:
        from agent.backends.store import model_dir
        from agent.card import read_dict

        self.args = args
        self.model_path = Path(args.model)
        self.card = read_dict(self.model_path)
        self.folder = model_dir(args.artifacts_dir, self.model_path)
        self.backends = _pick(args.backends, LEAN, "backend")
        self.precisions = _pick(args.precisions, ALL_PRECISIONS, "precision")
        self.threads = args.threads
        self._model: Any = None
        self._arrays: dict[str, Any] = {}
        self.notes: list[str] = []

    # --- lazily loaded inputs ---

    def keras_model(self) -> Any:
        if self._model is None:
            import keras

            try:
                self._model = keras.saving.load_model(self.model_path, compile=False)
            except Exception as exc:  # Keras raises many types for a bad file
                raise TdnError(f"cannot load model {self.model_path}: {exc}") from None
        return self._model

    def data(self) -> dict[str, Any]:
        """Calibration images (training split) and held-out images, labels and fp32 predictions."""
        if not self._arrays:
            from agent.geometry import InputSpec
            from agent.lab.data import (
                check_classes,
                held_out,
                load_arrays,
                load_dataset,
                load_frames,
                stratified_subset,
            )

            ds = load_dataset(self.args.data)
            check_classes(self.card, ds)
            # Calibration and gate images go through the card's input geometry, exactly as frames will.
            spec = InputSpec.from_card(self.card.get("input", {}))
            train, val, how = held_out(self.card, list(ds.samples))
            xc, _ = load_arrays(stratified_subset(train, self.args.calibration, seed=1), spec=spec)
            xv, yv, frame = load_frames(val, spec)
            import tensorflow as tf

            model = self.keras_model()
            fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
                tf.TensorSpec([EVAL_BATCH, spec.size, spec.size, 1], tf.float32))
            self._arrays = {"calib": xc, "x": xv, "y": yv, "frame": frame, "how": how}
            self._arrays["ref"] = self._top1(predict_probs(lambda b: fn(b).numpy(), xv, EVAL_BATCH))
        return self._arrays

    def _top1(self, probs: np.ndarray) -> np.ndarray:
        """Top-1 class per gate image from the rows [T,C]: a tiling model's image takes its deciding tile's row, as
        in the agent, each runtime picking with its own probabilities."""
        d = self._arrays
        if d["frame"] is not None:
            from agent.decision import pass_mask_of
            from agent.geometry import frame_picks

            pass_mask = pass_mask_of(self.card.get("classes", ()), self.card.get("pass_classes", ()))
            probs = probs[frame_picks(probs, d["frame"], len(d["y"]), pass_mask)]
        return np.argmax(probs, axis=1)

    # --- steps ---

    def steps(self) -> list[Step]:
        f = self.folder
        out = [Step("dense kernel (CAM)", f / "cam_kernel.npy", self.kernel),
               Step("SavedModel (probs + feature map)", f / "savedmodel" / "saved_model.pb", self.savedmodel)]
        want = set(self.precisions)
        gated = bool(self.args.data)
        if not gated and want - {"fp32"}:
            self.notes.append("bf16/int8 skipped: they need the model's labelled images (--data DIR) to calibrate "
                              "and gate")
        if "litert" in self.backends:
            out.append(Step("litert fp32", f / "litert-fp32.tflite", self.litert_fp32))
            if "int8" in want and gated:
                out.append(Step("litert int8 (calibrating)", f / "litert-int8.tflite", self.litert_int8))
        if "openvino" in self.backends:
            out.append(Step("openvino fp32", f / "openvino-fp32.xml", self.openvino_fp32))
            if "int8" in want and gated:
                out.append(Step("openvino int8 (NNCF)", f / "openvino-int8.xml", self.openvino_int8))
        if gated:
            out += self._gate_steps()
        return out

    def _gate_steps(self) -> list[Step]:
        out = []
        for backend in self.backends:
            for precision in self.precisions:
                if precision not in _supported(backend):
                    continue
                if not self._native(backend, precision):
                    # Not a step: without native support nothing is gated, so nothing could ever be cached.
                    self.notes.append(f"{backend} {precision}: not gated, this CPU has no native {precision} support")
                    continue
                out.append(Step(f"gate {backend} {precision}", self.folder / f"{backend}-{precision}.gate.json",
                                lambda b=backend, p=precision: self.gate(b, p)))  # type: ignore[misc]
        if "bf16" in self.precisions and _zendnn_bf16_here():
            out.append(Step("gate zendnn bf16", self.folder / "zendnn-bf16.gate.json", self.gate_zendnn_bf16))
        return out

    def gate_zendnn_bf16(self) -> None:
        """ZenDNN's bf16 path against the fp32 reference, measured in a child process: this one imported
        TensorFlow without the plugin's switches, which are read only at TensorFlow's import."""
        import subprocess
        import tempfile

        d = self.data()
        with tempfile.TemporaryDirectory(prefix="tdn-zgate-") as tmp:
            x_file, out_file = Path(tmp) / "x.npy", Path(tmp) / "out.npz"
            np.save(x_file, d["x"])
            code = ("import sys; from agent.lab.export import zendnn_bf16_worker; "
                    "sys.exit(zendnn_bf16_worker(*sys.argv[1:]))")
            res = subprocess.run([sys.executable, "-c", code, str(self.model_path), str(x_file), str(out_file),
                                  str(self.threads)], capture_output=True, text=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if res.returncode != 0:
                tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
                self.notes.append(f"zendnn bf16: not gated, its measurement failed: {tail[-200:]}")
                return
            got = np.load(out_file)
            self._write_gate("zendnn", "bf16", self._top1(got["probs"]), got["self_test"])

    def _write_gate(self, backend: str, precision: str, pred: np.ndarray, self_test: np.ndarray) -> None:
        """The gate record of a variant's top-1 classes on the gate images, with its own self-test output: what the
        agent checks that variant against at start-up (int8 on the synthetic self-test images differs from fp32 by
        up to ~0.23 while passing the gate)."""
        from agent.backends.gate import gate_record, write_gate

        d = self.data()
        record = {**gate_record(pred, d["ref"], d["y"]), "images": d["how"], "fp32_reference": "Keras (TensorFlow)",
                  "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "self_test_probs": np.round(np.asarray(self_test, np.float64), 6).tolist(),
                  "card_self_test": self.card.get("self_test", {}).get("expected_probs")}
        write_gate(self.folder, backend, precision, record)

    def _native(self, backend: str, precision: str) -> bool:
        from agent.backends import create
        from agent.backends.artifacts import ArtifactBackend

        b = create(backend, self.model_path, self.threads, precision=precision, artifacts_dir=self.args.artifacts_dir)
        return not isinstance(b, ArtifactBackend) or b.supported_here(precision)

    def kernel(self) -> None:
        kernel = self.keras_model().get_layer("logits").get_weights()[0]
        np.save(self.folder / "cam_kernel.npy", np.asarray(kernel, np.float32))

    def savedmodel(self) -> None:
        from agent.lab.explain import features_model

        target = self.folder / "savedmodel"
        shutil.rmtree(target, ignore_errors=True)
        features_model(self.keras_model()).export(str(target), format="tf_saved_model", verbose=False)

    def _converter(self) -> Any:
        import tensorflow as tf

        return tf.lite.TFLiteConverter.from_saved_model(str(self.folder / "savedmodel"))

    def litert_fp32(self) -> None:
        (self.folder / "litert-fp32.tflite").write_bytes(self._converter().convert())

    def litert_int8(self) -> None:
        import tensorflow as tf

        calib = self.data()["calib"]
        conv = self._converter()
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
        # Full integer: every op int8 (XNNPACK's QS8 kernels); float input/output keep raw pixels and probabilities.
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        (self.folder / "litert-int8.tflite").write_bytes(conv.convert())

    def openvino_fp32(self) -> None:
        import openvino as ov

        model = ov.convert_model(str(self.folder / "savedmodel"))
        ov.save_model(model, str(self.folder / "openvino-fp32.xml"), compress_to_fp16=False)

    def openvino_int8(self) -> None:
        import nncf
        import openvino as ov

        calib = self.data()["calib"]
        model = ov.Core().read_model(str(self.folder / "openvino-fp32.xml"))
        quantized = nncf.quantize(model, nncf.Dataset(list(calib), lambda a: a[None]), subset_size=len(calib))
        ov.save_model(quantized, str(self.folder / "openvino-int8.xml"), compress_to_fp16=False)

    def gate(self, backend: str, precision: str) -> None:
        from agent.backends import create
        from agent.backends.artifacts import ArtifactBackend
        from agent.hostinfo import cores

        b = create(backend, self.model_path, self.threads, precision=precision, artifacts_dir=self.args.artifacts_dir)
        assert isinstance(b, ArtifactBackend)
        b.open_ungated(precision)
        if not b.supported_here(precision):
            self.notes.append(f"{backend} {precision}: not gated, this CPU has no native {precision} support")
            return
        if not b.artifact(precision).is_file():
            self.notes.append(f"{backend} {precision}: no artifact to gate")
            return
        run = b._runner(EVAL_BATCH, self.threads or cores())
        d = self.data()

        def probs(x: np.ndarray) -> np.ndarray:
            return np.asarray(run(x)[0])  # the runner returns (probs, features)

        pred = self._top1(predict_probs(probs, d["x"], EVAL_BATCH))
        self._write_gate(backend, precision, pred, self_test_output(probs, self.model_path))

    def run(self, progress: bool, lines: bool = False) -> list[str]:
        """Run every step not cached; return the labels of those that ran (with `lines`, print one line each)."""
        from agent.backends.store import manifest_ok, write_manifest

        if self.args.force or not manifest_ok(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)  # stale format or forced: nothing is reused
        self.folder.mkdir(parents=True, exist_ok=True)
        todo = [s for s in self.steps() if s.output is None or not s.output.exists()]
        ran: list[str] = []
        if todo:
            import tensorflow as tf

            # Native TF computes the fp32 reference: keep zentf's plugin optimizer out, as the tensorflow backend does.
            tf.config.optimizer.set_experimental_options({"use_plugin_optimizers": False})
        from tqdm import tqdm

        bar = tqdm(todo, desc="export", unit="step", disable=not progress, leave=False)
        for i, step in enumerate(bar, 1):
            bar.set_description(step.label)
            step.fn()
            ran.append(step.label)
            if lines:
                from agent.backends import PROGRESS_MARK

                print(PROGRESS_MARK + json.dumps({"step": i, "of": len(todo), "label": step.label}), flush=True)
        write_manifest(self.folder, self.model_path, _versions())
        return ran

    def table(self) -> str:
        from agent.backends.gate import read_gate

        rows = [("variant", "artifact", "size", "accuracy", "vs fp32", "agreement", "gate")]
        for backend in self.backends:
            for precision in _supported(backend):
                name = f"{backend}-{'int8' if precision == 'int8' else 'fp32'}"
                path = self.folder / (name + (".tflite" if backend == "litert" else ".xml"))
                size = path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml"
                                              and path.with_suffix(".bin").exists() else 0) if path.exists() else 0
                rec = read_gate(self.folder, backend, precision)
                if not path.exists() and rec is None:
                    continue
                if rec:
                    delta = 100 * (rec["accuracy"] - rec["fp32_accuracy"])
                    verdict = "fp32 (no gate)" if precision == "fp32" else ("pass" if rec["passed"] else "FAIL")
                    cells = (f"{rec['accuracy']:.4f}", f"{delta:+.2f} pts", f"{rec['agreement']:.4f}", verdict)
                else:
                    cells = ("-", "-", "-", "fp32 (no gate)" if precision == "fp32" else "not measured")
                rows.append((f"{backend}:{precision}", path.name if path.exists() else "-",
                             f"{size / 1024:.0f} KiB" if size else "-", *cells))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _supported(backend: str) -> tuple[str, ...]:
    from agent.backends import SUPPORTED

    return SUPPORTED[backend]


def _pick(spec: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in items if s not in known]
    if bad or not items:
        raise TdnError(f"unknown {what} {bad[0] if bad else spec!r}; choose from: {', '.join(known)}")
    return items


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "ai-edge-litert", "openvino", "nncf"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ZENDNN_OPTS", "0")
    if args.data and not Path(args.data).is_dir():
        raise TdnError(f"dataset folder {args.data} not found")
    missing = [b for b in _pick(args.backends, LEAN, "backend") if not _installed(b)]
    if missing:
        raise BackendError(f"runtime of {', '.join(missing)} not installed (pip install '.[{','.join(missing)}]')")
    t0 = time.monotonic()
    exporter = Exporter(args)
    ran = exporter.run(progress=not args.quiet and sys.stderr.isatty(), lines=args.progress_lines)
    if not args.quiet:
        print(exporter.table())
        for note in exporter.notes:
            print(f"note: {note}")
        held = exporter._arrays.get("how")
        if held:
            print(f"gate images: {held}")
        print(f"{len(ran)} step(s) built, the rest cached, in {time.monotonic() - t0:.0f} s: {exporter.folder}")
    return 0


def _installed(name: str) -> bool:
    from agent.backends import installed

    return installed(name)


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.lab.export`: what lean backends run, in a child process, to build a missing fp32 artifact."""
    p = argparse.ArgumentParser(prog="python -m agent.lab.export", description=__doc__)
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except TdnError as exc:
        print(f"tdn export: error: {exc}", file=sys.stderr)
        return 1


def _zendnn_bf16_here() -> bool:
    from agent.backends import installed
    from agent.hostinfo import cpu_flags

    return installed("zendnn") and "avx512_bf16" in cpu_flags()


def zendnn_bf16_worker(model: str, x_file: str, out_file: str, threads: str) -> int:
    """In a fresh process: ZenDNN bf16's top-1 classes on the gate images and its self-test output, to out_file."""
    from agent.backends.zendnn import ZenDNNBackend

    b = ZenDNNBackend(model, int(threads), "bf16", ungated=True)
    b.load()
    b.warmup((EVAL_BATCH,))
    probs = predict_probs(b.infer, np.load(x_file), EVAL_BATCH)
    np.savez(out_file, probs=probs, self_test=self_test_output(b.infer, Path(model)))
    return 0


def self_test_output(run: Any, model_path: Path) -> np.ndarray:
    """A variant's probabilities on the card's self-test images, through `run` at EVAL_BATCH (padded)."""
    from agent.card import read as read_card

    st = read_card(model_path).self_test_inputs()
    batch = np.concatenate([st, np.zeros((EVAL_BATCH - len(st), *st.shape[1:]), st.dtype)])
    return np.asarray(run(batch))[: len(st)]


def predict_probs(run: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """Probabilities of x through `run` (a fixed-size [batch,...] -> probs callable); the last batch is padded."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), xb.dtype)])
        out.append(np.asarray(run(xb))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def predict_all(run: Any, x: np.ndarray, batch: int) -> np.ndarray:
    """Top-1 classes of x through `run` (predict_probs)."""
    p = predict_probs(run, x, batch)
    return np.argmax(p, axis=1) if len(p) else np.zeros(0, np.int64)


if __name__ == "__main__":
    sys.exit(main())
