"""A fresh state directory: `tdn agent` with backend auto exports its lean artifacts on the first start, gated."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import testing
from agent.backends import FIRST_EXPORT, LEAN, installed
from agent.backends.gate import read_gate
from agent.backends.store import model_dir
from agent.lab.data import scan

pytestmark = pytest.mark.integration

PER_CLASS = 30  # enough to calibrate int8 and to gate on a stratified 20%, small enough to export in seconds


@pytest.fixture(scope="module")
def subset(neu_det: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 NEU-DET images a class, linked into a class-per-folder tree (the layout a line engineer brings)."""
    from agent.card import read_dict
    from tests.conftest import MODEL

    classes = read_dict(MODEL)["classes"]
    root = tmp_path_factory.mktemp("labelled")
    for label, name in enumerate(classes):
        (root / name).mkdir()
        for s in [s for s in scan(neu_det) if s.label == label][:PER_CLASS]:
            (root / name / Path(s.path).name).symlink_to(s.path)
    return root


class Systemd:
    """A bound datagram socket standing in for systemd's notify socket, read as datagrams arrive (a unix datagram
    queue holds ~10; the agent's sends are non-blocking and drop the rest, as they would with a stalled systemd)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.said: list[str] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                self.said.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self._stop.set()
        self._reader.join(5)
        self.sock.close()


EXPORTING = "exporting lean artifacts (first start)"


def exports(agent: Any) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e.get("event") == EXPORTING]


class TestFirstStartExport:
    """What a fresh install does before it serves, and what a restart then skips."""

    @pytest.fixture(autouse=True)
    def _lean(self) -> None:
        if not all(installed(n) for n in LEAN):
            pytest.fail("the litert and openvino extras are part of the test install")

    @pytest.mark.hang_guard(420)
    def test_gated_export_then_a_restart_skips_it(self, start_agent: Any, shipped_model: Path, subset: Path,
                                                    tmp_path: Path) -> None:
        """With labelled data, the first start builds and gates int8/bf16, logs each step, and serves the probe's
        pick; the next start exports nothing and serves the same variant."""
        settings: dict[str, Any] = {"state_dir": tmp_path / "state", "export_data": subset, "backend": "auto",
                                    "metrics_port": 0}
        systemd = Systemd(tmp_path / "notify")
        try:
            agent = testing.start_agent(tmp_path / "first.log", settings, env={"NOTIFY_SOCKET": systemd.path})
            try:
                testing.wait_for(lambda: any("READY=1" in m for m in systemd.said), 10, "READY=1 to systemd", 0.05)
                events = agent.events()
                first_id = agent.event("ready")["model_id"]  # type: ignore[index]
            finally:
                agent.kill()
        finally:
            systemd.close()
        said = systemd.said
        # Each step extends systemd's start timeout (TimeoutStartSec is sized for a model load), before READY.
        assert sum("EXTEND_TIMEOUT_USEC=" in m for m in said) >= 5
        started = [e for e in events if e.get("event") == EXPORTING]
        assert [e["precisions"] for e in started] == ["fp32,bf16,int8"] and started[0]["data"] == str(subset)
        steps = [e for e in events if e.get("event") == "export step"]
        assert [e["step"] for e in steps] == list(range(1, len(steps) + 1)) and steps[-1]["of"] == len(steps)
        assert any("int8" in e["label"] for e in steps)
        folder = model_dir(tmp_path / "state" / "artifacts", shipped_model)
        for backend in LEAN:
            record = read_gate(folder, backend, "int8")
            assert record is not None and "stratified 20%" in record["images"]
        assert json.loads((folder / FIRST_EXPORT).read_text())["ok"] is True
        served = [e for e in events if e.get("event") == "model serving"]
        assert served and served[0]["selected_by"].startswith("probe: ")

        again = start_agent(**settings)
        assert exports(again) == [] and again.event("ready")["model_id"] == first_id  # type: ignore[index]

    @pytest.mark.hang_guard(420)
    def test_data_of_other_classes_falls_back_to_fp32(self, start_agent: Any, shipped_model: Path,
                                                       magnetic_tile: Path, tmp_path: Path) -> None:
        """A folder whose classes are not the model's fails the gated export with a logged reason; the agent still
        exports fp32, serves it, and does not retry on the next start."""
        settings = {"state_dir": tmp_path / "state", "export_data": magnetic_tile, "backend": "auto"}
        agent = start_agent(**settings)
        assert [e["precisions"] for e in exports(agent)] == ["fp32,bf16,int8", "fp32"]
        failed = agent.event("export failed")
        assert failed is not None and "do not match" in failed["error"]
        assert agent.event("ready")["model_id"].endswith("-fp32")  # type: ignore[index]
        folder = model_dir(tmp_path / "state" / "artifacts", shipped_model)
        assert json.loads((folder / FIRST_EXPORT).read_text())["ok"] is False
        agent.stop()
        assert exports(start_agent(**settings)) == []

    @pytest.mark.hang_guard(420)
    def test_a_named_reduced_precision_is_exported_too(self, start_agent: Any, subset: Path, tmp_path: Path) -> None:
        """`--backend litert:int8` on a fresh state directory exports and gates it first, then serves it."""
        agent = start_agent(state_dir=tmp_path / "state", export_data=subset, backend="litert:int8")
        assert [e["precisions"] for e in exports(agent)] == ["fp32,bf16,int8"]
        assert agent.event("ready")["model_id"].endswith("/litert-int8")  # type: ignore[index]

    def test_a_missing_folder_is_one_line(self, start_agent: Any, tmp_path: Path) -> None:
        """TDN_EXPORT_DATA naming no folder stops the start with exit code 1 and a message naming it."""
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-m", "agent.cli", "agent", "--export-data", str(tmp_path / "nope"),
                              "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "export_data" in out.stderr and "nope" in out.stderr
        assert "Traceback" not in out.stderr


class TestReloadPrecision:
    """A hot swap keeps the serving precision for the next model when it can, and falls back to fp32 when not."""

    @pytest.mark.hang_guard(420)
    def test_exports_with_data_else_fp32(self, shipped_model: Path, subset: Path, tmp_path: Path) -> None:
        """With no int8 for the next model and no data, fp32; with its data, the int8 is exported, gated and kept."""
        import shutil

        from agent.backends import export_first_start, reload_precision

        model = tmp_path / "next.keras"  # the card names training data that is not on this machine
        shutil.copyfile(shipped_model, model)
        card = json.loads(shipped_model.with_suffix(".json").read_text())
        card["training"]["data"] = "/nowhere/neu-det"
        model.with_suffix(".json").write_text(json.dumps(card))
        arts = tmp_path / "art"
        assert export_first_start(model, arts, None, "test") == list(LEAN)
        assert reload_precision("litert", "int8", model, arts, None) == "fp32"
        assert reload_precision("litert", "int8", model, arts, subset) == "int8"
        assert reload_precision("openvino", "int8", model, arts, None) == "int8"  # gated by the same export
        assert reload_precision("tensorflow", "fp32", model, arts, None) == "fp32"
