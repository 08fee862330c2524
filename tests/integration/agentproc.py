"""Run the real agent as a subprocess on chosen endpoints and wait for /readyz (works with CURVE on, too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port


@dataclass
class AgentProc:
    """A live agent process, its endpoints and its metrics port."""

    proc: subprocess.Popen[bytes]
    frames: str
    publish: str
    metrics_port: int
    log: Path
    readyz_seen: set[int] = field(default_factory=set)  # /readyz answers seen while waiting for ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}, labels sorted."""
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(http_get(self.url + "/metrics")[1]):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


class Launcher:
    """Starts agents (the shipped model unless TDN_MODEL_PATH says otherwise) and kills them all at close()."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[AgentProc] = []

    def start(self, frames: str | None = None, publish: str | None = None, metrics_port: int | None = None,
              ready_timeout: float = 120, **settings: Any) -> AgentProc:
        """Start `tdn agent` with these settings and wait until /readyz answers 200."""
        frames = frames or f"tcp://127.0.0.1:{free_port()}"
        publish = publish or f"tcp://127.0.0.1:{free_port()}"
        port = metrics_port or free_port()
        log = self.tmp_path / f"agent{len(self.started)}.log"
        cmd = [sys.executable, "-m", "agent.cli", "agent", "--frames-endpoint", frames, "--publish-endpoint",
               publish, "--metrics-port", str(port), "--log-json", "true"]
        for k, v in settings.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        with log.open("ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        agent = AgentProc(proc, frames, publish, port, log)
        self.started.append(agent)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"agent exited with {proc.returncode} before ready:\n{agent.log_text()[-3000:]}")
            code = http_get(agent.url + "/readyz", timeout=1)[0]
            agent.readyz_seen.add(code)
            if code == 200:
                return agent
            time.sleep(0.1)
        raise AssertionError(f"agent not ready after {ready_timeout} s:\n{agent.log_text()[-3000:]}")

    def close(self) -> None:
        """Kill whatever is still running."""
        for a in self.started:
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait()
