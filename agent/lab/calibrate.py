"""Fitting the decision rule on validation: temperature, ECE, Mahalanobis OOD, operating thresholds, cross-fit."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.decision import DIVERT, PASS, REVIEW, DecisionRule, Mahalanobis

ECE_BINS = 15
SHRINKAGE = 0.1  # share of the covariance replaced by its mean variance: ~1,000 images for 128 features
OOD_QUANTILE = 0.99  # the OOD threshold flags this share of clean validation images as in-distribution
REVIEW_GOAL = 0.95  # min_confidence sends at least this share of validation errors (clean + degraded) to review
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 801))


def softmax_t(probs: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.maximum(np.asarray(probs, np.float64), 1e-30)) / t
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(1, keepdims=True)
    return out


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins (Guo et al. 2017)."""
    p = np.asarray(probs, np.float64)
    if len(p) == 0:
        return 0.0
    conf = p.max(1)
    correct = p.argmax(1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return float(total)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    p = np.asarray(probs, np.float64)
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-30))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation NLL, by a fine log-spaced grid (one parameter: no optimiser needed)."""
    losses = [nll(softmax_t(probs, float(t)), y) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def fit_mahalanobis(pooled: np.ndarray, y: np.ndarray, n_classes: int, shrinkage: float = SHRINKAGE) -> Mahalanobis:
    """Class means and a shared, shrunk covariance of training features (Lee et al. 2018), whitened for speed."""
    f = np.asarray(pooled, np.float64)
    dim = f.shape[1]
    means = np.stack([f[y == c].mean(0) if (y == c).any() else f.mean(0) for c in range(n_classes)])
    centred = f - means[y]
    cov = centred.T @ centred / max(1, len(f) - n_classes)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / dim * np.eye(dim)
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    whiten = np.linalg.cholesky(precision)  # precision = L L^T, so d^2 = ||(f - mu) L||^2
    return Mahalanobis(whiten.astype(np.float32), (means @ whiten).astype(np.float32))


def choose_pass_threshold(q: np.ndarray, y: np.ndarray, pass_mask: np.ndarray, ood_flag: np.ndarray,
                          escape_budget: int = 0) -> float:
    """The lowest pass threshold passing at most `escape_budget` defects on validation: just above the
    (budget + 1)-th best-scoring escape (budget 0: above the best one)."""
    if not pass_mask.any():
        return 0.5
    idx = q.argmax(1)
    pass_prob = q[:, pass_mask].sum(1)
    escapes = pass_mask[idx] & ~pass_mask[y] & ~ood_flag
    t = 0.5
    if escapes.sum() > escape_budget:
        worst = np.sort(pass_prob[escapes])[::-1][escape_budget]
        t = max(t, float(np.nextafter(np.float32(worst), np.float32(2.0))))
    return min(t, 1.0)


def choose_min_confidence(conf: np.ndarray, wrong: np.ndarray, reviewed_anyway: np.ndarray,
                          goal: float = REVIEW_GOAL) -> tuple[float, float]:
    """(threshold, share of errors reviewed): the lowest confidence floor that sends `goal` of errors to review.

    reviewed_anyway marks errors already reviewed by another rule (OOD, pass threshold); the floor covers the
    rest, lowest first, so correct verdicts lose as little as possible.
    """
    n_err = int(wrong.sum())
    if n_err == 0:
        return 0.5, 1.0
    need = int(np.ceil(goal * n_err)) - int((wrong & reviewed_anyway).sum())
    rest = np.sort(conf[wrong & ~reviewed_anyway])
    if need <= 0 or len(rest) == 0:
        return 0.5, float((wrong & reviewed_anyway).sum() / n_err)
    need = min(need, len(rest))
    t = float(np.nextafter(np.float32(rest[need - 1]), np.float32(2.0)))
    t = min(max(t, 0.5), 1.0)
    caught = (wrong & (reviewed_anyway | (conf < t))).sum()
    return t, float(caught / n_err)


def outcome(decisions: np.ndarray, idx: np.ndarray, y: np.ndarray, pass_mask: np.ndarray) -> dict[str, Any]:
    """Accuracy and what the decisions did: escapes, false rejects, reviews, errors that ended as review."""
    wrong = idx != y
    good = pass_mask[y]
    n_good = int(good.sum())
    n_bad = int((~good).sum())
    d: dict[str, Any] = {
        "n": len(y),
        "accuracy": float((~wrong).mean()) if len(y) else None,
        "pass": int((decisions == PASS).sum()),
        "divert": int((decisions == DIVERT).sum()),
        "review": int((decisions == REVIEW).sum()),
        "errors": int(wrong.sum()),
        "errors_reviewed": int((wrong & (decisions == REVIEW)).sum()),
        "errors_reviewed_share": float((wrong & (decisions == REVIEW)).sum() / wrong.sum()) if wrong.any() else None,
        "correct_reviewed_share": float(((~wrong) & (decisions == REVIEW)).sum() / max(1, (~wrong).sum())),
    }
    if pass_mask.any():
        d["good"] = n_good
        d["defective"] = n_bad
        d["escapes"] = int((~good & (decisions == PASS)).sum())
        d["false_rejects"] = int((good & (decisions != PASS)).sum())
        d["false_reject_rate"] = float(d["false_rejects"] / n_good) if n_good else None
    return d


def fit_rule(classes: Sequence[str], pass_classes: Sequence[str], probs: np.ndarray, y: np.ndarray,
             pooled: np.ndarray, ood: Mahalanobis | None, deg_probs: np.ndarray | None = None,
             deg_y: np.ndarray | None = None, deg_pooled: np.ndarray | None = None, escape_budget: int = 0
             ) -> tuple[DecisionRule, dict[str, Any]]:
    """Fit temperature, OOD threshold, pass threshold and confidence floor on validation, in that order.

    probs/pooled are clean validation outputs; deg_* the same images under the degradations (optional), which
    only the confidence floor uses: it is the rule that turns degraded-image errors into reviews.
    """
    rule = DecisionRule(tuple(classes), tuple(pass_classes))
    t = fit_temperature(probs, y)
    rule = rule.with_overrides({"temperature": t})
    info: dict[str, Any] = {"temperature": t}
    if ood is not None:
        rule = DecisionRule(rule.classes, rule.pass_classes, t, ood=ood)
        scores = ood.score(pooled)
        thr = float(np.quantile(scores, OOD_QUANTILE))
        rule = rule.with_overrides({"ood_threshold": thr})
        info["ood_threshold"] = thr
    q = rule.calibrate(probs)
    ood_flag = rule.ood_score(pooled, len(q)) > rule.ood_threshold if rule.needs_pooled else np.zeros(len(q), bool)
    t_pass = choose_pass_threshold(q, y, rule.pass_mask, ood_flag, escape_budget)
    rule = rule.with_overrides({"pass_threshold": t_pass})
    info["pass_threshold"] = t_pass
    # The confidence floor sees clean and degraded validation images together.
    all_p, all_y, all_f = probs, y, pooled
    if deg_probs is not None and deg_y is not None and deg_pooled is not None:
        all_p = np.concatenate([probs, deg_probs])
        all_y = np.concatenate([y, deg_y])
        all_f = np.concatenate([pooled, deg_pooled])
    dec0, idx, conf, _ = rule.with_overrides({"min_confidence": 0.0}).decide(all_p, all_f)
    wrong = idx != all_y
    t_conf, caught = choose_min_confidence(conf, wrong, dec0 == REVIEW)
    rule = rule.with_overrides({"min_confidence": t_conf})
    info["min_confidence"] = t_conf
    info["errors_reviewed_share"] = caught
    return rule, info


def stratified_halves(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two index sets splitting each class in half, seeded."""
    rng = np.random.default_rng(seed)
    a: list[int] = []
    b: list[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        h = len(idx) // 2
        a += idx[:h].tolist()
        b += idx[h:].tolist()
    return np.array(sorted(a), np.int64), np.array(sorted(b), np.int64)
