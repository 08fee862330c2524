"""Make a CurveZMQ key pair (NAME.key to share, NAME.key_secret to keep), or a control token file."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from agent.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="directory for the two key files (created, mode 0700)")
    p.add_argument("--name", help="key name, e.g. agent, cam1, bridge1")
    p.add_argument("--token", type=Path, metavar="FILE",
                   help="instead of a key pair, write a random control token to FILE (mode 0600) for "
                        "TDN_CONTROL_TOKEN_FILE and `tdn agent thresholds --token-file`")


def run(args: argparse.Namespace) -> int:
    from agent.security import make_keypair, make_token

    if args.token is not None:
        print(f"control token: {make_token(args.token)} (mode 0600; give it to the agent and its operator tools)")
        return 0
    if args.out is None or args.name is None:
        raise ConfigError("tdn keygen needs --out DIR and --name NAME (or --token FILE)")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", args.name):
        raise ConfigError(f"--name {args.name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")
    out: Path = args.out
    created = not out.exists()
    public, secret = make_keypair(out, args.name)
    if created:
        out.chmod(0o700)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600; never copy it off this machine)")
    if args.name == "agent":
        print(f"cameras and bridges: --curve-server-key {public}")
    else:
        print(f"allow it on the agent: copy {public} into the agent's curve_allow_dir")
    return 0
