"""The acceptance rule: is a pushed adapter version at least as good as its parent? (pure logic)

Inputs are the hub's held-out mean loss per language, for the candidate and for its parent version.
A candidate is accepted when its loss on the adapter's own languages is lower than the parent's by at
least ``margin`` (``candidate <= parent - margin``; with the default margin 0 an equal loss passes).
The own-language loss is a plain mean over the languages, or a token-weighted mean when ``weights``
(held-out tokens per language) is given, so a language with ten times the held-out text counts ten
times as much.

The full gate's second clause is ready but optional: with ``others``, each of those languages must
also stay within ``tolerance`` of the parent (``candidate <= parent + tolerance``), one by one, so a
gain on the adapter's languages cannot hide a regression elsewhere. Other languages without held-out
data on both sides are skipped and named in the reason.

Anything that cannot be compared (no languages, missing data, non-finite losses) is rejected with a
reason, never raised: a rejection is recorded with the contribution.

``decide_base`` is the same rule for a candidate *base* (a merge or a CPT checkpoint) against the
current base: over every held-out language at once, its loss must be strictly lower than the current
base's by ``margin`` (``candidate < current - margin``: an unchanged base is never published), and no
single language may be worse than the current base's by more than ``tolerance`` (``tolerance=None``
skips that clause: when absorbed adapters continue from their residuals, each absorbed language is
served by the base with its adapter, and ``decide_adapted`` judges those instead).

``decide_adapted`` judges what a merge does to each rebased adapter's languages as they are served
(with residual rebases, every adapter carrying trained work, absorbed or not): new base + its rebased
version against old base + its version just before the merge, every language within ``tolerance``
(``after <= before + tolerance``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from fedem_flwr.errors import ConfigError


@dataclass(frozen=True)
class Decision:
    """The gate's verdict; ``delta`` is candidate minus parent loss on own languages (NaN: not compared)."""

    accepted: bool
    reason: str
    delta: float


def decide(
    candidate: Mapping[str, float],
    parent: Mapping[str, float],
    languages: Sequence[str],
    margin: float = 0.0,
    *,
    weights: Optional[Mapping[str, float]] = None,
    others: Optional[Sequence[str]] = None,
    tolerance: float = 0.0,
) -> Decision:
    """Accept ``candidate`` when its own-language loss beats ``parent``'s by ``margin`` (see module doc)."""
    _check_settings("gate", margin, tolerance)
    own = list(dict.fromkeys(languages))
    if not own:
        return _reject("the adapter declares no languages")
    missing = _missing(candidate, parent, own, weights)
    if missing:
        return _reject(f"no held-out data for languages {missing}")
    bad = _non_finite(candidate, parent, own, weights)
    if bad:
        return _reject(bad)

    before = _mean(parent, own, weights)
    after = _mean(candidate, own, weights)
    delta = after - before
    summary = f"loss {before:.3f} -> {after:.3f} on {','.join(own)} ({delta:+.3f})"
    if not after <= before - margin:
        need = f"needs <= {-margin:+.3f} (margin {margin:.3f})" if margin else "needs no increase"
        return Decision(False, f"{summary}; {need}", delta)
    if others is None:
        return Decision(True, summary, delta)

    return _check_others(candidate, parent, [lang for lang in dict.fromkeys(others) if lang not in own],
                         tolerance, summary, delta)


def decide_base(
    candidate: Mapping[str, float],
    current: Mapping[str, float],
    margin: float = 0.0,
    tolerance: Optional[float] = 0.0,
    *,
    weights: Optional[Mapping[str, float]] = None,
) -> Decision:
    """Publish ``candidate`` (a merged or CPT base) only when it beats ``current`` on all languages (module doc).

    Languages are those of ``current``; each must have a candidate loss (and a weight > 0 when
    ``weights`` is given). ``delta`` is candidate minus current loss over all languages. With
    ``tolerance=None`` no single language is checked on its own.
    """
    _check_settings("merge", margin, 0.0 if tolerance is None else tolerance)
    languages = sorted(current)
    if not languages:
        return _reject("the current base has no held-out losses to compare with")
    missing = _missing(candidate, current, languages, weights)
    if missing:
        return _reject(f"no held-out data for the candidate base on languages {missing}")
    bad = _non_finite(candidate, current, languages, weights)
    if bad:
        return _reject(bad.replace("parent", "current base"))

    before = _mean(current, languages, weights)
    after = _mean(candidate, languages, weights)
    delta = after - before
    summary = f"loss {before:.3f} -> {after:.3f} over {len(languages)} languages ({delta:+.3f})"
    if not after < before - margin:
        worse = [] if tolerance is None else _worse(candidate, current, languages, tolerance)
        also = f"; worse beyond tolerance {tolerance:.3f} on {', '.join(worse)}" if worse else ""
        need = f"needs < {-margin:+.3f} (margin {margin:.3f})" if margin else "needs a lower loss"
        return Decision(False, f"{summary}; {need}{also}", delta)
    if tolerance is None:
        return Decision(True, f"{summary}; no per-language clause on the base alone", delta)
    return _check_others(candidate, current, languages, tolerance, summary, delta, what="every language")


def decide_adapted(
    after: Mapping[str, Mapping[str, float]],
    before: Mapping[str, Mapping[str, float]],
    tolerance: float,
) -> Decision:
    """Accept a merge only when no rebased adapter's language is served worse after it (module doc).

    ``before`` maps each rebased adapter (absorbed or not) to its languages' losses on the old base with its version just
    before the merge (the languages to check), ``after`` the same adapter to its losses on the new base
    with its rebased version. Every language must be within ``tolerance`` of before; a missing or
    non-finite loss refuses. ``delta`` is the largest change (after minus before) over them all.
    """
    _check_settings("merge", 0.0, tolerance)
    if not before:
        return _reject("no absorbed adapter to compare")
    changes, worse = [], []
    for name in sorted(before):
        languages = sorted(before[name])
        if not languages:
            return _reject(f"adapter {name} has no held-out language to compare")
        mine = after.get(name, {})
        missing = [lang for lang in languages if lang not in mine]
        if missing:
            return _reject(f"no held-out loss of adapter {name} after the merge on languages {missing}")
        bad = _non_finite(mine, before[name], languages, None)
        if bad:
            return _reject(f"adapter {name}: {bad.replace('candidate', 'after').replace('parent', 'before')}")
        changes += [mine[lang] - before[name][lang] for lang in languages]
        worse += [f"{name}: {item}" for item in _worse(mine, before[name], languages, tolerance)]
    delta = max(changes)
    summary = f"adapted loss change at most {delta:+.3f} over {len(changes)} language(s) of {len(before)} adapter(s)"
    if worse:
        return Decision(False, f"{summary}; worse beyond tolerance {tolerance:.3f} on {'; '.join(worse)}", delta)
    return Decision(True, f"{summary}; within {tolerance:.3f}", delta)


def _check_settings(group: str, margin: float, tolerance: float) -> None:
    for key, value in (("margin", margin), ("tolerance", tolerance)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"`{group}.{key}` is {value!r}; it must be a finite number >= 0.")


def _missing(
    candidate: Mapping[str, float], reference: Mapping[str, float], languages: Sequence[str],
    weights: Optional[Mapping[str, float]],
) -> list[str]:
    """Languages a comparison cannot use: no loss on either side, or (with ``weights``) no positive weight."""
    missing = [lang for lang in languages if lang not in candidate or lang not in reference]
    if weights is not None:
        missing += [lang for lang in languages if lang not in missing and not weights.get(lang, 0) > 0]
    return missing


def _check_others(
    candidate: Mapping[str, float],
    parent: Mapping[str, float],
    others: list[str],
    tolerance: float,
    summary: str,
    delta: float,
    what: str = "others",
) -> Decision:
    checked = [lang for lang in others if lang in candidate and lang in parent]
    skipped = [lang for lang in others if lang not in checked]
    bad = _non_finite(candidate, parent, checked, None)
    if bad:
        return Decision(False, f"{summary}; {bad}", delta)
    worse = _worse(candidate, parent, checked, tolerance)
    if worse:
        return Decision(False, f"{summary}; worse beyond tolerance {tolerance:.3f} on {', '.join(worse)}", delta)
    note = f"; {what} within {tolerance:.3f} on {','.join(checked)}" if checked else ""
    if skipped:
        note += f"; no held-out data for others {skipped}, skipped"
    return Decision(True, summary + note, delta)


def _worse(candidate: Mapping[str, float], parent: Mapping[str, float], languages: list[str],
           tolerance: float) -> list[str]:
    """Each language where ``candidate`` is worse than ``parent`` beyond ``tolerance``, with both losses."""
    return [
        f"{lang} {parent[lang]:.3f} -> {candidate[lang]:.3f} ({candidate[lang] - parent[lang]:+.3f})"
        for lang in languages
        if not candidate[lang] <= parent[lang] + tolerance
    ]


def _mean(losses: Mapping[str, float], languages: list[str], weights: Optional[Mapping[str, float]]) -> float:
    if weights is None:
        return math.fsum(losses[lang] for lang in languages) / len(languages)
    total = math.fsum(weights[lang] for lang in languages)
    return math.fsum(losses[lang] * weights[lang] for lang in languages) / total


def _non_finite(
    candidate: Mapping[str, float],
    parent: Mapping[str, float],
    languages: list[str],
    weights: Optional[Mapping[str, float]],
) -> str:
    for side, losses in (("candidate", candidate), ("parent", parent), ("weight", weights or {})):
        bad = {lang: losses[lang] for lang in languages if lang in losses and not math.isfinite(losses[lang])}
        if bad:
            return f"non-finite {side} loss on {bad}" if side != "weight" else f"non-finite weights {bad}"
    return ""


def _reject(reason: str) -> Decision:
    return Decision(False, reason, math.nan)
