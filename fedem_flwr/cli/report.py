"""Figures and tables of a hub's history, for simulations and for people who would rather look.

Reads the registry only (never the store): held-out loss of each adapter's accepted versions on its
own held-out sets (``hub.terms``: a language adapter's languages, a chat adapter's ``en:chat``), the
stream of contributions with their decisions over time, and held-out loss per language across the
base versions of the lineage (with what each merge absorbed and each refused attempt). Figures are
titled with what they show and the base version they reach, never with a folder of the machine;
lines follow the public ledger's styles (``site.charts.style``), so 23 languages stay apart.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files, never windows: runs on headless hubs and in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedem_flwr.hub.terms import adapter_terms_of, own_loss  # noqa: E402
from fedem_flwr.site.charts import style  # noqa: E402

# The ledger's marker shapes (``site.charts.MARKERS``) by their matplotlib names.
MARKERS = {"circle": "o", "square": "s", "triangle": "^", "diamond": "D", "triangle-down": "v"}


def summary(registry: Any) -> dict[str, Any]:
    """Numbers a policy comparison needs, from one hub."""
    contributions = registry.contributions()
    decisions = Counter(c.decision for c in contributions)
    reasons = Counter(c.reason.split(":")[0] for c in contributions if c.decision == "rejected")
    gains = {}
    for name, terms in adapter_terms_of(registry).items():
        versions = registry.adapter_versions(name)
        if not versions:
            continue
        first, last = versions[0], versions[-1]
        before = own_loss(first.metrics.get("heldout"), terms)
        after = own_loss(last.metrics.get("heldout"), terms)
        if before is not None and after is not None:
            gains[name] = {"task": terms.task, "heldout_keys": list(terms.heldout_keys), "versions": last.version,
                           "loss_v0": before, "loss_latest": after}
    leases = registry.leases()
    span = (max(c.received for c in contributions) - min(l.issued for l in leases)) if contributions else 0.0
    absorbed = registry.absorbed_by_base()
    bases = [{"version": c.version, "parent": c.parent, "source": c.source, "heldout": dict(c.metrics.get("heldout", {})),
              "absorbed": [f"{a.adapter} v{a.adapter_version}" for a in absorbed.get(c.version, [])]}
             for c in registry.checkpoints()]
    attempts = [{"source": a.source, "parent": a.parent, "reason": a.reason} for a in registry.base_attempts()]
    return {
        "accepted": decisions.get("accepted", 0),
        "rejected": decisions.get("rejected", 0),
        "rejections": dict(reasons),
        "leases": len(leases),
        "seconds": span,
        "contributions_per_minute": 60.0 * len(contributions) / span if span > 0 else 0.0,
        "adapters": gains,
        "bases": bases,
        "refused_bases": attempts,
    }


def line_style(index: int) -> dict[str, Any]:
    """Matplotlib keywords for the ``index``-th line, as the ledger draws it (colour, dashes, marker)."""
    look = style(index)
    dashes = (0, tuple(float(d) for d in look.dash.split())) if look.dash else "-"
    return {"color": look.colour, "linestyle": dashes, "marker": MARKERS[look.marker]}


def base_lines(bases: list[dict[str, Any]]) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """Held-out loss per language over the base versions that have one, and the versions that have
    none (v0 where the hub did not measure its seed): those are left out, not drawn as gaps."""
    languages = sorted({lang for b in bases for lang in b["heldout"]})
    lines = {lang: [(b["version"], b["heldout"][lang]) for b in bases if lang in b["heldout"]] for lang in languages}
    return lines, [b["version"] for b in bases if not b["heldout"]]


def adapter_curves(registry: Any) -> dict[str, list[tuple[int, float]]]:
    """adapter -> (version, mean loss on its own held-out sets) of each version that has one."""
    curves = {}
    for name, terms in adapter_terms_of(registry).items():
        points = [(v.version, own_loss(v.metrics.get("heldout"), terms)) for v in registry.adapter_versions(name)]
        curves[name] = [(x, y) for x, y in points if y is not None]
    return curves


def plot_hub(registry: Any, out: Path) -> Path:
    """Two panels: held-out loss per adapter version, and contributions over time by decision; titled
    with the base version the hub has reached."""
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = 0
    for name, points in adapter_curves(registry).items():
        if len(points) > 1:
            ax_loss.plot(*zip(*points), label=name, **line_style(drawn))
            drawn += 1
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(xlabel="adapter version", ylabel="held-out loss (own held-out sets)",
                title="Held-out loss of each adapter's versions")
    if drawn:
        ax_loss.legend(fontsize="small", ncol=2)

    contributions = sorted(registry.contributions(), key=lambda c: c.received)
    if contributions:
        start = min(l.issued for l in registry.leases())
        for decision, colour in (("accepted", "tab:green"), ("rejected", "tab:red")):
            times = [(c.received - start) / 60 for c in contributions if c.decision == decision]
            ax_time.step([0.0, *times], range(len(times) + 1), where="post", color=colour, label=decision)
        ax_time.legend()
    ax_time.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_time.set(xlabel="minutes since the first lease", ylabel="contributions",
                title="Contributions so far, by decision")
    base = registry.latest_checkpoint()
    return _save(fig, out, "Relay progress" + ("" if base is None else f", base now v{base.version}"))


def plot_bases(bases: list[dict[str, Any]], out: Path) -> Path:
    """Held-out loss per language (one line each) across the base versions that have one, marked by
    source; a note names the versions without."""
    lines, unmeasured = base_lines(bases)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (lang, points) in enumerate(lines.items()):
        ax.plot(*zip(*points), label=lang, **line_style(i))
    measured = [b for b in bases if b["heldout"]]
    upright = len(measured) > 8  # side by side, many sources would run into each other
    for b in measured:
        ax.axvline(b["version"], color="0.85", zorder=0)
        ax.annotate(b["source"], (b["version"], 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                    fontsize="small", rotation=90 if upright else 0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="base version", ylabel="held-out loss")
    if lines:
        ax.legend(fontsize="small", ncol=-(-len(lines) // 12), loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        ax.text(0.5, 0.5, "no held-out loss recorded for any base version", ha="center", va="center",
                transform=ax.transAxes)
    if unmeasured and lines:
        fig.text(0.01, 0.01, "no held-out loss recorded for " + ", ".join(f"v{v}" for v in unmeasured),
                 fontsize="small", color="0.35")
    span = f", v{measured[0]['version']} to v{measured[-1]['version']}" if len(measured) > 1 else (
        f", v{measured[0]['version']}" if measured else "")
    return _save(fig, out, f"Held-out loss per language across base versions{span}")


def _save(fig: Any, out: Path, title: str) -> Path:
    """Title, lay out, write and close a figure: every report figure ends here."""
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 1))  # room for a note along the bottom
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
