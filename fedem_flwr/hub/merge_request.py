"""A merge asked for by hand (``fedem merge``): a file in the hub folder that the running hub takes.

The request is ``<hub>/merge-request.json`` (``{"requested_at": epoch seconds}``). Leaving one needs
neither the hub's writer lock nor a registry write, so ``fedem merge`` works while the hub runs and
never blocks it. The file appears whole or not at all (written under a temporary name, then linked
into place; a link never replaces an existing file, so the first of two requests is kept). The hub
takes it at its next loop turn with :func:`take_merge_request` (renamed away before it is read, so a
request left meanwhile waits for the following turn); one left while no hub runs waits for the
hub's next start.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Optional, Union

from fedem_flwr.durable import atomic_write

MERGE_REQUEST_FILE = "merge-request.json"


def merge_request_path(hub: Union[str, os.PathLike]) -> Path:
    return Path(hub) / MERGE_REQUEST_FILE


def request_merge(hub: Union[str, os.PathLike], now: float) -> tuple[dict[str, Any], bool]:
    """Leave a merge request; returns it and whether it is new (False: one was already waiting)."""
    request = {"requested_at": float(now)}
    try:
        with atomic_write(merge_request_path(hub), "w", overwrite=False) as out:
            out.write(json.dumps(request, sort_keys=True) + "\n")
    except FileExistsError:  # a request is already waiting: the first one is kept
        return pending_merge_request(hub) or request, False
    return request, True


def pending_merge_request(hub: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The waiting request, or None. Unreadable content still counts as a request (time unknown)."""
    try:
        text = merge_request_path(hub).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return _parse(text)


def take_merge_request(hub: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The hub's side: remove the waiting request and return it (None when there is none)."""
    final = merge_request_path(hub)
    taken = final.with_name(f".{MERGE_REQUEST_FILE}.taken-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(final, taken)
    except FileNotFoundError:
        return None
    try:
        return _parse(taken.read_text(encoding="utf-8"))
    finally:
        taken.unlink(missing_ok=True)


def _parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    when = data.get("requested_at") if isinstance(data, dict) else None
    ok = isinstance(when, (int, float)) and not isinstance(when, bool)
    return {"requested_at": float(when) if ok else None}
