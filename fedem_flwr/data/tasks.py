"""Keys that say which data an adapter is trained and judged on, shared by the held-out split, the
gate, the pool and the nodes' profiles. Pure: no torch, no datasets.

A language adapter is served and judged by its language's text, so its key is the language code
itself (``hi``): hubs set up before tasks existed keep every key they recorded. A task adapter adds
its data's format (``hi:chat``: conversations, scored on the assistant's turns) and, when it is
limited to one domain, the domain (``en@health``, ``en:chat@health``). Language codes hold neither
``:`` nor ``@``, so no key is ever mistaken for another.

*Held-out keys* name held-out sets (format and domain: what the gate compares). *Serving keys* name
what a node can train (format only: a node declares the formats it holds per language, and a node
without rows of a leased adapter's domain answers ``no-data`` like any node without its language).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Optional

from fedem_flwr.config.schema import TASK_FORMATS, CatalogConfig, CatalogEntry

TEXT = "text"
CHAT = "chat"
FORMATS = (TEXT, CHAT)
CAUSAL_LM = "causal-lm"  # the task of a language adapter (and of a domain adapter of plain text)


class DataKey(NamedTuple):
    language: str
    data_format: str = TEXT
    domain: str = ""

    def __str__(self) -> str:
        key = self.language if self.data_format == TEXT else f"{self.language}:{self.data_format}"
        return f"{key}@{self.domain}" if self.domain else key


def heldout_key(language: str, data_format: str = TEXT, domain: str = "") -> str:
    """The held-out set's name for ``language``'s rows of ``data_format`` (and ``domain``)."""
    return str(DataKey(language, data_format, domain))


def serve_key(language: str, data_format: str = TEXT) -> str:
    """What a node holding rows of ``data_format`` in ``language`` can train."""
    return heldout_key(language, data_format)


def parse_key(key: str) -> DataKey:
    """The parts of a held-out or serving key (``en:chat@health`` -> ``DataKey('en', 'chat', 'health')``)."""
    rest, _, domain = key.partition("@")
    language, _, data_format = rest.partition(":")
    return DataKey(language, data_format or TEXT, domain)


def node_serving(languages: Iterable[str], chat_languages: Iterable[str] = ()) -> tuple[str, ...]:
    """What a node can train: its languages' text (any row reads as text) and the chat it declared."""
    keys = [serve_key(lang) for lang in sorted(set(languages))]
    keys += [serve_key(lang, CHAT) for lang in sorted(set(chat_languages))]
    return tuple(keys)


@dataclass(frozen=True)
class AdapterTerms:
    """What an adapter is (task, languages, domain), what judges it and whether merges may absorb it:
    its catalog entry, or for an adapter the catalog does not name, a language adapter."""

    name: str
    task: str
    languages: tuple[str, ...]
    domain: str = ""
    mergeable: bool = True
    margin: Optional[float] = None  # None: the gate's own
    tolerance: Optional[float] = None

    @property
    def data_format(self) -> str:
        return TASK_FORMATS.get(self.task, TEXT)

    @property
    def heldout_keys(self) -> tuple[str, ...]:
        """The held-out sets its pushes are judged on, one per language."""
        return tuple(heldout_key(lang, self.data_format, self.domain) for lang in self.languages)

    @property
    def serving(self) -> tuple[str, ...]:
        """What a node must hold to be leased it (one of these)."""
        return tuple(serve_key(lang, self.data_format) for lang in self.languages)


def adapter_terms(name: str, languages: Iterable[str], task: str, catalog: Optional[CatalogConfig]) -> AdapterTerms:
    """The terms of a registered adapter: from its catalog entry when it has one."""
    entry = catalog.entry(name) if catalog is not None else None
    if entry is None:
        task = task or CAUSAL_LM
        return AdapterTerms(name, task, tuple(languages), mergeable=task == CAUSAL_LM)
    return terms_of_entry(entry)


def terms_of_entry(entry: CatalogEntry) -> AdapterTerms:
    return AdapterTerms(entry.name, entry.task, tuple(entry.languages), entry.domain, entry.mergeable,
                        entry.margin, entry.tolerance)
