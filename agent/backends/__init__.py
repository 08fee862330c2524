"""Inference runtimes behind one small interface, with an `auto` chooser (tuned profile, else a short probe)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import BackendError, ConfigError, TdnError

if TYPE_CHECKING:
    from agent.backends.base import Backend
    from agent.config import AgentSettings



@dataclass(frozen=True)
class Entry:
    """One backend: where its class lives, what it runs, and how to tell it is installed."""

    target: str  # "module:Class", imported only when the backend is created
    precisions: tuple[str, ...]
    lean: bool  # serves exported artifacts without importing TensorFlow
    module: str  # the runtime's import name, probed with importlib.util.find_spec


# The one table every other list derives from (uvicorn's loops/auto.py and config.py tables are the model).
REGISTRY: dict[str, Entry] = {
    "tensorflow": Entry("agent.backends.tensorflow:TensorFlowBackend", ("fp32",), False, "tensorflow"),
    "zendnn": Entry("agent.backends.zendnn:ZenDNNBackend", ("fp32", "bf16"), False, "zentf"),
    "litert": Entry("agent.backends.litert:LiteRTBackend", ("fp32", "int8"), True, "ai_edge_litert"),
    "openvino": Entry("agent.backends.openvino:OpenVINOBackend", ("fp32", "bf16", "int8"), True, "openvino"),
}
NAMES = tuple(REGISTRY)
PRECISIONS = ("auto", *dict.fromkeys(p for e in REGISTRY.values() for p in e.precisions))
SUPPORTED = {name: e.precisions for name, e in REGISTRY.items()}
LEAN = tuple(name for name, e in REGISTRY.items() if e.lean)
# Every spelling --backend accepts: auto, a backend, or backend:precision.
SPELLINGS = ("auto", *NAMES, *(f"{n}:{p}" for n, e in REGISTRY.items() for p in e.precisions))
PROBE_BATCH = 8
PROBE_SECONDS = 0.45  # per variant, over PROBE_ROUNDS interleaved rounds
PROBE_ROUNDS = 3
# Probed rates this close to the fastest are a tie (the probe's noise on a shared 2-core machine is ~10%) ...
TIE_MARGIN = 0.10
# ... broken in this order: full precision first (no accuracy question), then the lighter runtime.
PREFERENCE = ("litert:fp32", "openvino:fp32", "openvino:bf16", "litert:int8", "openvino:int8")
# The probe's result, beside the artifacts it measured, so every later start picks the same variant.
PROBE_CACHE = "auto-probe.json"
# Written once the first start's gated export has run, passed or failed, so later starts do not repeat it.
FIRST_EXPORT = "first-start-export.json"
# A line starting with this, from `python -m agent.lab.export --progress-lines`, is one finished step as JSON.
PROGRESS_MARK = "tdn-export-step "
# The gated export takes ~25 s on 2 cores; a hung child must not keep the agent from starting on what it has.
EXPORT_TIMEOUT_S = 900
EXPORT_STEP_S = 120  # how much longer systemd is asked to wait for the start after each export step


def parse(name: str) -> tuple[str, str | None]:
    """"litert:int8" -> ("litert", "int8"); "openvino" -> ("openvino", None)."""
    backend, _, precision = name.partition(":")
    return backend, (precision or None)


def installed(name: str) -> bool:
    """Whether the runtime of backend `name` is importable here (without importing it)."""
    if name == "zendnn":
        from agent.backends.zendnn import zendnn_installed

        return zendnn_installed()
    entry = REGISTRY.get(name)
    return entry is not None and importlib.util.find_spec(entry.module) is not None


@dataclass(frozen=True)
class Choice:
    """What `auto` resolved to, and why (logged in the backend's identity)."""

    backend: str
    precision: str = "auto"
    threads: int = 0
    knobs: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    workers: int = 0  # inference workers (0: auto, agent.backends.base.layout)


def create(name: str, model_path: str | Path, threads: int = 0, *, precision: str = "auto",
           artifacts_dir: str | Path | None = None, profile_path: str | Path | None = None,
           knobs: dict[str, Any] | None = None, export_data: Path | None = None, workers: int = 0) -> Backend:
    """The backend called `name` ("auto" picks; "litert:int8" also names a precision), not yet loaded.

    `workers` inference workers of `threads` runtime threads each (0: auto, agent.backends.base.layout) on the
    lean runtimes; TensorFlow and ZenDNN run one worker (BackendError if more are asked of them by name).
    """
    backend, named = parse(name)
    if named is not None:
        precision = named
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    reason = ""
    if backend == "auto":
        if profile_path is None:
            from agent.config import default_profile_path

            profile_path = default_profile_path()
        choice = choose_auto(Path(model_path), threads, artifacts_dir, profile_path, export_data)
        backend, reason = choice.backend, choice.reason
        if precision == "auto":
            precision = choice.precision
        threads = threads or choice.threads
        workers = workers or choice.workers
        knobs = {**choice.knobs, **{k: v for k, v in (knobs or {}).items() if v is not None}}
    if backend not in NAMES:
        raise BackendError(f"unknown backend {backend!r}; choose auto or one of: {', '.join(NAMES)}")
    _check_workers(backend, workers, auto=parse(name)[0] == "auto")
    if precision not in ("auto", *SUPPORTED[backend]):
        raise BackendError(f"backend {backend} has no precision {precision}; it runs: {', '.join(SUPPORTED[backend])}")
    module_name, _, cls_name = REGISTRY[backend].target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    b: Backend
    if backend == "zendnn":
        b = cls(model_path, threads, precision, knobs, artifacts_dir)
    elif REGISTRY[backend].lean:
        b = cls(model_path, threads, precision, artifacts_dir, workers)
    else:
        b = cls(model_path, threads, precision)
    b.selected_by = reason
    return b


def _check_workers(backend: str, workers: int, *, auto: bool) -> None:
    """Several inference workers only on the lean runtimes; asked of TensorFlow by name, one clear error."""
    if workers > 1 and not REGISTRY[backend].lean and not auto:
        raise BackendError(f"backend {backend} runs one inference worker (its thread pools are per process); "
                           f"workers={workers} needs litert or openvino")


def from_settings(settings: AgentSettings) -> Backend:
    """The backend the agent's settings ask for; a lean one at a reduced precision (or auto) is exported and gated
    first when it never was, as `auto` is on a first start."""
    from agent.backends.zendnn import KNOBS

    name, named = parse(settings.backend)
    if name in LEAN and (named or settings.precision) != "fp32":
        export_if_due(settings.model_path, settings.artifacts_dir, settings.export_data)

    return create(settings.backend, settings.model_path, settings.threads, precision=settings.precision,
                  artifacts_dir=settings.artifacts_dir, profile_path=settings.profile_path,
                  knobs={k: getattr(settings, k) for k in KNOBS}, export_data=settings.export_data,
                  workers=settings.workers)


# --- variants: backend x precision, for benchmarks and tuning ---


@dataclass(frozen=True)
class Variant:
    """One backend at one precision."""

    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.precision}"

    def create(self, model_path: str | Path, threads: int = 0, artifacts_dir: str | Path | None = None,
               knobs: dict[str, Any] | None = None, workers: int = 0) -> Backend:
        return create(self.backend, model_path, threads, precision=self.precision, artifacts_dir=artifacts_dir,
                      knobs=knobs, workers=workers)


def variants(spec: str = "all", include_native: bool = False) -> list[Variant]:
    """Variants named by `spec`: "all" (every installed backend x precision), "none", or "zendnn,litert:int8"."""
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        names = [n for n in NAMES if (include_native or n != "tensorflow") and installed(n)]
        return [Variant(n, p) for n in names for p in SUPPORTED[n]]
    out = []
    for item in spec.split(","):
        backend, precision = parse(item.strip())
        if backend not in NAMES:
            raise BackendError(f"unknown backend {backend!r} in {spec!r}; choose from: {', '.join(NAMES)}")
        for p in [precision] if precision else SUPPORTED[backend]:
            if p not in SUPPORTED[backend]:
                raise BackendError(f"backend {backend} has no precision {p}; it runs: {', '.join(SUPPORTED[backend])}")
            out.append(Variant(backend, p))
    return list(dict.fromkeys(out))  # "zendnn,zendnn:bf16" names bf16 twice: measure it once


# --- auto: the tuned profile, else a short probe ---


def load_profile(path: str | Path | None) -> dict[str, Any] | None:
    """The tuning profile written by `tdn tune`, or None when there is none; a malformed one is an error."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"profile {p}: invalid JSON ({exc}); re-run `tdn tune`") from None
    choice = data.get("choice") if isinstance(data, dict) else None
    if not isinstance(choice, dict) or choice.get("backend") not in NAMES:
        raise ConfigError(f"profile {p}: no valid 'choice' (backend one of {', '.join(NAMES)}); re-run `tdn tune`")
    if choice.get("precision", "fp32") not in SUPPORTED[choice["backend"]]:
        raise ConfigError(f"profile {p}: {choice['backend']} has no precision {choice.get('precision')!r}")
    return data


def profile_choice(profile: dict[str, Any], model_sha256: str, cpu_model: str, cores: int) -> tuple[Choice | None, str]:
    """The profile's choice when it was tuned for this model on this kind of host, else None and why not."""
    if profile.get("model_sha256") != model_sha256:
        return None, "profile was tuned for another model"
    host = profile.get("host", {})
    if host.get("cpu_model") != cpu_model or int(host.get("cores", -1)) != cores:
        return None, f"profile was tuned on another host ({host.get('cpu_model')}, {host.get('cores')} cores)"
    c = profile["choice"]
    if not installed(c["backend"]):
        return None, f"profile chose {c['backend']}, which is not installed"
    return Choice(c["backend"], c.get("precision", "fp32"), int(c.get("threads", 0)), dict(c.get("knobs", {})),
                  f"profile {profile.get('path', '')}".strip(), int(c.get("workers", 0))), "ok"


def choose_auto(model_path: Path | None = None, threads: int = 0, artifacts_dir: str | Path | None = None,
                profile_path: str | Path | None = None, export_data: Path | None = None) -> Choice:
    """The tuned profile's choice if it fits this model and host; else the fastest exported lean variant by a
    probe of a few seconds, after exporting them on the first start (`export_data`: the labelled folder that gates
    bf16/int8, else the card's training data); else ZenDNN on AMD (where it pays) or native TensorFlow."""
    from agent.card import file_sha256
    from agent.hostinfo import cores, cpu_model, cpu_vendor
    log = _log()
    profile = load_profile(profile_path)
    if profile is not None and model_path is not None:
        profile["path"] = str(profile_path)
        choice, why = profile_choice(profile, file_sha256(model_path), cpu_model(), cores())
        if choice is not None:
            return choice
        log.warning("tuning profile ignored", profile=str(profile_path), reason=why)
    if model_path is not None:
        probed = probe(model_path, threads, artifacts_dir)
        # With nothing exported yet, fp32 is built even without data; with data, bf16/int8 are gated too.
        if export_if_due(model_path, artifacts_dir, export_data, nothing_yet=probed is None):
            probed = probe(model_path, threads, artifacts_dir)
        if probed is not None:
            return probed
    if installed("zendnn") and cpu_vendor() == "AuthenticAMD":
        return Choice("zendnn", "fp32", reason="no profile or exported artifacts; ZenDNN on an AMD CPU")
    return Choice("tensorflow", "fp32", reason="no profile or exported artifacts; native TensorFlow")


def probe(model_path: Path, threads: int = 0, artifacts_dir: str | Path | None = None) -> Choice | None:
    """Time every lean variant already exported (and passing the gate) for a fraction of a second each, in
    interleaved rounds.

    Native TensorFlow is not probed: importing it alone takes seconds; `tdn tune` compares everything. Rates
    within TIE_MARGIN of the fastest count as a tie, broken by PREFERENCE, so close variants do not alternate
    from one start to the next on a noisy machine.
    """
    from agent.backends.store import model_dir

    folder = model_dir(artifacts_dir, model_path)
    key = _probe_key(folder, threads)
    cached = _cached_probe(folder / PROBE_CACHE, key)
    if cached is not None:
        return cached
    loaded = {v: b for v in (Variant(n, p) for n in LEAN if installed(n) for p in SUPPORTED[n])
              if (b := _probe_load(v, model_path, threads, artifacts_dir)) is not None}
    if not loaded:
        return None
    # Round-robin, median of the rounds: a drift of the shared host (~20% within seconds here) falls on every
    # variant alike instead of on whichever was timed during it.
    rounds: dict[Variant, list[float]] = {v: [] for v in loaded}
    for _ in range(PROBE_ROUNDS):
        for v, b in loaded.items():
            rounds[v].append(_probe_time(b))
    rates = {v: statistics.median(r) for v, r in rounds.items()}
    v, why = pick(rates)
    # A read-only artifacts folder keeps no cache: the next start probes again.
    with contextlib.suppress(OSError):
        (folder / PROBE_CACHE).write_text(json.dumps(
            {"key": key, "variant": v.label, "why": why, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "rates": {r.label: round(x, 1) for r, x in rates.items()}}, indent=2) + "\n")
    return Choice(v.backend, v.precision, threads, reason=f"probe: {why}")


def _probe_key(folder: Path, threads: int) -> dict[str, Any]:
    """What a cached probe is valid for: this host, thread count and set of exported files (name, size, mtime)."""
    from agent.backends.base import layout
    from agent.hostinfo import cores, cpu_model

    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != PROBE_CACHE) if folder.is_dir() else []
    # The layout too: each variant is timed on one worker's lane, so its thread count is what the rate means.
    return {"cpu_model": cpu_model(), "cores": cores(), "threads": threads, "layout": list(layout(threads, 0, cores())),
            "files": [[str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _cached_probe(path: Path, key: dict[str, Any]) -> Choice | None:
    """The choice of an earlier probe with the same key: a restart serves what the first start chose.

    Probes of variants within a few percent of each other rank them differently from one start to the next on a
    noisy host (openvino:fp32 on one start, litert:fp32 on the next); remembering the first measurement makes
    the choice the same on every start until the artifacts, the host or the threads change.
    """
    try:
        data = json.loads(path.read_text())
        if data["key"] != key:
            return None
        backend, precision = parse(str(data["variant"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: probe and rewrite it
    if backend not in LEAN or precision not in SUPPORTED[backend] or not installed(backend):
        return None
    return Choice(backend, precision or "fp32", key["threads"],
                  reason=f"probe of {data.get('measured', '?')}, kept in {path.name}: {data.get('why', '')}")


def pick(rates: dict[Variant, float], margin: float = TIE_MARGIN) -> tuple[Variant, str]:
    """The variant to serve from measured rates: the most preferred one within `margin` of the fastest."""
    best = max(rates.values())
    tied = [v for v, r in rates.items() if r >= (1.0 - margin) * best]
    order = {label: i for i, label in enumerate(PREFERENCE)}
    chosen = min(tied, key=lambda v: (order.get(v.label, len(order)), -rates[v]))
    summary = ", ".join(f"{v.label} {r:.0f}" for v, r in sorted(rates.items(), key=lambda kv: -kv[1]))
    return chosen, (f"{chosen.label} ({rates[chosen]:.0f} img/s at batch {PROBE_BATCH}; within {margin:.0%} of the "
                    f"fastest, ties go to {' > '.join(PREFERENCE)}; measured {summary})")


def gate_data(model_path: Path, setting: Path | None) -> tuple[Path | None, str]:
    """The labelled folder that calibrates and gates the first start's bf16/int8 export, and where it came from.

    The setting (TDN_EXPORT_DATA) if given; else the folder the model card says the model was trained from
    (`training.data`), as `tdn train` wrote it: relative to the directory training ran in, which is tried as the
    current directory and as the project's root (where the shipped models were trained).
    """
    if setting is not None:
        return setting, "TDN_EXPORT_DATA"
    from agent.card import read_dict

    try:
        named = read_dict(model_path).get("training", {}).get("data")
    except (TdnError, OSError, ValueError):
        return None, "the model card could not be read"
    if not named:
        return None, "the model card names no training data"
    path = Path(str(named))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, Path(__file__).resolve().parents[2] / path]
    for folder in candidates:
        if folder.is_dir():
            return folder.resolve(), "the model card's training.data"
    return None, f"the model card's training data ({named}) is not here"


def export_first_start(model_path: Path, artifacts_dir: str | Path | None, data: Path | None, why: str) -> list[str]:
    """Build the lean artifacts in a child process: fp32 always, bf16/int8 when `data` can calibrate and gate them.

    A fresh install has no artifacts, and would otherwise serve on native TensorFlow or on fp32 only. The child keeps
    TensorFlow out of the agent's own process and reports each step, which is logged. A gated export that fails
    (for example, a folder of other classes) falls back to fp32 only. Returns the backends exported.
    """
    from agent.backends.store import artifacts_root, model_dir

    names = [n for n in LEAN if installed(n)]
    if not names:
        return []
    folder = artifacts_root(artifacts_dir)
    log = _log()
    if data is None:
        log.warning("bf16/int8 not exported: no labelled data to gate them (set TDN_EXPORT_DATA, or run "
                    "`tdn export --data DIR`)", reason=why)
        return names if _run_export(model_path, folder, names, None, why) else []
    gated = _run_export(model_path, folder, names, data, why)
    done = gated or _run_export(model_path, folder, names, None, why)
    # Marked after the fallback: a failed export leaves no manifest, and the next export starts the folder afresh.
    _mark_exported(model_dir(artifacts_dir, model_path), data, ok=gated)
    return names if done else []


def _run_export(model_path: Path, folder: Path, names: list[str], data: Path | None, why: str) -> bool:
    import os
    import subprocess
    import sys
    import threading
    from collections import deque

    from agent.sdnotify import Notifier

    precisions = "fp32,bf16,int8" if data is not None else "fp32"
    log = _log()
    log.info("exporting lean artifacts (first start)", backends=names, precisions=precisions,
             data=str(data) if data else None, data_from=why if data else None, artifacts_dir=str(folder))
    t0 = time.monotonic()
    # --data "" for fp32: it needs none, and a TDN_DATA of another dataset (NEU-DET beside a Magnetic-tile model)
    # would otherwise fail the class check of the gate.
    cmd = [sys.executable, "-m", "agent.lab.export", "--model", str(model_path), "--artifacts-dir", str(folder),
           "--backends", ",".join(names), "--precisions", precisions, "--data", str(data or ""), "--quiet",
           "--progress-lines"]
    # Under systemd, each step buys the start another EXPORT_STEP_S: the unit's TimeoutStartSec is sized for a
    # model load, not for an export on a slow line PC.
    notifier = Notifier()
    notifier.notify(f"EXTEND_TIMEOUT_USEC={EXPORT_STEP_S * 1_000_000}", "STATUS=exporting lean artifacts")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    killer = threading.Timer(EXPORT_TIMEOUT_S, proc.kill)
    killer.start()
    tail: deque[str] = deque(maxlen=5)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PROGRESS_MARK):
                with contextlib.suppress(ValueError, TypeError):
                    step = json.loads(line[len(PROGRESS_MARK):])
                    log.info("export step", step=step.get("step"), of=step.get("of"), label=step.get("label"))
                    notifier.notify(f"EXTEND_TIMEOUT_USEC={EXPORT_STEP_S * 1_000_000}",
                                    f"STATUS=exporting lean artifacts: step {step.get('step')} of {step.get('of')}")
            elif line.strip():
                tail.append(line.strip())
        code = proc.wait()
    finally:
        killer.cancel()
    if code != 0:
        log.error("export failed", precisions=precisions, code=code, error=(list(tail) or ["no output"])[-1][-300:])
        return False
    log.info("exported lean artifacts", backends=names, precisions=precisions, seconds=round(time.monotonic() - t0, 1))
    return True


def _mark_exported(folder: Path, data: Path, ok: bool) -> None:
    # A record that the gated export ran for these artifacts, so a start after it (passed or not) does not run it
    # again: the gate writes no record for a precision this CPU cannot run natively.
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FIRST_EXPORT).write_text(json.dumps(
            {"data": str(data), "ok": ok, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")


def gated_export_due(model_path: Path, artifacts_dir: str | Path | None) -> bool:
    """Whether the reduced precisions were never exported and gated for this model here (by `tdn export --data`
    or a first start with data)."""
    from agent.backends.store import model_dir

    folder = model_dir(artifacts_dir, model_path)
    return not (folder / FIRST_EXPORT).exists() and not any(folder.glob("*.gate.json"))


def export_if_due(model_path: Path, artifacts_dir: str | Path | None, export_data: Path | None,
                  nothing_yet: bool = False) -> bool:
    """Run the first start's export when it is due: the gated one when it never ran for this model here and the
    model's data is here; with `nothing_yet` (no artifacts at all), fp32 without data too. Whether it exported."""
    if not (nothing_yet or gated_export_due(model_path, artifacts_dir)):
        return False
    data, why = gate_data(model_path, export_data)
    if data is None and not nothing_yet:
        return False
    return bool(export_first_start(model_path, artifacts_dir, data, why))


def reload_precision(name: str, precision: str, model_path: Path, artifacts_dir: str | Path | None,
                     export_data: Path | None) -> str:
    """The precision a hot swap serves the next model at, on the serving backend: the serving precision when it is
    exported and gated for that model (exporting it first, as a first start would, when its data is here); else
    fp32, which a lean backend builds without data. A new model is never refused only for lacking its int8 file."""
    if name not in LEAN or precision == "fp32":
        return precision
    from agent.backends.artifacts import ArtifactBackend

    b = create(name, model_path, precision=precision, artifacts_dir=artifacts_dir)
    assert isinstance(b, ArtifactBackend)
    if not b.exported(precision):
        export_if_due(model_path, artifacts_dir, export_data)
    if b.exported(precision):
        return precision
    _log().warning("next model served at fp32", model=str(model_path), serving=f"{name}:{precision}",
                   reason=f"{name}:{precision} is not exported and gated for it (`tdn export --data DIR`)")
    return "fp32"


def _log() -> Any:
    from agent.logging import get_logger

    return get_logger("backends")


def _probe_load(v: Variant, model_path: Path, threads: int, artifacts_dir: str | Path | None) -> Backend | None:
    from agent.backends.artifacts import ArtifactBackend

    try:
        b = v.create(model_path, threads, artifacts_dir)
        if not isinstance(b, ArtifactBackend) or not b.exported(v.precision):
            return None  # the probe never builds artifacts
        b.load()
        b.warmup((PROBE_BATCH,))
    except BackendError:
        return None
    return b


def _probe_time(b: Backend) -> float:
    """Images per second of one probe round at PROBE_BATCH."""
    import numpy as np

    x = np.zeros((PROBE_BATCH, *b.input_shape), np.float32)  # the card's input side, not always 200
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < PROBE_SECONDS / PROBE_ROUNDS:
        b.infer(x)
        n += 1
    return n * PROBE_BATCH / (time.perf_counter() - t0)
