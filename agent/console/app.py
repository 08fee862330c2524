"""The console's ASGI app: the page, a JSON API under /api, server-sent events, images by id, token checks.

POST /api/thresholds is the one route that changes something outside the console: it forwards an operator's
threshold change to the agent's control socket (SPEC 12, the same command as `tdn thresholds`) and answers with
the agent's reply; the agent checks the token, applies the change and logs who made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.console.state import ConsoleState
from agent.errors import TdnError
from protocol import ProtocolError
from protocol.control import Command, Outcome
from protocol.control import Request as ControlRequest

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "tdn_console_token"
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Guard:
    """ASGI middleware: with a token, every request must carry it; without one, only loopback Host names pass."""

    def __init__(self, app: ASGIApp, token: str | None, allowed_hosts: set[str]) -> None:
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    def _presented(self, scope: Scope) -> tuple[str | None, bool]:
        """The token the request carries and whether it came in the query string (then set the cookie)."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if "x-tdn-token" in headers:
            return headers["x-tdn-token"], False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            return None, False
        return (cookie[COOKIE].value if COOKIE in cookie else None), False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.token is None:
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1").lower()
            # DNS rebinding: a foreign page resolving its own name to 127.0.0.1 arrives with a foreign Host.
            if host not in self.allowed_hosts:
                await PlainTextResponse("unexpected Host header", status_code=403)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        presented, from_query = self._presented(scope)
        if presented is None or not hmac.compare_digest(presented.encode(), self.token.encode()):
            await PlainTextResponse("console token required", status_code=401)(scope, receive, send)
            return
        if not from_query:
            await self.app(scope, receive, send)
            return
        token = self.token

        async def send_with_cookie(message: Message) -> None:
            # A page opened with ?token= keeps it in a cookie, so its API calls, images and event stream pass.
            if message["type"] == "http.response.start":
                cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


@dataclass(frozen=True)
class ControlTargets:
    """The agents whose thresholds the console may change (--control), the control token and the CURVE keys."""

    endpoints: dict[str, str]  # agent_id -> its control_endpoint
    token: str
    curve: Any = None  # simulators.common.CurveKeys, or None for plaintext
    timeout_s: float = 3.0  # agent.cli.thresholds.DEFAULT_TIMEOUT_S


# HTTP status of each agent outcome; the body always carries the outcome and the agent's detail.
_STATUS = {Outcome.OK: 200, Outcome.BAD_VALUE: 400, Outcome.BAD_REQUEST: 400, Outcome.UNAUTHORIZED: 403,
           Outcome.UNAVAILABLE: 503}
_CHANGE_FIELDS = ("agent_id", "thresholds", "reset", "operator")


async def _json_body(request: Request) -> tuple[Any, tuple[int, str] | None]:
    """The JSON body, or (status, message) when it is not application/json or does not parse."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        # A cross-site form cannot send JSON without a preflight this server never answers.
        return None, (415, "send application/json")
    try:
        return await request.json(), None
    except ValueError:
        return None, (400, "bad JSON")


def _message(outcome: str, detail: str) -> str:
    # A protocol error's text already starts with its reason ("bad_value: ..."), which is then the outcome.
    return detail if detail.startswith(outcome) else f"{outcome}: {detail}" if detail else outcome


def _refused(status: int, outcome: str, detail: str, agent_id: str = "") -> JSONResponse:
    """A change the console itself refused (the agent was not asked, or did not answer)."""
    return JSONResponse({"outcome": outcome, "detail": detail, "error": _message(outcome, detail),
                         "agent_id": agent_id, "refused_by": "console"}, status_code=status)


def parse_change(body: object) -> tuple[str, str, Command, dict[str, float]]:
    """(agent_id, operator, command, thresholds) of a POST /api/thresholds body; ValueError saying what is wrong.

    Ranges and names are left to protocol.control.Request, which checks them exactly as the agent does.
    """
    if not isinstance(body, dict):
        raise ValueError("send a JSON object")
    unknown = sorted(set(body) - set(_CHANGE_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:64]!r}; expected {', '.join(_CHANGE_FIELDS)}")
    agent_id, operator, reset = body.get("agent_id"), body.get("operator"), body.get("reset", False)
    thresholds = body.get("thresholds")
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError("agent_id (string) required")
    if not isinstance(operator, str) or not operator:
        raise ValueError("operator (string: who makes the change, for the agent's log) required")
    if not isinstance(reset, bool):
        raise ValueError("reset must be true or false")
    if reset:
        if thresholds:
            raise ValueError("give thresholds or reset, not both")
        return agent_id, operator, Command.RESET_THRESHOLDS, {}
    return agent_id, operator, Command.SET_THRESHOLDS, _numbers(thresholds)


def _numbers(thresholds: object) -> dict[str, float]:
    if not isinstance(thresholds, dict) or not thresholds:
        raise ValueError("thresholds (an object of name: number) or reset: true required")
    values: dict[str, float] = {}
    for name, value in thresholds.items():
        if name == "ood_threshold" and value is None:
            values[name] = math.inf  # JSON has no infinity: null turns the OOD check off
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or abs(value) > 1e300:
            raise ValueError(f"thresholds.{name[:64]} must be a number"
                             + (" (or null: OOD check off)" if name == "ood_threshold" else ""))
        else:
            values[name] = float(value)
    return values


def reply_json(reply: Any) -> dict[str, Any]:
    """A protocol.control.Reply as JSON (an OOD check that is off, inf, is null)."""
    out = {"outcome": reply.outcome.value, "detail": reply.detail, "agent_id": reply.agent_id,
           "model_id": reply.model_id, "overridden": list(reply.overridden),
           "thresholds": {k: (v if math.isfinite(v) else None) for k, v in reply.thresholds.items()}}
    if not reply.ok:
        out["error"] = _message(reply.outcome.value, reply.detail)
        out["refused_by"] = "agent"
    return out


def _call_agent(endpoint: str, request: ControlRequest, timeout_s: float, curve: Any) -> Any:
    # Imported here, in the worker thread: the command-line package costs most of a second to import.
    from agent.cli.thresholds import call

    return call(endpoint, request, timeout_s, curve)


class _Api:
    """The page and the JSON API over one console state (every handler takes the state lock briefly)."""

    def __init__(self, state: ConsoleState, lock: threading.Lock, push_interval_s: float,
                 closing: threading.Event, control: ControlTargets | None = None) -> None:
        self.state, self.lock, self.push_interval_s, self.closing = state, lock, push_interval_s, closing
        self.control = control
        self._cache_t, self._cache_body = -1.0, b"{}"

    def summary_json(self) -> bytes:
        # Several open pages share one snapshot per push interval instead of each taking the lock.
        now = time.monotonic()
        if now - self._cache_t >= self.push_interval_s * 0.8:
            with self.lock:
                body = json.dumps(self.state.summary(), separators=(",", ":")).encode()
            self._cache_t, self._cache_body = now, body
        return self._cache_body

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def summary(self, request: Request) -> Response:
        return Response(self.summary_json(), media_type="application/json")

    async def review(self, request: Request) -> Response:
        with self.lock:
            listing = self.state.review.listing()
        return JSONResponse(listing)

    async def label(self, request: Request) -> Response:
        body, bad = await _json_body(request)
        if bad is not None:
            return JSONResponse({"error": bad[1]}, status_code=bad[0])
        name = body.get("class_name") if isinstance(body, dict) else None
        if not isinstance(name, str):
            return JSONResponse({"error": "class_name (string) required"}, status_code=400)
        item_id = int(request.path_params["item_id"])
        try:
            with self.lock:
                item = self.state.review.label(item_id, name, self.state.known_labels())
        except KeyError:
            return JSONResponse({"error": "no such review item"}, status_code=404)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(item.meta())

    async def thresholds(self, request: Request) -> Response:
        """Forward a threshold change (or a reset) to the agent's control socket; answer with its reply."""
        body, bad = await _json_body(request)
        if bad is not None:
            return _refused(bad[0], "bad_request", bad[1])
        try:
            agent_id, operator, command, values = parse_change(body)
        except ValueError as exc:
            return _refused(400, "bad_request", str(exc))
        endpoint = self.control.endpoints.get(agent_id) if self.control else None
        if self.control is None or endpoint is None:
            return _refused(404, "no_control", f"agent {agent_id[:64]!r} has no --control entry on this console: "
                            f"its thresholds are read-only here", agent_id)
        try:
            req = ControlRequest(command, self.control.token, operator, values)
        except ProtocolError as err:  # the agent's own rules (protocol.control): it would refuse the same way
            outcome = Outcome.BAD_VALUE if err.reason == "bad_value" else Outcome.BAD_REQUEST
            return _refused(400, outcome.value, str(err), agent_id)
        try:
            reply = await run_in_threadpool(_call_agent, endpoint, req, self.control.timeout_s, self.control.curve)
        except ProtocolError as err:
            return _refused(502, "bad_reply", f"{endpoint} answered with something else than a control reply: {err}",
                            agent_id)
        except TdnError as exc:
            return _refused(504, "no_answer", str(exc), agent_id)
        return JSONResponse(reply_json(reply), status_code=_STATUS.get(reply.outcome, 502))

    async def image(self, request: Request) -> Response:
        source, which = request.path_params["source"], request.path_params["which"]
        with self.lock:
            data = self.state.image(source, int(request.path_params["item_id"]), which)
        if data is None:
            return PlainTextResponse("no such image", status_code=404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    async def events(self, request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield b"retry: 1000\n\n"
            while not self.closing.is_set():
                yield b"data: " + self.summary_json() + b"\n\n"
                await asyncio.sleep(self.push_interval_s)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def create_app(state: ConsoleState, lock: threading.Lock, *, token: str | None = None,
               allowed_hosts: set[str] | None = None, push_interval_s: float = 0.25,
               closing: threading.Event | None = None, control: ControlTargets | None = None) -> ASGIApp:
    """The Starlette app wrapped in the token/Host guard; setting `closing` ends the open event streams."""
    done = closing or threading.Event()
    api = _Api(state, lock, push_interval_s, done, control)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        done.set()

    app = Starlette(
        routes=[
            Route("/", api.index),
            Route("/api/summary", api.summary),
            Route("/api/review", api.review),
            Route("/api/review/{item_id:int}/label", api.label, methods=["POST"]),
            Route("/api/thresholds", api.thresholds, methods=["POST"]),
            Route("/api/images/{source}/{item_id:int}/{which}", api.image),
            Route("/api/events", api.events),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    return Guard(app, token, allowed_hosts or set())
