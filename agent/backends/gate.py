"""The accuracy gate: a reduced-precision variant may serve only if it loses at most so much against fp32."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

MAX_ACCURACY_DROP = 0.005  # a variant may lose at most 0.5 accuracy points against fp32 ...
MAX_DISAGREEMENT = 0.01  # ... and change at most 1% of the fp32 model's top-1 decisions


def gate_path(folder: Path, backend: str, precision: str) -> Path:
    return folder / f"{backend}-{precision}.gate.json"


def gate_record(pred: np.ndarray, ref_pred: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy of `pred`, of the fp32 reference `ref_pred`, and their top-1 agreement, over labelled images."""
    pred, ref_pred, labels = (np.asarray(a).reshape(-1) for a in (pred, ref_pred, labels))
    if not len(labels) or not (len(pred) == len(ref_pred) == len(labels)):
        raise ValueError(f"need equal, non-empty predictions and labels, got {len(pred)}, {len(ref_pred)}, "
                         f"{len(labels)}")
    return {
        "accuracy": float((pred == labels).mean()),
        "fp32_accuracy": float((ref_pred == labels).mean()),
        "agreement": float((pred == ref_pred).mean()),
        "n": len(labels),
    }


def gate_decision(record: dict[str, Any], max_drop: float = MAX_ACCURACY_DROP,
                  max_disagreement: float = MAX_DISAGREEMENT) -> tuple[bool, str]:
    """Whether a reduced-precision variant may be chosen, and why, from its gate record."""
    drop = float(record["fp32_accuracy"]) - float(record["accuracy"])
    flips = 1.0 - float(record["agreement"])
    eps = 1e-9  # the bounds are inclusive; float noise must not flip an exact 0.5-point loss
    summary = (f"accuracy {record['accuracy']:.4f} vs fp32 {record['fp32_accuracy']:.4f}, "
               f"agreement {record['agreement']:.4f} on {record['n']} images")
    if drop > max_drop + eps:
        return False, f"loses {100 * drop:.2f} points (> {100 * max_drop:.1f}): {summary}"
    if flips > max_disagreement + eps:
        return False, f"changes {100 * flips:.2f}% of top-1 decisions (> {100 * max_disagreement:.1f}%): {summary}"
    return True, f"passes: {summary}"


def read_gate(folder: Path, backend: str, precision: str) -> dict[str, Any] | None:
    p = gate_path(folder, backend, precision)
    if not p.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return data


def passed_gate(record: dict[str, Any] | None, backend: str, precision: str, missing: str) -> dict[str, Any]:
    """The record of a variant that may serve; BackendError (`missing`, or why it failed) for one that may not."""
    from agent.errors import BackendError

    if record is None:
        raise BackendError(missing)
    if not record.get("passed"):
        raise BackendError(f"{backend} {precision} fails the accuracy gate: {record.get('decision')}")
    return record


def write_gate(folder: Path, backend: str, precision: str, record: dict[str, Any]) -> dict[str, Any]:
    ok, reason = gate_decision(record)
    out = {"backend": backend, "precision": precision, **record, "passed": ok, "decision": reason,
           "max_accuracy_drop": MAX_ACCURACY_DROP, "max_disagreement": MAX_DISAGREEMENT}
    gate_path(folder, backend, precision).write_text(json.dumps(out, indent=2) + "\n")
    return out
