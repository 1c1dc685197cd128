"""``fedem peers``: the peers that judged pushes (``gate.peers``) and how far the hub trusts each.

Read-only, so it never blocks the running hub. A peer's weight is its standing
(``PeerStanding.weight``): the share of its checked reports that agreed, one agreement assumed, so a
peer never checked weighs 1.
"""

from __future__ import annotations

from typing import Any

import click

from fedem_flwr.cli import render
from fedem_flwr.hub.records import PeerStanding
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.views import Names, iso


@click.command("peers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--reveal", is_flag=True, help="Show contributor identities (pk:/sim:/node:) instead of pseudonyms.")
@click.pass_obj
def peers_command(hub: Any, as_json: bool, reveal: bool) -> None:
    """Each peer asked to judge pushes: how often it was asked, how many of its reports counted, how many
    checked reports agreed or disagreed with the decision, and the weight its next reports get.

    Example: fedem peers --json
    """
    registry = hub.registry()
    rows = peers_view(registry, Names(registry, reveal))
    if as_json:
        click.echo(render.dumps(rows))
        return
    render.console().print(table(rows))


def peers_view(registry: Registry, names: Names) -> list[dict[str, Any]]:
    """``fedem peers --json``: one row a peer (by pseudonym), from its reports and its standing; ``outcomes``
    counts its asks by what came of them (``counted``, ``failed``, ``late``, ``unanswered``, ``ignored``)."""
    with registry.snapshot():
        outcomes = registry.peer_outcome_counts()
        standing = registry.peer_standing()
    rows = []
    for peer in sorted(set(outcomes) | set(standing)):
        counts = outcomes.get(peer, {})
        kept = standing.get(peer)
        checked = kept or PeerStanding(peer, 0, 0, 0.0)  # asked, never checked yet: a new peer's standing
        rows.append({"peer": names.contributor(peer), "asked": sum(counts.values()),
                     "counted": counts.get("counted", 0), "outcomes": counts, "agreed": checked.agreed,
                     "disagreed": checked.disagreed, "weight": checked.weight,
                     "updated": iso(kept.updated) if kept else None})
    return rows


def table(rows: list[dict[str, Any]]) -> render.Listing:
    return render.Listing("Peers judging pushes", (render.who("peer"), render.fixed("asked"), render.fixed("counted"),
                                                   render.fixed("agreed"), render.fixed("disagreed"),
                                                   render.fixed("weight")),
                          [(r["peer"], r["asked"], r["counted"], r["agreed"], r["disagreed"], f"{r['weight']:.2f}")
                           for r in rows], "no peer has judged a push yet")
