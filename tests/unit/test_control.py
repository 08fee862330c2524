"""The control channel (SPEC 12): its messages, and the agent's controller on a real card's decision rule."""

from __future__ import annotations

import contextlib
import json
import math
import stat
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.card import read
from agent.config import AgentSettings
from agent.control import THRESHOLDS_FILE, Controller, ThresholdStore
from agent.decision import DecisionRule
from agent.errors import ConfigError
from agent.line import ServingModel
from agent.security import load_token, make_token
from agent.serving import Loader, rule_thresholds
from protocol import ProtocolError
from protocol.control import (
    Command,
    Outcome,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

TOKEN = "a-control-token-of-some-length"


class Log:
    """Collects log calls as data (event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.lines.append(("info", event, kw))

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append(("warning", event, kw))


def serving(shipped_model: Path, tmp_path: Path) -> tuple[Loader, ServingModel]:
    """A real Loader holding a model whose rule is the shipped card's (no backend: the rule is what is tested)."""
    card = read(shipped_model)
    rule = DecisionRule.from_card(card.raw)
    model = ServingModel("m1/tensorflow-fp32", card.classes, rule.pass_classes, rule, rule_thresholds(rule),
                         rule.needs_pooled, base_rule=rule)
    loader = Loader(AgentSettings(state_dir=tmp_path))
    loader.model = model
    return loader, model


def request(command: Command | str = Command.GET_THRESHOLDS, token: str = TOKEN, **th: float) -> list[bytes]:
    return encode_request(Request(command, token, "alice", th))


def raw(header: dict[str, Any], topic: bytes = b"command") -> list[bytes]:
    return [topic, msgpack.packb(header)]


@pytest.fixture
def ctl(shipped_model: Path, tmp_path: Path) -> tuple[Controller, Loader, list[ServingModel], list[str], Log]:
    loader, _ = serving(shipped_model, tmp_path)
    applied: list[ServingModel] = []
    events: list[str] = []
    log = Log()
    c = Controller(TOKEN.encode(), "agent1", loader, ThresholdStore(tmp_path), applied.append, events.append, log)
    return c, loader, applied, events, log


class TestMessages:
    """Requests and replies round-trip, and every broken rule is a ProtocolError naming it."""

    def test_round_trip(self) -> None:
        """A set request and an ok reply decode to what was encoded, infinity included."""
        req = Request(Command.SET_THRESHOLDS, TOKEN, "alice", {"min_confidence": 0.9, "ood_threshold": math.inf})
        assert decode_request(encode_request(req)) == req
        rep = Reply(Outcome.OK, "", {"min_confidence": 0.9}, ("min_confidence",), "agent1", "m/tf")
        assert decode_reply(encode_reply(rep)) == rep

    @pytest.mark.parametrize(("header", "reason"), [
        ({"v": 2, "command": "get_thresholds", "token": TOKEN, "operator": "a"}, "bad_version"),
        ({"v": 1, "token": TOKEN, "operator": "a"}, "missing_field"),
        ({"v": 1, "command": "reboot", "token": TOKEN, "operator": "a"}, "bad_value"),
        ({"v": 1, "command": "get_thresholds", "token": TOKEN, "operator": "a b"}, "bad_id"),
        ({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a"}, "missing_field"),
        ({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a", "thresholds": {"temperature": 2.0}},
         "bad_value"),
        ({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a",
          "thresholds": {"pass_threshold": 1.5}}, "bad_value"),
        ({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a",
          "thresholds": {"min_confidence": float("nan")}}, "bad_value"),
        ({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a",
          "thresholds": {"min_confidence": "high"}}, "bad_type"),
        ({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a",
          "thresholds": {"ood_threshold": -1.0}}, "bad_value"),
    ])
    def test_invalid_requests(self, header: dict[str, Any], reason: str) -> None:
        """Each rule of SPEC 12 is enforced with its reason code."""
        with pytest.raises(ProtocolError) as err:
            decode_request(raw(header))
        assert err.value.reason == reason

    def test_layout_errors(self) -> None:
        """Wrong topic, part count, msgpack or header type are refused before any field is read."""
        good = request()
        for parts, reason in ((good[:1], "frame_count"), ([*good, b"x"], "frame_count"),
                              ([b"frame/x/", good[1]], "bad_topic"), ([b"command", b"\xc1"], "bad_msgpack"),
                              ([b"command", msgpack.packb([1, 2])], "bad_type")):
            with pytest.raises(ProtocolError) as err:
                decode_request(parts)
            assert err.value.reason == reason

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=4))
    def test_garbage_never_raises_anything_else(self, parts: list[bytes]) -> None:
        """Arbitrary frames are a request or a ProtocolError, never another exception."""
        with contextlib.suppress(ProtocolError):
            decode_request(parts)


class TestController:
    """The controller checks the token first, validates, applies, saves, counts and logs."""

    def test_get(self, ctl: Any) -> None:
        """get_thresholds answers the card's thresholds and changes nothing."""
        c, loader, applied, events, _ = ctl
        rep = decode_reply(c.handle(request()))
        assert rep.ok and rep.thresholds == loader.model.thresholds and rep.overridden == ()
        assert applied == [] and events == ["commands"]

    def test_set_changes_decisions(self, ctl: Any, tmp_path: Path) -> None:
        """ood_threshold 0 makes every frame review; the new model is handed over, saved and logged."""
        c, loader, applied, events, log = ctl
        before = loader.model
        rep = decode_reply(c.handle(request(Command.SET_THRESHOLDS, ood_threshold=0.0)))
        assert rep.ok and rep.thresholds["ood_threshold"] == 0.0 and rep.overridden == ("ood_threshold",)
        assert applied == [loader.model] and loader.model.model_id == before.model_id
        rng = np.random.default_rng(0)
        probs = rng.dirichlet(np.ones(6), 32).astype(np.float32)
        pooled = rng.normal(size=(32, before.rule.ood.features)).astype(np.float32)
        decisions = loader.model.rule.decide(probs, pooled)[0]
        assert set(decisions.tolist()) == {2}  # review
        saved = json.loads((tmp_path / THRESHOLDS_FILE).read_text())
        assert saved["thresholds"] == {"ood_threshold": 0.0} and saved["operator"] == "alice"
        assert ("info", "thresholds changed") in [(lv, e) for lv, e, _ in log.lines]
        changed = next(kw for _, e, kw in log.lines if e == "thresholds changed")["changed"]
        assert changed["ood_threshold"][1] == 0.0 and events == ["commands"]

    def test_sets_accumulate_and_reset_drops_them(self, ctl: Any, tmp_path: Path) -> None:
        """Two sets keep both keys; reset returns the card's values and removes the saved file."""
        c, loader, _, _, _ = ctl
        card_values = dict(loader.model.thresholds)
        c.handle(request(Command.SET_THRESHOLDS, min_confidence=0.5))
        rep = decode_reply(c.handle(request(Command.SET_THRESHOLDS, pass_threshold=0.7)))
        assert rep.overridden == ("min_confidence", "pass_threshold")
        assert rep.thresholds["min_confidence"] == 0.5 and rep.thresholds["pass_threshold"] == 0.7
        rep = decode_reply(c.handle(request(Command.RESET_THRESHOLDS)))
        assert rep.thresholds == card_values and rep.overridden == ()
        assert not (tmp_path / THRESHOLDS_FILE).exists()

    def test_wrong_token_learns_nothing(self, ctl: Any) -> None:
        """A wrong or missing token is refused, counted, and the reply says nothing about the line."""
        c, loader, applied, events, log = ctl
        before = loader.model
        for parts in (request(Command.SET_THRESHOLDS, token="wrong-token", ood_threshold=0.0),
                      raw({"v": 1, "command": "set_thresholds", "operator": "a", "thresholds": {}})):
            rep = decode_reply(c.handle(parts))
            assert rep.outcome is Outcome.UNAUTHORIZED and rep.thresholds == {} and rep.model_id == ""
        assert loader.model is before and applied == [] and events == ["commands_refused"] * 2
        assert [e for _, e, _ in log.lines] == ["command refused"] * 2

    def test_bad_request_with_the_token(self, ctl: Any) -> None:
        """An authenticated but invalid request is bad_value or bad_request, and changes nothing."""
        c, loader, _, events, _ = ctl
        before = loader.model
        bad = raw({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "a",
                   "thresholds": {"min_confidence": 7.0}})
        assert decode_reply(c.handle(bad)).outcome is Outcome.BAD_VALUE
        bad = raw({"v": 1, "command": "set_thresholds", "token": TOKEN, "operator": "not an id",
                   "thresholds": {"min_confidence": 0.5}})
        assert decode_reply(c.handle(bad)).outcome is Outcome.BAD_REQUEST
        assert loader.model is before and events == ["commands_refused"] * 2

    def test_refusal_logging_is_rate_limited(self, ctl: Any) -> None:
        """A peer hammering wrong tokens is counted every time but logged a few times only."""
        c, _, _, events, log = ctl
        for _ in range(50):
            c.handle(request(token="wrong-token"))
        assert events.count("commands_refused") == 50 and len(log.lines) <= 5

    def test_ood_on_and_off_switches_the_pooled_features(self, shipped_model: Path, tmp_path: Path) -> None:
        """An OOD check the settings turned off, turned on at run time, asks the backend for pooled features."""
        card = read(shipped_model)
        base = DecisionRule.from_card(card.raw, {"ood": False})
        model = ServingModel("m1/tf", card.classes, base.pass_classes, base, rule_thresholds(base),
                             base.needs_pooled, base_rule=base)
        loader = Loader(AgentSettings(state_dir=tmp_path))
        loader.model = model
        assert not model.needs_pooled
        assert loader.retune({"ood_threshold": 1.0}).needs_pooled
        assert not loader.retune({"ood_threshold": math.inf}).needs_pooled

    def test_draining_is_unavailable(self, ctl: Any) -> None:
        """While draining, commands are refused as unavailable."""
        c, _, applied, _, _ = ctl
        rep = decode_reply(c.handle(request(Command.SET_THRESHOLDS, min_confidence=0.5), draining=True))
        assert rep.outcome is Outcome.UNAVAILABLE and applied == []


class TestStore:
    """Run-time thresholds survive a restart; a broken file is one clear error."""

    def test_round_trip_with_off(self, tmp_path: Path) -> None:
        """An OOD check turned off (inf) is saved as null and read back as inf."""
        store = ThresholdStore(tmp_path)
        store.save({"ood_threshold": math.inf, "min_confidence": 0.4}, "bob")
        assert store.load() == {"ood_threshold": math.inf, "min_confidence": 0.4}

    @pytest.mark.parametrize("text", ["{", '{"thresholds": {"pass_threshold": 3}}', '{"thresholds": []}',
                                      '{"thresholds": {"bogus": 0.1}}', "[]"])
    def test_bad_file(self, tmp_path: Path, text: str) -> None:
        """A bad thresholds.json is a ConfigError naming the file."""
        (tmp_path / THRESHOLDS_FILE).write_text(text)
        with pytest.raises(ConfigError) as err:
            ThresholdStore(tmp_path).load()
        assert THRESHOLDS_FILE in str(err.value) and "\n" not in str(err.value)


class TestToken:
    """The control token file: made private, refused when readable by others or malformed."""

    def test_make_and_load(self, tmp_path: Path) -> None:
        """keygen's token is mode 0600, loads, and is never overwritten."""
        p = make_token(tmp_path / "t")
        assert stat.S_IMODE(p.stat().st_mode) == 0o600 and len(load_token(p)) >= 32
        with pytest.raises(ConfigError):
            make_token(p)

    def test_refused(self, tmp_path: Path) -> None:
        """Group-readable, too short and missing token files are one-line errors naming the file."""
        p = tmp_path / "t"
        p.write_text("x" * 40 + "\n")
        p.chmod(0o640)
        for path in (p, tmp_path / "missing"):
            with pytest.raises(ConfigError, match="control token file"):
                load_token(path)
        p.chmod(0o600)
        p.write_text("short\n")
        with pytest.raises(ConfigError, match=r"16\.\.256"):
            load_token(p)

    def test_settings_need_the_token(self, tmp_path: Path) -> None:
        """control_endpoint without control_token_file, or with a bad one, fails settings validation."""
        from agent import config

        with pytest.raises(ConfigError, match="control_token_file"):
            config.load(control_endpoint="tcp://127.0.0.1:5557")
        with pytest.raises(ConfigError, match="control token file"):
            config.load(control_endpoint="tcp://127.0.0.1:5557", control_token_file=str(tmp_path / "none"))
