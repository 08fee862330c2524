"""Operator console: a live web page of the line (tiles, latency, explanations, review queue) fed by agents' PUB."""

from __future__ import annotations

import argparse
import re
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import TdnError
from simulators.common import is_loopback, read_private

if TYPE_CHECKING:
    from agent.console.app import ControlTargets
    from simulators.common import CurveKeys

DEFAULT_LISTEN = "127.0.0.1:8787"
# Where the console connects a REQ socket to an agent's control_endpoint (SPEC 12): a concrete address.
_CONTROL_ENDPOINT_RE = re.compile(r"(tcp://[^\s:]+:\d{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:\d{1,5}|ipc://\S+)")


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
                   help="SUB receive queue, messages (default 100000: the console drops, counting, not libzmq)")
    p.add_argument("--max-rate", type=int, default=None, metavar="N",
                   help="messages decoded per second at most; beyond, the console drops and counts them, so it "
                        "never takes more CPU from the agent (default 5000: about a quarter of a core)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument("--control", action="append", default=[], metavar="AGENT_ID=ENDPOINT",
                   help="the control_endpoint of an agent whose thresholds this console may change (repeatable; "
                        "without it the thresholds are shown read-only)")
    p.add_argument("--control-token-file", type=Path, default=None, metavar="FILE",
                   help="the agents' control token file (their control_token_file; mode 0600); needed with --control")
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


def parse_control(specs: list[str]) -> dict[str, str]:
    """{agent_id: endpoint} from repeated --control AGENT_ID=ENDPOINT; TdnError naming the bad one."""
    from protocol.messages import is_valid_id

    out: dict[str, str] = {}
    for spec in specs:
        agent_id, sep, endpoint = spec.partition("=")
        agent_id, endpoint = agent_id.strip(), endpoint.strip()
        if not sep:
            raise TdnError(f"--control {spec!r}: expected AGENT_ID=ENDPOINT, e.g. a1=tcp://127.0.0.1:5557")
        if not is_valid_id(agent_id):
            raise TdnError(f"--control {spec!r}: the agent id must be 1..64 chars of [A-Za-z0-9_.-]")
        if not _CONTROL_ENDPOINT_RE.fullmatch(endpoint):
            raise TdnError(f"--control {spec!r}: {endpoint!r} is not a ZeroMQ endpoint to connect to "
                           f"(tcp://HOST:PORT or ipc://PATH)")
        if agent_id in out:
            raise TdnError(f"--control: agent {agent_id} is given twice")
        out[agent_id] = endpoint
    return out


def control_targets(args: argparse.Namespace, curve: CurveKeys | None) -> ControlTargets | None:
    """The agents whose thresholds the console may change, with their token; None without --control."""
    from agent.console.app import ControlTargets
    from agent.security import load_token

    endpoints = parse_control(args.control)
    if not endpoints:
        if args.control_token_file is not None:
            raise TdnError("--control-token-file needs --control AGENT_ID=ENDPOINT")
        return None
    if args.control_token_file is None:
        raise TdnError("--control needs --control-token-file FILE (the agents' control_token_file)")
    try:
        token = load_token(args.control_token_file).decode()
    except TdnError as exc:
        raise TdnError(f"--control-token-file: {exc}") from None
    return ControlTargets(endpoints, token, curve)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.console.app import create_app
    from agent.console.state import ConsoleState
    from agent.console.subscriber import DEFAULT_MAX_RATE, DEFAULT_RCVHWM, Subscriber
    from simulators.common import DEFAULT_OUTPUT_ENDPOINT, CurveKeyError, curve_options

    host, port = parse_listen(args.listen)
    token = read_token(args.token_file) if args.token_file else None
    if token is None and not is_loopback(host):
        raise TdnError(f"--listen {host} is not loopback: pass --token-file FILE")
    if not 0.0 <= args.review_below <= 1.0:
        raise TdnError("--review-below must be within 0..1")
    try:
        curve = curve_options(args)
    except CurveKeyError as exc:
        raise TdnError(str(exc)) from None
    control = control_targets(args, curve)
    endpoints = args.endpoint or [DEFAULT_OUTPUT_ENDPOINT]
    state = ConsoleState(state_dir=args.state_dir, export_dir=args.export_dir, gallery_cap=args.gallery_cap,
                         review_cap=args.review_cap, review_below=args.review_below,
                         controllable=control.endpoints if control else ())
    lock = threading.Lock()
    closing = threading.Event()
    hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}
    app = create_app(state, lock, token=token, allowed_hosts=hosts, closing=closing, control=control)
    if args.max_rate is not None and args.max_rate < 1:
        raise TdnError("--max-rate must be >= 1")
    sub = Subscriber(state, lock, endpoints, curve=curve, rcvhwm=args.rcvhwm or DEFAULT_RCVHWM,
                     max_rate=args.max_rate or DEFAULT_MAX_RATE)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            closing.set()  # ends the event streams, which would otherwise hold the shutdown open
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=not args.quiet,
                            timeout_graceful_shutdown=3, lifespan="on")
    server = Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"console: http://{shown}:{port}/" + (" (append ?token=<token file contents>)" if token else "")
          + f" watching {', '.join(endpoints)}; state in {args.state_dir}"
          + (f"; thresholds changeable for {', '.join(sorted(control.endpoints))}" if control else ""), flush=True)
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

