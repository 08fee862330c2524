"""The model being served, and a new one loaded, checked and warmed beside it on SIGHUP (hot swap)."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent import card as cards
from agent.backends.base import Backend, BatchBuffers
from agent.control import ThresholdStore
from agent.decision import DecisionRule
from agent.errors import ModelError, TdnError
from agent.geometry import InputSpec
from agent.line import Inferred, Job, ServingModel
from agent.logging import get_logger
from protocol import MAX_IMAGES, MAX_TEXT_LEN, AgentState, Heartbeat

if TYPE_CHECKING:
    from agent.config import AgentSettings
    from agent.line import Line

log = get_logger("agent.serving")
# A file in the state directory naming the next model to serve; without it, SIGHUP reloads model_path.
NEXT_MODEL_FILE = "next-model"
# The gate keeps the card's self-test as it was; the same card matches it up to float32 rounding.
CARD_EXACT = 1e-5


def overrides(settings: AgentSettings) -> dict[str, Any]:
    """The decision thresholds the settings set (None keeps the card's)."""
    return {"pass_classes": settings.pass_classes, "pass_threshold": settings.pass_threshold,
            "min_confidence": settings.min_confidence, "ood_threshold": settings.ood_threshold}


def describe_thresholds(model: ServingModel) -> dict[str, float]:
    """The thresholds in force, for the heartbeat (an OOD check that is off is left out)."""
    return {k: v for k, v in model.thresholds.items() if math.isfinite(v)}


def rule_thresholds(rule: DecisionRule) -> dict[str, float]:
    """The numbers a rule decides by, as the heartbeat and the control channel name them."""
    return {"temperature": rule.temperature, "pass_threshold": rule.pass_threshold,
            "min_confidence": rule.min_confidence, "ood_threshold": rule.ood_threshold}


def retuned(model: ServingModel, runtime: dict[str, float]) -> ServingModel:
    """`model` deciding by its card-and-settings rule with run-time thresholds on top (ValueError if invalid)."""
    rule = model.base_rule.with_overrides(runtime)
    # An OOD check turned on at run time needs the pooled features from the next batch on (and off, not).
    return replace(model, rule=rule, thresholds=rule_thresholds(rule), needs_pooled=rule.needs_pooled)


def prepare(backend: Backend, settings: AgentSettings, model_path: Path) -> ServingModel:
    """Load, warm and check a model against its card; ModelError (one line) when it must not serve."""
    card = cards.read(model_path)
    try:
        rule = DecisionRule.from_card(card.raw, overrides(settings))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model card {cards.card_path(model_path)}: bad decision settings: {exc}") from None
    backend.load()
    backend.warmup(settings.batch_sizes)
    if rule.needs_pooled:
        backend.warmup_pooled(settings.batch_sizes)
    probs = np.asarray(backend.infer_any(card.self_test_inputs()))
    if probs.ndim != 2 or probs.shape[1] != len(card.classes):
        raise ModelError(f"model {model_path} outputs {probs.shape}, its card lists {len(card.classes)} classes")
    # A gated reduced precision is held to its own output at export, fp32 (and an ungated runtime) to the card's.
    gate = backend.gate or {}
    recorded = gate.get("self_test_probs")
    problem = card.check_self_test(probs, expected=recorded, source="its gate's record" if recorded else "the card")
    if problem is None and gate.get("card_self_test") is not None:
        # Artifacts are keyed by the weights alone: a card edited since the export (same .keras file) must still
        # match the card that variant's record was measured against.
        problem = card.check_self_test(np.asarray(gate.get("card_self_test"), np.float32), tolerance=CARD_EXACT)
        problem = problem and f"{problem}; the card is not the one {backend.name}:{backend.precision} was exported with"
    if problem is not None:
        raise ModelError(f"model {model_path} fails its self-test: {problem}")
    return ServingModel(card.variant_id(backend.name, backend.precision), card.classes, rule.pass_classes, rule,
                        rule_thresholds(rule), rule.needs_pooled, runner=backend, input=card.input, base_rule=rule,
                        explain_method=card.explain_method)


def _can_undo_nice() -> bool:
    """Whether this process may lower a thread's nice value back to 0: as root, or when RLIMIT_NICE allows it
    (the agent's systemd unit sets LimitNICE=+0)."""
    import resource

    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or soft >= 20


class _Background:
    """The reload thread at the lowest priority while it loads, warms and self-tests the next model, so that work
    takes only what the serving inference thread leaves of the cores.

    Nice is per thread on Linux, and the runtime threads the reload creates (an interpreter's pool per batch size)
    inherit it; they serve the new model afterwards, so on exit they are put back to the process's priority. Where
    that is not allowed (an unprivileged process without LimitNICE), nothing is lowered in the first place.
    """

    def __enter__(self) -> None:
        self.before = set(os.listdir("/proc/self/task"))
        self.base = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's (Linux: PRIO_PROCESS 0 is the caller)
        self.lowered = False
        if _can_undo_nice():
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, 19)
                self.lowered = True

    def __exit__(self, *exc: object) -> None:
        if not self.lowered:
            return
        for tid in set(os.listdir("/proc/self/task")) - self.before:
            with contextlib.suppress(OSError, ValueError):
                os.setpriority(os.PRIO_PROCESS, int(tid), self.base)


class Loader:
    """Holds the serving model; reload() prepares the next one on its own thread, take_ready() hands it over."""

    def __init__(self, settings: AgentSettings) -> None:
        self.s = settings
        self.model: ServingModel | None = None
        # Thresholds set by control commands (agent/control.py), applied to every model served, swaps included;
        # the ones saved before a restart apply from the start.
        self.runtime: dict[str, float] = ThresholdStore(settings.state_dir).load()
        self._recent: dict[str, ServingModel] = {}  # by model_id: explanations of verdicts made before a swap
        self._lock = threading.Lock()
        self._ready: ServingModel | None = None
        self._refused = 0
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> Backend:
        """The serving model's backend."""
        return self.require_model().runner

    @property
    def current_input(self) -> InputSpec:
        """How intake turns frames into the serving model's input."""
        spec = self.require_model().input
        assert spec is not None
        return spec

    def require_model(self) -> ServingModel:
        if self.model is None:
            raise RuntimeError("no model is being served yet")
        return self.model

    def serve(self, backend: Backend) -> ServingModel:
        """The first model, at start-up: any problem is fatal (one clear error, exit 1)."""
        self.model = retuned(prepare(backend, self.s, self.s.model_path), self.runtime)
        self._recent[self.model.model_id] = self.model
        log.info("model serving", model_id=self.model.model_id, classes=list(self.model.classes),
                 pass_classes=list(self.model.pass_classes), set_at_run_time=self.runtime, **backend.identity())
        return self.model

    def model_by_id(self, model_id: str) -> ServingModel | None:
        return self._recent.get(model_id)

    def next_path(self) -> Path:
        """What SIGHUP loads: the path named in <state_dir>/next-model, else model_path (replaced in place)."""
        f = Path(self.s.state_dir) / NEXT_MODEL_FILE
        if f.is_file():
            text = f.read_text().strip()
            if text:
                return Path(text)
        return Path(self.s.model_path)

    @property
    def reloading(self) -> bool:
        """Whether a model is loading beside the serving one (readable from any thread)."""
        return self._thread is not None and self._thread.is_alive()

    def start_reload(self) -> None:
        """Begin loading the next model beside the serving one (ignored while a reload runs)."""
        if self.reloading:
            log.warning("reload already running; request ignored")
            return
        self._thread = threading.Thread(target=self._reload, name="tdn-reload", daemon=True)
        self._thread.start()

    def _reload(self) -> None:
        # Loading a model makes tens of thousands of objects; the collections they trigger would walk them (and
        # each new generation) while holding the GIL, stalling the I/O thread for tens of ms mid-line. Collection
        # waits until the model is built, and what it built is then frozen out of it, as at start-up.
        gc.disable()
        try:
            with _Background():
                self._load_next()
        finally:
            gc.freeze()
            gc.enable()

    def _load_next(self) -> None:
        from agent.backends import create, reload_precision

        path = self.next_path()
        current = self.require_model()
        log.info("model reload", path=str(path), serving=current.model_id)
        try:
            precision = reload_precision(current.runner.name, current.runner.precision, path, self.s.artifacts_dir,
                                         self.s.export_data)
            # As many lanes as the serving backend: the service's inference workers were started for those.
            backend = create(current.runner.name, path, self.s.threads, precision=precision,
                             artifacts_dir=self.s.artifacts_dir, profile_path=self.s.profile_path,
                             workers=current.runner.workers)
            model = prepare(backend, self.s, path)
            if model.input != current.input:
                # Frames already queued were shaped for the serving model; a new geometry needs a restart.
                raise ModelError(f"input geometry {model.input} differs from the serving model's {current.input}")
        except (TdnError, OSError, ValueError, RuntimeError) as exc:
            log.error("model refused", path=str(path), error=str(exc), serving=current.model_id)
            with self._lock:
                self._refused += 1
            return
        with self._lock:
            self._ready = model

    def take_ready(self) -> ServingModel | None:
        """The prepared model, once; the I/O loop swaps it in between batches."""
        with self._lock:
            model, self._ready = self._ready, None
        if model is None:
            return None
        # Thresholds an operator set apply to the new model too, including any set while it loaded.
        model = retuned(model, self.runtime)
        old = self.model
        self.model = model
        self._recent = {m.model_id: m for m in (old, model) if m is not None}
        log.info("model swapped", model_id=model.model_id, previous=old.model_id if old else None)
        return model

    def retune(self, runtime: dict[str, float]) -> ServingModel:
        """Serve the current model with these run-time thresholds (ValueError, nothing changed, if invalid)."""
        model = retuned(self.require_model(), runtime)
        self.runtime = dict(runtime)
        self.model = model
        self._recent[model.model_id] = model
        return model

    def count_refusals(self, line: Line | None) -> None:
        """Carry refusals from the reload thread into the line's accounting (on the I/O thread)."""
        with self._lock:
            n, self._refused = self._refused, 0
        if n and line is not None:
            line.record("model_refused", n=n)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def run_job(job: Job, buffers: BatchBuffers, sizes: tuple[int, ...] = (), lane: int = 0) -> Inferred:
    """One batch through its model's runner on `lane` (the calling inference worker's own runtime instance); a
    runtime failure comes back as the error.

    A tiling model's frames carry several inputs each: they run as rows of warmed batch sizes (`sizes`), and each
    frame gets the row of the tile that decides it (agent.geometry.combine).
    """
    spec = job.model.input
    tiled = spec is not None and spec.method == "tile"
    probs = pooled = error = None
    t0 = time.perf_counter()
    try:
        if tiled:
            probs, pooled = _run_tiles(job, buffers, sizes or (job.padded_size,), lane)
        else:
            batch = buffers.fill([p.image for p in job.items], job.padded_size)
            if job.model.needs_pooled:
                probs, pooled = job.model.runner.infer_pooled(batch, lane)
            else:
                probs = job.model.runner.infer(batch, lane)
    except Exception as exc:  # any runtime failure must still end in verdicts
        error = f"{type(exc).__name__}: {exc}"
    return Inferred(job, probs, pooled, error, time.time_ns(), time.perf_counter() - t0, lane)


def _run_tiles(job: Job, buffers: BatchBuffers, sizes: tuple[int, ...], lane: int
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Every tile of the job's frames through the runner in chunks of warmed sizes; one combined row per frame."""
    from agent.batcher import pad_to_compiled
    from agent.geometry import frame_picks, tiles

    m = job.model
    size = m.input.size
    rows: list[np.ndarray] = []
    counts: list[int] = []
    for item in job.items:
        assert item.image is not None  # a job holds accepted frames only
        t = tiles(item.image, size)
        rows.extend(t)
        counts.append(len(t))
    largest = max(sizes)
    ps: list[np.ndarray] = []
    fs: list[np.ndarray] = []
    for start in range(0, len(rows), largest):
        chunk = rows[start:start + largest]
        batch = buffers.fill(chunk, pad_to_compiled(len(chunk), sizes))
        if m.needs_pooled:
            p, f = m.runner.infer_pooled(batch, lane)
            fs.append(np.asarray(f)[: len(chunk)])
        else:
            p = m.runner.infer(batch, lane)
        ps.append(np.asarray(p)[: len(chunk)])
    all_p = np.concatenate(ps)
    all_f = np.concatenate(fs) if fs else None
    pass_mask = getattr(m.rule, "pass_mask", np.zeros(len(m.classes), bool))
    pick = frame_picks(all_p, np.repeat(np.arange(len(counts)), counts), len(counts), pass_mask)
    return all_p[pick], None if all_f is None else all_f[pick]


def heartbeat(settings: AgentSettings, epoch: int, hb_seq: int, uptime_s: float, state: AgentState,
              line: Line | None, model: ServingModel | None, backend: Backend) -> Heartbeat:
    """The heartbeat of this moment; while the model loads (no line yet) it says `starting` and little else."""
    ident = model.runner.identity() if model is not None else {"backend": backend.name}
    # The SPEC bounds every text to MAX_TEXT_LEN; a long value (auto's reason lists every variant it measured)
    # is cut here, whole in the log, rather than failing the heartbeat and with it the I/O loop.
    ident = {k: v if len(v) <= MAX_TEXT_LEN else v[: MAX_TEXT_LEN - 1] + "\u2026" for k, v in ident.items()}
    return Heartbeat(
        agent_id=settings.agent_id, epoch=epoch, hb_seq=hb_seq, time_ns=time.time_ns(), uptime_s=uptime_s,
        state=state, queue_depth=len(line.batcher) if line else 0, counters=line.counters() if line else {},
        batch_sizes={str(k): v for k, v in sorted(line.batch_sizes.items())} if line else {},
        backend=ident, model_id=model.model_id if model else "",
        classes=model.classes if model else (), pass_classes=model.pass_classes if model else (),
        thresholds=describe_thresholds(model) if model else {}, max_frame_bytes=settings.max_frame_bytes,
        max_images=MAX_IMAGES,
    )
