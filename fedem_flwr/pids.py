"""Whether a process id names a live process: shared by the hub's writer lock and the launcher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pid_alive(pid: Any) -> bool:
    """True when ``pid`` exists and is not a zombie (a zombie holds no lock and serves nothing)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return _signal_alive(pid)
    return state != "Z"


def _signal_alive(pid: int) -> bool:
    # Where /proc is missing: signal 0 checks existence without touching the process.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
