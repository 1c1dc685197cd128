"""The hub's durable state: the registry (SQLite), the artifact store (a local folder laid out like
Hugging Face repos, or the Hub itself), pseudonyms, settings, the writer lock, and what the CLI and
the ledger site show of it. No Flower, no Hydra, no relay: readers such as ``fedem status`` stay light."""
