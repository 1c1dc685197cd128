"""Model cards (README.md with YAML metadata) for base checkpoints and adapter versions.

The Hub reads `base_model`, `language`, `library_name`, `tags` and `model-index` (evaluation
results) from the YAML header; `contributors` (pseudonyms, never identities) and `fedem` (versions,
lineage) are extra keys the Hub keeps as they are. A card is built only from what the registry
recorded (or is about to record) for that version, with no clock, so writing the same version twice
yields the same bytes (and the same digest): the card written into the store with the artifact
(`hub.lineage`) and the one `fedem publish` writes are both reproducible.

A base card says the version's parent and source (`init`, `merge`, `cpt`), for a merge its method
and every absorbed adapter with its version, weight and contributors, for CPT the run's steps and
tokens so far, and the held-out loss per language. An adapter card says its base, parent version,
kind (`fresh`, `push`, `rebase`), task (a tag too), languages, held-out loss per held-out set and
contributors; an `sft-chat` adapter's card also says its loss was on the assistant's turns only and
that prompts use the base tokenizer's chat template (shown in the card when given), since a chat
adapter fed flat text or another template is not what was trained.

An adapter card's `fedem_record` holds what the registry records with the version beyond its lineage,
so a restore can rebuild the row from the store alone (`hub.restore`): a push's `contribution` id,
`lease` token and `contributor` pseudonym; a rebase's `rebase` record (its mode, truncation error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fedem_flwr.config.schema import TASK_FORMATS
from fedem_flwr.data.tasks import CHAT, TEXT, parse_key
from fedem_flwr.hub.records import Absorbed
from fedem_flwr.hub.terms import LANGUAGE_TASK

TASK = "text-generation"
CARD_FILE = "README.md"
# Metrics that are not held-out evaluations: never listed as evaluation results.
_NOT_EVALUATED = ("cpt", "merge", "train", "heldout-replaced", "heldout-split")


def _eval_results(metrics: dict[str, Any]) -> Optional[list[EvalResult]]:
    """One `EvalResult` per finite numeric metric (nested dicts flattened as `a/b`), sorted by name."""
    flat: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            flat[prefix] = float(value)

    walk("", {k: v for k, v in metrics.items() if k not in _NOT_EVALUATED})
    if not flat:
        return None
    return [
        EvalResult(task_type=TASK, dataset_type="fedem-held-out", dataset_name="fedem held-out data",
                   metric_type=name, metric_value=value)
        for name, value in sorted(flat.items())
    ]


def _heldout_lines(metrics: dict[str, Any]) -> list[str]:
    """A Markdown table of held-out loss per language (per held-out set once a task's sets are among
    them, with a note on what a chat set scores), or a line saying none was measured."""
    heldout = metrics.get("heldout")
    rows = sorted((lang, loss) for lang, loss in (heldout or {}).items()
                  if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss))
    if not rows:
        return ["", "No held-out loss recorded."]
    tasks = [key for key, _ in rows if parse_key(key).data_format != TEXT]
    heading = "held-out set" if tasks or any(parse_key(key).domain for key, _ in rows) else "language"
    note = ["", "A `:chat` set holds conversations, scored on the assistant's turns only."] if tasks else []
    return ["", f"| {heading} | held-out loss |", "| --- | --- |",
            *(f"| {key} | {loss:.4f} |" for key, loss in rows), *note]


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``, so the block cannot be closed early."""
    run, longest = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _task_lines(task: str, domain: str, base_model: str, base_revision: str,
                chat_template: Optional[str]) -> list[str]:
    """What the adapter was trained on and how to prompt it: a chat adapter needs the base's chat template."""
    rows = f" tagged `{domain}`" if domain else ""
    if _is_chat(task):
        template = ("chat template: the base tokenizer's, shown below" if chat_template else
                    f"chat template: the base tokenizer's, saved with `{base_model}` revision `{base_revision}`")
        return [f"task `{task}`: supervised fine-tuning on conversations{rows} rendered with the base tokenizer's "
                "chat template; the loss was on the assistant's turns only",
                template + "; prompt with `tokenizer.apply_chat_template(messages, add_generation_prompt=True)`"]
    if task == LANGUAGE_TASK:
        return [f"task `{task}`: causal language modelling on flat text{rows}"]
    return [f"task `{task}`" + (f", rows tagged `{domain}`" if domain else "")]


def _is_chat(task: str) -> bool:
    return TASK_FORMATS.get(task, TEXT) == CHAT


def _template_lines(task: str, chat_template: Optional[str]) -> list[str]:
    """The chat template in a fenced block, for a chat adapter given one."""
    if not chat_template or not _is_chat(task):
        return []
    fence = _fence(chat_template)
    return ["", "## Chat template", "", f"{fence}jinja", chat_template.rstrip("\n"), fence]


def _render(data: ModelCardData, title: str, lines: list[str], tail: Sequence[str] = ()) -> ModelCard:
    body = "\n".join(f"- {line}" for line in lines)
    extra = "\n".join(tail)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body}\n" + (f"{extra}\n" if extra else ""))


def base_card(repo_id: str, version: int, parent: Optional[int], source: str,
              metrics: Optional[dict[str, Any]] = None, *, absorbed: Sequence[Absorbed] = (),
              contributors: Optional[Mapping[str, Sequence[str]]] = None) -> ModelCard:
    """Card of base checkpoint `version` (source `init`, `merge` or `cpt`).

    `metrics` keys as recorded with the checkpoint (`heldout`, `cpt` {steps, tokens}, `merge`
    {method, seed}); `absorbed` the adapter versions a merge took in, and `contributors` the
    pseudonyms behind each absorbed adapter (by adapter name).
    """
    metrics = metrics or {}
    contributors = contributors or {}
    results = _eval_results(metrics)
    lineage: dict[str, Any] = {"kind": "base", "version": version, "parent": parent, "source": source}
    lines = [f"version v{version} ({source}" + (f" from v{parent})" if parent is not None else ")")]
    merge = metrics.get("merge") or {}
    if source == "merge" or absorbed:
        method = merge.get("method") or ", ".join(sorted({a.method for a in absorbed})) or "unknown"
        seed = merge.get("seed")
        lineage["merge"] = {"method": method, "seed": seed, "absorbed": [
            {"adapter": a.adapter, "version": a.adapter_version, "weight": a.weight, "method": a.method,
             "seed": a.seed, "contributors": sorted(contributors.get(a.adapter, []))} for a in absorbed]}
        lines.append(f"merge method `{method}`" + (f", seed {seed}" if seed is not None else "")
                     + f", {len(absorbed)} adapter(s) absorbed")
        for a in absorbed:
            names = sorted(contributors.get(a.adapter, []))
            lines.append(f"absorbed adapter `{a.adapter}` v{a.adapter_version}, weight {a.weight:g}, "
                         + (f"contributors {', '.join(names)}" if names else "no accepted contribution"))
    cpt = metrics.get("cpt") or {}
    if source == "cpt" or cpt:
        lineage["cpt"] = {"steps": cpt.get("steps"), "tokens": cpt.get("tokens")}
        lines.append(f"continuous pretraining: {_count(cpt.get('steps'))} optimizer step(s), "
                     f"{_count(cpt.get('tokens'))} token(s) so far")
    everyone = sorted({name for a in absorbed for name in contributors.get(a.adapter, [])})
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=TASK,
        tags=["fedem", "federated-learning"],
        model_name=repo_id if results else None,
        eval_results=results,
        contributors=everyone or None,
        fedem=lineage,
    )
    lines.append("load: `AutoModelForCausalLM.from_pretrained(repo_id, revision=...)`")
    return _render(data, f"{repo_id} v{version}", lines, _heldout_lines(metrics))


def adapter_card(repo_id: str, name: str, version: int, base_model: str, base_revision: str,
                 languages: list[str], contributors: list[str],
                 metrics: Optional[dict[str, Any]] = None, *, parent_version: Optional[int] = None,
                 base_version: Optional[int] = None, kind: Optional[str] = None, task: str = LANGUAGE_TASK,
                 domain: str = "", chat_template: Optional[str] = None,
                 record: Optional[Mapping[str, Any]] = None) -> ModelCard:
    """Card of adapter `name` at `version`, trained on `base_model`@`base_revision` for `task`
    (`domain`: only rows tagged with it; `chat_template`: the base tokenizer's, shown in the card).

    `contributors` are pseudonyms (keyed hashes): the card never names a contributor's identity.
    `record` becomes the card's `fedem_record` (module docstring): what a restore needs to rebuild the row.
    """
    metrics = metrics or {}
    results = _eval_results(metrics)
    lineage: dict[str, Any] = {"kind": "adapter", "adapter": name, "version": version, "base_revision": base_revision,
                               "task": task, **({"domain": domain} if domain else {})}
    if kind is not None:
        lineage.update({"version_kind": kind, "parent_version": parent_version, "base_version": base_version})
    data = ModelCardData(
        base_model=base_model,
        language=sorted(languages) or None,
        library_name="peft",
        pipeline_tag=TASK,
        tags=["fedem", "lora", "federated-learning", f"adapter-{name}", task],
        model_name=repo_id if results else None,
        eval_results=results,
        contributors=sorted(set(contributors)),
        fedem=lineage,
        **({"fedem_record": dict(record)} if record else {}),
    )
    lines = [f"adapter `{name}` version v{version}, on `{base_model}` revision `{base_revision}`"]
    if kind is not None:
        residual = (metrics.get("rebase") or {}).get("mode") == "residual"
        rebase = (f"continues from its residual (its delta less the merged one, at its rank) after a merge "
                  f"absorbed v{parent_version}" if residual else
                  f"restarted from a zero delta after a merge absorbed v{parent_version}")
        lines.append({"fresh": "a fresh LoRA (zero delta)",
                      "push": f"an accepted contribution on v{parent_version}",
                      "rebase": rebase}.get(kind, kind))
    lines += _task_lines(task, domain, base_model, base_revision, chat_template)
    if languages:
        lines.append(f"languages: {', '.join(sorted(languages))}")
    lines += [f"{len(set(contributors))} accepted contribution(s), listed by pseudonym",
              "load: `peft.AutoPeftModelForCausalLM.from_pretrained(repo_id, revision=...)`"]
    return _render(data, f"{repo_id} v{version}", lines, _heldout_lines(metrics) + _template_lines(task, chat_template))


def write_card(folder: Path, card: ModelCard) -> Path:
    """Write ``card`` as the folder's README.md (replacing PEFT's template), before the folder is stored."""
    path = Path(folder) / CARD_FILE
    path.write_text(str(card), encoding="utf-8")
    return path


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "unknown"
