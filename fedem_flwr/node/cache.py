"""A node's cache of base checkpoints, by manifest digest: each base is fetched once, and at most
``cache-max-bases`` of them are kept.

Node config keys (``flower-supernode --node-config``):

``cache-dir``        where base checkpoints are cached (default: ``$FEDEM_CACHE``, else
                     ``$XDG_CACHE_HOME/fedem``, else ``~/.cache/fedem``)
``cache-max-bases``  how many base checkpoints to keep (a positive integer, default 2); the least
                     recently used go first, never the one in use

A base is written into a temporary folder, checked against its digest, fsynced and renamed into place,
so a reader never sees half a base, even after a crash of the machine. Recency is the folder's
modification time, set on every use; an evicted base is renamed away before it is deleted, so a
reader never sees half a base then either.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Union

from fedem_flwr.durable import rename_into_place
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.manifest import DigestMismatch, digest

log = logging.getLogger(__name__)

NodeConfig = Mapping[str, Union[bool, int, float, str]]
DEFAULT_MAX_BASES = 2


class BaseCache:
    """Base checkpoints by manifest digest, at most ``max_bases`` of them, least recently used out first."""

    def __init__(self, root: Path, max_bases: int = DEFAULT_MAX_BASES, clock: Callable[[], float] = time.time) -> None:
        if isinstance(max_bases, bool) or not isinstance(max_bases, int) or max_bases < 1:
            raise ConfigError(
                f"`cache-max-bases` is {max_bases!r}; it must be a positive integer (the base in use is always "
                f"kept), e.g. --node-config 'cache-max-bases={DEFAULT_MAX_BASES}'."
            )
        self.root = root
        self.max_bases = max_bases
        self.clock = clock

    @classmethod
    def for_node(cls, node_config: NodeConfig, env: Mapping[str, str] = os.environ) -> "BaseCache":
        max_bases = node_config.get("cache-max-bases", DEFAULT_MAX_BASES)
        if node_config.get("cache-dir"):
            root = Path(str(node_config["cache-dir"])).expanduser()
        elif env.get("FEDEM_CACHE"):
            root = Path(env["FEDEM_CACHE"]).expanduser()
        else:
            root = Path(env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "fedem"
        return cls(root, max_bases)

    def path(self, base_digest: str) -> Path:
        return self.root / "bases" / base_digest

    def has(self, base_digest: str) -> bool:
        return self.path(base_digest).is_dir()

    def digests(self) -> list[str]:
        folder = self.root / "bases"
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if folder.is_dir() else []

    def use(self, base_digest: str) -> Path:
        """The cached base's folder, marked as just used (it is the last to be evicted)."""
        target = self.path(base_digest)
        now = self.clock()
        os.utime(target, (now, now))
        return target

    def add(self, base_digest: str, write: Callable[[Path], None]) -> Path:
        """Write into a temp folder, check the digest, rename into place, then evict beyond ``max_bases``."""
        target = self.path(base_digest)
        if not target.is_dir():
            self._write(target, base_digest, write)
        self.use(base_digest)
        self.evict(keep=base_digest)
        return target

    def evict(self, keep: str) -> list[str]:
        """Delete the least recently used bases beyond ``max_bases``, never ``keep``; returns those deleted."""
        others = [d for d in self.digests() if d != keep]
        others.sort(key=lambda d: (self._used(d), d), reverse=True)  # most recent first
        evicted = others[self.max_bases - 1:]
        for name in evicted:
            doomed = self.path(name)
            trash = doomed.with_name(f".evicted-{name}-{os.getpid()}")
            try:
                os.replace(doomed, trash)
            except FileNotFoundError:
                continue  # another process on this machine evicted it first
            shutil.rmtree(trash, ignore_errors=True)
            log.info("Base cache: evicted %s (keeping %d)", name, self.max_bases)
        return evicted

    def _used(self, base_digest: str) -> float:
        try:
            return self.path(base_digest).stat().st_mtime
        except FileNotFoundError:
            return float("-inf")

    def _write(self, target: Path, base_digest: str, write: Callable[[Path], None]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=target.parent))
        try:
            write(tmp)
            got = digest(tmp)
            if got != base_digest:
                raise DigestMismatch(f"base checkpoint received with digest {got}, expected {base_digest}")
            rename_into_place(tmp, target)
        except FileExistsError:
            pass  # another process on this machine cached it first
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
