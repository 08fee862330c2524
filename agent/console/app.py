"""The console's ASGI app: the page, a JSON API under /api, server-sent events, images by id, token checks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agent.console.state import ConsoleState

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


class _Api:
    """The page and the JSON API over one console state (every handler takes the state lock briefly)."""

    def __init__(self, state: ConsoleState, lock: threading.Lock, push_interval_s: float,
                 closing: threading.Event) -> None:
        self.state, self.lock, self.push_interval_s, self.closing = state, lock, push_interval_s, closing
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
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            # A cross-site form cannot send JSON without a preflight this server never answers.
            return JSONResponse({"error": "send application/json"}, status_code=415)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "bad JSON"}, status_code=400)
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
               closing: threading.Event | None = None) -> ASGIApp:
    """The Starlette app wrapped in the token/Host guard; setting `closing` ends the open event streams."""
    done = closing or threading.Event()
    api = _Api(state, lock, push_interval_s, done)

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
            Route("/api/images/{source}/{item_id:int}/{which}", api.image),
            Route("/api/events", api.events),
            Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    return Guard(app, token, allowed_hosts or set())
