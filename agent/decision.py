"""The decision rule of a model card: calibrated probabilities (+ pooled features) -> pass / divert / review."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

PASS, DIVERT, REVIEW = 0, 1, 2
DECISIONS = ("pass", "divert", "review")
# A card written before decisions existed: today's reject rule (a verdict below 0.5 is unsure) and no OOD score.
LEGACY_MIN_CONFIDENCE = 0.5
OVERRIDE_KEYS = ("temperature", "pass_threshold", "min_confidence", "ood_threshold", "pass_classes", "ood")
_TINY = np.float32(1e-30)


@dataclass(frozen=True)
class Mahalanobis:
    """Tied-covariance Mahalanobis distance to the nearest class mean, divided by the feature count.

    whiten is W with W W^T = the (shrunk) inverse covariance, so d^2(f, mu) = ||f W - mu W||^2; the class means
    are stored already whitened, which makes the per-row cost one [F,F] product and one [C,F] product.
    """

    whiten: np.ndarray  # float32 [F,F]
    means: np.ndarray  # float32 [C,F], whitened

    def __post_init__(self) -> None:
        object.__setattr__(self, "_means_sq", (self.means.astype(np.float64) ** 2).sum(1).astype(np.float32))

    @classmethod
    def from_card(cls, ood: dict[str, Any]) -> Mahalanobis:
        w = np.asarray(ood["whiten"], np.float32)
        m = np.asarray(ood["means_whitened"], np.float32)
        if w.ndim != 2 or w.shape[0] != w.shape[1] or m.ndim != 2 or m.shape[1] != w.shape[1]:
            raise ValueError(f"ood whiten {w.shape} and means {m.shape} do not fit ([F,F], [C,F])")
        return cls(w, m)

    @property
    def features(self) -> int:
        return int(self.whiten.shape[0])

    def score(self, pooled: np.ndarray) -> np.ndarray:
        z = np.asarray(pooled, np.float32) @ self.whiten
        d2 = (z * z).sum(1, keepdims=True) - 2.0 * (z @ self.means.T) + self._means_sq  # type: ignore[attr-defined]
        return np.maximum(d2.min(1), 0.0) / np.float32(self.features)


def pass_mask_of(classes: Sequence[str], pass_classes: Sequence[str]) -> np.ndarray:
    """bool [C]: which of the classes are pass classes."""
    return np.array([c in pass_classes for c in classes], bool)


@dataclass(frozen=True)
class DecisionRule:
    """Pass only a pass class above pass_threshold; divert a defect class at >= min_confidence; else review.

    Every frame the OOD score flags (score > ood_threshold) is review, whatever its class. Probabilities are
    calibrated first: softmax(log(p) / temperature), which is temperature scaling of the logits up to the
    per-row constant the softmax removes.
    """

    classes: tuple[str, ...]
    pass_classes: tuple[str, ...] = ()
    temperature: float = 1.0
    pass_threshold: float = 0.5
    min_confidence: float = LEGACY_MIN_CONFIDENCE
    ood_threshold: float = float("inf")
    ood: Mahalanobis | None = None
    pass_mask: np.ndarray = field(init=False, repr=False)
    # Derived once: decide() runs once per batch, and at light load a batch is one frame.
    _pass_any: bool = field(init=False, repr=False, compare=False)
    _needs_pooled: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [c for c in self.pass_classes if c not in self.classes]
        if unknown:
            raise ValueError(f"pass class {unknown[0]!r} is not one of the model's classes {list(self.classes)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("pass_threshold", "min_confidence"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        object.__setattr__(self, "pass_mask", pass_mask_of(self.classes, self.pass_classes))
        object.__setattr__(self, "_pass_any", bool(self.pass_mask.any()))
        object.__setattr__(self, "_needs_pooled", self.ood is not None and bool(np.isfinite(self.ood_threshold)))

    @property
    def needs_pooled(self) -> bool:
        """decide() needs the GAP-pooled last feature map (the card's ood.inputs is "pooled")."""
        return self._needs_pooled

    @classmethod
    def from_card(cls, card: dict[str, Any], overrides: dict[str, Any] | None = None) -> DecisionRule:
        """The rule a card states (pass_classes, calibration, decision, ood), then settings' overrides on top.

        overrides: temperature, pass_threshold, min_confidence, ood_threshold (None = the card's; inf = off),
        pass_classes (class names), ood (False turns the OOD check off). None values keep the card's.
        """
        classes = tuple(card["classes"])
        dec = card.get("decision", {})
        ood_card = card.get("ood") or {}
        ood: Mahalanobis | None = None
        ood_threshold = float("inf")
        if ood_card.get("method") == "mahalanobis":
            ood = Mahalanobis.from_card(ood_card)
            ood_threshold = float(ood_card["threshold"])
        elif ood_card.get("method") not in (None, "none"):
            raise ValueError(f"unknown ood method {ood_card.get('method')!r} in the model card")
        rule = cls(
            classes=classes,
            pass_classes=tuple(card.get("pass_classes", ())),
            temperature=float(card.get("calibration", {}).get("temperature", 1.0)),
            pass_threshold=float(dec.get("pass_threshold", 0.5)),
            min_confidence=float(dec.get("min_confidence", LEGACY_MIN_CONFIDENCE)),
            ood_threshold=ood_threshold,
            ood=ood,
        )
        return rule.with_overrides(overrides) if overrides else rule

    def with_overrides(self, overrides: dict[str, Any]) -> DecisionRule:
        """A copy with settings replacing thresholds; an unknown key is an error naming it."""
        bad = [k for k in overrides if k not in OVERRIDE_KEYS]
        if bad:
            raise ValueError(f"unknown decision override {bad[0]!r}; expected one of {', '.join(OVERRIDE_KEYS)}")
        changes: dict[str, Any] = {}
        for k, v in overrides.items():
            if v is None:
                continue
            if k == "pass_classes":
                changes[k] = tuple(_names(v))
            elif k == "ood":
                if not v:
                    changes["ood_threshold"] = float("inf")
            else:
                changes[k] = float(v)
        return replace(self, **changes)

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Temperature-scaled probabilities float32 [N,C] from softmax probabilities."""
        p = np.asarray(probs, np.float32)
        if self.temperature == 1.0:
            return p
        z = np.log(np.maximum(p, _TINY)) * np.float32(1.0 / self.temperature)
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        out: np.ndarray = e / e.sum(1, keepdims=True)
        return out

    def ood_score(self, pooled: np.ndarray | None, n: int) -> np.ndarray:
        """float32 [N] OOD scores (0 when the rule has none); pooled is required when the rule has one."""
        if self.ood is None:
            return np.zeros(n, np.float32)
        if pooled is None:
            raise ValueError("this model's OOD check needs the pooled features (card ood.inputs = 'pooled')")
        f = np.asarray(pooled, np.float32)
        if f.shape != (n, self.ood.features):
            raise ValueError(f"pooled features {f.shape} do not fit ({n}, {self.ood.features})")
        return self.ood.score(f).astype(np.float32, copy=False)

    def decide(self, probs: np.ndarray, pooled: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(decision codes uint8 [N], class index int64 [N], calibrated confidence float32 [N], OOD score [N]).

        codes: PASS=0, DIVERT=1, REVIEW=2 (DECISIONS names them).
        """
        p = np.asarray(probs, np.float32)
        if p.ndim != 2 or p.shape[1] != len(self.classes):
            raise ValueError(f"probs {p.shape} do not fit [N, {len(self.classes)}]")
        n = p.shape[0]
        q = self.calibrate(p)
        idx = q.argmax(1)
        conf = q.max(1)  # the argmax's own value: one reduction instead of an index array and a gather
        # When the OOD check is off (threshold inf) pooled features are not needed, and not read.
        score = self.ood_score(pooled, n) if self._needs_pooled else np.zeros(n, np.float32)
        if self._pass_any:
            pass_prob = q[:, self.pass_mask].sum(1)
            out = np.where(self.pass_mask[idx], np.where(pass_prob >= self.pass_threshold, PASS, REVIEW),
                           np.where(conf >= self.min_confidence, DIVERT, REVIEW)).astype(np.uint8)
        else:  # no pass class: every frame is a defect class, divert when confident
            out = np.where(conf >= self.min_confidence, DIVERT, REVIEW).astype(np.uint8)
        out[score > self.ood_threshold] = REVIEW
        return out, idx.astype(np.int64, copy=False), conf.astype(np.float32, copy=False), score


def _names(v: Any) -> Sequence[str]:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [str(s) for s in v]


def names(codes: np.ndarray) -> list[str]:
    """Decision names of an array of codes."""
    return [DECISIONS[int(c)] for c in codes]
