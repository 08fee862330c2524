"""The agent's own work per frame, without inference: intake, the line core, verdicts, metrics and the PUB send.

Runs the real code paths in one process (the codec, agent.intake, agent.line, agent.metrics, a ZeroMQ PUB on
inproc) with a stand-in for the backend that returns fixed probabilities (and pooled features, when the card's
decision rule has an OOD check), and prints microseconds per frame by stage. Every frame must end `ok`: a run whose
verdicts were refused timed the wrong path, and fails. What is left when inference is taken away is what bounds
the line at high frame rates.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=20_000, help="frames to push through")
    p.add_argument("--batch", type=int, default=16, help="batch size (the agent's max_batch_size)")
    p.add_argument("--size", type=int, default=200, help="frame side in pixels (gray8)")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--images", type=int, default=1,
                   help="images per message (SPEC 4.1: a strip, each image answered by its own verdict)")
    p.add_argument("--model", type=Path, default=None, help="model whose card gives classes and the decision rule")
    p.add_argument("--profile", action="store_true", help="also print the top functions by own time (cProfile)")
    p.add_argument("--json", type=Path, help="also write the figures here")


def run(args: argparse.Namespace) -> int:
    import json

    from agent.config import DEFAULT_MODEL
    from protocol import MAX_DIM, MAX_IMAGES

    if not 1 <= args.images <= min(MAX_IMAGES, MAX_DIM // args.size):
        raise SystemExit(f"--images must be 1..{min(MAX_IMAGES, MAX_DIM // args.size)} for {args.size}-px frames")
    stages, n = measure(args.model or DEFAULT_MODEL, args.frames, args.batch, args.size, args.cameras, args.images)
    total = sum(stages.values())
    print(f"{n:,} frames, batch {args.batch}, {args.size}x{args.size} gray8, {args.cameras} cameras, "
          f"{args.images} image(s) a message")
    for name, seconds in stages.items():
        print(f"  {name:<28} {1e6 * seconds / n:7.2f} us/frame")
    print(f"  {'total':<28} {1e6 * total / n:7.2f} us/frame  (= {n / total:,.0f} frames/s on one core)")
    if args.profile:
        _profile(args.model or DEFAULT_MODEL, min(args.frames, 10_000), args.batch, args.size, args.cameras,
                 args.images)
    if args.json:
        args.json.write_text(json.dumps({"frames": n, "batch": args.batch, "images": args.images, "us_per_frame": {
            k: 1e6 * v / n for k, v in stages.items()}, "total_us": 1e6 * total / n}, indent=2) + "\n")
    return 0


def _setup(model_path: Path, batch: int) -> tuple[Any, Any, Any, Any, Any]:
    import zmq

    from agent.batcher import BatchPolicy
    from agent.card import read
    from agent.decision import DecisionRule
    from agent.line import Line, ServingModel
    from agent.metrics import Metrics

    card = read(model_path)
    rule = DecisionRule.from_card(card.raw)
    model = ServingModel(card.variant_id("bench", "fp32"), card.classes, rule.pass_classes, rule,
                         needs_pooled=rule.needs_pooled, input=card.input)
    sizes = (*(1 << i for i in range(12) if 1 << i < batch), batch)
    metrics = Metrics()
    line = Line(BatchPolicy(batch, 2000, 60_000.0, 4 * batch, sizes), model, agent_id="bench", epoch=1,
                sink=metrics.record)
    ctx: zmq.Context[Any] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("inproc://bench-frame")
    return line, metrics, pub, card, ctx


def measure(model_path: Path, frames: int, batch: int, size: int, cameras: int,
            images: int = 1) -> tuple[dict[str, float], int]:
    """Seconds spent per stage over `frames` frames, sent `images` to a message."""
    from agent.backends.base import BatchBuffers
    from agent.intake import admit
    from protocol import Encoding, Frame, Status, encode_frame, encode_verdict

    line, metrics, pub, card, ctx = _setup(model_path, batch)
    pixels = np.random.default_rng(0).integers(0, 256, size * size * images, dtype=np.uint8).tobytes()
    now = time.time_ns()
    # The payload bytes object is shared: as on the wire, a frame's pixels arrive in their own buffer.
    msgs = [encode_frame(Frame(camera_id=f"cam{i % cameras}", seq=images * (i // cameras), capture_ns=now,
                               width=size, height=size * images, encoding=Encoding.GRAY8, payload=pixels,
                               images=images)) for i in range(frames // images)]
    probs = np.full((batch, len(card.classes)), 0.02, np.float32)
    probs[:, 0] = 1.0 - 0.02 * (len(card.classes) - 1)
    rule = line.model.rule
    # The OOD check scores the pooled features: the stand-in gives those of the first class's mean (z W = mu), in
    # distribution, so each frame is decided as a typical one is (not sent to review and its explanation queue).
    pooled = None
    if rule.needs_pooled:
        centre = np.linalg.solve(rule.ood.whiten.astype(np.float64).T, rule.ood.means[0].astype(np.float64))
        pooled = np.repeat(centre[None].astype(np.float32), batch, 0)
    stages = dict.fromkeys(("intake (decode, validate)", "line (batch, decide, order)", "preprocess",
                            "verdict encode + send", "metrics"), 0.0)
    clock = time.perf_counter
    buffers = BatchBuffers()
    done = 0
    queued = iter(msgs)
    while done < len(msgs) * images:
        t0 = clock()
        while len(line.batcher) < batch and (parts := next(queued, None)) is not None:
            admit(parts, line, card.input, 1 << 30)
        t1 = clock()
        job, shed = line.poll(flush=True)
        assert job is not None and not shed
        t2 = clock()
        x = buffers.fill([p.image for p in job.items], job.padded_size)
        t3 = clock()
        out = line.complete(job, probs[: len(x)], None if pooled is None else pooled[: len(x)], None, now)
        if any(v.status is not Status.OK for v in out):
            raise RuntimeError(f"the bench's verdicts were refused ({out[0].reason}): it would time the wrong path")
        t4 = clock()
        for v in out:
            pub.send_multipart(encode_verdict(v), copy=False)
        t5 = clock()
        metrics.verdicts([(v, now) for v in out])
        metrics.batch(job, time.monotonic_ns())
        t6 = clock()
        done += len(out)
        for name, dt in zip(stages, (t1 - t0, (t2 - t1) + (t4 - t3), t3 - t2, t5 - t4, t6 - t5), strict=True):
            stages[name] += dt
    pub.close(linger=0)
    ctx.term()
    return stages, done


def _profile(model_path: Path, frames: int, batch: int, size: int, cameras: int, images: int) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    measure(model_path, frames, batch, size, cameras, images)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
