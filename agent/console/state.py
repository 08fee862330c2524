"""The console's socket-free state: camera tiles, agents, a latency window, a snapshot gallery and the review store."""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol import PNG_MAGIC, Explanation, Heartbeat, Status, Verdict
from simulators.plc_bridge import LineTracker

DECISIONS = ("pass", "divert", "review")
# A label becomes a folder and a file name: the id alphabet, and never a dot-only name.
_LABEL_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}")
# The agent blends its overlay as base*(1-a) + JET(heatmap)*a (agent/explain.py overlay(), alpha 0.45); knowing
# that lets the console recover the grey frame from the two PNGs it gets when the agent sends no raw image.
OVERLAY_ALPHA = 0.45
# A gap this recent still shows the camera as failing safe.
GAP_ALERT_S = 10.0


def decision_of(v: Verdict) -> str:
    """The agent's decision; for agents that publish none (v1), divert what is a defect and pass the rest."""
    decision = getattr(v, "decision", None)
    if decision:
        return str(getattr(decision, "value", decision))
    return "divert" if v.defect else "pass"


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear-interpolated percentile of an already sorted list; None when empty."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def valid_label(name: object) -> bool:
    """Whether a class name is safe to use as a folder and file name."""
    return isinstance(name, str) and _LABEL_RE.fullmatch(name) is not None


# --- latency ---


@dataclass
class _Bucket:
    start: float
    count: int = 0
    samples: list[float] = field(default_factory=list)


class LatencyWindow:
    """Capture-to-verdict latency over the last `window_s`, in `bucket_s` buckets of bounded reservoir samples."""

    def __init__(self, *, window_s: float = 300.0, bucket_s: float = 5.0, samples_per_bucket: int = 200,
                 clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        self.bucket_s = bucket_s
        self.samples_per_bucket = samples_per_bucket
        self.clock = clock
        self.buckets: deque[_Bucket] = deque(maxlen=max(1, math.ceil(window_s / bucket_s)))
        self._rng = random.Random(seed)
        self._t0 = clock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def add(self, ms: float) -> None:
        """Record one latency in milliseconds."""
        now = self.clock()
        start = self._t0 + math.floor((now - self._t0) / self.bucket_s) * self.bucket_s
        if not self.buckets or self.buckets[-1].start != start:
            self.buckets.append(_Bucket(start))
        b = self.buckets[-1]
        b.count += 1
        if len(b.samples) < self.samples_per_bucket:
            b.samples.append(ms)
        else:
            # Reservoir sampling keeps every verdict equally likely to be in the sample, at bounded memory.
            j = self._rng.randrange(b.count)
            if j < self.samples_per_bucket:
                b.samples[j] = ms

    def _live(self) -> list[_Bucket]:
        horizon = self.clock() - self.bucket_s * (self.buckets.maxlen or 1)
        return [b for b in self.buckets if b.start >= horizon]

    def summary(self, max_age_s: float = 1.0) -> dict[str, Any]:
        """Window p50/p99 and a series of per-bucket [seconds ago, p50, p99, count] for the chart.

        Recomputed at most every max_age_s: sorting the whole window on every page push cost more CPU than
        everything else the console does.
        """
        now = self.clock()
        if self._cached is not None and now - self._cached[0] < max_age_s:
            return self._cached[1]
        live = self._live()
        merged: list[float] = sorted(x for b in live for x in b.samples)
        series = []
        for b in live:
            ordered = sorted(b.samples)
            series.append([round(now - b.start, 1), _r(percentile(ordered, 0.5)), _r(percentile(ordered, 0.99)),
                           b.count])
        out = {
            "window_s": self.bucket_s * (self.buckets.maxlen or 1),
            "bucket_s": self.bucket_s,
            "count": sum(b.count for b in live),
            "p50_ms": _r(percentile(merged, 0.5)),
            "p99_ms": _r(percentile(merged, 0.99)),
            "series": series,
        }
        self._cached = (now, out)
        return out


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


# --- tiles ---


@dataclass
class CameraTile:
    """What the page shows for one camera besides the bridge-style gap bookkeeping."""

    decisions: Counter[str] = field(default_factory=Counter)
    per_second: deque[list[int]] = field(default_factory=lambda: deque(maxlen=8))  # [second, verdicts]
    last: dict[str, Any] | None = None
    review_flagged: int = 0

    def count(self, now: float) -> None:
        sec = int(now)
        if self.per_second and self.per_second[-1][0] == sec:
            self.per_second[-1][1] += 1
        else:
            self.per_second.append([sec, 1])

    def rate(self, now: float, span: int = 5) -> float:
        """Verdicts per second over the last `span` whole seconds."""
        sec = int(now)
        return sum(n for s, n in self.per_second if sec - span <= s < sec) / span


# --- images ---


@dataclass
class Snapshot:
    """One explanation kept for the gallery: metadata and both PNGs."""

    id: int
    camera_id: str
    seq: int
    agent_id: str
    class_name: str
    confidence: float
    method: str
    part_id: str | None
    model_id: str | None
    received_ns: int
    heatmap_png: bytes
    overlay_png: bytes
    image_png: bytes | None = None

    @property
    def nbytes(self) -> int:
        return len(self.heatmap_png) + len(self.overlay_png) + len(self.image_png or b"")

    def meta(self) -> dict[str, Any]:
        """JSON-ready description (no image bytes)."""
        return {
            "id": self.id, "camera_id": self.camera_id, "seq": self.seq, "agent_id": self.agent_id,
            "class_name": self.class_name, "confidence": round(self.confidence, 4), "method": self.method,
            "part_id": self.part_id, "model_id": self.model_id, "received_ns": self.received_ns,
        }


def reconstruct_frame(overlay_png: bytes, heatmap_png: bytes, alpha: float = OVERLAY_ALPHA) -> bytes | None:
    """The grey frame behind an overlay (within a few grey levels), as PNG; None when the PNGs do not fit."""
    import cv2
    import numpy as np

    overlay = cv2.imdecode(np.frombuffer(overlay_png, np.uint8), cv2.IMREAD_COLOR)
    heat = cv2.imdecode(np.frombuffer(heatmap_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    if overlay is None or heat is None or overlay.shape[:2] != heat.shape:
        return None
    color = cv2.applyColorMap(heat, cv2.COLORMAP_JET).astype(np.float32)
    base = (overlay.astype(np.float32) - alpha * color) / (1.0 - alpha)
    # The frame is grey, so its three channel estimates agree; their mean halves the rounding error.
    gray = np.clip(np.round(base.mean(axis=2)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", gray)
    return bytes(buf) if ok else None


# --- review store ---


@dataclass
class ReviewItem:
    """A frame the line wants a person to look at; on disk once it has an image."""

    id: int
    camera_id: str
    seq: int
    agent_id: str
    epoch: int
    model_id: str
    class_name: str | None
    confidence: float | None
    top: list[list[Any]]
    part_id: str | None
    decision: str
    why: str
    received_ns: int
    has_image: bool = False
    image_kind: str | None = None  # "frame" (sent by the agent) or "reconstructed" (from overlay + heatmap)
    label: str | None = None
    labelled_ns: int | None = None
    exported: str | None = None  # path relative to the export folder

    def meta(self) -> dict[str, Any]:
        """JSON-ready form, also what is stored as <id>.json."""
        return dict(self.__dict__)


class ReviewStore:
    """Review items: image-less ones in memory, those with images on disk under `root`, both capped."""

    def __init__(self, root: Path | None, export_dir: Path | None, *, cap: int = 200, awaiting_cap: int = 256,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.root = root
        self.export_dir = export_dir
        self.cap = cap
        self.wall_ns = wall_ns
        self.items: OrderedDict[int, ReviewItem] = OrderedDict()  # with an image, oldest first
        self.awaiting: OrderedDict[tuple[str, int], ReviewItem] = OrderedDict()  # no image yet
        self.awaiting_cap = awaiting_cap
        self.images: dict[int, dict[str, bytes]] = {}  # kept in memory only when there is no root
        self.evicted = 0
        self.expired_without_image = 0
        self.version = 0
        self._next_id = 1
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            self._load()

    def _load(self) -> None:
        assert self.root is not None
        for path in sorted(self.root.glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            if not path.stem.isdigit():
                continue
            try:
                item = ReviewItem(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a half-written or foreign file: skip it rather than refuse to start
            self.items[item.id] = item
            self._next_id = max(self._next_id, item.id + 1)
        self._enforce_cap()

    # -- intake --

    def add(self, v: Verdict, decision: str, why: str, top: list[list[Any]]) -> ReviewItem:
        """Queue a verdict for review; it waits in memory until an explanation brings its image."""
        item = ReviewItem(
            id=self._next_id, camera_id=v.camera_id, seq=v.seq, agent_id=v.agent_id, epoch=v.epoch,
            model_id=v.model_id, class_name=v.class_name, confidence=v.confidence, top=top, part_id=v.part_id,
            decision=decision, why=why, received_ns=self.wall_ns(),
        )
        self._next_id += 1
        self.awaiting[(v.camera_id, v.seq)] = item
        while len(self.awaiting) > self.awaiting_cap:
            self.awaiting.popitem(last=False)
            self.expired_without_image += 1
        return item  # no version bump: the page re-lists only when an item with an image changes

    def attach(self, snap: Snapshot) -> ReviewItem | None:
        """Give the waiting item for this snapshot's (camera, seq) its images and store it; None if none waits."""
        item = self.awaiting.pop((snap.camera_id, snap.seq), None)
        if item is None:
            return None
        item.has_image = True
        item.image_kind = "frame" if snap.image_png else "reconstructed"
        images = {"heatmap": snap.heatmap_png, "overlay": snap.overlay_png}
        if snap.image_png:
            images["image"] = snap.image_png
        if self.root is None:
            self.images[item.id] = images
        else:
            for which, data in images.items():
                _write_atomic(self.root / f"{item.id}.{which}.png", data)
            self._save(item)
        self.items[item.id] = item
        self._enforce_cap()
        self.version += 1
        return item

    def _enforce_cap(self) -> None:
        while len(self.items) > self.cap:
            # Labelled items are already exported: they go first; then the oldest pending one.
            victim = next((i for i, it in self.items.items() if it.label is not None), next(iter(self.items)))
            self._drop(victim)
            self.evicted += 1

    def _drop(self, item_id: int) -> None:
        self.items.pop(item_id, None)
        self.images.pop(item_id, None)
        if self.root is not None:
            for suffix in (".json", ".heatmap.png", ".overlay.png", ".image.png"):
                (self.root / f"{item_id}{suffix}").unlink(missing_ok=True)

    def _save(self, item: ReviewItem) -> None:
        assert self.root is not None
        _write_atomic(self.root / f"{item.id}.json", json.dumps(item.meta()).encode())

    # -- reading --

    def image(self, item_id: int, which: str) -> bytes | None:
        """PNG bytes of one item's heatmap, overlay or image; None when unknown."""
        if item_id not in self.items or which not in ("heatmap", "overlay", "image"):
            return None
        if self.root is None:
            return self.images.get(item_id, {}).get(which)
        try:
            return (self.root / f"{item_id}.{which}.png").read_bytes()
        except OSError:
            return None

    def listing(self) -> dict[str, Any]:
        """Every item with an image (newest first) and the count still waiting for one."""
        items = [it.meta() for it in reversed(self.items.values())]
        return {
            "items": items,
            "pending": sum(it.label is None for it in self.items.values()),
            "labelled": sum(it.label is not None for it in self.items.values()),
            "awaiting_image": len(self.awaiting),
            "expired_without_image": self.expired_without_image,
            "evicted": self.evicted,
            "cap": self.cap,
            "version": self.version,
        }

    # -- labelling --

    def label(self, item_id: int, label: str, known: set[str]) -> ReviewItem:
        """Confirm or correct an item's class and export it as <export>/<class>/<class>_<camera>-<seq>-<id>.png."""
        item = self.items.get(item_id)
        if item is None:
            raise KeyError(item_id)
        if not valid_label(label) or (known and label not in known):
            raise ValueError(f"unknown class {label[:64]!r}")
        if self.export_dir is None:
            raise ValueError("no export folder")
        frame = self.image(item_id, "image")
        if frame is None:
            overlay, heat = self.image(item_id, "overlay"), self.image(item_id, "heatmap")
            frame = reconstruct_frame(overlay, heat) if overlay and heat else None
        if frame is None:
            raise ValueError("no usable image for this item")
        rel = f"{label}/{label}_{item.camera_id}-{item.seq}-{item.id}.png"
        if item.exported and item.exported != rel:
            (self.export_dir / item.exported).unlink(missing_ok=True)  # relabelled: the old class loses it
        target = self.export_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, frame)
        item.label, item.labelled_ns, item.exported = label, self.wall_ns(), rel
        with (self.export_dir / "labels.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps({"file": rel, "label": label, "predicted": item.class_name, "id": item.id,
                                "camera_id": item.camera_id, "seq": item.seq, "model_id": item.model_id,
                                "image": item.image_kind, "labelled_ns": item.labelled_ns}) + "\n")
        if self.root is not None:
            self._save(item)
        self.version += 1
        return item


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- the whole console ---


class ConsoleState:
    """Everything the page shows, fed decoded messages; not thread-safe (the subscriber holds a lock)."""

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        export_dir: Path | None = None,
        gallery_cap: int = 24,
        gallery_max_bytes: int = 32 * 1024 * 1024,
        review_cap: int = 200,
        review_below: float = 0.0,
        controllable: Collection[str] = (),
        latency_window_s: float = 300.0,
        latency_bucket_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.clock = clock
        self.wall_ns = wall_ns
        self.review_below = review_below
        self.controllable = frozenset(controllable)  # agents with a --control entry: thresholds changeable
        self.gallery_cap = gallery_cap
        self.gallery_max_bytes = gallery_max_bytes
        # The bridge's own bookkeeping gives gaps, duplicates, restarts and lost agents exactly as SPEC 7 says.
        self.line = LineTracker(clock=clock, seq_window=10_000)
        self.tiles: dict[str, CameraTile] = {}
        self.latency = LatencyWindow(window_s=latency_window_s, bucket_s=latency_bucket_s, clock=clock)
        self.gallery: OrderedDict[int, Snapshot] = OrderedDict()
        self._gallery_bytes = 0
        self._snap_id = 0
        review_root = state_dir / "review" if state_dir is not None else None
        if export_dir is None and state_dir is not None:
            export_dir = state_dir / "dataset"
        self.review = ReviewStore(review_root, export_dir, cap=review_cap, wall_ns=wall_ns)
        # (camera, seq) -> (part_id, model_id) of recent verdicts, so a snapshot can show its part.
        self._recent: OrderedDict[tuple[str, int], tuple[str | None, str]] = OrderedDict()
        self._index_names: dict[int, str] = {}  # class index -> name, learned from verdicts (v1 agents)
        self.received: Counter[str] = Counter()
        self.malformed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.skipped_images = 0
        self._started = clock()

    # -- input --

    def on_verdict(self, v: Verdict) -> None:
        """Count a verdict on its camera's tile, its latency, and queue it for review when it asks for one."""
        self.received["verdict"] += 1
        outcome = self.line.on_verdict(v)
        # No per-verdict history is wanted from the tracker; the latency window keeps a bounded sample instead.
        self.line.latencies_ms.clear()
        self.line.agent_latencies_ms.clear()
        if outcome == "duplicate":
            return
        now = self.clock()
        tile = self.tiles.setdefault(v.camera_id, CameraTile())
        decision = decision_of(v)
        tile.decisions[decision] += 1
        tile.count(now)
        if v.class_index is not None and v.class_name is not None:
            self._index_names[v.class_index] = v.class_name
        tile.last = {
            "seq": v.seq, "decision": decision, "status": v.status.value, "class_name": v.class_name,
            "confidence": None if v.confidence is None else round(v.confidence, 4), "part_id": v.part_id,
            "agent_id": v.agent_id, "model_id": v.model_id, "published_ns": v.published_ns,
        }
        if v.capture_ns is not None:
            # Publication minus capture: the line's own latency, unaffected by how late the console reads it.
            self.latency.add((v.published_ns - v.capture_ns) / 1e6)
        self._recent[(v.camera_id, v.seq)] = (v.part_id, v.model_id)
        while len(self._recent) > 4096:
            self._recent.popitem(last=False)
        why = None
        if decision == "review":
            why = "agent"
        elif (self.review_below > 0 and v.status is Status.OK and v.confidence is not None
              and v.confidence < self.review_below):
            why = f"console: confidence {v.confidence:.3f} < {self.review_below:g}"
        if why is not None:
            tile.review_flagged += 1
            self.review.add(v, decision, why, self.top_classes(v))

    def on_explanation(self, e: Explanation) -> None:
        """Keep a snapshot for the gallery (capped in number and bytes) and give a waiting review item its image."""
        self.received["explain"] += 1
        heat, over = bytes(e.heatmap_png), bytes(e.overlay_png)
        image = getattr(e, "image_png", None)
        image_b = bytes(image) if image is not None and bytes(image[:8]) == PNG_MAGIC else None
        part_id, model_id = self._recent.get((e.camera_id, e.seq), (None, None))
        self._snap_id += 1
        snap = Snapshot(self._snap_id, e.camera_id, e.seq, e.agent_id, e.class_name, e.confidence, e.method,
                        part_id, model_id, self.wall_ns(), heat, over, image_b)
        self.review.attach(snap)
        if snap.nbytes > self.gallery_max_bytes // 4:
            self.skipped_images += 1  # one huge snapshot must not flush the whole gallery
            return
        self.gallery[snap.id] = snap
        self._gallery_bytes += snap.nbytes
        while len(self.gallery) > self.gallery_cap or self._gallery_bytes > self.gallery_max_bytes:
            _, old = self.gallery.popitem(last=False)
            self._gallery_bytes -= old.nbytes

    def on_heartbeat(self, hb: Heartbeat) -> None:
        """Refresh the agent's liveness and what it reports."""
        self.received["heartbeat"] += 1
        self.line.on_heartbeat(hb)

    def on_malformed(self, reason: str) -> None:
        """Count a message refused by the decoder, by reason."""
        self.malformed[reason] += 1
        self.line.on_protocol_error(reason)

    def on_dropped(self, kind: str, n: int = 1) -> None:
        """Count messages the console itself dropped because it fell behind."""
        self.dropped[kind] += n

    def tick(self) -> None:
        """Apply the bridge timeouts (gaps, lost agents); call it a few times a second."""
        self.line.tick()

    # -- classes --

    def class_names(self, agent_id: str | None = None) -> list[str]:
        """Class names in probs order: the agent's heartbeat list when it sends one, else those seen in verdicts."""
        agents = [self.line.agents[agent_id]] if agent_id in self.line.agents else list(self.line.agents.values())
        for agent in agents:
            classes = getattr(agent.heartbeat, "classes", None) if agent.heartbeat else None
            if classes:
                return list(classes)
        if not self._index_names:
            return []
        return [self._index_names.get(i, f"class {i}") for i in range(max(self._index_names) + 1)]

    def known_labels(self) -> set[str]:
        """Classes an operator may assign."""
        names = set(self.class_names())
        for agent in self.line.agents.values():
            names.update(getattr(agent.heartbeat, "classes", None) or ())
        return {n for n in names if valid_label(n)}

    def top_classes(self, v: Verdict, k: int = 3) -> list[list[Any]]:
        """The k most probable [class, p] of a verdict (just its own class when it carries no probs)."""
        if v.probs is None:
            return [] if v.class_name is None else [[v.class_name, v.confidence]]
        names = self.class_names(v.agent_id)
        ranked = sorted(enumerate(v.probs), key=lambda ip: -ip[1])[:k]
        return [[names[i] if i < len(names) else f"class {i}", round(p, 4)] for i, p in ranked]

    # -- output --

    def image(self, source: str, item_id: int, which: str) -> bytes | None:
        """PNG bytes by id: a gallery snapshot's or a review item's heatmap/overlay; None when unknown."""
        if source == "snap":
            snap = self.gallery.get(item_id)
            if snap is None or which not in ("heatmap", "overlay"):
                return None
            return snap.heatmap_png if which == "heatmap" else snap.overlay_png
        if source == "review":
            return self.review.image(item_id, which)
        return None

    def summary(self) -> dict[str, Any]:
        """The JSON the page and GET /api/summary show."""
        now = self.clock()
        review = self.review.listing()
        return {
            "cameras": self._cameras(now),
            "agents": self._agents(now),
            "latency": self.latency.summary(),
            "gallery": [s.meta() for s in reversed(self.gallery.values())],
            "review": {k: review[k] for k in ("pending", "labelled", "awaiting_image", "expired_without_image",
                                              "evicted", "cap", "version")},
            "classes": sorted(self.known_labels()),
            "console": {
                "uptime_s": round(now - self._started, 1),
                "received": dict(self.received),
                "dropped": dict(self.dropped),
                "malformed": dict(self.malformed),
                "skipped_images": self.skipped_images,
                "gallery_bytes": self._gallery_bytes,
                "review_below": self.review_below,
            },
            "events": [e.to_dict() for e in list(self.line.events)[-20:]],
        }

    def _cameras(self, now: float) -> dict[str, Any]:
        recent_gap_cams = {e.subject for e in self.line.events if e.kind == "gap"
                           and now - self._started - e.t < GAP_ALERT_S}
        lost_cams: dict[str, list[str]] = {}
        for agent_id, agent in self.line.agents.items():
            if agent.lost:
                for cam in agent.cameras:
                    lost_cams.setdefault(cam, []).append(agent_id)
        cameras: dict[str, Any] = {}
        for cam_id in sorted(self.line.cameras):
            track = self.line.cameras[cam_id]
            tile = self.tiles.get(cam_id, CameraTile())
            reasons = [f"agent {a} lost" for a in lost_cams.get(cam_id, [])]
            if cam_id in recent_gap_cams:
                reasons.append("recent gap fail-safed")
            cameras[cam_id] = {
                "verdicts": track.verdicts,
                "decisions": {d: tile.decisions[d] for d in DECISIONS},
                "by_status": {s.value: track.by_status[s.value] for s in Status},
                "rate_per_s": round(tile.rate(now), 2),
                "last": tile.last,
                "gaps": track.gaps,
                "pending": len(track.missing),
                "duplicates": track.duplicates,
                "late": track.late,
                "review_flagged": tile.review_flagged,
                "fail_safe": bool(reasons),
                "fail_safe_reasons": reasons,
            }
        return cameras

    def _agents(self, now: float) -> dict[str, Any]:
        agents: dict[str, Any] = {}
        for agent_id in sorted(self.line.agents):
            agent = self.line.agents[agent_id]
            hb = agent.heartbeat
            agents[agent_id] = {
                "epoch": agent.epoch,
                "lost": agent.lost,
                "restarts": agent.restarts,
                "heartbeat_age_s": round(now - agent.last_heartbeat, 2),
                "state": hb.state.value if hb else None,
                "backend": dict(hb.backend) if hb else {},
                "model_id": hb.model_id if hb else None,
                "queue_depth": hb.queue_depth if hb else None,
                "uptime_s": round(hb.uptime_s, 1) if hb else None,
                "counters": dict(hb.counters) if hb else {},
                "classes": list(getattr(hb, "classes", None) or ()) if hb else [],
                "pass_classes": list(getattr(hb, "pass_classes", None) or ()) if hb else [],
                "thresholds": dict(getattr(hb, "thresholds", None) or {}) if hb else {},
                "thresholds_changeable": agent_id in self.controllable,
                "cameras": sorted(agent.cameras),
            }
        return agents
