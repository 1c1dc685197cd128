"""A virtual clock: simulated epoch seconds that move only when the simulation says so.

The relay Strategy, the coordinator, the leases, backoff and the base keeper all take a clock
(``() -> float``); in a simulation they share one ``VirtualClock``, so a day of three-hour leases is
decided exactly as in deployment while no one waits for it.
"""

from __future__ import annotations

import time
from typing import Optional


class VirtualClock:
    """Starts at ``start`` (default: the real time now, so registry dates stay plausible)."""

    def __init__(self, start: Optional[float] = None) -> None:
        self.start = time.time() if start is None else float(start)
        self._now = self.start

    def __call__(self) -> float:
        return self._now

    @property
    def elapsed(self) -> float:
        """Simulated seconds since the start."""
        return self._now - self.start

    def advance_to(self, when: float) -> None:
        """Move to ``when``; a clock never goes back."""
        if when < self._now:
            raise ValueError(f"a virtual clock cannot go back (now {self._now}, asked {when}).")
        self._now = float(when)
