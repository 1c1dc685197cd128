"""Whether a process still runs: shared by the hub's writer lock and the launcher."""

from __future__ import annotations

from typing import Any

import psutil


def pid_alive(pid: Any) -> bool:
    """True when ``pid`` exists and is not a zombie (a zombie holds no lock and serves nothing)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        return process_alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def process_alive(proc: psutil.Process) -> bool:
    """True while ``proc`` runs: this very process, not a later one that reuses its pid; a zombie has ended."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True
