"""Model cards (README.md with YAML metadata) for published base checkpoints and adapter versions.

The Hub reads `base_model`, `language`, `library_name`, `tags` and `model-index` (evaluation
results) from the YAML header; `contributors` (pseudonyms, never identities) and `fedem` (versions)
are extra keys the Hub keeps as they are. A card is built only from what the registry recorded for
that version, with no clock, so publishing the same version twice yields the same bytes (and the
same digest), which is what makes `publish_hub` idempotent.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TASK = "text-generation"


def _eval_results(metrics: dict[str, Any]) -> Optional[list[EvalResult]]:
    """One `EvalResult` per finite numeric metric (nested dicts flattened as `a/b`), sorted by name."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix] = float(value)

    walk("", metrics)
    if not flat:
        return None
    return [
        EvalResult(task_type=TASK, dataset_type="fedem-held-out", dataset_name="fedem held-out data",
                   metric_type=name, metric_value=value)
        for name, value in sorted(flat.items())
    ]


def _render(data: ModelCardData, title: str, lines: list[str]) -> ModelCard:
    body = "\n".join(f"- {line}" for line in lines)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n")


def base_card(repo_id: str, version: int, parent: Optional[int], source: str,
              metrics: Optional[dict[str, Any]] = None) -> ModelCard:
    """Card of base checkpoint `version` (source `init`, `merge` or `cpt`)."""
    results = _eval_results(metrics or {})
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=TASK,
        tags=["fedem", "federated-learning"],
        model_name=repo_id if results else None,
        eval_results=results,
        fedem={"kind": "base", "version": version, "parent": parent, "source": source},
    )
    lines = [f"version v{version} ({source}" + (f" from v{parent})" if parent is not None else ")"),
             "load: `AutoModelForCausalLM.from_pretrained(repo_id, revision=...)`"]
    return _render(data, f"{repo_id} v{version}", lines)


def adapter_card(repo_id: str, name: str, version: int, base_model: str, base_revision: str,
                 languages: list[str], contributors: list[str],
                 metrics: Optional[dict[str, Any]] = None) -> ModelCard:
    """Card of adapter `name` at `version`, trained on `base_model`@`base_revision`.

    `contributors` are pseudonyms (keyed hashes): the card never names a contributor's identity.
    """
    results = _eval_results(metrics or {})
    data = ModelCardData(
        base_model=base_model,
        language=sorted(languages) or None,
        library_name="peft",
        pipeline_tag=TASK,
        tags=["fedem", "lora", "federated-learning", f"adapter-{name}"],
        model_name=repo_id if results else None,
        eval_results=results,
        contributors=sorted(set(contributors)),
        fedem={"kind": "adapter", "adapter": name, "version": version, "base_revision": base_revision},
    )
    lines = [f"adapter `{name}` version v{version}, on `{base_model}` revision `{base_revision}`",
             f"{len(set(contributors))} accepted contribution(s), listed by pseudonym",
             "load: `peft.AutoPeftModelForCausalLM.from_pretrained(repo_id, revision=...)`"]
    return _render(data, f"{repo_id} v{version}", lines)
