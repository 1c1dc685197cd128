"""The peer-judging study's table (results/peers.yaml): per arm, mean ± std over seeds of the wrong
decisions on the thin languages and elsewhere, the final test loss, the adapter waiting time and the
share of contributor time spent judging peers.

    python -m simulations.peers_table runs/peers

Reads each cell's ``hub/sim/result.json`` (``decisions``, ``peer_waiting``, ``contributor_time``:
``fedem_flwr.simulation.run``); the sweep's own report (``fedem sim report``) knows none of these fields.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedem_flwr.hub.registry import Registry
from fedem_flwr.simulation.record import read_result
from simulations.cells import CELL_FILE, CELLS_DIR, HUB_DIR

COLUMNS = (
    ("wrong, thin languages", lambda r: r["decisions"]["thin"]["wrong"], "{:.1f}"),
    ("of decisions there", lambda r: r["decisions"]["thin"]["scored"], "{:.1f}"),
    ("accepted worse / rejected better (thin)",
     lambda r: (r["decisions"]["thin"]["accepted_worse"], r["decisions"]["thin"]["rejected_better"]), None),
    ("wrong, elsewhere", lambda r: r["decisions"]["other"]["wrong"], "{:.1f}"),
    ("of decisions there", lambda r: r["decisions"]["other"]["scored"], "{:.1f}"),
    ("harmful pushes", lambda r: r["harmful_pushes"], "{:.1f}"),
    ("final test loss", lambda r: r["loss_mean"], "{:.3f}"),
    ("adapter waiting, simulated h", lambda r: r["peer_waiting"]["adapter_waiting_s"] / 3600, "{:.2f}"),
    ("peer-eval share of contributor time", lambda r: r["contributor_time"]["peer_eval_share"], "{:.1%}"),
    ("same, at the tokens peers scored (est. where priced at the bound)", lambda r: r["scored_share"], "{:.1%}"),
    ("peer evaluations", lambda r: r["peer_evals"], "{:.0f}"),
)
PRICED_BLOCKS, BLOCK_SIZE = 64, 128  # gate.max_eval_blocks and data.block_size of results/peers.yaml


def scored_share(hub: Path, result: Mapping[str, Any]) -> float:
    """The peer-eval share had each evaluation been priced at the tokens its peer scored (the reports' tokens,
    from the registry) instead of at ``max_blocks`` blocks: the grid's price is an upper bound, and nodes
    hold fewer held-out blocks. Every adapter here has one language. An estimate: speeds differ by peer."""
    priced = result["peer_evals"] * PRICED_BLOCKS * BLOCK_SIZE
    if not priced:
        return 0.0
    with Registry.open(hub, readonly=True) as registry:
        scored = sum(report.get("tokens") or 0 for contribution in registry.contributions()
                     for report in contribution.evaluation.get("peers", {}).get("reports", []))
    time = result["contributor_time"]
    judging = time["peer_eval_s"] * scored / priced
    return judging / (time["training_s"] + judging) if time["training_s"] + judging > 0 else 0.0


def cells(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Each arm's results, ordered by seed."""
    arms: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for folder in sorted((out / CELLS_DIR).iterdir()):
        try:
            result = read_result(folder / HUB_DIR)
        except FileNotFoundError:
            continue  # not run, or failed: the sweep's status.json says why
        cell = json.loads((folder / CELL_FILE).read_text(encoding="utf-8"))
        scored = cell.get("sim.peer_eval_cost") == "scored"  # priced at the scored tokens already
        result["scored_share"] = (result["contributor_time"]["peer_eval_share"] if scored
                                  else scored_share(folder / HUB_DIR, result))
        arms.setdefault(str(cell.get("arm", "")), []).append((int(cell["seed"]), {**result, "seed": cell["seed"]}))
    return {arm: [result for _, result in sorted(rows, key=lambda row: row[0])] for arm, rows in arms.items()}


def _show(values: Sequence[float], fmt: str) -> str:
    if len(values) < 2:
        return fmt.format(values[0]) if values else ""
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(arms: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """The markdown table: one row an arm, mean ± std over its seeds (sums for the paired counts)."""
    lines = ["| arm | seeds | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for arm, results in arms.items():
        shown = []
        for _, read, fmt in COLUMNS:
            values = [read(result) for result in results]
            if fmt is None:  # a pair of counts: summed over seeds
                shown.append(f"{sum(v[0] for v in values)} / {sum(v[1] for v in values)} (sum)")
            else:
                shown.append(_show([float(v) for v in values], fmt))
        lines.append(f"| {arm} | {len(results)} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def per_seed(arms: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Each cell's wrong decisions per language (wrong / scored), for the README's detail."""
    lines = []
    for arm, results in arms.items():
        for result in results:
            by = result["decisions"]["by_language"]
            counts = ", ".join(f"{lang}{'*' if row['thin'] else ''} {row['wrong']}/{row['scored']}"
                               for lang, row in sorted(by.items()))
            lines.append(f"- {arm}, seed {result.get('seed', '?')}: {counts}; accepted {result['accepted']}, "
                         f"rejected {result['rejected']}; test loss {result['loss_mean']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    found = cells(Path(sys.argv[1]))
    print(table(found))
    print()
    print(per_seed(found))
