"""Ask a running agent whether it is ready (GET /readyz); exit 0 when it answers 200, else 1."""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request


def default_url() -> str:
    """The agent's /readyz on its metrics address and port (TDN_METRICS_ADDR / TDN_METRICS_PORT)."""
    addr = os.environ.get("TDN_METRICS_ADDR", "127.0.0.1")
    port = os.environ.get("TDN_METRICS_PORT", "9108")
    host = f"[{addr}]" if ":" in addr else addr
    return f"http://{host}:{port}/readyz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="readiness URL (default: /readyz on TDN_METRICS_ADDR:PORT, "
                   "127.0.0.1:9108)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--quiet", action="store_true", help="print nothing; the exit code is the answer")


def check(url: str, timeout: float) -> tuple[bool, str]:
    """(ready, one-line description) for the URL."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200, f"{resp.status} {resp.read(200).decode(errors='replace').strip()}"
    except urllib.error.HTTPError as exc:
        return False, f"{exc.code} {exc.read(200).decode(errors='replace').strip()}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"unreachable: {reason}"


def run(args: argparse.Namespace) -> int:
    url = args.url or default_url()
    ok, text = check(url, args.timeout)
    if not args.quiet:
        print(f"{url}: {text}")
    return 0 if ok else 1
