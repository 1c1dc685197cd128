"""Keep the libraries' noise out of what a user reads: deprecation notices (meant for the libraries'
callers' developers, not for whoever runs a hub or a node) and the progress bars `datasets` and
`transformers` draw for internal steps. No Flower here: the CLI uses it too."""

from __future__ import annotations

import warnings

# Libraries whose deprecation and future warnings are hidden from a run's log; fedem's own stay.
QUIET_LIBRARIES = ("transformers", "peft", "datasets", "huggingface_hub", "torch", "flwr", "typer", "click",
                   "ray", "hydra", "omegaconf", "safetensors", "tokenizers", "pydantic")
_DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def quiet_library_deprecations() -> None:
    """Ignore deprecation and future warnings raised inside `QUIET_LIBRARIES` (idempotent)."""
    pattern = rf"({'|'.join(QUIET_LIBRARIES)})(\.|$)"
    for category in _DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category, module=pattern)


def quiet_library_progress() -> None:
    """Hide the progress bars `datasets` and `transformers` draw for internal steps (filters,
    shard writes, weight loads): inside a relay they flood the run's log with no information.
    fedem's own training progress stays, as `train.progress` says."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
