"""The operator console against a real agent and NEU-DET cameras, driven in a real headless Chromium."""

from __future__ import annotations

import json
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

from agent.security import make_keypair
from protocol import AgentState, Heartbeat, encode_heartbeat
from tests.conftest import ROOT, free_port
from tests.integration.agentproc import Launcher

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
SCREENSHOTS = ROOT / "agent" / "console" / "static" / "screenshots"
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


def http(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of a request; 0 when nothing answers."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
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
    """An agent, two NEU-DET cameras and a console watching them."""

    agent_publish: str
    console: Console
    cameras: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory, neu_det: Path, shipped_model: Path) -> Iterator[Line]:
    """The line for the whole module: one agent (snapshots every 0.3 s), 2 cameras at 20 fps, one console."""
    tmp = tmp_path_factory.mktemp("console")
    launcher = Launcher(tmp)
    agent = launcher.start(explain_interval_s=0.3, agent_id="a1")
    # Every verdict below 0.97 confidence is queued for review: this agent publishes no review decision yet.
    console = start_console(tmp, [agent.publish], "--review-below", "0.97", "--review-cap", "500")
    cameras = subprocess.Popen([sys.executable, "-m", "simulators.camera", "--endpoint", agent.frames,
                                "--cameras", "2", "--fps", "20", "--shuffle", "--source", str(neu_det), "--quiet"])
    try:
        yield Line(agent.publish, console, cameras)
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

