"""Rate-limited logging: a flood of bad clients must not become a flood of log lines."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Logs at most `burst` messages per key in each `window` seconds, then counts the rest."""

    def __init__(self, logger: logging.Logger, burst: int = 5, window: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._windows: dict[str, list[float | int]] = {}  # key -> [window start, logged, dropped]

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log a warning unless this key already logged `burst` times in the current window."""
        now = time.monotonic()
        state = self._windows.get(key)
        if state is None or now - state[0] >= self.window:
            if state is not None and state[2]:
                self.logger.warning("%d more %r messages suppressed", state[2], key)
            state = self._windows[key] = [now, 0, 0]
        if state[1] < self.burst:
            state[1] += 1
            self.logger.warning(message, *args)
        else:
            state[2] += 1
