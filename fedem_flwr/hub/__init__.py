"""Hub state: the registry (SQLite), the artifact store, contributor pseudonyms and the writer lock.

Import-light on purpose: ``fedem --help`` and readers must not pay for the store's dependencies, so
names are resolved on first use (``from fedem_flwr.hub import Registry`` imports only the registry).
"""

from fedem_flwr.lazy import export_lazily

export_lazily(__name__, {
    "Registry": "registry",
    "Checkpoint": "records",
    "Adapter": "records",
    "AdapterVersion": "records",
    "Contribution": "records",
    "revision_name": "records",
    "HubWriterLock": "paths",
    "resolve_hub_path": "paths",
    "default_hub_path": "paths",
    "require_hub": "paths",
    "ensure_hub": "paths",
    "read_lock_holder": "paths",
    "pseudonym_of": "pseudonym",
    "open_store": "store",
})
