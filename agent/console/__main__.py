"""`python -m agent.console`: the console without the rest of the `tdn` command line."""

import argparse
import sys

from agent.console import add_arguments, run
from agent.errors import TdnError

parser = argparse.ArgumentParser(prog="tdn console", description=(sys.modules["agent.console"].__doc__ or "").strip())
add_arguments(parser)
try:
    sys.exit(run(parser.parse_args()))
except TdnError as exc:
    print(f"tdn: error: {exc}", file=sys.stderr)
    sys.exit(1)
