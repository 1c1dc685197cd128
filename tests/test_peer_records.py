"""Peer judging's records (migration 6): peer reports and standing in the registry, the ``peers`` column
of ``fedem contributions``, ``fedem peers``, and the ledger site showing the hub's and the peers' results."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli import T0, as_json, invoke, make_hub, pseudonyms

from fedem_flwr.cli import cli
from fedem_flwr.hub import schema
from fedem_flwr.hub.records import PeerReport, PeerStanding
from fedem_flwr.hub.registry import Registry
from fedem_flwr.site import render
from fedem_flwr.site.data import LEDGER_COLUMNS, as_dict, site_data

PEER_A, PEER_B, PUSHER = "c-0a0a0a0a0a0a", "c-0b0b0b0b0b0b", "c-0c0c0c0c0c0c"
REPORT = {"tokens": {"hi": 512}, "candidate": {"hi": 3.97}, "parent": {"hi": 4.0}, "delta": -0.03, "weight": 1.0}
PEERS = {"role": "veto", "asked": 3, "counted": 3, "delta": -0.041, "tokens": 1536, "effect": "agreed",
         "reports": [{"peer": PEER_A, "tokens": 512, "delta": -0.03, "weight": 1.0, "outcome": "counted"},
                     {"peer": PEER_B, "tokens": 512, "delta": -0.052, "weight": 0.5, "outcome": "counted"}]}
HUB = {"tokens": 480, "delta": -0.021, "accepted": True}


def asked(token: int, peer: str, at: float, outcome: str = "counted", report=REPORT, pusher: str = PUSHER):
    return PeerReport(token, peer, pusher, at, None if report is None else at + 30, outcome, report)


# -- migration 6 -------------------------------------------------------------------------------
def test_a_schema_5_registry_gains_the_peer_tables_and_keeps_its_rows(tmp_path, monkeypatch):
    # Prepare: a registry as fedem-flwr with migrations 1-5 left it, with a contribution
    path = tmp_path / "registry.sqlite"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:5])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 5)
    with Registry.open(path) as old:
        old.add_checkpoint(None, "init", "fedem/base", None, "d0", {}, T0)
        old.add_adapter("hi", ["hi"], "lm", {}, T0)
        old.add_contribution(old.pseudonym("sim:1"), "hi", None, T0 + 60, "d", {}, {"heldout": {"hi": 4.0}},
                             "rejected", "stale")
    monkeypatch.undo()
    with pytest.raises(Exception, match="schema version 5 and this fedem-flwr needs 6"):
        Registry.open(path, readonly=True)  # a reader cannot migrate

    # Execute
    with Registry.open(path) as registry:
        # Assert
        assert schema.schema_version(registry._conn) == schema.SCHEMA_VERSION == 6
        assert [tuple(r) for r in registry._conn.execute("SELECT version, name FROM migrations")][-1] == (6, "peers")
        assert [(c.reason, c.evaluation) for c in registry.contributions()] == [("stale", {"heldout": {"hi": 4.0}})]
        assert registry.peer_reports() == [] and registry.peer_standing() == {} and registry.peer_pair_counts() == {}
        assert registry.integrity_problems() == []


# -- reports, pairs and standing --------------------------------------------------------------
def test_peer_reports_are_read_back_by_push_and_newest_first_with_a_limit(fresh_db):
    # Prepare
    first = [asked(7, PEER_A, T0), asked(7, PEER_B, T0, "unanswered", None), asked(7, "c-0d", T0, "failed: oom", None)]
    later = [asked(8, PEER_A, T0 + 100, "late", None)]

    # Execute
    fresh_db.add_peer_reports(first)
    fresh_db.add_peer_reports(later)
    fresh_db.add_peer_reports([])

    # Assert
    assert fresh_db.peer_reports() == first + later
    assert fresh_db.peer_reports(lease_token=7) == first
    assert fresh_db.peer_reports(limit=2) == [later[0], first[2]]
    assert fresh_db.peer_reports(lease_token=9) == []
    assert fresh_db.peer_outcome_counts() == {PEER_A: {"counted": 1, "late": 1}, PEER_B: {"unanswered": 1},
                                              "c-0d": {"failed": 1}}


def test_a_non_finite_loss_in_a_report_is_stored_as_null(fresh_db):
    fresh_db.add_peer_reports([asked(7, PEER_A, T0, report={"candidate": {"hi": float("nan")},
                                                             "parent": {"hi": 4.0}, "delta": float("inf")})])

    (report,) = fresh_db.peer_reports()

    assert report.report == {"candidate": {"hi": None}, "parent": {"hi": 4.0}, "delta": None}


def test_pair_counts_count_every_ask_of_a_peer_for_a_pusher(fresh_db):
    fresh_db.add_peer_reports([asked(1, PEER_A, T0), asked(1, PEER_B, T0, "unanswered", None),
                               asked(2, PEER_A, T0 + 10, "late", None), asked(3, PEER_A, T0 + 20, pusher=PEER_B)])

    assert fresh_db.peer_pair_counts() == {(PEER_A, PUSHER): 2, (PEER_B, PUSHER): 1, (PEER_A, PEER_B): 1}


def test_standing_adds_the_increments_and_weighs_a_new_peer_1(fresh_db):
    # Execute
    fresh_db.update_peer_standing(PEER_A, 2, 0, T0)
    fresh_db.update_peer_standing(PEER_A, 1, 1, T0 + 60)
    fresh_db.update_peer_standing(PEER_B, 0, 0, T0 + 60)

    # Assert: (agreed + 1) / (agreed + disagreed + 1)
    standing = fresh_db.peer_standing()
    assert standing == {PEER_A: PeerStanding(PEER_A, 3, 1, T0 + 60), PEER_B: PeerStanding(PEER_B, 0, 0, T0 + 60)}
    assert (standing[PEER_A].weight, standing[PEER_B].weight) == (4 / 5, 1.0)
    assert PeerStanding("c-x", 0, 3, T0).weight == 1 / 4


def test_reports_and_standing_join_a_push_transaction(fresh_db):
    # Prepare / Execute: the push's records fail together
    with pytest.raises(RuntimeError), fresh_db.atomic():
        fresh_db.add_peer_reports([asked(7, PEER_A, T0)])
        fresh_db.update_peer_standing(PEER_A, 1, 0, T0)
        raise RuntimeError("the contribution could not be recorded")
    with fresh_db.atomic():
        fresh_db.add_peer_reports([asked(7, PEER_A, T0)])
        fresh_db.update_peer_standing(PEER_A, 1, 0, T0)

    # Assert
    assert len(fresh_db.peer_reports()) == 1 and fresh_db.peer_standing()[PEER_A].agreed == 1


@pytest.mark.parametrize("report, match", [
    (PeerReport(-1, PEER_A, PUSHER, T0, None, "unanswered"), "`lease_token` of a peer report is -1"),
    (PeerReport(True, PEER_A, PUSHER, T0, None, "unanswered"), "`lease_token` of a peer report is True"),
    (PeerReport(1, "", PUSHER, T0, None, "unanswered"), "`peer` of the peer report on lease 1 is ''"),
    (PeerReport(1, PEER_A, None, T0, None, "unanswered"), "`pusher` of the peer report on lease 1 is None"),
    (PeerReport(1, PEER_A, PUSHER, float("nan"), None, "unanswered"), "`asked` is nan"),
    (PeerReport(1, PEER_A, PUSHER, T0, float("inf"), "counted", {}), "`answered` is inf"),
    (PeerReport(1, PEER_A, PUSHER, T0, None, "lost"), "`outcome` is 'lost'; allowed: counted"),
    (PeerReport(1, PEER_A, PUSHER, T0, None, "failed"), "`outcome` is 'failed'; allowed"),
    (PeerReport(1, PEER_A, PUSHER, T0, None, "late: slow"), "`outcome` is 'late: slow'"),
    (PeerReport(1, PEER_A, PUSHER, T0, T0, "counted", [1.0]), "`report` of peer .* must be a dict"),
    (PeerReport(1, PEER_A, PUSHER, T0, T0, "counted", {"delta": object()}), "cannot be stored as JSON"),
])
def test_bad_peer_reports_are_refused_and_nothing_is_written(fresh_db, report, match):
    with pytest.raises(ValueError, match=match):
        fresh_db.add_peer_reports([asked(1, PEER_A, T0), report])
    assert fresh_db.peer_reports() == []


@pytest.mark.parametrize("args, match", [
    (("", 1, 0, T0), "`peer` is ''"), ((PEER_A, -1, 0, T0), "`agreed` of peer .* is -1"),
    ((PEER_A, 0, 1.5, T0), "`disagreed` of peer .* is 1.5"), ((PEER_A, True, 0, T0), "`agreed` of peer .* is True"),
    ((PEER_A, 1, 0, float("nan")), "`at` is nan"),
])
def test_bad_standing_updates_are_refused(fresh_db, args, match):
    with pytest.raises(ValueError, match=match):
        fresh_db.update_peer_standing(*args)
    assert fresh_db.peer_standing() == {}


def test_the_database_refuses_what_the_registry_would(fresh_db):
    with pytest.raises(sqlite3.IntegrityError):
        fresh_db._conn.execute("INSERT INTO peer_reports (lease_token, peer, pusher, asked, outcome, report) "
                               "VALUES (1, 'c-a', 'c-b', 0, 'counted', 'not json')")
    with pytest.raises(sqlite3.IntegrityError):
        fresh_db._conn.execute("INSERT INTO peer_standing VALUES ('c-a', -1, 0, 0)")


def test_peer_rows_survive_reopening(tmp_path):
    path = tmp_path / "hub"
    with Registry.open(path) as registry:
        registry.add_peer_reports([asked(7, PEER_A, T0)])
        registry.update_peer_standing(PEER_A, 1, 0, T0 + 30)

    with Registry.open(path, readonly=True) as again:
        assert again.peer_reports() == [asked(7, PEER_A, T0)]
        assert again.peer_standing() == {PEER_A: PeerStanding(PEER_A, 1, 0, T0 + 30)}


# -- fedem contributions and fedem peers -------------------------------------------------------
@pytest.fixture
def hub(tmp_path) -> Path:
    """``test_cli``'s hub plus a push three peers judged (lease 1) and the records of their asks."""
    path = make_hub(tmp_path)
    with Registry.open(path) as registry:
        registry.add_contribution(registry.pseudonym("sim:3"), "hi", None, T0 + 200, "d3", {"ok": True},
                                  {"heldout": {"hi": 2.4}, "hub": HUB, "peers": PEERS}, "accepted", "peers agreed")
        registry.add_contribution(registry.pseudonym("sim:3"), "hi", None, T0 + 300, "d4", {"ok": True},
                                  {"heldout": {"hi": 2.6}, "hub": HUB,
                                   "peers": {**PEERS, "role": "decide", "counted": 1, "delta": None,
                                             "effect": "too-few", "reports": PEERS["reports"][:1]}},
                                  "rejected", "too few peers")
        registry.add_peer_reports([asked(1, PEER_A, T0), asked(1, PEER_B, T0),
                                   asked(1, "c-0d0d0d0d0d0d", T0, "unanswered", None),
                                   asked(2, PEER_A, T0 + 100, "late", None)])
        registry.update_peer_standing(PEER_A, 3, 1, T0 + 200)
    return path


def test_contributions_show_what_the_peers_did(hub):
    # Execute
    out = CliRunner().invoke(cli, ["--hub", str(hub), "contributions"], env={"COLUMNS": "160"},
                             catch_exceptions=False).output
    narrow = invoke(hub, "contributions").output
    rows = as_json(hub, "contributions")

    # Assert: a column of its own, "-" for the pushes no peer judged; --json carries the dicts as they are; at
    # 80 columns the reason keeps its room and the caption names the columns left out
    assert "3/3 -0.041 veto:agreed" in out and "1/3 too-few" in out
    assert "left out at 80 columns: lease, peers, version (--json has every field)" in narrow
    assert [(r["id"], r["evaluation"].get("peers", {}).get("effect")) for r in rows] == [
        (4, "too-few"), (3, "agreed"), (2, None), (1, None)]
    assert rows[1]["evaluation"] == {"heldout": {"hi": 2.4}, "hub": HUB, "peers": PEERS}
    lines = {line.split("│")[0].strip(): [c.strip() for c in line.split("│")] for line in out.splitlines()
             if "│" in line and line.split("│")[0].strip().isdigit()}
    heading = [c.strip() for c in next(line for line in out.splitlines() if "┃" in line).split("┃")]
    assert lines["1"][heading.index("peers")] == "-"


def test_the_peers_column_reads_every_shape_of_a_judgement():
    from fedem_flwr.cli.render import judged

    assert judged({"peers": PEERS}) == "3/3 -0.041 veto:agreed"
    assert judged({"peers": {**PEERS, "role": "decide", "counted": 2, "delta": 0.12, "effect": "decided"}}) == \
        "2/3 +0.120 decide:decided"
    assert judged({"peers": {**PEERS, "counted": 1, "delta": None, "effect": "too-few"}}) == "1/3 too-few"
    assert judged({"heldout": {"hi": 2.5}}) is None and judged({}) is None and judged(None) is None


def test_fedem_peers_lists_each_peers_standing(hub):
    # Execute
    rows = as_json(hub, "peers")
    out = invoke(hub, "peers").output

    # Assert: one row a peer, from its asks and its standing; a peer never checked weighs 1
    assert rows == [
        {"peer": PEER_A, "asked": 2, "counted": 1, "outcomes": {"counted": 1, "late": 1}, "agreed": 3,
         "disagreed": 1, "weight": 0.8, "updated": "2023-11-14T22:16:40+00:00"},
        {"peer": PEER_B, "asked": 1, "counted": 1, "outcomes": {"counted": 1}, "agreed": 0, "disagreed": 0,
         "weight": 1.0, "updated": None},
        {"peer": "c-0d0d0d0d0d0d", "asked": 1, "counted": 0, "outcomes": {"unanswered": 1}, "agreed": 0,
         "disagreed": 0, "weight": 1.0, "updated": None},
    ]
    assert "Peers judging pushes" in out
    assert [c.strip() for c in next(line for line in out.splitlines() if PEER_A in line).split("│")] == [
        PEER_A, "2", "1", "3", "1", "0.80"]


def test_fedem_peers_on_a_hub_no_peer_judged_says_so(tmp_path):
    hub = make_hub(tmp_path)

    assert as_json(hub, "peers") == []
    assert "no peer has judged a push yet" in invoke(hub, "peers").output


def test_fedem_peers_reveals_identities_only_when_asked(hub):
    alias = pseudonyms(hub)
    with Registry.open(hub) as registry:
        registry.update_peer_standing(alias["node:7"], 1, 0, T0)

    assert alias["node:7"] in [r["peer"] for r in as_json(hub, "peers")]
    assert "node:7" in [r["peer"] for r in as_json(hub, "peers", "--reveal")]
    assert "node:7" not in invoke(hub, "peers").output


# -- the ledger site -----------------------------------------------------------------------------
def test_the_site_shows_the_hub_and_each_peer_by_pseudonym(hub, tmp_path):
    # Prepare: a pseudonym with markup, to see it escaped (the registry's pseudonyms never have any)
    with Registry.open(hub) as registry:
        registry.add_contribution(registry.pseudonym("sim:5"), "te", None, T0 + 400, "d5", {}, {
            "heldout": {"te": 3.0}, "hub": {**HUB, "accepted": False},
            "peers": {**PEERS, "reports": [{**PEERS["reports"][0], "peer": "<b>c-x</b>"}]}}, "rejected", "vetoed")
    out = tmp_path / "site"

    # Execute
    invoke(hub, "site", "--out", str(out))
    with Registry.open(hub, readonly=True) as registry:
        site = site_data(registry, T0 + 500)

    # Assert: the ledger's rows carry the judgement (None without peers); its page shows it in the
    # held-out loss cell, so its headings are those it had
    rows = {as_dict(r)["id"]: as_dict(r) for r in site["ledger"]}
    assert (rows[1]["judges"], rows[2]["judges"]) == (None, None)
    assert rows[3]["judges"] == {"hub": HUB, "peers": PEERS}
    assert LEDGER_COLUMNS[-2:] == ("judges", "reason")
    ledger = (out / "ledger.html").read_text()
    assert 'data-key="judges"' not in ledger and 'data-key="heldout"' in ledger
    page = (out / "contributors" / f"{pseudonyms(hub)['sim:3']}.html").read_text()
    assert "hub -0.021 on 480 tokens (accept); peers 3/3 -0.041 on 1,536 tokens (veto: agreed)" in page
    assert f"<li>{PEER_A} -0.030 on 512 tokens, weight 1.00, counted</li>" in page
    assert f"<li>{PEER_B} -0.052 on 512 tokens, weight 0.50, counted</li>" in page
    assert "peers 1/3 - on 1,536 tokens (decide: too-few)" in page
    # a contribution without peers: its cell is the losses alone
    assert re.search(r"<td>hi 2\.500</td>", page)
    other = (out / "contributors" / f"{pseudonyms(hub)['sim:5']}.html").read_text()
    assert "(reject)" in other and "&lt;b&gt;c-x&lt;/b&gt;" in other and "<b>c-x" not in other
    data = "".join(p.read_text() for p in (out / "data").glob("ledger-0*.js"))
    assert PEER_B in data and json.dumps(PEER_A) in data


def test_judgement_formats_match_the_ledger_script():
    judges = {"hub": HUB, "peers": PEERS}

    assert render.judged(judges) == "hub -0.021 on 480 tokens (accept); peers 3/3 -0.041 on 1,536 tokens (veto: agreed)"
    assert render.judged({"hub": None, "peers": {**PEERS, "delta": None}}).startswith("peers 3/3 - on")
    assert render.judged({"hub": None, "peers": {**PEERS, "role": "", "effect": ""}}).endswith("1,536 tokens")
    assert render.peer_report(PEERS["reports"][1]) == f"{PEER_B} -0.052 on 512 tokens, weight 0.50, counted"
    assert (render.signed(-0.0), render.signed(0.12), render.weight(None)) == ("+0.000", "+0.120", "-")
    script = (Path(render.__file__).parent / "assets" / "site.js").read_text()
    assert '(x >= 0 ? "+" : "") + x.toFixed(3)' in script and 'if (name === "judges") { return; }' in script


def test_a_judgement_holding_no_numbers_is_shown_with_dashes_not_raised():
    from fedem_flwr.site.data import judges_of

    odd = {"hub": {"tokens": "many", "delta": [1], "accepted": True},
           "peers": {**PEERS, "delta": "x", "tokens": {"hi": 1}, "reports": [{"peer": PEER_A, "delta": True}, 7]}}
    judges = judges_of(odd)

    assert judges["hub"] == {"tokens": None, "delta": None, "accepted": True}
    assert judges["peers"]["reports"] == [{"peer": PEER_A, "tokens": None, "delta": None, "weight": None,
                                           "outcome": None}]
    assert render.judged(judges) == "hub - on - tokens (accept); peers 3/3 - on - tokens (veto: agreed)"
    assert render.peer_report(judges["peers"]["reports"][0]) == f"{PEER_A} - on - tokens, weight -, -"
    assert judges_of({"peers": {**PEERS, "reports": 5}})["peers"]["reports"] == []
