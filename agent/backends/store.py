"""Where exported artifacts live: one folder per model hash, with a manifest of the export format."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.card import file_sha256

# Bump when an artifact's layout or export recipe changes, so old caches are rebuilt (2: gate self-tests; 3: the
# gate records the card's self-test it was measured against).
FORMAT = 3
KERNEL_FILE = "cam_kernel.npy"
MANIFEST = "manifest.json"


def artifacts_root(artifacts_dir: str | Path | None) -> Path:
    """The artifacts root: the one given, else the agent's default (`TDN_ARTIFACTS_DIR` or its state dir)."""
    from agent.config import default_artifacts_dir

    return Path(artifacts_dir) if artifacts_dir else default_artifacts_dir()


def model_dir(artifacts_dir: str | Path | None, model_path: str | Path) -> Path:
    """The folder of one model's artifacts: a new model (new hash) never reuses another's."""
    return artifacts_root(artifacts_dir) / f"tinydefectnet-{file_sha256(Path(model_path))[:16]}"


def write_manifest(folder: Path, model_path: Path, versions: dict[str, str]) -> None:
    data = {"format": FORMAT, "model": Path(model_path).name, "model_sha256": file_sha256(Path(model_path)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")


def manifest_ok(folder: Path) -> bool:
    """Whether the folder holds artifacts of the current export format (else they are rebuilt)."""
    try:
        return bool(json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT)
    except (OSError, json.JSONDecodeError):
        return False
