"""Inference runtimes behind one small interface, with an `auto` chooser (tuned profile, else a short probe)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import BackendError, ConfigError

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
PROBE_SECONDS = 0.3
# Probed rates this close to the fastest are a tie (the probe's noise on a shared 2-core machine is ~10%) ...
TIE_MARGIN = 0.10
# ... broken in this order: full precision first (no accuracy question), then the lighter runtime.
PREFERENCE = ("litert:fp32", "openvino:fp32", "openvino:bf16", "litert:int8", "openvino:int8")
# The probe's result, beside the artifacts it measured, so every later start picks the same variant.
PROBE_CACHE = "auto-probe.json"


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


def create(name: str, model_path: str | Path, threads: int = 0, *, precision: str = "auto",
           artifacts_dir: str | Path | None = None, profile_path: str | Path | None = None,
           knobs: dict[str, Any] | None = None) -> Backend:
    """The backend called `name` ("auto" picks; "litert:int8" also names a precision), not yet loaded."""
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
        choice = choose_auto(Path(model_path), threads, artifacts_dir, profile_path)
        backend, reason = choice.backend, choice.reason
        if precision == "auto":
            precision = choice.precision
        threads = threads or choice.threads
        knobs = {**choice.knobs, **{k: v for k, v in (knobs or {}).items() if v is not None}}
    if backend not in NAMES:
        raise BackendError(f"unknown backend {backend!r}; choose auto or one of: {', '.join(NAMES)}")
    if precision not in ("auto", *SUPPORTED[backend]):
        raise BackendError(f"backend {backend} has no precision {precision}; it runs: {', '.join(SUPPORTED[backend])}")
    module_name, _, cls_name = REGISTRY[backend].target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    b: Backend
    if backend == "zendnn":
        b = cls(model_path, threads, precision, knobs, artifacts_dir)
    elif REGISTRY[backend].lean:
        b = cls(model_path, threads, precision, artifacts_dir)
    else:
        b = cls(model_path, threads, precision)
    b.selected_by = reason
    return b


def from_settings(settings: AgentSettings) -> Backend:
    """The backend the agent's settings ask for."""
    from agent.backends.zendnn import KNOBS

    return create(settings.backend, settings.model_path, settings.threads, precision=settings.precision,
                  artifacts_dir=settings.artifacts_dir, profile_path=settings.profile_path,
                  knobs={k: getattr(settings, k) for k in KNOBS})


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
               knobs: dict[str, Any] | None = None) -> Backend:
        return create(self.backend, model_path, threads, precision=self.precision, artifacts_dir=artifacts_dir,
                      knobs=knobs)


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
    return out


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
                  f"profile {profile.get('path', '')}".strip()), "ok"


def choose_auto(model_path: Path | None = None, threads: int = 0, artifacts_dir: str | Path | None = None,
                profile_path: str | Path | None = None) -> Choice:
    """The tuned profile's choice if it fits this model and host; else the fastest exported lean variant by a
    probe of a few seconds; else ZenDNN on AMD (where it pays) or native TensorFlow."""
    from agent.card import file_sha256
    from agent.hostinfo import cores, cpu_model, cpu_vendor
    from agent.logging import get_logger

    log = get_logger("backends")
    profile = load_profile(profile_path)
    if profile is not None and model_path is not None:
        profile["path"] = str(profile_path)
        choice, why = profile_choice(profile, file_sha256(model_path), cpu_model(), cores())
        if choice is not None:
            return choice
        log.warning("tuning profile ignored", profile=str(profile_path), reason=why)
    if model_path is not None:
        probed = probe(model_path, threads, artifacts_dir)
        if probed is None and export_fp32(model_path, artifacts_dir):
            probed = probe(model_path, threads, artifacts_dir)
        if probed is not None:
            return probed
    if installed("zendnn") and cpu_vendor() == "AuthenticAMD":
        return Choice("zendnn", "fp32", reason="no profile or exported artifacts; ZenDNN on an AMD CPU")
    return Choice("tensorflow", "fp32", reason="no profile or exported artifacts; native TensorFlow")


def probe(model_path: Path, threads: int = 0, artifacts_dir: str | Path | None = None) -> Choice | None:
    """Time every lean variant already exported (and passing the gate) for a fraction of a second each.

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
    rates: dict[Variant, float] = {}
    for name in LEAN:
        if not installed(name):
            continue
        for precision in SUPPORTED[name]:
            v = Variant(name, precision)
            rate = _probe_rate(v, model_path, threads, artifacts_dir)
            if rate is not None:
                rates[v] = rate
    if not rates:
        return None
    v, why = pick(rates)
    # A read-only artifacts folder keeps no cache: the next start probes again.
    with contextlib.suppress(OSError):
        (folder / PROBE_CACHE).write_text(json.dumps(
            {"key": key, "variant": v.label, "why": why, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "rates": {r.label: round(x, 1) for r, x in rates.items()}}, indent=2) + "\n")
    return Choice(v.backend, v.precision, threads, reason=f"probe: {why}")


def _probe_key(folder: Path, threads: int) -> dict[str, Any]:
    """What a cached probe is valid for: this host, thread count and set of exported files (name, size, mtime)."""
    from agent.hostinfo import cores, cpu_model

    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != PROBE_CACHE) if folder.is_dir() else []
    return {"cpu_model": cpu_model(), "cores": cores(), "threads": threads,
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


def export_fp32(model_path: Path, artifacts_dir: str | Path | None) -> list[str]:
    """Build the fp32 artifacts of every installed lean backend in a child process (no data needed); their names.

    A fresh install has none, and would otherwise serve on native TensorFlow; the child keeps TensorFlow out of
    the agent's own process.
    """
    import os
    import subprocess
    import sys

    from agent.backends.store import artifacts_root
    from agent.logging import get_logger

    names = [n for n in LEAN if installed(n)]
    if not names:
        return []
    log = get_logger("backends")
    folder = artifacts_root(artifacts_dir)
    log.info("exporting lean artifacts (first start)", backends=names, artifacts_dir=str(folder))
    t0 = time.monotonic()
    # --data "": fp32 needs no data, and a TDN_DATA of another dataset (NEU-DET beside a Magnetic-tile model)
    # would otherwise fail the class check of the gate and leave the agent on the slow path.
    cmd = [sys.executable, "-m", "agent.lab.export", "--model", str(model_path), "--artifacts-dir", str(folder),
           "--backends", ",".join(names), "--precisions", "fp32", "--data", "", "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                         timeout=900)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        log.error("export failed; serving without lean artifacts", error=tail)
        return []
    log.info("exported lean artifacts", backends=names, seconds=round(time.monotonic() - t0, 1))
    return names


def _probe_rate(v: Variant, model_path: Path, threads: int, artifacts_dir: str | Path | None) -> float | None:
    import numpy as np

    from agent.backends.artifacts import ArtifactBackend

    try:
        b = v.create(model_path, threads, artifacts_dir)
        if not isinstance(b, ArtifactBackend) or not b.exported(v.precision):
            return None  # the probe never builds artifacts
        b.load()
        b.warmup((PROBE_BATCH,))
    except BackendError:
        return None
    x = np.zeros((PROBE_BATCH, *b.input_shape), np.float32)  # the card's input side, not always 200
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < PROBE_SECONDS:
        b.infer(x)
        n += 1
    return n * PROBE_BATCH / (time.perf_counter() - t0)
