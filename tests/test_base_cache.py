"""A node's base cache holds at most ``cache-max-bases`` checkpoints, least recently used out first,
never the one in use."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.manifest import DigestMismatch, digest
from fedem_flwr.node.cache import BaseCache


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 10
        return self.now


def make_base(tmp_path: Path, name: str) -> tuple[str, callable]:
    """A tiny 'checkpoint' folder: its digest and a writer that copies it where the cache says."""
    source = tmp_path / "sources" / name
    source.mkdir(parents=True)
    (source / "config.json").write_text(f'{{"name": "{name}"}}')
    (source / "model.safetensors").write_bytes(name.encode() * 100)

    def write(folder: Path) -> None:
        for path in source.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())

    return digest(source), write


@pytest.fixture
def bases(tmp_path):
    return {name: make_base(tmp_path, name) for name in ("a", "b", "c", "d")}


def add(cache: BaseCache, bases, name: str) -> Path:
    base_digest, write = bases[name]
    return cache.add(base_digest, write)


def names(cache: BaseCache, bases) -> set[str]:
    by_digest = {d: name for name, (d, _) in bases.items()}
    return {by_digest[d] for d in cache.digests()}


def test_at_most_max_bases_least_recently_added_out_first(tmp_path, bases):
    cache = BaseCache(tmp_path / "cache", max_bases=2, clock=Clock())

    add(cache, bases, "a")
    add(cache, bases, "b")
    assert names(cache, bases) == {"a", "b"}
    path = add(cache, bases, "c")

    assert names(cache, bases) == {"b", "c"}
    assert path.is_dir() and digest(path) == bases["c"][0]
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache" / "bases").iterdir())  # no leftovers


def test_a_base_used_again_is_kept_over_an_older_one(tmp_path, bases):
    cache = BaseCache(tmp_path / "cache", max_bases=2, clock=Clock())
    add(cache, bases, "a")
    add(cache, bases, "b")

    used = cache.use(bases["a"][0])  # a is trained on again: the most recently used now
    add(cache, bases, "c")

    assert used == cache.path(bases["a"][0])
    assert names(cache, bases) == {"a", "c"}


def test_the_base_in_use_is_never_evicted(tmp_path, bases):
    cache = BaseCache(tmp_path / "cache", max_bases=1, clock=Clock())
    add(cache, bases, "a")
    add(cache, bases, "b")
    assert names(cache, bases) == {"b"}

    # re-adding a base already cached (a resent base) keeps it and touches it
    add(cache, bases, "b")
    assert names(cache, bases) == {"b"}
    assert cache.evict(keep=bases["b"][0]) == []


def test_a_bad_base_leaves_the_cache_as_it_was(tmp_path, bases):
    cache = BaseCache(tmp_path / "cache", max_bases=1, clock=Clock())
    add(cache, bases, "a")

    with pytest.raises(DigestMismatch):
        cache.add(bases["b"][0], bases["c"][1])  # c's files under b's digest

    assert names(cache, bases) == {"a"}


def test_cache_max_bases_comes_from_the_node_config(tmp_path):
    assert BaseCache.for_node({"cache-dir": str(tmp_path)}).max_bases == 2
    assert BaseCache.for_node({"cache-dir": str(tmp_path), "cache-max-bases": 5}).max_bases == 5
    for bad in (0, -1, "3", 2.5, True):
        with pytest.raises(ConfigError, match=rf"`cache-max-bases` is {bad!r}; it must be a positive integer"):
            BaseCache.for_node({"cache-dir": str(tmp_path), "cache-max-bases": bad})


def test_contributor_still_exports_the_base_cache():
    from fedem_flwr.node import contributor

    assert contributor.BaseCache is BaseCache
