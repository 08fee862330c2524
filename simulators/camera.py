"""Camera simulator: replays a NEU image folder, or synthetic surfaces, as Frame messages over ZeroMQ PUSH."""

from __future__ import annotations

import argparse
import functools
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq

from protocol import MAX_DIM, MAX_IMAGES, NEU_CLASSES, NEU_CLS_PREFIXES, Encoding, Frame, encode_frame, is_valid_id
from simulators.common import (
    DEFAULT_FRAMES_ENDPOINT,
    CurveKeys,
    add_curve_arguments,
    close_socket,
    curve_from_args,
    make_curve_client,
    set_link_options,
    stop_on_signals,
    write_report,
)
from simulators.surfaces import synthetic_surfaces

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".bmp", ".png"})
_IMENCODE_EXT = {Encoding.JPEG: ".jpg", Encoding.PNG: ".png"}


class SourceError(Exception):
    """An image folder is missing or empty, or one of its files cannot be decoded."""


@dataclass(frozen=True)
class Shot:
    """One image to send, with its ground-truth class (None when unknown) and where it came from."""

    image: np.ndarray
    label: str | None
    origin: str


# Frames queued per agent: ZeroMQ's queue, then the kernel send buffer (Linux doubles it). Each connection's queue
# adds to the frames in flight, so 32 cameras with 10 and 256 KiB had 1,300 frames (over 0.5 s) waiting (README).
SNDHWM = 2
SNDBUF_BYTES = 32 * 1024
FLUSH_AT_CLOSE_MS = 5000  # at most this long for the queued frames to leave when a camera stops

# --- image sources ---


def label_for(path: Path) -> str | None:
    """The class a NEU-DET or NEU-CLS file name encodes, or None for other names."""
    stem = path.stem
    prefix, sep, number = stem.partition("_")
    if sep and prefix in NEU_CLS_PREFIXES and number.isdigit():
        return NEU_CLS_PREFIXES[prefix]
    name = stem.rpartition("_")[0]
    return name if name in NEU_CLASSES else None


def _natural_key(path: Path) -> list[Any]:
    # crazing_2 before crazing_10, as a person listing the folder would expect.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def list_images(root: Path) -> list[tuple[Path, str | None]]:
    """(file, label) for a NEU-DET root (IMAGES/), a flat NEU-CLS folder, or one folder per class.

    In a class-per-folder layout the class is the top-level folder and images are found at any depth; a .png
    beside a photo with the same stem is that photo's mask, not an image to send.
    """
    folder = root / "IMAGES" if (root / "IMAGES").is_dir() else root
    if not folder.is_dir():
        raise SourceError(f"image folder not found: {root}")
    flat = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if flat:
        return [(path, label_for(path)) for path in sorted(flat, key=_natural_key)]
    found: list[tuple[Path, str | None]] = []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        files = [p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        photos = {p.with_suffix("") for p in files if p.suffix.lower() != ".png"}
        found += [(p, class_dir.name) for p in sorted(files, key=_natural_key)
                  if not (p.suffix.lower() == ".png" and p.with_suffix("") in photos)]
    if not found:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder} or its class folders")
    return found


@functools.lru_cache(maxsize=4096)
def read_gray(path: Path) -> np.ndarray:
    """The file as a 2-D uint8 image; SourceError naming the file if it cannot be decoded.

    Cached: a looping camera would otherwise spend its CPU decoding the same JPEGs again, which on a small
    machine steals cores from the agent under test.
    """
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SourceError(f"cannot decode image file {path}")
    if max(image.shape) > MAX_DIM:
        raise SourceError(f"image file {path} is {image.shape[1]}x{image.shape[0]}, above {MAX_DIM}")
    return image


def folder_shots(
    files: Sequence[tuple[Path, str | None]], *, loop: bool = True, shuffle: bool = False, seed: int = 0
) -> Iterator[Shot]:
    """The files in order (or a new seeded shuffle per pass), decoded lazily, forever when loop is set."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(files)) if shuffle else range(len(files))
        for index in order:
            path, label = files[int(index)]
            yield Shot(read_gray(path), label, path.name)
        if not loop:
            return


def synthetic_shots(seed: int = 0) -> Iterator[Shot]:
    """Endless procedurally generated surfaces, balanced over the classes."""
    for image, label in synthetic_surfaces(seed):
        yield Shot(image, label, "synthetic")


# --- the camera ---


@dataclass
class CameraStats:
    """What one camera did; `timed_out` frames were dropped by the camera but still used up a seq."""

    camera_id: str
    first_seq: int
    next_seq: int
    sent: int = 0
    blocked: int = 0
    timed_out: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return (self.ended if self.ended is not None else time.monotonic()) - self.started

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures for the report."""
        seconds = self.seconds
        return {
            "camera_id": self.camera_id,
            "sent": self.sent,
            "blocked": self.blocked,
            "timed_out": self.timed_out,
            "attempted": self.next_seq - self.first_seq,
            "first_seq": self.first_seq,
            "next_seq": self.next_seq,
            "seconds": round(seconds, 3),
            "fps_achieved": round(self.sent / seconds, 2) if seconds > 0 else 0.0,
            "error": self.error,
        }


class Camera:
    """Sends shots as Frame messages on its own PUSH socket, paced at `fps` (0: as fast as accepted)."""

    def __init__(
        self,
        camera_id: str,
        shots: Iterator[Shot],
        *,
        endpoint: str | Sequence[str] = DEFAULT_FRAMES_ENDPOINT,
        fps: float = 10.0,
        count: int | None = None,
        encoding: Encoding = Encoding.GRAY8,
        send_timeout_ms: int = 1000,
        sndhwm: int = SNDHWM,
        start_seq: int = 0,
        stop: threading.Event | None = None,
        context: zmq.Context[Any] | None = None,
        curve: CurveKeys | None = None,
        images: int = 1,
    ) -> None:
        if not is_valid_id(camera_id):
            raise ValueError(f"invalid camera id {camera_id!r}: use 1..64 chars of [A-Za-z0-9_.-]")
        if not 1 <= images <= MAX_IMAGES:
            raise ValueError(f"images per message must be 1..{MAX_IMAGES}, got {images}")
        # Images per message: a line-scan camera's strip, stacked top to bottom, each answered by its own verdict.
        self.images = images
        self.camera_id = camera_id
        self.shots = shots
        self.endpoint = endpoint
        # Several agents: PUSH deals frames round-robin over the connected ones (SPEC 1), so a lost one fails over.
        self.endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        self.fps = fps
        self.count = count
        self.encoding = Encoding(encoding)
        self.send_timeout_ms = send_timeout_ms
        self.sndhwm = sndhwm
        self.stop = stop or threading.Event()
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.stats = CameraStats(camera_id, start_seq, start_seq)

    def _payload(self, image: np.ndarray) -> bytes | memoryview:
        if self.encoding is Encoding.GRAY8:
            return np.ascontiguousarray(image).data  # a view, sent without a copy
        ok, buf = cv2.imencode(_IMENCODE_EXT[self.encoding], image)
        if not ok:
            raise SourceError(f"OpenCV could not encode a {image.shape} image as {self.encoding}")
        return buf.tobytes()

    def _send(self, sock: zmq.Socket[Any], parts: list[bytes | memoryview], images: int) -> None:
        # Try without blocking first only to learn whether the agent is pushing back (counted as blocked).
        # Counts are of images (frames), whatever number one message carries.
        try:
            sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            self.stats.sent += images
            return
        except zmq.Again:
            self.stats.blocked += images
        try:
            sock.send_multipart(parts, copy=False)  # waits up to SNDTIMEO
            self.stats.sent += images
        except zmq.Again:
            # Dropped here; the seqs are not reused, so bridges see a gap and fail the parts safe.
            self.stats.timed_out += images

    def _take(self) -> list[Shot]:
        """The next message's shots: `images` of them, fewer at the end of the source or of --count."""
        want = self.images
        if self.count is not None:
            want = min(want, self.count - (self.stats.next_seq - self.stats.first_seq))
        shots = []
        for _ in range(want):
            shot = next(self.shots, None)
            if shot is None:
                break
            shots.append(shot)
        return shots

    def _wait_turn(self, due: float) -> float:
        """Sleep until `due` (waking early on stop) and return when the next message is due."""
        period = self.images / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            self.stop.wait(delay)
        # After a stall, resume the cadence from now instead of sending a burst to catch up.
        return max(due + period, time.monotonic())

    def _frame(self, shots: list[Shot]) -> Frame:
        """One message: a shot, or several stacked top to bottom (each resized to the first one's size)."""
        first = shots[0].image
        height, width = first.shape[:2]
        if height * len(shots) > MAX_DIM:
            raise SourceError(f"{len(shots)} images of {width}x{height} make a strip over {MAX_DIM} rows: "
                              f"send at most {MAX_DIM // height} per message")
        if len(shots) == 1:
            return Frame(camera_id=self.camera_id, seq=self.stats.next_seq, capture_ns=time.time_ns(), width=width,
                         height=height, encoding=self.encoding, payload=self._payload(first), label=shots[0].label)
        strip = np.concatenate([s.image if s.image.shape[:2] == (height, width)
                                else cv2.resize(s.image, (width, height), interpolation=cv2.INTER_AREA)
                                for s in shots])
        labels = tuple(s.label for s in shots)
        return Frame(camera_id=self.camera_id, seq=self.stats.next_seq, capture_ns=time.time_ns(), width=width,
                     height=height * len(shots), encoding=self.encoding, payload=self._payload(strip),
                     images=len(shots), labels=None if all(label is None for label in labels) else labels)

    def run(self) -> CameraStats:
        """Send until count is reached, the shots run out or stop is set; returns the stats."""
        stats = self.stats
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.SNDTIMEO, self.send_timeout_ms)
        # Queue only to agents actually connected: frames must not wait for a dead or absent agent.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # A small kernel send buffer keeps frames from aging in transit when the agent pushes back.
        sock.setsockopt(zmq.SNDBUF, SNDBUF_BYTES)
        # With several agents, give up one whose host vanished within about a second (heartbeats, TCP user
        # timeout), so its share of the frames goes to the others instead of into a connection nobody reads.
        # With one agent there is nowhere to switch to, and the same timeouts would give up an agent that is only
        # slow to read under overload (seen at 2x load on 2 shared cores), losing the frames queued to it.
        if len(self.endpoints) > 1:
            set_link_options(sock)
        make_curve_client(sock, self.curve)
        stats.started = time.monotonic()
        due = stats.started
        try:
            for endpoint in self.endpoints:
                sock.connect(endpoint)
            while not self.stop.is_set():
                shots = self._take()
                if not shots:
                    break
                if self.fps > 0:
                    due = self._wait_turn(due)
                    if self.stop.is_set():
                        break
                frame = self._frame(shots)
                stats.next_seq += len(shots)
                self._send(sock, encode_frame(frame), len(shots))
        finally:
            stats.ended = time.monotonic()
            # Frames counted as sent may still sit in ZeroMQ's queue: flush them, also on a signal, so that `sent`
            # stays an honest count of frames handed to an agent. An overloaded agent reads that queue (up to
            # SNDHWM frames plus the kernel buffer) slowly, so the bound is generous; a dead one drops the pipe.
            close_socket(sock, max(self.send_timeout_ms, FLUSH_AT_CLOSE_MS))
        return stats


# --- command line ---


def build_parser() -> argparse.ArgumentParser:
    """The camera's command-line options."""
    parser = argparse.ArgumentParser(
        prog="tdn camera",
        description="Send NEU images (or synthetic surfaces) to an agent as TinyDefectNet frames.",
    )
    parser.add_argument("--endpoint", action="append", default=None,
                        help=f"agent PULL endpoint to connect; repeat for several agents, which share the frames "
                             f"round-robin and take over from a lost one (default {DEFAULT_FRAMES_ENDPOINT})")
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument("--camera-id", default=None, help="camera id (default cam1)")
    ids.add_argument("--cameras", type=int, default=1, help="run N cameras cam1..camN, one thread each")
    parser.add_argument(
        "--source", "--data", dest="source", type=Path, default=None,
        help="NEU-DET root, NEU-CLS folder, or one folder per class (default: synthetic surfaces)",
    )
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second per camera; 0 = as fast as taken")
    parser.add_argument("--count", type=int, default=None, help="frames per camera, then exit (default: endless)")
    parser.add_argument("--no-loop", action="store_true", help="stop after one pass over the folder")
    parser.add_argument("--shuffle", action="store_true", help="shuffle the folder (a new order each pass)")
    parser.add_argument("--lazy", action="store_true",
                        help="decode images while sending instead of all up front (up to 4,096 are cached)")
    parser.add_argument("--seed", type=int, default=0, help="seed for shuffling and synthetic surfaces")
    parser.add_argument("--encoding", choices=[e.value for e in Encoding], default=Encoding.GRAY8.value)
    parser.add_argument("--images", type=int, default=1,
                        help=f"images per message, stacked top to bottom like a line-scan camera's strip, each "
                             f"answered by its own verdict (SPEC 4.1; 1..{MAX_IMAGES}, default 1)")
    parser.add_argument("--send-timeout-ms", type=int, default=1000, help="drop a frame not taken within this")
    parser.add_argument("--sndhwm", type=int, default=SNDHWM, help="frames ZeroMQ may queue per agent")
    parser.add_argument("--start-seq", type=int, default=0, help="first seq (use a higher one after a restart)")
    parser.add_argument("--report", type=Path, default=None, help="write a JSON report here at exit")
    parser.add_argument("--quiet", action="store_true", help="no summary line on stdout")
    add_curve_arguments(parser)
    return parser


def _report(stats: list[CameraStats], args: argparse.Namespace) -> dict[str, Any]:
    per_camera = [s.to_dict() for s in stats]
    seconds = max((s.seconds for s in stats), default=0.0)
    sent = sum(s.sent for s in stats)
    return {
        "camera_id": ",".join(s.camera_id for s in stats),
        "camera_ids": [s.camera_id for s in stats],
        "sent": sent,
        "blocked": sum(s.blocked for s in stats),
        "timed_out": sum(s.timed_out for s in stats),
        "attempted": sum(p["attempted"] for p in per_camera),
        "seconds": round(seconds, 3),
        "fps_achieved": round(sent / seconds, 2) if seconds > 0 else 0.0,
        "endpoint": ",".join(args.endpoint),
        "endpoints": args.endpoint,
        "encoding": args.encoding,
        "source": str(args.source) if args.source else "synthetic",
        "errors": [s.error for s in stats if s.error],
        "per_camera": {p["camera_id"]: p for p in per_camera},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the camera(s) until done or SIGINT/SIGTERM; exit code 0, or 1 on a source error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cameras < 1 or (args.count is not None and args.count < 0) or args.fps < 0:
        parser.error("--cameras must be >= 1, --count and --fps >= 0")
    if not 1 <= args.images <= MAX_IMAGES:
        parser.error(f"--images must be 1..{MAX_IMAGES}")
    camera_ids = [args.camera_id or "cam1"] if args.cameras == 1 else [f"cam{i + 1}" for i in range(args.cameras)]
    if not is_valid_id(camera_ids[0]):
        parser.error(f"invalid --camera-id {camera_ids[0]!r}: use 1..64 chars of [A-Za-z0-9_.-]")
    args.endpoint = args.endpoint or [DEFAULT_FRAMES_ENDPOINT]
    curve = curve_from_args(args, parser)
    try:
        files = _load_source(args)
    except SourceError as exc:
        print(f"camera: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    context: zmq.Context[Any] = zmq.Context()
    cameras = [_make_camera(args, camera_id, index, files, stop, context, curve)
               for index, camera_id in enumerate(camera_ids)]
    _run_all(cameras, stop)
    context.term()
    report = _report([c.stats for c in cameras], args)
    write_report(args.report, report)
    for error in report["errors"]:
        print(f"camera: {error}", file=sys.stderr)
    if not args.quiet:
        print(
            f"camera {report['camera_id']}: sent {report['sent']} blocked {report['blocked']} "
            f"timed_out {report['timed_out']} in {report['seconds']:.1f} s ({report['fps_achieved']:.1f} fps)"
        )
    return 1 if report["errors"] else 0


def _load_source(args: argparse.Namespace) -> list[tuple[Path, str | None]] | None:
    """The files to replay (None: synthetic surfaces), decoded up front unless --lazy."""
    files = list_images(args.source) if args.source is not None else None
    if files is not None and not args.lazy:
        # Decode up front: a first pass decoding as it goes sends slower than later ones, which skews any
        # rate measured from the start, and a corrupt file is better reported before the first frame.
        for path, _ in files[: read_gray.cache_info().maxsize or 0]:
            read_gray(path)
    return files


def _make_camera(args: argparse.Namespace, camera_id: str, index: int, files: list[tuple[Path, str | None]] | None,
                 stop: threading.Event, context: zmq.Context[Any], curve: Any) -> Camera:
    seed = args.seed + index  # cameras show different sequences of the same source
    shots = (folder_shots(files, loop=not args.no_loop, shuffle=args.shuffle, seed=seed) if files is not None
             else synthetic_shots(seed))
    return Camera(camera_id, shots, endpoint=args.endpoint, fps=args.fps, count=args.count,
                  encoding=Encoding(args.encoding), send_timeout_ms=args.send_timeout_ms, sndhwm=args.sndhwm,
                  start_seq=args.start_seq, stop=stop, context=context, curve=curve, images=args.images)


def _run_all(cameras: list[Camera], stop: threading.Event) -> None:
    """Each camera on its own thread until all are done; one broken camera stops the run."""

    def run(camera: Camera) -> None:
        try:
            camera.run()
        except Exception as exc:  # reported in the summary and exit code instead of a thread traceback
            camera.stats.error = f"{camera.camera_id}: {exc}" if isinstance(exc, SourceError) else repr(exc)
            stop.set()  # one broken camera stops the run, so the failure is not missed

    with stop_on_signals(stop):
        threads = [threading.Thread(target=run, args=(c,), name=c.camera_id, daemon=True) for c in cameras]
        for thread in threads:
            thread.start()
        for thread in threads:
            # join with a timeout so the main thread stays responsive to signals
            while thread.is_alive():
                thread.join(0.2)


if __name__ == "__main__":
    sys.exit(main())
