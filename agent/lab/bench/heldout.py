"""The model card's held-out images through the real agent at their native sizes: accuracy, escapes, false rejects.

Starts `tdn agent` with the model, sends every held-out image once over ZeroMQ as a camera would (its own file
bytes when it is a JPEG or PNG, else gray8 at its own size), keeps at most `--window` frames in flight so none is
shed, and scores the verdicts against the folder labels: the decision figures of the model card's
`decision.validation` block, measured on the line instead of in Keras. Both are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    from agent.config import DEFAULT_MODEL

    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .keras model (its card beside it)")
    p.add_argument("--data", help="the folder it was trained from (default: the model's shipped dataset)")
    p.add_argument("--split", choices=("val", "all"), default="val", help="the card's held-out split or every image")
    p.add_argument("--backend", default=None, help="agent backend (default: the agent's own default)")
    p.add_argument("--encoding", choices=("file", "gray8"), default="file",
                   help="file: a JPEG/PNG goes as its own bytes (the agent decodes it); gray8: decoded pixels")
    p.add_argument("--window", type=int, default=32, help="frames in flight at most")
    p.add_argument("--out", type=Path, default=Path("runs/bench-heldout"))
    p.add_argument("--json", type=Path)


def frame_for(path: Path, seq: int, label: str, encoding: str) -> Any:
    """The protocol Frame a camera would send for this image file, at the image's own size."""
    import cv2

    from protocol import JPEG_MAGIC, PNG_MAGIC, Encoding, Frame

    data = path.read_bytes()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise ValueError(f"{path}: OpenCV cannot decode it")
    h, w = img.shape
    # By content, as the agent checks it (SPEC 4.1): a JPEG or PNG goes as it is, anything else as pixels.
    kind = Encoding.JPEG if data.startswith(JPEG_MAGIC) else Encoding.PNG if data.startswith(PNG_MAGIC) else None
    if encoding == "gray8" or kind is None:
        kind, data = Encoding.GRAY8, img.tobytes()
    return Frame(camera_id="heldout", seq=seq, capture_ns=time.time_ns(), width=w, height=h, encoding=kind,
                 payload=data, label=label)


def stream(push: Any, sub: Any, frames: Any, n: int, window: int, stall_s: float = 60.0) -> dict[int, Any]:
    """Send `frames` (an iterator of n Frames), at most `window` unanswered; {seq: Verdict} once all are answered."""
    import zmq

    from protocol import ProtocolError, decode_verdict, encode_frame

    got: dict[int, Any] = {}
    sent = 0
    last = time.monotonic()
    while len(got) < n:
        while sent < n and sent - len(got) < window:
            push.send_multipart(encode_frame(next(frames)), copy=False)
            sent += 1
        if sub.poll(1000, zmq.POLLIN):
            try:
                v = decode_verdict(sub.recv_multipart())
            except ProtocolError:
                continue
            got[v.seq] = v
            last = time.monotonic()
        elif time.monotonic() - last > stall_s:
            raise TimeoutError(f"no verdict for {stall_s:.0f} s ({len(got)} of {n} answered)")
    return got


def score(verdicts: dict[int, Any], y: np.ndarray, classes: tuple[str, ...], pass_classes: tuple[str, ...]
          ) -> dict[str, Any]:
    """The outcome block (agent.lab.calibrate.outcome) of the verdicts by seq; non-ok verdicts count as divert."""
    from agent.decision import DECISIONS
    from agent.lab.calibrate import outcome

    dec = np.array([DECISIONS.index(verdicts[i].decision.value) for i in range(len(y))], np.uint8)
    idx = np.array([-1 if verdicts[i].class_index is None else verdicts[i].class_index for i in range(len(y))])
    pass_mask = np.array([c in pass_classes for c in classes])
    out = outcome(dec, idx, y, pass_mask)
    out["not_ok"] = int(sum(1 for v in verdicts.values() if v.status.value != "ok"))
    return out


def run(args: argparse.Namespace) -> int:
    import zmq
    from tqdm import tqdm

    from agent.lab.bench.common import model_card_data
    from agent.lab.data import held_out
    from agent.testing import start_agent
    from protocol import VERDICT_PREFIX

    model, data, card, ds = model_card_data(str(args.model), args.data)
    samples, how = (ds.samples, f"every image ({len(ds.samples)})") if args.split == "all" else \
        held_out(card, ds.samples)[1:]
    y = np.array([s.label for s in samples])
    classes, pass_classes = tuple(card["classes"]), tuple(card.get("pass_classes", ()))
    print(f"{model.name} on {how} of {data}", flush=True)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # An accuracy run, not a latency one: a frame that waits long on a busy host must not be shed (and miscounted).
    settings: dict[str, Any] = {"model_path": model, "explain_interval_s": 0, "agent_id": "heldout",
                                "shed_deadline_ms": 600_000}
    if args.backend:
        settings["backend"] = args.backend
    log = out / "agent.log"
    log.unlink(missing_ok=True)
    agent = start_agent(log, settings)
    ready = agent.event("ready") or {}
    ctx: zmq.Context[Any] = zmq.Context()
    sub, push = ctx.socket(zmq.SUB), ctx.socket(zmq.PUSH)
    try:
        for s in (sub, push):
            s.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, VERDICT_PREFIX)
        sub.connect(agent.publish)
        push.connect(agent.frames)
        time.sleep(0.5)  # the subscription reaches the agent's PUB before the first verdict (PUB has no history)
        bar = tqdm(samples, desc="frames", unit="img", leave=False)
        frames = (frame_for(s.path, i, classes[s.label], args.encoding) for i, s in enumerate(bar))
        t0 = time.monotonic()
        verdicts = stream(push, sub, frames, len(samples), args.window)
        seconds = time.monotonic() - t0
        bar.close()
    finally:
        sub.close(0)
        push.close(0)
        ctx.term()
        agent.stop(30)
    line = score(verdicts, y, classes, pass_classes)
    keras = card.get("decision", {}).get("validation", {})
    report = {"model": str(model), "model_id": ready.get("model_id"),
              "variants": sorted({v.model_id for v in verdicts.values()}),
              "split": how, "images": len(samples), "seconds": round(seconds, 2), "line": line,
              "card_validation_keras": keras,
              "per_image": [{"file": s.rel or s.path.name, "label": classes[s.label],
                             "class": verdicts[i].class_name, "decision": verdicts[i].decision.value,
                             "confidence": verdicts[i].confidence, "probs": verdicts[i].probs}
                            for i, s in enumerate(samples)]}
    _print(line, keras if args.split == "val" else {}, pass_classes)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if line["n"] == len(samples) else 1


def _print(line: dict[str, Any], keras: dict[str, Any], pass_classes: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="held-out images through the agent", show_header=True)
    t.add_column("figure")
    t.add_column("through the agent", justify="right")
    t.add_column("model card (Keras)", justify="right")
    keys = ["n", "accuracy", "pass", "divert", "review", "errors", "errors_reviewed", "not_ok"]
    if pass_classes:
        keys += ["good", "defective", "escapes", "false_rejects", "false_reject_rate"]
    for k in keys:
        a, b = line.get(k), keras.get(k)
        fmt = (lambda x: "-" if x is None else f"{100 * x:.2f}%") if k in ("accuracy", "false_reject_rate") \
            else (lambda x: "-" if x is None else str(x))
        t.add_row(k, fmt(a), fmt(b))
    Console().print(t)
