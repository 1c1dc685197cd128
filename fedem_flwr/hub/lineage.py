"""Writing versions of the lineage with their filled model cards: artifact + card, then registry row.

Every version in the store carries its card from the moment it is written (the card is README.md in
the folder before ``store.put``, so the digest covers it), built from what the registry knows and what
is about to be recorded, with no clock (``hub.model_card``). The order is DESIGN decision 12's: the
artifact is written and renamed into place, then its registry row commits, so a crash leaves at worst
an orphan that the next write of that revision replaces.

API (the hub's loop calls these; none imports torch or Flower):

- ``publish_base(registry, store, folder, *, parent, source, metrics, created, absorbed=(), repo=None)
  -> Checkpoint``: the next base version (a merge or a CPT checkpoint that passed its gate), with
  the merge's absorbed ``(adapter, version, weight, method, seed)`` recorded in the same transaction.
- ``record_attempt(registry, *, source, parent, reason, details, created) -> BaseAttempt``: a merge or
  CPT checkpoint that was not published.
- ``store_adapter_version(registry, store, folder, *, adapter, base_version, parent_version, kind,
  metrics, created) -> AdapterVersion``: a version with no contribution (``rebase``: an absorbed
  adapter continuing on the new base, from a zero delta or from its residual).
- ``write_adapter_card(folder, registry, store, ..., task=None, chat_template=None)``: the card of an
  adapter version about to be stored (the relay coordinator writes it between saving an accepted push
  and storing it; the hub's start writes each fresh adapter's before registering it).
- ``checkpoint_card`` / ``version_card``: the cards of recorded versions (``fedem publish``).

An adapter card's ``fedem_record`` (``hub.model_card``) lets a restore rebuild the version's row from the
store: a push's contribution id (the next one, as the coordinator records it right after storing the
version), its lease token (the contributor's active lease on the adapter) and contributor; a rebase's
record. ``version_card`` rebuilds it from the recorded rows, so both cards are the same bytes.

An adapter card's task, domain and languages are its terms as the registry reads them
(``hub.terms``: the recorded catalog, else a language adapter), so the card written with a version
and the one ``fedem publish`` rebuilds for it are the same bytes. A chat adapter's card shows the chat
template saved with its base's tokenizer (``base_chat_template``; pass it to ``version_card`` too).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import ModelCard

from fedem_flwr.data.tasks import CHAT
from fedem_flwr.errors import FedemError
from fedem_flwr.hub.model_card import adapter_card, base_card, write_card
from fedem_flwr.hub.records import Absorbed, AdapterVersion, BaseAttempt, Checkpoint, revision_name
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import ArtifactStore
from fedem_flwr.hub.terms import terms_of


def checkpoint_card(registry: Registry, repo_id: str, version: int, parent: Optional[int], source: str,
                    metrics: Optional[dict[str, Any]], absorbed: Sequence[Absorbed] = ()) -> ModelCard:
    """The card of base ``version``; the contributors behind each absorbed adapter come from the registry."""
    contributors = {a.adapter: registry.contributors_of(a.adapter, a.adapter_version) for a in absorbed}
    return base_card(repo_id, version, parent, source, metrics, absorbed=absorbed, contributors=contributors)


TEMPLATE_FILE = "chat_template.jinja"  # where transformers saves a tokenizer's chat template
TOKENIZER_CONFIG = "tokenizer_config.json"  # where older versions kept it


# Each store's base chat templates read so far, by (repo, revision, digest): a stored base never changes, so
# a chat push's card reads its base's once (a store on a Hugging Face Hub resolves the whole revision to read it).
_templates: weakref.WeakKeyDictionary[Any, dict[tuple[str, str, str], Optional[str]]] = weakref.WeakKeyDictionary()


def base_chat_template(store: ArtifactStore, repo: str, revision: Optional[str],
                       digest: Optional[str] = None) -> Optional[str]:
    """The chat template saved with base ``repo``@``revision``'s tokenizer, or None when it has none or
    cannot be read (a chat adapter's card then says where it is instead of showing it). With the base's
    ``digest``, what was read is kept for the next call with the same store."""
    if not revision:
        return None
    key, known = (repo, revision, digest or ""), _kept(store) if digest else None
    if known is not None and key in known:
        return known[key]
    try:
        folder = Path(store.local_path(repo, revision))
        if (folder / TEMPLATE_FILE).is_file():
            template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        elif (folder / TOKENIZER_CONFIG).is_file():
            template = _template_of(json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8")))
        else:
            template = None
    except (FedemError, OSError, ValueError, TypeError):
        return None  # not kept: the next card tries again
    if known is not None:
        known[key] = template
    return template


def _kept(store: ArtifactStore) -> Optional[dict[tuple[str, str, str], Optional[str]]]:
    """The templates kept for ``store``; None for a store that cannot key them (not weakly referable)."""
    try:
        return _templates.setdefault(store, {})
    except TypeError:
        return None


def _template_of(config: Any) -> Optional[str]:
    """``tokenizer_config.json``'s ``chat_template``: one string, or named ones (the ``default`` is shown)."""
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def version_card(registry: Registry, v: AdapterVersion, repo_id: str, base_repo_id: str, base_revision: str,
                 extra_contributors: Sequence[str] = (), chat_template: Optional[str] = None) -> ModelCard:
    """The card of adapter version ``v`` (recorded, or about to be: ``extra_contributors`` names the
    contribution not yet recorded), with its task from the registry."""
    terms = terms_of(registry, v.adapter)
    return adapter_card(repo_id, v.adapter, v.version, base_repo_id, base_revision, list(terms.languages),
                        [*registry.contributors_of(v.adapter, v.version), *extra_contributors], v.metrics,
                        parent_version=v.parent_version, base_version=v.base_version, kind=v.kind,
                        task=terms.task, domain=terms.domain, chat_template=chat_template,
                        record=_recorded(registry, v))


def _recorded(registry: Registry, v: AdapterVersion) -> dict[str, Any]:
    """The ``fedem_record`` of recorded version ``v``: its accepted contribution, or its rebase record."""
    if v.kind != "push":
        return _rebase_record(v.metrics.get("rebase")) if v.kind == "rebase" else {}
    pushed = registry.accepted_contribution(v.adapter, v.version)
    if pushed is None:  # a push re-registered by a restore whose contributor it did not know
        return {}
    lease = pushed.lease_token  # a contribution restored from a card keeps the card's token aside
    if lease is None:
        lease = (pushed.validation.get("restored") or {}).get("lease")
    return _push_fields(pushed.id, lease, pushed.pseudonym)


def _rebase_record(rebase: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    return {"rebase": dict(rebase)} if rebase else {}


def _push_fields(contribution: int, lease: Optional[int], contributor: str) -> dict[str, Any]:
    fields = {"contribution": contribution, "lease": lease, "contributor": contributor}
    return {key: value for key, value in fields.items() if value is not None}


def _push_record(registry: Registry, adapter: str, contributor: Optional[str]) -> dict[str, Any]:
    """The ``fedem_record`` of a push about to be recorded: the contribution id the registry gives next
    (the coordinator records it right after the version) and the contributor's active lease on ``adapter``."""
    if not contributor:
        return {}
    contribution = registry.next_contribution_id()
    held = [lease.token for lease in registry.leases(active_only=True)
            if lease.adapter == adapter and registry.pseudonym(lease.holder) == contributor]
    return _push_fields(contribution, held[0] if len(held) == 1 else None, contributor)


def write_adapter_card(folder: Path, registry: Registry, store: ArtifactStore, *, repo: str, adapter: str,
                       version: int, base_version: int, parent_version: Optional[int], kind: str,
                       heldout: Mapping[str, float], contributor: Optional[str] = None,
                       languages: Optional[Sequence[str]] = None,
                       rebase: Optional[Mapping[str, Any]] = None, task: Optional[str] = None,
                       chat_template: Optional[str] = None) -> ModelCard:
    """Write the card of ``adapter`` v``version`` (not yet recorded) into ``folder``, before it is stored.

    ``contributor`` is the pseudonym of the push being accepted; the card also lists those whose
    accepted work the parent version carries. ``languages`` and ``task`` default to the adapter's
    recorded ones (``causal-lm`` for one not registered yet); ``rebase`` is a rebase version's record
    (its mode, and a residual's truncation error); ``chat_template`` the base tokenizer's, shown in a chat
    adapter's card (default: the one saved with base ``base_version``).
    """
    base = registry.checkpoint(base_version)
    if base is None:
        raise ValueError(f"`base_version` is {base_version}, but no base checkpoint has it.")
    terms = terms_of(registry, adapter, None if languages is None else list(languages), task)
    if chat_template is None and terms.data_format == CHAT:
        chat_template = base_chat_template(store, base.repo, base.revision, base.digest)
    earlier = registry.contributors_of(adapter, parent_version) if kind == "push" and parent_version is not None else []
    record = _push_record(registry, adapter, contributor) if kind == "push" else _rebase_record(rebase)
    card = adapter_card(store.repo_id(repo), adapter, version, store.repo_id(base.repo), base.revision,
                        list(terms.languages), [*earlier, *([contributor] if contributor else [])],
                        {"heldout": dict(heldout), **({"rebase": dict(rebase)} if rebase else {})},
                        parent_version=parent_version, base_version=base_version, kind=kind,
                        task=terms.task, domain=terms.domain, chat_template=chat_template, record=record)
    write_card(folder, card)
    return card


def publish_base(registry: Registry, store: ArtifactStore, folder: Path, *, parent: int, source: str,
                 metrics: Optional[dict[str, Any]], created: float,
                 absorbed: Sequence[Union[Absorbed, tuple]] = (), repo: Optional[str] = None,
                 message: Optional[str] = None) -> Checkpoint:
    """Store ``folder`` (a saved base model) as the next base version with its card, then record it.

    ``repo`` defaults to the parent's repo. ``metrics`` keys: ``heldout`` (loss per language), ``cpt``
    {steps, tokens}, ``merge`` {method, seed}. The card is written into ``folder``.
    """
    parent_row = registry.checkpoint(parent)
    if parent_row is None:
        raise ValueError(f"`parent` is {parent}, but no base checkpoint has that version.")
    rows = [a if isinstance(a, Absorbed) else Absorbed(*a) for a in absorbed]
    repo = repo or parent_row.repo
    version = registry.next_checkpoint_version()
    revision = revision_name(version)
    write_card(folder, checkpoint_card(registry, store.repo_id(repo), version, parent, source, metrics, rows))
    ref = store.put(repo, revision, Path(folder), message=message or f"base v{version} ({source} from v{parent})",
                    replace_orphan=True)  # `version` is past the registry's latest: anything stored there is an orphan
    return registry.add_checkpoint(parent, source, ref.repo, ref.revision, ref.digest, metrics, created,
                                   version=version, absorbed=rows)


def record_attempt(registry: Registry, *, source: str, parent: Optional[int], reason: str,
                   details: Optional[dict[str, Any]], created: float) -> BaseAttempt:
    """A merge or CPT checkpoint that was not published: nothing changes but this record."""
    return registry.add_base_attempt(source, parent, reason, details, created)


def store_adapter_version(registry: Registry, store: ArtifactStore, folder: Path, *, adapter: str,
                          base_version: int, parent_version: int, kind: str, metrics: Optional[dict[str, Any]],
                          created: float, message: Optional[str] = None) -> AdapterVersion:
    """Store ``folder`` (a saved PEFT adapter) as ``adapter``'s next version of ``kind`` with its card,
    then record it (its ``metrics["heldout"]`` becomes its evaluation on ``base_version``).

    For versions without a contribution (``rebase``); an accepted push is recorded by the relay
    coordinator together with its contribution and lease.
    """
    parent = registry.latest_adapter_version(adapter)
    if parent is None:
        raise ValueError(f"`adapter` is {adapter!r}, but it has no version to continue from.")
    version = parent.version + 1
    write_adapter_card(folder, registry, store, repo=parent.repo, adapter=adapter, version=version,
                       base_version=base_version, parent_version=parent_version, kind=kind,
                       heldout=(metrics or {}).get("heldout") or {}, rebase=(metrics or {}).get("rebase"))
    ref = store.put(parent.repo, revision_name(version), Path(folder),
                    message=message or f"{adapter} v{version} ({kind} on base v{base_version})", replace_orphan=True)
    return registry.add_adapter_version(adapter, base_version, parent_version, ref.repo, ref.revision, ref.digest,
                                        metrics, created, version=version, kind=kind)
