"""Kill points for tests on real processes: a hub that dies at an exact step (node faults, which
change Flower replies, are in ``fedem_flwr.protocol.faults``).

A kill point is armed by the environment, so a test can crash a real hub process at an exact step
and check what a restart makes of the state left behind::

    FEDEM_KILL_AT=after-artifact-write                      the first artifact write
    FEDEM_KILL_AT='after-artifact-write:*/adapter-*@v1'     the first write whose `repo@revision` matches

Points (each called by the code that owns the step):

- ``after-artifact-write``: an artifact revision is stored whole (local folder renamed into place and
  listed, or Hub commit tagged) and its registry row is not yet committed.

Unarmed, a kill point costs one environment lookup.
"""

from __future__ import annotations

import fnmatch
import os
import signal

KILL_ENV = "FEDEM_KILL_AT"
POINTS = ("after-artifact-write",)


def kill_point(point: str, where: str = "") -> None:
    """Die with SIGKILL here when ``FEDEM_KILL_AT`` names ``point`` (and its pattern matches ``where``)."""
    assert point in POINTS, point
    armed = os.environ.get(KILL_ENV)
    if not armed:
        return
    name, _, pattern = armed.partition(":")
    if name == point and (not pattern or fnmatch.fnmatchcase(where, pattern)):
        os.kill(os.getpid(), signal.SIGKILL)
