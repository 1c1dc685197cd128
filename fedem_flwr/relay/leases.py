"""Leases: timed, fenced locks on adapters (pure logic; the clock is passed in as ``now``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

STATES = ("active", "released", "expired")


@dataclass(frozen=True)
class Lease:
    """One adapter handed to one node until ``deadline`` (epoch seconds from the injected clock)."""

    token: int
    adapter: str
    holder: str
    base_version: int
    adapter_version: int
    issued: float
    deadline: float
    state: str = "active"
    ended: Optional[float] = None
    outcome: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.state == "active"

    def remaining(self, now: float) -> float:
        """Seconds left before the deadline (0 once due or ended)."""
        return max(0.0, self.deadline - now) if self.active else 0.0

    def is_due(self, now: float) -> bool:
        """An active lease expires exactly at its deadline: ``now >= deadline``."""
        return self.active and now >= self.deadline
