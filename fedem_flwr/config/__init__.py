"""The single source of truth: one composed, validated configuration. ``config.schema`` holds the
typed dataclasses (no Hydra); ``config.loader`` composes them with Hydra."""
