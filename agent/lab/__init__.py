"""The lab: builds, trains, exports, audits and benchmarks models; imports the runtime, never the reverse."""

from __future__ import annotations

import os
from pathlib import Path

REPO_DATA = Path(__file__).resolve().parents[3] / "shared" / "neu-det"


def default_data() -> str | None:
    """The NEU-DET folder from TDN_DATA, else ../shared/neu-det beside the checkout when it exists."""
    env = os.environ.get("TDN_DATA")
    if env:
        return env
    return str(REPO_DATA) if REPO_DATA.is_dir() else None
