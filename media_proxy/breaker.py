"""A circuit breaker: after a run of failures, stop asking a dead dependency for a while.

A dead S3 must tie up neither the proxy's workers nor Synapse's thread pool: once
`threshold` calls in a row have failed, calls are refused at once for `cooldown` seconds;
then one trial call is let through (half-open), whose result closes or re-opens the circuit.
Pure state with an injectable clock; one instance per worker process and dependency.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._trial = False  # a half-open trial call is under way

    @property
    def state(self) -> str:
        """closed | open | half-open, for logs, metrics and the readiness answer."""
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until and not self._trial else "half-open"

    def allow(self) -> bool:
        """May a call be made now? In half-open state only one trial at a time."""
        if self._open_until is None:
            return True
        if self._clock() < self._open_until or self._trial:
            return False
        self._trial = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._open_until = None
        self._trial = False

    def failure(self) -> bool:
        """Record a failed call; True when this failure opened (or re-opened) the circuit."""
        self._failures += 1
        if self._trial or self._failures >= self.threshold:
            self._trial = False
            self._open_until = self._clock() + self.cooldown
            return True
        return False
