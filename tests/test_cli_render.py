"""How ``fedem`` prints: every table fits an 80-column terminal with its headings whole (columns wrap,
the least useful are left out and named), and ``fedem report``'s figures are titled with what they
show, never a folder, drawing base v0 when the hub measured it and leaving it out when not."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console
from test_cli import T0
from test_cli_lineage import lineage_hub  # noqa: F401 - the fixture

from fedem_flwr.cli import cli, render
from fedem_flwr.cli.render import Col, Listing, held, holders, squeeze
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry

report = importlib.import_module("fedem_flwr.cli.report")  # the package's `report` is the click command

LANGUAGES = ("as", "bn", "de", "en", "es", "fr", "gu", "hi", "it", "ja", "kn", "ko", "ml", "mr", "ne", "or", "pa",
             "pt", "ru", "sa", "ta", "te", "ur")
REASON = ("loss 4.280 -> 3.508 on mr (-0.772); others within 0.120 on as,bn,de,en,es,fr,gu,hi,it,ja,kn,ko,ml,ne,"
          "or,pa,pt,ru,sa,ta,te,ur")
FOLDER = "/srv/fedem/hub/store/fedem"


def shown(printable, width: int = 80) -> str:
    out = Console(width=width, record=True, highlight=False, soft_wrap=False)
    out.print(printable)
    return out.export_text()


def headings(text: str) -> list[list[str]]:
    """The heading cells of every table in ``text`` (one row each: the line with ``┃`` above the rule)."""
    lines = text.splitlines()
    return [[cell.strip() for cell in lines[i - 1].split("┃")] for i, line in enumerate(lines) if "╇" in line]


def assert_fits(text: str, width: int = 80) -> None:
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    assert "…" not in text
    rows = headings(text)
    assert rows and all(cell for row in rows for cell in row)


def labelled(fig) -> list:
    """The lines of a figure's first panel that have a legend entry (not the rules marking versions)."""
    return [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]


def test_squeeze_narrows_the_widest_first_and_never_below_a_floor():
    assert squeeze([2, 19, 60], [2, 10, 20], 50) == [2, 19, 29]
    assert squeeze([2, 19, 60], [2, 10, 20], 33) == [2, 11, 20]
    assert squeeze([2, 19, 60], [2, 10, 20], 31) is None
    assert squeeze([5, 5], [5, 5], 10) == [5, 5]


def test_a_listing_leaves_out_its_least_useful_columns_and_says_which():
    # Prepare: 8 columns of which two may go (lease first, then version)
    columns = [Col("id"), Col("received", True, 10), Col("adapter", True), Col("contributor", True, 14),
               Col("lease", drop=1), Col("decision"), Col("version", drop=2), Col("reason", True, 20)]
    row = (123456, "2026-12-07 07:12:10", "hi", "c-e40f8bdc8c88", 98765, "accepted", 3, REASON)
    listing = Listing("Contributions", columns, [row], "none")

    # Execute / Assert: wide, everything; at 80, lease and version go; a time wraps under its date
    assert headings(shown(listing, 140)) == [["id", "received", "adapter", "contributor", "lease", "decision",
                                               "version", "reason"]]
    text = shown(listing)
    assert_fits(text)
    assert headings(text) == [["id", "received", "adapter", "contributor", "decision", "reason"]]
    assert "left out at 80 columns: lease, version (--json has every field)" in text
    assert text.splitlines()[3].rstrip() == "123456 │ 2026-12-07 │ hi      │ c-e40f8bdc8c88 │ accepted │ loss 4.280 -> 3.508"
    assert text.splitlines()[4].startswith("       │ 07:12:10   │         │")


def test_holders_name_their_lanes_and_are_counted_against_the_lanes():
    rows = [{"lane": 0, "holder": "c-e40f8bdc8c88", "token": 7}, {"lane": 2, "holder": "c-0a1b2c3d4e5f", "token": 9}]

    assert holders(rows) == "c-e40f8bdc8c88 (lane 0), c-0a1b2c3d4e5f (lane 2)"
    assert holders([]) is None  # printed as "-"
    assert (held(2, 3), held(0, 1), held(2, "unknown"), held(1, "unknown")) == ("2/3 lanes", "0/1 lanes", "2 holders",
                                                                                "1 holder")


def test_cell_text_is_not_rich_markup():
    text = shown(Listing("t", [Col("reason", True)], [("missing [bold]lora_A[/bold] in [red]",)], "none"))
    assert "missing [bold]lora_A[/bold] in [red]" in text


@pytest.mark.parametrize("args", [("status",), ("adapters",), ("adapters", "hi"), ("leases",), ("leases", "--all"),
                                  ("checkpoints",), ("contributions",), ("status", "--reveal")])
def test_every_command_fits_80_columns(lineage_hub, args):  # noqa: F811
    # Prepare: the lineage hub's folders are long temporary paths; a reason long enough to wrap; te held on
    # a second of 3 lanes by a long identity
    with Registry.open(lineage_hub) as registry:
        registry.add_contribution(registry.pseudonym("sim:3"), "hi", None, T0 + 1300, "d4", {"ok": True},
                                  {"heldout": {"hi": 3.25}}, "rejected", REASON)
        registry.save_lease(Lease(4, "te", "pk:" + "0badc0de" * 8, 2, 1, T0 + 1300, T0 + 12100, lane=1))
        registry.put_setting("relay", {"lanes": 3}, T0)

    # Execute
    result = CliRunner().invoke(cli, ["--hub", str(lineage_hub), *args], env={"COLUMNS": "80"},
                                catch_exceptions=False)

    # Assert
    assert result.exit_code == 0, result.output
    assert_fits(result.output)
    if args[0] in ("status", "contributions"):  # the reason is whole, wrapped in the last column
        reasons = "".join(line.split("│")[-1] for line in result.output.splitlines() if "│" in line)
        assert "".join(REASON.split()) in "".join(reasons.split())


def test_a_busy_hub_fits_80_columns():
    """Views as a long-running hub gives them: six-digit ids, identities revealed, 23 languages, 14 bases."""
    # Prepare
    identity = "pk:" + "0badc0de" * 8
    when = "2026-12-07T07:12:10+00:00"
    adapters = [{"name": "hindi-news", "version": 412, "base_version": 13, "languages": list(LANGUAGES[:6]),
                 "task": "causal-lm", "path": f"{FOLDER}/adapter-hindi-news/v412",
                 "holders": [{"lane": lane, "holder": identity, "token": 104217 + lane} for lane in range(3)]}]
    versions = [{"version": 412, "kind": "rebase", "parent_version": 411, "base_version": 13, "created": when,
                 "digest": "8d33888326b8" * 5, "path": f"{FOLDER}/adapter-hindi-news/v412"}]
    leases = [{"token": 104217, "adapter": "hindi-news", "lane": 11, "holder": identity, "state": "expired",
               "issued": when, "deadline": when, "ended": when, "outcome": "expired"}]
    contributions = [{"id": 123456, "received": when, "adapter": "hindi-news", "contributor": "c-e40f8bdc8c88",
                      "lease_token": 104217, "decision": "accepted", "adapter_version": 412, "reason": REASON}]
    bases = [{"version": v, "parent": v - 1 or None, "source": "merge", "created": when, "path": f"{FOLDER}/base/v{v}",
              "metrics": {"heldout": dict.fromkeys(LANGUAGES, 3.5)},
              "absorbed": [{"adapter": "hindi-news", "adapter_version": 400 + v}] * 3} for v in range(14)]
    heldout = [{"version": b["version"], "source": b["source"], "heldout": b["metrics"]["heldout"]} for b in bases]

    # Execute
    tables = [render.adapters(adapters), render.versions("hindi-news", versions), render.leases(leases, 0.0, True),
              render.leases(leases, 0.0, False), render.contributions(contributions), render.checkpoints(bases),
              render.heldout_table(heldout)]
    texts = [shown(t) for t in tables]

    # Assert: every heading whole (a base's "v13 merge" may stand on two lines), the newest bases shown
    for text in texts[:-1]:
        assert_fits(text)
    assert max(len(line.rstrip()) for line in texts[-1].splitlines()) <= 80 and "…" not in texts[-1]
    assert headings(texts[-1])[0][-1] == "merge" and "v13" in texts[-1] and "v0 merge, v1 merge" in texts[-1]


def test_figures_are_titled_with_what_they_show_and_skip_an_unmeasured_v0(lineage_hub, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    # Prepare: keep each figure as it is saved (the CLI passes its hub folder as `title`)
    saved = {}
    keep = report._save

    def remember(fig, out, title):
        saved[out.name] = (title, [list(line.get_xdata()) for line in labelled(fig)],
                           [t.get_text() for t in fig.texts])
        return keep(fig, out, title)

    monkeypatch.setattr(report, "_save", remember)

    # Execute
    result = CliRunner().invoke(cli, ["--hub", str(lineage_hub), "report", "--out", str(tmp_path / "r")],
                                catch_exceptions=False)

    # Assert: v0 has no held-out loss in this hub: lines start at v1 and a note says why
    assert result.exit_code == 0, result.output
    assert saved["relay.png"][0] == "Relay progress, base now v2"
    assert saved["bases.png"] == ("Held-out loss per language across base versions, v1 to v2", [[1, 2], [1, 2]],
                                  ["no held-out loss recorded for v0"])
    assert not [t for t, _, _ in saved.values() if str(tmp_path) in t or "/" in t]
    assert (tmp_path / "r" / "bases.png").stat().st_size > 10_000


def test_base_v0_is_drawn_when_its_losses_are_recorded(tmp_path, monkeypatch):
    measured = [{"version": 0, "source": "init", "heldout": {"hi": 5.5, "te": 5.9}},
                {"version": 1, "source": "merge", "heldout": {"hi": 4.0, "te": 4.5}},
                {"version": 2, "source": "cpt", "heldout": {"hi": 3.9}}]
    unmeasured = [{**measured[0], "heldout": {}}, *measured[1:]]
    saved = {}

    def remember(fig, out, title):
        saved[out.name] = (title, [line.get_xydata().tolist() for line in labelled(fig)])
        return out

    monkeypatch.setattr(report, "_save", remember)

    assert report.base_lines(measured) == ({"hi": [(0, 5.5), (1, 4.0), (2, 3.9)], "te": [(0, 5.9), (1, 4.5)]}, [])
    assert report.base_lines(unmeasured) == ({"hi": [(1, 4.0), (2, 3.9)], "te": [(1, 4.5)]}, [0])
    report.plot_bases(measured, tmp_path / "with.png")
    report.plot_bases(unmeasured, tmp_path / "without.png")
    assert saved["with.png"] == ("Held-out loss per language across base versions, v0 to v2",
                                 [[[0, 5.5], [1, 4.0], [2, 3.9]], [[0, 5.9], [1, 4.5]]])
    assert saved["without.png"] == ("Held-out loss per language across base versions, v1 to v2",
                                    [[[1, 4.0], [2, 3.9]], [[1, 4.5]]])


def test_23_languages_get_the_ledger_styles_in_figures(tmp_path):
    bases = [{"version": v, "source": "merge", "heldout": dict.fromkeys(LANGUAGES, 4.0 - v / 10)} for v in range(3)]
    styles = [report.line_style(i) for i in range(len(LANGUAGES))]

    path = report.plot_bases(bases, tmp_path / "bases.png")

    assert len({(s["color"], str(s["linestyle"])) for s in styles}) == 23 and styles[0]["linestyle"] == "-"
    assert report.line_style(24) == {"color": styles[0]["color"], "linestyle": (0, (6.0, 3.0)), "marker": "v"}
    assert path.stat().st_size > 10_000 and Path(path) == tmp_path / "bases.png"
