"""What a hub was set up with: recorded in the registry at its first start, compared at every later one.

Settings (the registry's ``settings`` table, one row each)::

    lora       r, alpha, dropout, target_modules     the shape and scale of every stored adapter
    tokenizer  kind, path, bpe_merges, model_max_length
    model      the ``model`` section                  what base version 0 was built from
    data       the ``data`` section                   the corpus, its held-out split, its blocks
    store      kind, repo_prefix, endpoint, private   where the artifacts live (``fedem`` reads it)
    catalog    per_language, adapters                 which adapters the hub relays (``conf/catalog``)

A later start whose config differs in a key that gives stored artifacts or recorded losses their
meaning is refused, naming each difference. Allowed, and recorded as the new value:

- ``lora.dropout``: it acts only while a node trains; the stored weights mean the same.
- ``model.kernels``: the execution path (fused kernels or PyTorch), not the weights.
- ``data.languages`` growing (``[]`` is every language): the split is per row, keyed by its own
  language and text, so adding a language changes no other language's held-out rows; the new ones
  get adapters of their own. Removing one is refused: its adapters would lose their held-out data.
- ``data.partitioner``, ``data.dirichlet_alpha``: how simulated nodes share the training rows, not
  the hub's held-out rows.
- ``data.min_language_bytes``: which languages get a new adapter; existing adapters stay.
- ``data.heldout_fraction``, ``data.min_heldout_blocks``: which rows the hub holds out. The split is
  fingerprinted (``fedem_flwr.lineage.heldout``): when it changes, every adapter's current losses are
  re-evaluated on the new held-out set before the gate compares anything with them.
- ``hub.private``: the visibility of Hub repos created from now on.
- ``catalog``: adapters may be added (they are seeded at the next start), ``per_language`` turned on,
  and an entry's ``merge``, ``margin`` and ``tolerance`` changed (they act on what comes next). An
  entry's task, languages and domain are what its versions were trained and judged on: once it is
  seeded, changing one, or removing the entry, is refused (declare a new adapter under a new name
  instead). An entry whose start was refused (its data missing) was never seeded: fix it freely.

Everything else in these sections is refused: the tokenizer and model are baked into base version
0 (a changed value would be silently ignored), and the corpus, block size and held-out fraction
decide the blocks every adapter was trained and measured on. A hub with no base checkpoint yet
records the config as it is. A hub set up before settings were recorded is checked against the
LoRA spec its adapters were registered with.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any, Optional

from fedem_flwr.errors import ConfigError

LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
TOKENIZER_KEYS = ("kind", "path", "bpe_merges", "model_max_length", "chat")
# What a catalog entry's stored versions mean: fixed once the entry is recorded.
CATALOG_FIXED = ("task", "languages", "domain")
# (setting, key) whose change is safe (module docstring says why).
ALLOWED = {
    ("lora", "dropout"), ("model", "kernels"), ("data", "partitioner"), ("data", "dirichlet_alpha"),
    ("data", "min_language_bytes"), ("data", "heldout_fraction"), ("data", "min_heldout_blocks"),
    ("store", "private"),
}
# How a setting's key is named where the user changes it.
_STORE_KEYS = {"kind": "hub.store", "repo_prefix": "hub.repo_prefix", "endpoint": "HF_ENDPOINT",
               "private": "hub.private"}


@dataclass(frozen=True)
class Difference:
    """One key whose configured value differs from the recorded one."""

    setting: str
    key: str
    recorded: Any
    configured: Any
    note: str = ""

    @property
    def name(self) -> str:
        """The config key (``lora.r``), or the environment variable for the Hub endpoint."""
        return _STORE_KEYS[self.key] if self.setting == "store" else f"{self.setting}.{self.key}"

    def __str__(self) -> str:
        return f"`{self.name}`: recorded {self.recorded!r}, configured {self.configured!r}" + (
            f" ({self.note})" if self.note else "")


def configured_settings(cfg: Any, store: Any) -> dict[str, dict]:
    """The settings ``cfg`` (a ``FedemConfig``) and the opened ``store`` would record."""
    lora, tokenizer = asdict(cfg.lora), asdict(cfg.tokenizer)
    return {
        "lora": {k: lora[k] for k in LORA_KEYS},
        "tokenizer": {k: tokenizer[k] for k in TOKENIZER_KEYS},
        "model": asdict(cfg.model),
        "data": asdict(cfg.data),
        "store": {"kind": cfg.hub.store, "repo_prefix": cfg.hub.repo_prefix,
                  "endpoint": getattr(store, "endpoint", None), "private": cfg.hub.private},
        "catalog": asdict(cfg.catalog),
    }


def differences(recorded: dict[str, dict], configured: dict[str, dict],
                registered: Optional[Collection[str]] = None) -> list[Difference]:
    """The refused differences between recorded and configured settings (module docstring);
    ``registered`` names the adapters that exist (None: every recorded catalog entry does)."""
    found = []
    for setting, values in configured.items():
        before = recorded.get(setting)
        if before is None:
            continue
        if setting == "catalog":
            found += catalog_differences(before, values, registered)
            continue
        for key in sorted(set(before) & set(values)):  # a key one side lacks came with another version
            old, new = before.get(key), values.get(key)
            if old == new or (setting, key) in ALLOWED:
                continue
            if (setting, key) == ("store", "endpoint") and not before.get("kind") == values.get("kind") == "hf":
                continue  # an endpoint matters between two Hub stores; a change of kind is named already
            if (setting, key) == ("data", "languages"):
                dropped = _dropped_languages(old or [], new or [])
                if dropped:
                    found.append(Difference(setting, key, old, new,
                                            f"languages may be added, not removed: {', '.join(dropped)} "
                                            "would lose the held-out data their adapters are judged on"))
                continue
            found.append(Difference(setting, key, old, new))
    return found


def catalog_differences(recorded: dict, configured: dict,
                        registered: Optional[Collection[str]] = None) -> list[Difference]:
    """A catalog may grow; what a registered entry was trained and judged on may not change (module doc).
    An entry never seeded (its start was refused) is the operator's to fix: ``registered`` names those
    that were (None: all)."""
    found = []
    if recorded.get("per_language") and not configured.get("per_language"):
        found.append(Difference("catalog", "per_language", True, False,
                                "the language adapters exist; a hub cannot stop having them"))
    entries = {entry["name"]: entry for entry in configured.get("adapters") or []}
    for old in recorded.get("adapters") or []:
        if registered is not None and old["name"] not in registered:
            continue
        new = entries.get(old["name"])
        if new is None:
            found.append(Difference("catalog", "adapters", old["name"], None,
                                    f"adapter {old['name']!r} was declared; entries may be added, not removed"))
            continue
        for key in CATALOG_FIXED:
            if old.get(key) != new.get(key):
                found.append(Difference("catalog", "adapters", f"{old['name']}.{key}={old.get(key)!r}",
                                        f"{old['name']}.{key}={new.get(key)!r}",
                                        "its versions were trained and judged on that; declare a new adapter "
                                        "under a new name instead"))
    return found


def _dropped_languages(old: list[str], new: list[str]) -> list[str]:
    """Recorded languages the configured list leaves out (``[]`` keeps every language)."""
    if not new:
        return []
    if not old:
        return ["every language not listed"]
    return sorted(set(old) - set(new))


def check_and_record(registry: Any, cfg: Any, store: Any, hub: Any, now: Optional[float] = None) -> None:
    """Refuse to open a hub whose recorded settings ``cfg`` contradicts; record the configured ones.

    Raises ``ConfigError`` naming each difference (key, recorded value, configured value) and how
    to proceed. Called before anything is seeded or loaded.
    """
    configured = configured_settings(cfg, store)
    if registry.latest_checkpoint() is not None:
        recorded = registry.settings()
        adapters = registry.adapters()
        if "lora" not in recorded and adapters:  # set up before settings were recorded
            recorded["lora"] = {k: v for k, v in adapters[0].lora_spec.items() if k in LORA_KEYS}
        refused = differences(recorded, configured, {a.name for a in adapters})
        if refused:
            raise ConfigError(refusal(refused, hub))
    recorded = registry.settings()
    with registry.atomic():
        for name, value in configured.items():
            if recorded.get(name) != value:
                registry.put_setting(name, value, updated=now)


def refusal(refused: list[Difference], hub: Any) -> str:
    """The message of a refused start: each difference, then how to proceed."""
    overrides = " ".join(f"{d.name}={_override(d.recorded)}" for d in refused
                         if d.name != "HF_ENDPOINT" and d.setting != "catalog")
    catalog = [d for d in refused if d.setting == "catalog"]
    endpoint = [d for d in refused if d.name == "HF_ENDPOINT"]
    ways = []
    if overrides:
        ways.append(f"start with the recorded values (overrides \"{overrides}\")")
    if endpoint:
        ways.append(f"set HF_ENDPOINT={endpoint[0].recorded}")
    if catalog:
        ways.append("declare the recorded catalog entries as they were (above)")
    lines = [f"the hub at {str(hub)!r} was set up with other settings than this config; it does not start:"]
    lines += [f"  {d}" for d in refused]
    lines.append(f"To proceed, {' and '.join(ways)}, or use a new hub folder (run config `hub`, "
                 "`fedem --hub`, or $FEDEM_HUB) for the new settings.")
    return "\n".join(lines)


def _override(value: Any) -> str:
    """A recorded value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)
