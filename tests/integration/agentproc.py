"""The metrics-aware launcher: the shared agent.testing launcher, plus /readyz and /metrics (CURVE on, too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.testing import AgentProcess, http_get, start_agent, wait_for, wait_ready
from tests.conftest import free_port


@dataclass
class AgentProc(AgentProcess):
    """A live agent process with its metrics port, and the /readyz answers seen while it started."""

    metrics_port: int = 0
    readyz_seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}, labels sorted."""
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(http_get(self.url + "/metrics")[1]):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


class Launcher:
    """Starts agents (the shipped model unless TDN_MODEL_PATH says otherwise) and kills them all at close()."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[AgentProc] = []

    def start(self, frames: str | None = None, publish: str | None = None, metrics_port: int | None = None,
              ready_timeout: float = 120, **settings: Any) -> AgentProc:
        """Start `tdn agent` with these settings and wait until /readyz answers 200 (noting what it said before)."""
        port = metrics_port or free_port()
        endpoints = {"frames_endpoint": frames, "publish_endpoint": publish}
        values = {**{k: v for k, v in endpoints.items() if v is not None}, "metrics_port": port, **settings}
        log = self.tmp_path / f"agent{len(self.started)}.log"
        base = start_agent(log, values, wait="publishing", ready_timeout_s=ready_timeout)
        agent = AgentProc(base.proc, base.log, publish=base.publish, metrics_port=port)
        self.started.append(agent)

        def ready() -> bool:
            if not agent.alive():
                raise AssertionError(f"agent exited with {agent.proc.returncode}:\n{agent.log_text()[-3000:]}")
            code = http_get(agent.url + "/readyz", timeout=1)[0]
            agent.readyz_seen.add(code)
            return code == 200

        # Polled often: a lean variant loads and warms in a few hundred ms, and the 503 before it is asserted on.
        wait_for(ready, ready_timeout, "agent /readyz 200", 0.02)
        wait_ready(agent, ready_timeout)
        return agent

    def close(self) -> None:
        """Kill whatever is still running."""
        for a in self.started:
            a.kill()
