"""Run a real agent for tests, benchmarks and the demo: one launcher, ports chosen by ZeroMQ, waits on conditions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.errors import TdnError

T = TypeVar("T")
ANY_PORT = "tcp://127.0.0.1:*"


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.1f} s")
        time.sleep(interval_s)


def free_port() -> int:
    """A TCP port free on loopback right now (for servers that cannot bind port 0 and report it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


@dataclass
class AgentProcess:
    """A live `tdn agent` process, the endpoints it bound, and its log (JSON lines)."""

    proc: subprocess.Popen[bytes]
    log: Path
    frames: str = ""
    publish: str = ""
    control: str = ""  # the control endpoint (SPEC 12), when control_endpoint was set
    metrics_url: str | None = None

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (other lines, such as a runtime's own output, are skipped)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def event(self, name: str) -> dict[str, Any] | None:
        """The last log event called `name`, if any."""
        found = [e for e in self.events() if e.get("event") == name]
        return found[-1] if found else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the exit code (SIGKILL, and its code, if it has not drained within `timeout`)."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def wait_event(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Block until the agent logs `name`; fail with the log tail if it exits first or takes too long."""

        def seen() -> dict[str, Any] | None:
            e = self.event(name)
            if e is None and not self.alive():
                raise TdnError(f"agent exited with code {self.proc.returncode} before {name!r}; log tail:\n"
                               f"{self.log_text()[-3000:]}")
            return e

        try:
            return wait_for(seen, timeout_s, f"agent log event {name!r}", 0.05)
        except TimeoutError:
            raise TdnError(f"agent logged no {name!r} within {timeout_s:.0f} s; log tail:\n"
                           f"{self.log_text()[-3000:]}") from None


def agent_command(settings: Mapping[str, Any], python: str = sys.executable) -> list[str]:
    """The `tdn agent` command line for these settings (ZeroMQ-chosen ports unless endpoints are given)."""
    values = {"frames_endpoint": ANY_PORT, "publish_endpoint": ANY_PORT, "log_json": "true", **settings}
    cmd = [python, "-m", "agent.cli", "agent"]
    for k, v in values.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def start_agent(log: Path, settings: Mapping[str, Any] | None = None, *, wait: str = "ready",
                ready_timeout_s: float = 180, env: Mapping[str, str] | None = None,
                cpus: Sequence[int] | None = None, python: str = sys.executable,
                prefix: Sequence[str] = ()) -> AgentProcess:
    """Start `tdn agent` and wait for its `wait` log event ("publishing": PUB bound; "ready": serving).

    The agent binds the ports ZeroMQ chooses (tcp://127.0.0.1:*) and logs them, so there is no
    find-a-free-port-then-close race between processes. `prefix` wraps the command (for example
    `ip netns exec NS`, which execs it in place, so the process is still the agent).
    """
    # The agent's default holds READY until a bridge subscribed; callers here subscribe once it is up, so they
    # ask for no wait unless they say otherwise (None: the agent's default, as the demo and its tests do).
    settings = {"ready_subscribers": 0, **(settings or {})}
    level = str(settings.get("log_level", "INFO")).upper()
    if level not in ("DEBUG", "INFO"):
        raise ValueError(f"log_level {level}: the launcher waits for the agent's info events (publishing, ready)")
    cmd = agent_command(settings, python)
    if cpus:
        cmd = ["taskset", "-c", ",".join(str(c) for c in cpus), *cmd]
    cmd = [*prefix, *cmd]
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
    agent = AgentProcess(proc, log)
    try:
        published = agent.wait_event("publishing", ready_timeout_s)
        agent.publish = str(published["publish"])
        if wait == "ready":
            ready = agent.wait_event("ready", ready_timeout_s)
            agent.frames = str(ready["frames"])
            agent.control = str(ready.get("control") or "")
        metrics = agent.event("metrics")
        agent.metrics_url = str(metrics["url"]).removesuffix("/metrics") if metrics else None
    except BaseException:
        agent.kill()
        raise
    return agent


def wait_ready(agent: AgentProcess, timeout_s: float = 180) -> AgentProcess:
    """For an agent started with wait="publishing": block until it is ready, and fill in its frame endpoint."""
    ready = agent.wait_event("ready", timeout_s)
    agent.frames = str(ready["frames"])
    agent.control = str(ready.get("control") or "")
    metrics = agent.event("metrics")
    agent.metrics_url = str(metrics["url"]).removesuffix("/metrics") if metrics else None
    return agent
