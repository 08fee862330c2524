"""Operator console: a live web page of the line (tiles, latency, explanations, review queue) fed by agents' PUB."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from agent.errors import TdnError
from simulators.common import is_loopback, read_private

DEFAULT_LISTEN = "127.0.0.1:8787"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from simulators.common import DEFAULT_OUTPUT_ENDPOINT, add_curve_arguments

    p.add_argument("--endpoint", action="append", default=None,
                   help=f"agent PUB endpoint; repeat for several agents (default {DEFAULT_OUTPUT_ENDPOINT})")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where the page is served (default {DEFAULT_LISTEN}; off loopback needs --token-file)")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the access token (mode 0600, >= 16 chars); required off loopback")
    p.add_argument("--state-dir", type=Path, default=Path("runs/console"),
                   help="review items (bounded) live here, and the labelled dataset under dataset/")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="labelled frames go to EXPORT/<class>/<file>.png (default STATE_DIR/dataset)")
    p.add_argument("--review-cap", type=int, default=200, help="review items with images kept on disk")
    p.add_argument("--gallery-cap", type=int, default=24, help="explanation snapshots kept in memory")
    p.add_argument("--review-below", type=float, default=0.0, metavar="CONF",
                   help="also queue for review every ok verdict less confident than CONF (for agents that "
                        "publish no review decision; 0 = off)")
    p.add_argument("--rcvhwm", type=int, default=None,
                   help="SUB receive queue (small: the console drops, not the agent)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    add_curve_arguments(p)


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise TdnError(f"--listen {text!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def read_token(path: Path) -> str:
    """The access token from a file only its owner may read."""
    try:
        token = read_private(path, "--token-file").strip()
    except ValueError as exc:
        raise TdnError(str(exc)) from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise TdnError(f"--token-file {path}: the token must be >= 16 printable characters without spaces")
    return token


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.console.app import create_app
    from agent.console.state import ConsoleState
    from agent.console.subscriber import DEFAULT_RCVHWM, Subscriber
    from simulators.common import DEFAULT_OUTPUT_ENDPOINT, CurveKeyError, curve_client_keys

    host, port = parse_listen(args.listen)
    token = read_token(args.token_file) if args.token_file else None
    if token is None and not is_loopback(host):
        raise TdnError(f"--listen {host} is not loopback: pass --token-file FILE")
    if not 0.0 <= args.review_below <= 1.0:
        raise TdnError("--review-below must be within 0..1")
    curve = None
    if args.curve_server_key is not None:
        try:
            curve = curve_client_keys(args.curve_secret, args.curve_server_key)
        except CurveKeyError as exc:
            raise TdnError(str(exc)) from None
    elif args.curve_secret is not None:
        raise TdnError("--curve-secret needs --curve-server-key")
    endpoints = args.endpoint or [DEFAULT_OUTPUT_ENDPOINT]
    state = ConsoleState(state_dir=args.state_dir, export_dir=args.export_dir, gallery_cap=args.gallery_cap,
                         review_cap=args.review_cap, review_below=args.review_below)
    lock = threading.Lock()
    closing = threading.Event()
    hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}
    app = create_app(state, lock, token=token, allowed_hosts=hosts, closing=closing)
    sub = Subscriber(state, lock, endpoints, curve=curve, rcvhwm=args.rcvhwm or DEFAULT_RCVHWM)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            closing.set()  # ends the event streams, which would otherwise hold the shutdown open
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=not args.quiet,
                            timeout_graceful_shutdown=3, lifespan="on")
    server = Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"console: http://{shown}:{port}/" + (" (append ?token=<token file contents>)" if token else "")
          + f" watching {', '.join(endpoints)}; state in {args.state_dir}", flush=True)
    sub.start()
    # uvicorn re-raises the signal that stopped it once it has shut down cleanly; with these no-op handlers in
    # place that re-raise lands here, so SIGINT/SIGTERM end the console with exit code 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        sub.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1

