"""The operator console against a real agent and NEU-DET cameras, driven in a real headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import msgpack
import pytest
import zmq

from agent.errors import TdnError
from agent.security import load_token, make_keypair, make_token
from protocol import PROTOCOL_VERSION, AgentState, Heartbeat, encode_heartbeat
from protocol.control import COMMAND_TOPIC, Command, Outcome, Reply, Request, decode_reply
from tests.conftest import ROOT, free_port
from tests.integration.agentproc import AgentProc, Launcher

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
# Written to a build folder, not over the README's committed pictures: a CI run must not dirty the checkout,
# and a picture caught during a latency spike should not replace a good one unseen. Copy them in on purpose.
SCREENSHOTS = Path(os.environ.get("TDN_SCREENSHOTS", ROOT / "build" / "screenshots"))
TOKEN = "t0ken-for-the-console-test-0123456789"
TEST_TIMEOUT_S = 150
# urllib honours http_proxy; the console is on loopback and must be reached directly.
os.environ["no_proxy"] = "127.0.0.1,localhost"


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIMEOUT_S instead of hanging CI."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"test ran longer than {TEST_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def wait_for(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def http(url: str, headers: dict[str, str] | None = None, data: bytes | None = None,
         timeout: float = 3) -> tuple[int, bytes]:
    """(status, body) of a request; 0 when nothing answers."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class Console:
    """A running `tdn console` process."""

    proc: subprocess.Popen[bytes]
    url: str
    state_dir: Path
    log: Path

    def summary(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        status, body = http(self.url + "/api/summary", headers)
        assert status == 200, body[:200]
        return dict(json.loads(body))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_console(tmp: Path, endpoints: list[str], *extra: str, host: str = "127.0.0.1",
                  token_headers: dict[str, str] | None = None) -> Console:
    """Start the console and wait until its API answers."""
    port = free_port()
    state = tmp / f"console-{port}"
    log = tmp / f"console-{port}.log"
    cmd = [sys.executable, "-m", "agent.console", "--listen", f"{host}:{port}", "--state-dir", str(state), "--quiet"]
    for ep in endpoints:
        cmd += ["--endpoint", ep]
    with log.open("wb") as f:
        proc = subprocess.Popen([*cmd, *extra], stdout=f, stderr=subprocess.STDOUT)
    console = Console(proc, f"http://127.0.0.1:{port}", state, log)

    def up() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")
        return http(console.url + "/api/summary", token_headers)[0] == 200

    wait_for(up, 30, "the console API")
    return console


@dataclass
class Line:
    """An agent (with a control socket), two NEU-DET cameras and a console watching them."""

    agent_publish: str
    console: Console
    cameras: subprocess.Popen[bytes]
    agent: AgentProc
    control_token: Path


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory, neu_det: Path, shipped_model: Path,
         shared_artifacts: Path) -> Iterator[Line]:
    """The line for the whole module: one agent (snapshots every 0.3 s), 2 cameras at 20 fps, one console."""
    tmp = tmp_path_factory.mktemp("console")
    launcher = Launcher(tmp)
    token = make_token(tmp / "control.token")
    # Its own state dir: run-time thresholds are kept there and must not leak into other agents' default one.
    agent = launcher.start(explain_interval_s=0.3, agent_id="a1", state_dir=tmp / "agent-state",
                           artifacts_dir=shared_artifacts, control_endpoint="tcp://127.0.0.1:*",
                           control_token_file=token)
    assert agent.control, "the agent logged no control endpoint"
    # Every verdict below 0.97 confidence is queued for review: this agent publishes no review decision yet.
    console = start_console(tmp, [agent.publish], "--review-below", "0.97", "--review-cap", "500",
                            "--control", f"a1={agent.control}", "--control-token-file", str(token))
    cameras = subprocess.Popen([sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames,
                                "--cameras", "2", "--fps", "20", "--shuffle", "--source", str(neu_det), "--quiet"])
    try:
        yield Line(agent.publish, console, cameras, agent, token)
    finally:
        cameras.send_signal(signal.SIGINT)
        try:
            cameras.wait(10)
        except subprocess.TimeoutExpired:
            cameras.kill()
        console.stop()
        launcher.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), "install Debian's chromium (bash .ci/setup does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser page, closed after the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    yield pg
    context.close()


def tile_verdicts(page: Any, camera: str) -> int:
    value = page.get_attribute(f'.tile[data-camera="{camera}"]', "data-verdicts")
    return int(value or 0)


class TestPage:
    """The page in Chromium while two cameras replay NEU-DET through a real agent."""

    def test_page_loads_and_goes_live(self, line: Line, page: Any) -> None:
        """The page is served, its script runs and the event stream connects."""
        response = page.goto(line.console.url + "/")
        assert response.status == 200
        assert page.title() == "TinyDefectNet Line: operator console"
        page.wait_for_function("document.getElementById('conn').textContent === 'live'")

    def test_tiles_update(self, line: Line, page: Any) -> None:
        """Both camera tiles appear and their verdict counts keep rising; the agent row shows its backend."""
        page.goto(line.console.url + "/")
        for cam in ("cam1", "cam2"):
            page.wait_for_selector(f'.tile[data-camera="{cam}"]')
        first = tile_verdicts(page, "cam1")
        page.wait_for_function(f"Number(document.querySelector('.tile[data-camera=\"cam1\"]').dataset.verdicts) "
                               f"> {first + 20}")
        text = page.inner_text('.tile[data-camera="cam1"]')
        assert "verdicts" in text and "divert" in text and "last:" in text
        row = page.inner_text('#agents tr[data-agent="a1"]')
        assert "ready" in row and "tinydefectnet" in row
        summary = line.console.summary()
        cam = summary["cameras"]["cam1"]
        assert sum(cam["decisions"].values()) == cam["verdicts"]
        assert set(summary["agents"]) == {"a1"}

    def test_thresholds_shown(self, line: Line, page: Any) -> None:
        """The thresholds cell shows the heartbeat's map, or says the agent publishes none."""
        page.goto(line.console.url + "/")
        page.wait_for_selector('#agents tr[data-agent="a1"]')
        published = line.console.summary()["agents"]["a1"]["thresholds"]
        cell = page.inner_text('#agents tr[data-agent="a1"] td.thresholds')
        if published:
            assert all(k in cell for k in published)
        else:
            assert cell == "not published by this agent"

    def test_page_reflects_a_verdict_within_one_second(self, line: Line, page: Any) -> None:
        """Each tile update shows a verdict published less than 1 s before (p95 over ~6 s of updates)."""
        page.goto(line.console.url + "/")
        page.wait_for_selector('.tile[data-camera="cam1"]')
        delays: dict[str, list[float]] = page.evaluate("""() => new Promise((resolve) => {
            const tile = document.querySelector('.tile[data-camera="cam1"]');
            const ages = [], gaps = []; let seq = tile.dataset.seq, last = null;
            const obs = new MutationObserver(() => {
                if (tile.dataset.seq !== seq) {
                    const now = Date.now();
                    seq = tile.dataset.seq;
                    ages.push(now - Number(tile.dataset.publishedNs) / 1e6);
                    if (last !== null) gaps.push(now - last);
                    last = now;
                }
            });
            obs.observe(tile, { attributes: true });
            setTimeout(() => { obs.disconnect(); resolve({ ages, gaps }); }, 6000);
        })""")
        ages, gaps = sorted(delays["ages"]), sorted(delays["gaps"])
        assert len(ages) >= 10, delays
        p95_age = ages[int(0.95 * (len(ages) - 1))]
        # A verdict shows at the first update after it reaches the console: at worst one update gap after
        # the newest verdict's age, so age + gap bounds the delay of every verdict.
        bound = p95_age + gaps[int(0.95 * (len(gaps) - 1))]
        figures = {"updates": len(ages), "age_median_ms": round(statistics.median(ages), 1),
                   "age_p95_ms": round(p95_age, 1), "age_max_ms": round(ages[-1], 1),
                   "update_gap_median_ms": round(statistics.median(gaps), 1), "update_gap_max_ms": round(gaps[-1], 1),
                   "bound_p95_ms": round(bound, 1)}
        print(f"\npage reflects a verdict: {figures}")
        assert bound < 1000

    def test_heatmap_renders_and_opens_full_size(self, line: Line, page: Any) -> None:
        """A gallery heatmap decodes to a real image, and clicking its overlay opens it in the viewer."""
        page.goto(line.console.url + "/")
        page.wait_for_function("""() => [...document.querySelectorAll('#gallery img.heatmap')]
            .some((img) => img.complete && img.naturalWidth > 0)""")
        size = page.evaluate("""() => { const img = [...document.querySelectorAll('#gallery img.heatmap')]
            .find((i) => i.naturalWidth > 0); return [img.naturalWidth, img.naturalHeight]; }""")
        assert size == [200, 200]
        # The gallery re-renders as snapshots arrive (every review verdict is explained), so a click can land on
        # an image that is being replaced: click again until the viewer shows one, within a bound.
        opened = ("() => { const v = document.getElementById('viewer-img');"
                  " return document.getElementById('viewer').open && v.naturalWidth > 0; }")
        for _ in range(20):
            if page.evaluate(opened):
                break
            try:
                page.click("#gallery .snap img.overlay", timeout=2000)
                page.wait_for_function(opened, timeout=1000)
            except Exception:  # Playwright's TimeoutError: the image was replaced; try the next click
                continue
        assert page.evaluate(opened), "the viewer never opened"
        meta = page.inner_text("#gallery .snap")
        assert "seq" in meta and "%" in meta

    def test_confirm_and_correct_write_labelled_files(self, line: Line, page: Any) -> None:
        """Confirming a review item writes <class>/<file>.png with the frame; correcting one files it elsewhere."""
        page.goto(line.console.url + "/")
        page.wait_for_selector("#review .ritem")
        item = page.query_selector("#review .ritem:not(.done)")
        item_id = item.get_attribute("data-review")
        listing = json.loads(http(line.console.url + "/api/review")[1])
        meta = next(i for i in listing["items"] if str(i["id"]) == item_id)
        item.query_selector("button.confirm").click()
        page.wait_for_function(f"document.querySelector('.ritem[data-review=\"{item_id}\"] .status')"
                               f"?.textContent.startsWith('labelled') ?? false")
        cls = meta["class_name"]
        path = line.console.state_dir / "dataset" / cls / f"{cls}_{meta['camera_id']}-{meta['seq']}-{item_id}.png"
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.shape == (200, 200), path

        page.wait_for_selector("#review .ritem:not(.done)")
        other = page.query_selector("#review .ritem:not(.done)")
        other_id = other.get_attribute("data-review")
        options = other.eval_on_selector("select.label", "s => [...s.options].map(o => o.value)")
        predicted = next(i for i in json.loads(http(line.console.url + "/api/review")[1])["items"]
                         if str(i["id"]) == other_id)["class_name"]
        correction = next(o for o in options if o != predicted)
        other.query_selector("select.label").select_option(correction)
        other.query_selector("button.correct").click()
        page.wait_for_function(f"document.querySelector('.ritem[data-review=\"{other_id}\"] .status')"
                               f"?.textContent.startsWith('labelled') ?? false")
        assert list((line.console.state_dir / "dataset" / correction).glob(f"*-{other_id}.png"))
        labels = (line.console.state_dir / "dataset" / "labels.jsonl").read_text().splitlines()
        assert {json.loads(x)["label"] for x in labels} >= {cls, correction}

    def test_screenshots(self, line: Line, page: Any) -> None:
        """Screenshots of the live page for the README, taken once tiles, chart and gallery have content."""
        page.goto(line.console.url + "/")
        page.wait_for_function("""() => document.querySelectorAll('.tile').length === 2
            && document.querySelector('#threshold-forms form.thform')
            && document.querySelectorAll('#gallery img.heatmap').length >= 8
            && document.querySelectorAll('#review .ritem').length > 0
            && document.querySelector('#latency-chart polyline')?.getAttribute('points')?.includes(' ')""")
        page.wait_for_timeout(1500)  # let the lazily loaded thumbnails decode before the picture is taken
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        top = SCREENSHOTS / "console.png"
        page.screenshot(path=str(top))
        box = page.locator("#review-section").bounding_box()
        page.screenshot(path=str(SCREENSHOTS / "review.png"), full_page=True,
                        clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": min(box["height"], 420)})
        for shot in (top, SCREENSHOTS / "review.png"):
            img = cv2.imread(str(shot))
            assert img is not None and img.shape[1] >= 600
            assert shot.stat().st_size < 600_000


class TestToken:
    """Off loopback the console needs a token, and then every request is checked."""

    def test_refuses_to_start_off_loopback_without_token(self, tmp_path: Path) -> None:
        """Binding 0.0.0.0 without --token-file exits with an error before listening."""
        proc = subprocess.run([sys.executable, "-m", "agent.console", "--listen", f"0.0.0.0:{free_port()}",
                               "--state-dir", str(tmp_path / "s"), "--endpoint", "tcp://127.0.0.1:9"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0
        assert "--token-file" in proc.stderr

    def test_page_without_token_is_refused(self, line: Line, browser: Any, tmp_path: Path) -> None:
        """Bound off loopback: no or a wrong token gets 401, ?token= opens the page and its API calls pass."""
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        console = start_console(tmp_path, [line.agent_publish], "--token-file", str(token_file), host="0.0.0.0",
                                token_headers=auth)
        try:
            context = browser.new_context()
            pg = context.new_page()
            assert pg.goto(console.url + "/").status == 401
            assert "token required" in pg.inner_text("body")
            assert pg.goto(console.url + "/?token=wrong-token-0123456789").status == 401
            assert pg.goto(console.url + f"/?token={TOKEN}").status == 200
            pg.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=20_000)
            pg.wait_for_selector('.tile[data-camera="cam1"]', timeout=20_000)
            context.close()
            assert http(console.url + "/api/summary")[0] == 401
            assert http(console.url + "/api/summary", {"X-TDN-Token": "nope"})[0] == 401
            assert "cameras" in console.summary(auth)
            assert http(console.url + "/api/review/1/label", data=b"{}")[0] == 401
        finally:
            console.stop()


def post_json(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a POST with a JSON body; the body is {} when the answer is not JSON."""
    status, raw = http(url, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode(), 10)
    try:
        return status, dict(json.loads(raw))
    except ValueError:
        return status, {}


def agent_call(line: Line, command: Command, operator: str = "test-harness", **values: float) -> Reply:
    """Send one control command straight to the line's agent (not through the console)."""
    from agent.cli.thresholds import call

    return call(line.agent.control, Request(command, load_token(line.control_token).decode(), operator, values))


def raw_agent_call(line: Line, header: dict[str, Any]) -> Reply:
    """A command the protocol's Request would refuse to build, sent as raw frames: the agent's own answer to it."""
    ctx: zmq.Context[Any] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        sock.connect(line.agent.control)
        sock.send_multipart([COMMAND_TOPIC, msgpack.packb({"v": PROTOCOL_VERSION, **header})])
        return decode_reply(sock.recv_multipart())
    finally:
        sock.close(linger=0)


def apply_in_page(page: Any, url: str, agent_id: str, values: dict[str, str], operator: str) -> str:
    """Open the page, type the values and the operator into the agent's threshold form, Apply; the outcome shown."""
    page.goto(url + "/")
    form = f'form.thform[data-agent="{agent_id}"]'
    page.wait_for_selector(form)
    for name, value in values.items():
        page.fill(f'{form} input[name="{name}"]', value)
    page.fill(f'{form} input[name="operator"]', operator)
    page.click(f"{form} button.apply")
    page.wait_for_function(f"document.querySelector('{form} .outcome')?.dataset.outcome")
    return str(page.inner_text(f"{form} .outcome"))


def changes_logged(line: Line, operator: str) -> list[dict[str, Any]]:
    """The agent's "thresholds changed" log events so far made by `operator`."""
    return [e for e in line.agent.events() if e.get("event") == "thresholds changed" and e.get("operator") == operator]


def next_heartbeats(console: Console, n: int = 2) -> dict[str, Any]:
    """The summary once `n` more heartbeats have reached the console."""
    seen = console.summary()["console"]["received"].get("heartbeat", 0)
    return dict(wait_for(lambda: (s := console.summary())["console"]["received"].get("heartbeat", 0) >= seen + n
                         and s, 15, f"{n} more heartbeats"))


class TestThresholdControl:
    """Thresholds changed from the console go through the agent's control command (SPEC 12): authenticated, logged."""

    @pytest.fixture(autouse=True)
    def restore(self, line: Line) -> Iterator[None]:
        """Start once the console's last heartbeat agrees with the agent; reset the shared agent afterwards."""
        in_force = {k: v for k, v in agent_call(line, Command.GET_THRESHOLDS).thresholds.items() if math.isfinite(v)}
        # A reset by the previous test shows only from the agent's next heartbeat.
        wait_for(lambda: line.console.summary()["agents"].get("a1", {}).get("thresholds") == in_force, 15,
                 "a heartbeat with the thresholds in force")
        yield
        assert agent_call(line, Command.RESET_THRESHOLDS).ok

    def test_apply_in_the_page_changes_the_agent(self, line: Line, page: Any) -> None:
        """Apply in the page sets min_confidence: the agent's next heartbeat shows it, its log names the operator."""
        before = line.console.summary()["agents"]["a1"]["thresholds"]
        assert line.console.summary()["agents"]["a1"]["thresholds_changeable"] is True
        new = 0.95 if before["min_confidence"] != 0.95 else 0.9
        shown = apply_in_page(page, line.console.url, "a1", {"min_confidence": str(new)}, "alice")
        assert shown.startswith("ok") and "min_confidence" in shown, shown
        wait_for(lambda: line.console.summary()["agents"]["a1"]["thresholds"]["min_confidence"] == new, 15,
                 "a heartbeat with the new min_confidence")
        page.wait_for_function(f"""() => document.querySelector('#agents tr[data-agent="a1"] td.thresholds')
            .textContent.includes('min_confidence {new}')""")
        field = 'form.thform[data-agent="a1"] input[name="min_confidence"]'
        page.wait_for_function(f"document.querySelector('{field}').placeholder === '{new}'")
        change = wait_for(lambda: changes_logged(line, "alice"), 10, "the agent's 'thresholds changed' event")[-1]
        assert change["command"] == "set_thresholds"
        assert change["changed"] == {"min_confidence": [before["min_confidence"], new]}
        rest = line.console.summary()["agents"]["a1"]["thresholds"]
        assert {k: v for k, v in rest.items() if k != "min_confidence"} == \
            {k: v for k, v in before.items() if k != "min_confidence"}

    def test_out_of_range_value_is_refused(self, line: Line, page: Any) -> None:
        """min_confidence 1.5 is refused with the agent's bad_value message shown, and nothing changes."""
        before = line.console.summary()["agents"]["a1"]["thresholds"]
        shown = apply_in_page(page, line.console.url, "a1", {"min_confidence": "1.5"}, "bob")
        # The agent's own words for this value (sent past the console's check, which runs the same protocol rules).
        agent_says = raw_agent_call(line, {"command": "set_thresholds", "operator": "bob",
                                           "token": load_token(line.control_token).decode(),
                                           "thresholds": {"min_confidence": 1.5}})
        assert agent_says.outcome is Outcome.BAD_VALUE
        assert shown == f"refused: {agent_says.detail}", shown
        assert "min_confidence must be in [0, 1], got 1.5" in shown
        status, body = post_json(line.console.url + "/api/thresholds",
                                 {"agent_id": "a1", "operator": "bob", "thresholds": {"min_confidence": 1.5}})
        assert status == 400 and body["outcome"] == "bad_value" and body["detail"] == agent_says.detail
        assert next_heartbeats(line.console)["agents"]["a1"]["thresholds"] == before
        assert changes_logged(line, "bob") == []
        assert agent_call(line, Command.GET_THRESHOLDS).overridden == ()

    def test_wrong_token_is_refused_unauthorized(self, line: Line, page: Any, tmp_path: Path) -> None:
        """A console holding another token gets the agent's unauthorized (403), shown in the page; nothing changes."""
        wrong = make_token(tmp_path / "wrong.token")
        console = start_console(tmp_path, [line.agent_publish], "--control", f"a1={line.agent.control}",
                                "--control-token-file", str(wrong))
        try:
            shown = apply_in_page(page, console.url, "a1", {"min_confidence": "0.9"}, "mallory")
            assert shown.startswith("refused: unauthorized"), shown
            status, body = post_json(console.url + "/api/thresholds",
                                     {"agent_id": "a1", "operator": "mallory", "reset": True})
            assert status == 403, body
            assert body["outcome"] == "unauthorized" and body["refused_by"] == "agent"
            assert body["thresholds"] == {}  # a peer without the token learns nothing about the line
            assert any(e.get("event") == "command refused" and e.get("outcome") == "unauthorized"
                       for e in line.agent.events())
            assert changes_logged(line, "mallory") == []
            assert agent_call(line, Command.GET_THRESHOLDS).overridden == ()
        finally:
            console.stop()

    def test_change_needs_the_console_token_off_loopback(self, line: Line, tmp_path: Path) -> None:
        """Bound to 0.0.0.0 a change without (or with a wrong) console token gets 401; with it, the agent answers."""
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        console = start_console(tmp_path, [line.agent_publish], "--token-file", str(token_file), "--control",
                                f"a1={line.agent.control}", "--control-token-file", str(line.control_token),
                                host="0.0.0.0", token_headers=auth)
        try:
            change = {"agent_id": "a1", "operator": "carol", "thresholds": {"min_confidence": 0.9}}
            assert post_json(console.url + "/api/thresholds", change)[0] == 401
            wrong = {"X-TDN-Token": "nope-0123456789abcdef"}
            assert post_json(console.url + "/api/thresholds", change, wrong)[0] == 401
            status, body = post_json(console.url + "/api/thresholds", {"agent_id": "a1", "operator": "carol",
                                                                        "reset": True}, auth)
            assert status == 200 and body["outcome"] == "ok" and body["agent_id"] == "a1", body
            assert set(body["thresholds"]) >= {"pass_threshold", "min_confidence", "ood_threshold"}
            # This console started just now: the agent's row comes with its next heartbeat, not at once.
            row = wait_for(lambda: console.summary(auth)["agents"].get("a1"), 15, "a1's heartbeat in the console")
            assert row["thresholds_changeable"] is True
        finally:
            console.stop()

    def test_silent_agent_gets_504_without_stalling_the_console(self, line: Line, tmp_path: Path) -> None:
        """A control endpoint that never answers gets 504 after the call's timeout; meanwhile the API answers."""
        import threading

        silent = f"tcp://127.0.0.1:{free_port()}"
        console = start_console(tmp_path, [line.agent_publish], "--control", f"ghost={silent}",
                                "--control-token-file", str(line.control_token))
        try:
            result: list[tuple[int, dict[str, Any]]] = []
            t0 = time.monotonic()
            waiter = threading.Thread(target=lambda: result.append(post_json(
                console.url + "/api/thresholds", {"agent_id": "ghost", "operator": "dave", "reset": True})))
            waiter.start()
            time.sleep(0.5)
            t1 = time.monotonic()
            assert "agents" in console.summary() and time.monotonic() - t1 < 1.0  # the event loop is not blocked
            waiter.join(10)
            status, body = result[0]
            assert status == 504 and body["outcome"] == "no_answer" and "no answer from" in body["detail"], body
            assert 2.5 < time.monotonic() - t0 < 8
        finally:
            console.stop()

    def test_loopback_console_keeps_its_host_and_json_checks(self, line: Line) -> None:
        """On loopback a foreign Host header gets 403 and a form-encodable (non-JSON) body 415, as for labels."""
        change = json.dumps({"agent_id": "a1", "operator": "eve", "thresholds": {"min_confidence": 0.9}}).encode()
        host = {"Host": "evil.example:80", "Content-Type": "application/json"}
        assert http(line.console.url + "/api/thresholds", host, change)[0] == 403
        assert http(line.console.url + "/api/thresholds", {"Content-Type": "text/plain"}, change)[0] == 415
        assert agent_call(line, Command.GET_THRESHOLDS).overridden == ()

    def test_malformed_requests_get_400(self, line: Line) -> None:
        """Bad JSON, wrong types, missing fields and unknown names get 400 saying what is wrong; unknown agents 404."""
        url = line.console.url + "/api/thresholds"
        ok = {"agent_id": "a1", "operator": "dave"}
        status, raw = http(url, {"Content-Type": "application/json"}, b"{not json")
        assert status == 400 and json.loads(raw)["detail"] == "bad JSON"
        cases: list[tuple[object, int, str]] = [
            ([1, 2], 400, "send a JSON object"),
            ({**ok, "thresholds": {"min_confidence": "0.9"}}, 400, "thresholds.min_confidence must be a number"),
            ({**ok, "thresholds": {"min_confidence": True}}, 400, "must be a number"),
            ({**ok, "thresholds": [0.9]}, 400, "thresholds (an object"),
            ({**ok}, 400, "thresholds (an object"),
            ({**ok, "reset": "yes"}, 400, "reset must be true or false"),
            ({**ok, "reset": True, "thresholds": {"min_confidence": 0.9}}, 400, "not both"),
            ({"agent_id": "a1", "thresholds": {"min_confidence": 0.9}}, 400, "operator"),
            ({**ok, "operator": "dave smith", "reset": True}, 400, "operator must be 1..64 chars"),
            ({**ok, "treshold": {}}, 400, "unknown field 'treshold'"),
            ({**ok, "thresholds": {"temperature": 2.0}}, 400, "unknown threshold 'temperature'"),
            ({**ok, "thresholds": {"ood_threshold": -1}}, 400, "ood_threshold must be >= 0"),
            ({**ok, "agent_id": "nobody", "reset": True}, 404, "no --control entry"),
        ]
        for body, want, says in cases:
            status, answer = post_json(url, body)
            assert (status, says in answer.get("detail", "")) == (want, True), (body, status, answer)
            assert answer["outcome"] in ("bad_request", "bad_value", "no_control") and answer["error"]
        assert http(url)[0] == 405
        assert agent_call(line, Command.GET_THRESHOLDS).overridden == ()


class TestControlOptions:
    """The console's --control options are checked at start-up."""

    @pytest.mark.parametrize(("options", "says"), [
        (["--control", "a1"], "expected AGENT_ID=ENDPOINT"),
        (["--control", "a b=tcp://127.0.0.1:5557", "--control-token-file", "{token}"], "agent id must be"),
        (["--control", "a1=http://127.0.0.1:5557", "--control-token-file", "{token}"], "not a ZeroMQ endpoint"),
        (["--control", "a1=tcp://127.0.0.1:1", "--control", "a1=tcp://127.0.0.1:2", "--control-token-file",
          "{token}"], "given twice"),
        (["--control", "a1=tcp://127.0.0.1:5557"], "--control needs --control-token-file"),
        (["--control", "a1=tcp://127.0.0.1:5557", "--control-token-file", "{missing}"], "does not exist"),
        (["--control-token-file", "{token}"], "--control-token-file needs --control"),
    ])
    def test_bad_control_options_stop_the_start(self, tmp_path: Path, options: list[str], says: str) -> None:
        """A bad --control spec or a missing control token file is one clear error before anything starts."""
        import argparse

        from agent.console import add_arguments, run

        token = make_token(tmp_path / "control.token")
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{free_port()}",
                                  *(o.format(token=token, missing=tmp_path / "missing.token") for o in options)])
        with pytest.raises(TdnError, match=says):
            run(args)
        assert not (tmp_path / "state").exists()


class TestWire:
    """The console's subscriber against a hand-driven PUB socket."""

    def test_malformed_messages_are_counted_and_skipped(self, tmp_path: Path) -> None:
        """Junk on the PUB socket is counted by reason, the next valid heartbeat still counts, SIGINT exits 0."""
        ctx: zmq.Context[Any] = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        port = free_port()
        pub.bind(f"tcp://127.0.0.1:{port}")
        console = start_console(tmp_path, [f"tcp://127.0.0.1:{port}"])
        try:
            hb_seq = 0

            def beat() -> None:
                nonlocal hb_seq
                hb = Heartbeat("fake", 7, hb_seq, time.time_ns(), 1.0, AgentState.READY, 0, {}, {}, {}, "m")
                pub.send_multipart(encode_heartbeat(hb))
                hb_seq += 1

            wait_for(lambda: beat() or "fake" in console.summary()["agents"], 10, "the subscription", 0.2)
            pub.send_multipart([b"verdict/cam1/", b"\xc1not msgpack"])
            pub.send_multipart([b"verdict/cam1/", msgpack.packb({"v": 2, "kind": "verdict"})])
            pub.send_multipart([b"heartbeat/fake/", msgpack.packb({"v": 1, "kind": "heartbeat"})])
            beat()
            malformed = wait_for(lambda: (m := console.summary()["console"]["malformed"]) and sum(m.values()) >= 3
                                 and m, 10, "the malformed counters")
            assert malformed["bad_msgpack"] == 1 and malformed["bad_version"] == 1
            assert console.summary()["agents"]["fake"]["state"] == "ready"
            assert console.proc.poll() is None
            assert console.stop() == 0  # SIGINT is a clean stop, with an open subscription
        finally:
            console.stop()
            ctx.destroy(linger=0)


    def test_flood_is_dropped_and_counted_not_queued(self, tmp_path: Path) -> None:
        """A PUB flood far above what the console decodes is dropped and counted, and the API keeps answering."""
        from protocol import Status, Verdict, encode_verdict

        ctx: zmq.Context[Any] = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 0)  # the publisher keeps everything: any loss is the console's own choice
        port = free_port()
        pub.bind(f"tcp://127.0.0.1:{port}")
        console = start_console(tmp_path, [f"tcp://127.0.0.1:{port}"], "--rcvhwm", "100000")
        try:
            def beat() -> bool:
                hb = Heartbeat("flood", 1, 0, time.time_ns(), 1.0, AgentState.READY, 0, {}, {}, {}, "m")
                pub.send_multipart(encode_heartbeat(hb))
                return "flood" in console.summary()["agents"]

            wait_for(beat, 10, "the subscription", 0.2)
            now = time.time_ns()
            sent = 60_000
            for seq in range(sent):
                v = Verdict("camF", seq, Status.OK, None, "a", 0, 0.9, None, True, "m", "flood", 1, now, now, now, now)
                pub.send_multipart(encode_verdict(v))
            t0 = time.monotonic()
            summary = console.summary()
            assert time.monotonic() - t0 < 2.0
            done = wait_for(lambda: (s := console.summary()) and (s["console"]["received"].get("verdict", 0)
                            + s["console"]["dropped"].get("verdict", 0)) >= sent and s, 30, "the flood to drain")
            received = done["console"]["received"]["verdict"]
            dropped = done["console"]["dropped"]["verdict"]
            assert dropped > 0, summary["console"]
            assert received + dropped == sent
            assert done["cameras"]["camF"]["verdicts"] == received
        finally:
            console.stop()
            ctx.destroy(linger=0)


class TestCurve:
    """The console as a CurveZMQ client of an agent that requires allow-listed subscribers."""

    def test_console_receives_over_curve(self, tmp_path: Path, shipped_model: Path) -> None:
        """With the allow-listed key the console sees the agent's heartbeats; without CURVE it sees nothing."""
        pub_key, agent_secret = make_keypair(tmp_path / "agent", "agent")
        allow = tmp_path / "allowed"
        allow.mkdir()
        _, console_secret = make_keypair(tmp_path / "console", "console")
        shutil.copy(console_secret.with_suffix(".key"), allow)
        launcher = Launcher(tmp_path)
        try:
            agent = launcher.start(curve_enabled="true", curve_server_secret=agent_secret, curve_allow_dir=allow,
                                   curve_require_subscribers="true", agent_id="secure")
            secure = start_console(tmp_path, [agent.publish], "--curve-secret", str(console_secret),
                                   "--curve-server-key", str(pub_key))
            plain = start_console(tmp_path, [agent.publish])
            try:
                wait_for(lambda: "secure" in secure.summary()["agents"], 15, "a heartbeat over CURVE")
                seen = secure.summary()["console"]["received"]["heartbeat"]
                # Two more heartbeats reached the CURVE console while the plaintext one was connected too.
                wait_for(lambda: secure.summary()["console"]["received"]["heartbeat"] >= seen + 2, 10, "heartbeats")
                assert plain.summary()["agents"] == {}
                assert plain.summary()["console"]["received"] == {}
            finally:
                secure.stop()
                plain.stop()
        finally:
            launcher.close()

