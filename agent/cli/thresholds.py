"""Show or change a running agent's decision thresholds over its control socket (SPEC 12), with its token.

Examples:
  tdn thresholds --endpoint tcp://127.0.0.1:5557 --token-file /etc/tdn/control.token
  tdn thresholds ... --set pass_threshold=0.8 --set min_confidence=0.9 --operator alice
  tdn thresholds ... --set ood_threshold=inf       (turns the out-of-distribution check off)
  tdn thresholds ... --reset                        (back to the model card's and the settings' values)

The agent checks the token, validates every value (nothing changes if one is bad), applies the change between
batches, logs who changed what ("thresholds changed"), counts it, and keeps it in <state_dir>/thresholds.json
so it survives a restart and a model swap. Exit codes: 0 done, 1 refused or no answer, 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import re
from pathlib import Path
from typing import Any

from agent.errors import TdnError

DEFAULT_TIMEOUT_S = 3.0


def call(endpoint: str, request: Any, timeout_s: float = DEFAULT_TIMEOUT_S, curve: Any = None) -> Any:
    """Send one control Request and return the agent's Reply; TdnError if it does not answer in time."""
    import zmq

    from protocol.control import decode_reply, encode_request
    from simulators.common import make_curve_client

    ctx: zmq.Context[Any] = zmq.Context.instance()
    # A fresh REQ socket per call: after a timeout a REQ socket is stuck waiting for its reply forever.
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        make_curve_client(sock, curve)
        sock.connect(endpoint)
        try:
            sock.send_multipart(encode_request(request))
            parts = sock.recv_multipart()
        except zmq.Again:
            raise TdnError(f"no answer from {endpoint} within {timeout_s:g} s (is control_endpoint set on the "
                           f"agent, and is CURVE on both sides or neither?)") from None
        return decode_reply(parts)
    finally:
        sock.close(linger=0)


def parse_assignment(text: str) -> tuple[str, float]:
    """NAME=VALUE from --set; VALUE is a number, or inf/off for the OOD threshold."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*=\s*(\S+)\s*", text)
    if not m:
        raise TdnError(f"--set {text!r}: expected NAME=VALUE, e.g. pass_threshold=0.8")
    name, raw = m.groups()
    value = math.inf if raw.lower() in ("inf", "off") else None
    if value is None:
        try:
            value = float(raw)
        except ValueError:
            raise TdnError(f"--set {text!r}: {raw!r} is not a number") from None
    return name, value


def add_arguments(p: argparse.ArgumentParser) -> None:
    from protocol.control import SETTABLE
    from simulators.common import add_curve_arguments

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5557", help="the agent's control_endpoint")
    p.add_argument("--token-file", type=Path, required=True,
                   help="the control token file the agent reads (control_token_file; mode 0600)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help=f"set a threshold (repeatable); NAME is one of {', '.join(SETTABLE)}")
    p.add_argument("--reset", action="store_true", help="drop every run-time threshold")
    p.add_argument("--operator", default=None, help="who is changing it, for the agent's log (default: $USER)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    add_curve_arguments(p)


def _operator(name: str | None) -> str:
    who = name or getpass.getuser() or "operator"
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", who)[:64]


def run(args: argparse.Namespace) -> int:
    from agent.security import load_token
    from protocol import ProtocolError
    from protocol.control import Command, Request
    from simulators.common import CurveKeyError, curve_options

    if args.set and args.reset:
        raise TdnError("--set and --reset do not go together")
    token = load_token(args.token_file).decode()
    values = dict(parse_assignment(s) for s in args.set)
    command = Command.SET_THRESHOLDS if values else Command.RESET_THRESHOLDS if args.reset else Command.GET_THRESHOLDS
    try:
        request = Request(command, token, _operator(args.operator), values)
    except ProtocolError as err:
        raise TdnError(f"--set: {err.detail or err}") from None
    try:
        curve = curve_options(args)
    except CurveKeyError as exc:
        raise TdnError(str(exc)) from None
    reply = call(args.endpoint, request, args.timeout, curve)
    if args.json:
        print(json.dumps({"outcome": reply.outcome.value, "detail": reply.detail, "agent_id": reply.agent_id,
                          "model_id": reply.model_id, "overridden": list(reply.overridden),
                          "thresholds": {k: (v if math.isfinite(v) else None) for k, v in reply.thresholds.items()}}))
    else:
        print(f"{reply.agent_id} {reply.model_id}: {reply.outcome.value}" + (f" ({reply.detail})" if reply.detail
                                                                               else ""))
        for k, v in sorted(reply.thresholds.items()):
            mark = "  (set at run time)" if k in reply.overridden else ""
            print(f"  {k:<16} {v:g}{mark}" if math.isfinite(v) else f"  {k:<16} off{mark}")
    if not reply.ok:
        raise TdnError(f"the agent refused: {reply.outcome.value}: {reply.detail}")
    return 0
