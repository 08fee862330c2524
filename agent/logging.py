"""structlog set-up, done once per process: JSON lines off a TTY, readable console on one."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

_configured = False


def configure(level: str = "INFO", json: bool | None = None, native: bool = False) -> None:
    """Configure structlog for the whole process; later calls are ignored.

    native: also turn what native libraries write to fd 2 (libjpeg's "Corrupt JPEG data", TensorFlow's C++
    log) into JSON log events, so the journal stays one JSON object per line.
    """
    global _configured
    if _configured:
        return
    _configured = True
    if json is None:
        json = not sys.stderr.isatty()
    if json and native:
        _route_native_stderr()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _route_native_stderr() -> None:
    """Point fd 2 at a pipe whose lines a daemon thread logs as events; Python's own stderr keeps the real fd."""
    import os
    import re
    import threading

    real = os.dup(2)
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace")

    def pump() -> None:
        limited = RateLimited(structlog.get_logger("native"), burst=20, window_s=10.0)
        with os.fdopen(r, "r", encoding="utf-8", errors="replace") as pipe:
            for line in pipe:
                text = line.rstrip()
                if text:
                    limited.warning("native output", re.sub(r"\d+", "N", text)[:40], line=text[:500])

    threading.Thread(target=pump, name="tdn-native-stderr", daemon=True).start()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


class RateLimited:
    """Log at most `burst` lines per key per `window_s`; the next line after a window says how many it held back.

    A peer sending 6,000 bad frames must not write 6,000 warnings: the counters already count every one, the
    log only has to say what kind of thing is happening, and how often.
    """

    def __init__(self, log: Any, burst: int = 5, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (window start, logged, suppressed)

    def warning(self, event: str, key: str, **fields: Any) -> bool:
        """Log `event` for `key` unless its window's burst is spent; True when a line was written."""
        now = self.clock()
        start, logged, held = self._windows.get(key, (now, 0, 0))
        if now - start >= self.window_s:
            start, logged = now, 0
        if logged >= self.burst:
            self._windows[key] = (start, logged, held + 1)
            return False
        if held:
            fields["suppressed"] = held
        self.log.warning(event, **fields)
        self._windows[key] = (start, logged + 1, 0)
        return True
