"""Operator commands (SPEC 12): authenticated by a token, validated, logged, and kept in the state directory."""

from __future__ import annotations

import hmac
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import ConfigError
from agent.logging import RateLimited
from protocol.control import (
    SETTABLE,
    Command,
    Outcome,
    Reply,
    decode_request,
    encode_reply,
    peek_token,
)
from protocol.errors import ProtocolError

if TYPE_CHECKING:  # settings validation reads the thresholds file before the agent imports numpy
    from agent.line import ServingModel

# Run-time thresholds survive a restart: an operator's correction must not silently vanish with the process.
THRESHOLDS_FILE = "thresholds.json"


class Retunable(Protocol):
    """What the controller needs of the serving side (agent.serving.Loader)."""

    model: ServingModel | None
    runtime: dict[str, float]

    def retune(self, runtime: dict[str, float]) -> ServingModel: ...


def _finite(values: dict[str, float]) -> dict[str, float]:
    # JSON has no infinity: an OOD check turned off is kept as null, and read back as inf.
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}  # type: ignore[misc]


class ThresholdStore:
    """<state_dir>/thresholds.json: the thresholds set at run time, who set them and when."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / THRESHOLDS_FILE

    def load(self) -> dict[str, float]:
        """The saved thresholds ({} without a file); ConfigError naming the file when it is not valid."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
            raw = data["thresholds"]
            if not isinstance(raw, dict):
                raise TypeError("thresholds must be an object")
            from protocol.control import _threshold

            return {k: _threshold(k, math.inf if v is None else v) for k, v in raw.items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"run-time thresholds file {self.path}: {exc} (fix it, or remove it to use the "
                              f"card's and the settings' thresholds)") from None

    def save(self, values: dict[str, float], operator: str) -> None:
        if not values:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"thresholds": _finite(values), "operator": operator,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
        os.replace(tmp, self.path)


class Controller:
    """Answers one control request at a time: token first, then the command; every outcome counted and logged."""

    def __init__(self, token: bytes, agent_id: str, serving: Retunable, store: ThresholdStore,
                 on_retune: Callable[[ServingModel], None], record: Callable[[str], None], log: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._token = token
        self.agent_id = agent_id
        self.serving = serving
        self.store = store
        self._on_retune = on_retune
        self._record = record
        self._log = log  # every accepted change is written: it is authenticated, so it cannot flood
        self._refusals = RateLimited(log, clock=clock)  # a peer hammering wrong tokens must not flood the journal

    def _reply(self, outcome: Outcome, detail: str = "") -> list[bytes]:
        if outcome is Outcome.UNAUTHORIZED:  # a peer without the token learns nothing about the line
            return encode_reply(Reply(outcome, detail))
        model = self.serving.model
        th = dict(model.thresholds) if model else {}
        return encode_reply(Reply(outcome, detail, th, tuple(sorted(self.serving.runtime)), self.agent_id,
                                  model.model_id if model else ""))

    def _refuse(self, outcome: Outcome, detail: str, **fields: Any) -> list[bytes]:
        self._record("commands_refused")
        self._refusals.warning("command refused", key=outcome.value, outcome=outcome.value, detail=detail, **fields)
        return self._reply(outcome, detail)

    def handle(self, parts: Sequence[Any], draining: bool = False) -> list[bytes]:
        """The reply frames to one request's frames; never raises on what a peer sent."""
        token = peek_token(parts)
        if token is None or not hmac.compare_digest(token.encode(), self._token):
            return self._refuse(Outcome.UNAUTHORIZED, "missing or wrong token")
        try:
            req = decode_request(parts)
        except ProtocolError as err:
            return self._refuse(Outcome.BAD_VALUE if err.reason == "bad_value" else Outcome.BAD_REQUEST, str(err))
        if draining or self.serving.model is None:
            return self._refuse(Outcome.UNAVAILABLE, "the agent is not serving (starting or draining)",
                                operator=req.operator)
        self._record("commands")
        if req.command is Command.GET_THRESHOLDS:
            return self._reply(Outcome.OK)
        new = {} if req.command is Command.RESET_THRESHOLDS else {**self.serving.runtime, **req.thresholds}
        old = dict(self.serving.model.thresholds)
        try:
            model = self.serving.retune(new)
        except ValueError as exc:
            return self._refuse(Outcome.BAD_VALUE, str(exc), operator=req.operator)
        try:
            self.store.save(new, req.operator)
            saved = ""
        except OSError as exc:  # the change holds in memory; say that it will not survive a restart
            saved = f"not saved to {self.store.path}: {exc.strerror}"
        self._on_retune(model)
        changed = {k: [old.get(k), model.thresholds.get(k)] for k in SETTABLE
                   if old.get(k) != model.thresholds.get(k)}
        self._log.info("thresholds changed", operator=req.operator,
                       command=req.command.value, changed=changed, model_id=model.model_id,
                       **({"warning": saved} if saved else {}))
        return self._reply(Outcome.OK, saved)


def for_agent(settings: Any, serving: Retunable, line: Any, log: Any) -> Controller:
    """The agent's controller: its token file (checked at start-up already), its state directory, its line."""
    from agent.security import load_token

    return Controller(load_token(settings.control_token_file), settings.agent_id, serving,
                      ThresholdStore(settings.state_dir), line.retune, line.record, log)
