"""Contributor pseudonyms: a keyed hash of the identity, so evaluations and listings never carry it.

An identity is the contributor's key (``pk:<sha256>``, ``sim:<partition-id>`` or ``node:<node_id>``,
see DESIGN decision 11). Its pseudonym is ``c-`` plus the first 12 hex digits of
HMAC-SHA256(secret, identity). The secret lives in the hub folder (``<hub>/secret``, mode 0600) and
never in the registry, so a copy of the database alone cannot confirm a guessed identity.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional, Union

from fedem_flwr.durable import atomic_write
from fedem_flwr.errors import HubError

PREFIX = "c-"
DIGITS = 12  # 48 bits: a collision needs ~16 million contributors; the registry still refuses one
_SECRET_BYTES = 32


def pseudonym_of(identity: str, secret: bytes) -> str:
    """The pseudonym of ``identity`` under ``secret``, e.g. ``c-3f9a1b2c4d5e``."""
    if not isinstance(identity, str) or not identity:
        raise ValueError(f"`identity` is {identity!r}; it must be a non-empty string such as 'node:42'.")
    if len(secret) < 16:
        raise ValueError("the pseudonym secret must be at least 16 bytes.")
    digest = hmac.new(secret, identity.encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:DIGITS]


def load_or_create_secret(path: Union[str, os.PathLike], secret: Optional[bytes] = None) -> bytes:
    """Read the secret at ``path``; create it (mode 0600) on first use: random, or ``secret`` (a
    simulation study gives every cell of a seed the same one, hence the same held-out split).

    Creation writes a temporary file and hard-links it into place (``atomic_write(overwrite=False)``),
    which fails if another process won the race: then its secret is read. The secret is never
    rewritten, since every pseudonym recorded so far depends on it.
    """
    path = Path(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        with atomic_write(path, "w", permissions=0o600, overwrite=False) as handle:
            handle.write((secret.hex() if secret is not None else secrets.token_hex(_SECRET_BYTES)) + "\n")
    except FileExistsError:
        pass  # another process created it first: its secret is the one
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise HubError(
            f"the pseudonym secret {str(path)!r} is malformed; restore it from a backup (pseudonyms "
            "recorded so far depend on it), or delete it only for a hub with no contributors yet."
        )
    return secret
