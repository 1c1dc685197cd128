"""``fedem`` on a hub whose base improved: the lineage in ``checkpoints``, merges and CPT so far and
what is due next in ``status``, held-out loss across base versions in ``report``, and ``merge``
leaving a request for the running hub without taking its lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import T0, as_json, invoke, make_hub, pseudonyms, put

from fedem_flwr.hub.merge_request import merge_request_path, pending_merge_request, take_merge_request
from fedem_flwr.hub.paths import HubWriterLock
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.stores import open_store


def iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


@pytest.fixture
def lineage_hub(tmp_path) -> Path:
    """make_hub's hub (base v0; hi v0, v1 from sim:3), then: merge v1 absorbing hi v1; hi v2 rebased on v1;
    CPT v2 at 200 steps; a push to te accepted on v2; a merge refused on v2; settings recorded."""
    path = make_hub(tmp_path)
    store = open_store(path)
    with Registry.open(path) as registry:
        ref = put(store, tmp_path, "fedem/base", "v1", {"config.json": '{"merged": 1}'})
        registry.add_checkpoint(0, "merge", ref.repo, ref.revision, ref.digest,
                                {"heldout": {"hi": 4.0, "te": 4.5}, "merge": {"method": "sum", "seed": None}},
                                T0 + 600, absorbed=[("hi", 1, 1.0, "sum", None)])
        ref = put(store, tmp_path, "fedem/adapter-hi", "v2", {"adapter_model.safetensors": "zero"})
        registry.add_adapter_version("hi", 1, 1, ref.repo, ref.revision, ref.digest, {"heldout": {"hi": 4.0}},
                                     T0 + 600, kind="rebase")
        ref = put(store, tmp_path, "fedem/base", "v2", {"config.json": '{"cpt": 1}'})
        registry.add_checkpoint(1, "cpt", ref.repo, ref.revision, ref.digest,
                                {"heldout": {"hi": 3.9, "te": 4.4}, "cpt": {"steps": 200, "tokens": 409600}}, T0 + 900)
        registry.add_base_attempt("merge", 2, "merge-gate: te 4.400 -> 4.600 (+0.200) beyond tolerance 0.050",
                                  {"heldout": {"te": 4.6}}, T0 + 1000)
        registry.save_lease(Lease(3, "te", "sim:5", 2, 0, T0 + 1100, T0 + 2000, "released", T0 + 1200, "accepted"))
        ref = put(store, tmp_path, "fedem/adapter-te", "v1", {"adapter_model.safetensors": "te 1"})
        registry.add_adapter_version("te", 2, 0, ref.repo, ref.revision, ref.digest, {"heldout": {"te": 4.3}}, T0 + 1200)
        registry.add_contribution(registry.pseudonym("sim:5"), "te", 3, T0 + 1200, "d3", {"ok": True}, {}, "accepted",
                                  "own languages improved", 1, base_version=2, judged_base_version=2)
        registry.put_setting("merge", {"every_accepted": 4, "every_s": 3600.0, "method": "sum"}, T0)
        registry.put_setting("cpt", {"enabled": True, "checkpoint_every": 200}, T0)
    return path


def test_checkpoints_list_the_lineage_with_every_field(lineage_hub):
    alias = pseudonyms(lineage_hub)
    rows = as_json(lineage_hub, "checkpoints")
    store = lineage_hub / "store" / "fedem" / "base"

    assert [(r["version"], r["parent"], r["source"], r["path"]) for r in rows] == [
        (0, None, "init", str(store / "v0")), (1, 0, "merge", str(store / "v1")), (2, 1, "cpt", str(store / "v2"))]
    assert rows[1] == {"version": 1, "parent": 0, "source": "merge", "path": str(store / "v1"), "repo": "fedem/base",
                       "revision": "v1", "digest": rows[1]["digest"], "created": iso(T0 + 600),
                       "metrics": {"heldout": {"hi": 4.0, "te": 4.5}, "merge": {"method": "sum", "seed": None}},
                       "absorbed": [{"adapter": "hi", "adapter_version": 1, "weight": 1.0, "method": "sum",
                                     "seed": None, "contributors": [alias["sim:3"]]}],
                       "where": ["local"], "pruned": None}
    assert rows[2]["metrics"]["cpt"] == {"steps": 200, "tokens": 409600} and rows[2]["absorbed"] == []
    (te,) = as_json(lineage_hub, "contributions", "--adapter", "te", "--limit", "1")
    assert (te["base_version"], te["judged_base_version"]) == (2, 2)
    assert [v["kind"] for v in as_json(lineage_hub, "adapters", "hi")] == ["fresh", "push", "rebase"]
    revealed = as_json(lineage_hub, "checkpoints", "--reveal")
    assert revealed[1]["absorbed"][0]["contributors"] == ["sim:3"]


def test_checkpoints_table_shows_loss_and_absorbed(lineage_hub):
    out = invoke(lineage_hub, "checkpoints").output
    assert "4.250 (2)" in out and "hi v1" in out and "4.150 (2)" in out


def test_status_shows_merges_cpt_and_what_is_due(lineage_hub):
    status = as_json(lineage_hub, "status")
    assert status["base"]["version"] == 2
    assert status["lineage"] == {
        "merges": 1, "cpt": 1, "refused": {"merge": 1, "cpt": 0},
        # the counters restart at the merge refused on v2
        "next_merge": {"base_version": 2, "since": iso(T0 + 1000), "accepted_since": 1, "every_accepted": 4,
                       "every_s": 3600.0, "due_at": iso(T0 + 4600), "requested_at": None},
        "next_cpt": {"enabled": True, "steps": 200, "checkpoint_every": 200, "next_at_step": 400},
    }
    out = invoke(lineage_hub, "status").output
    assert "lineage    1 merge(s), 1 CPT; refused 1 merge(s), 0 CPT" in out
    assert "next merge 1 accepted since v2; merge at 4; due now by time" in out  # T0 + 4600 is long past
    assert "checkpoint at step 400 (every 200 steps, 200 so far)" in out


def test_status_says_unknown_without_recorded_settings(tmp_path):
    hub = make_hub(tmp_path)
    out = invoke(hub, "status").output
    assert "next merge 0 accepted since v0; due: unknown (merge settings not recorded)" in out
    assert "next CPT   unknown (cpt settings not recorded)" in out


def test_merge_queues_a_request_without_the_lock_and_the_hub_takes_it(lineage_hub):
    # Execute: twice while a hub holds the writer lock
    with HubWriterLock(lineage_hub):
        first = as_json(lineage_hub, "merge")
        second = invoke(lineage_hub, "merge")
        status = as_json(lineage_hub, "status")
    # Assert
    assert first["new"] is True and first["writer"]["pid"] > 0
    assert "a merge request is already queued" in second.output
    assert "the running hub (pid" in second.output and "takes it at its next loop turn" in second.output
    assert status["lineage"]["next_merge"]["requested_at"] == first["requested_at"]
    assert "requested at" in invoke(lineage_hub, "status").output
    taken = take_merge_request(lineage_hub)
    assert iso(taken["requested_at"]) == first["requested_at"]
    assert take_merge_request(lineage_hub) is None and pending_merge_request(lineage_hub) is None
    assert as_json(lineage_hub, "status")["lineage"]["next_merge"]["requested_at"] is None


def test_merge_with_no_hub_running_waits_for_the_next_start(lineage_hub):
    out = invoke(lineage_hub, "merge").output
    assert out.startswith("merge requested at ") and "no hub is running; the hub takes it at its next start" in out
    assert json.loads(merge_request_path(lineage_hub).read_text())["requested_at"] > T0


def test_merge_needs_a_hub(tmp_path):
    result = invoke(tmp_path / "nowhere", "merge", code=1)
    assert "no hub state at" in result.output and not (tmp_path / "nowhere").exists()


def test_a_malformed_request_is_still_a_request(lineage_hub):
    merge_request_path(lineage_hub).write_text("not json")
    assert as_json(lineage_hub, "status")["lineage"]["next_merge"]["requested_at"] == "unknown"
    assert take_merge_request(lineage_hub) == {"requested_at": None}


def test_report_adds_held_out_loss_per_language_across_base_versions(lineage_hub, tmp_path):
    out = tmp_path / "report"

    data = as_json(lineage_hub, "report", "--out", str(out))
    table = invoke(lineage_hub, "report", "--out", str(out)).output

    assert data["bases"] == [
        {"version": 0, "parent": None, "source": "init", "heldout": {}, "absorbed": []},
        {"version": 1, "parent": 0, "source": "merge", "heldout": {"hi": 4.0, "te": 4.5}, "absorbed": ["hi v1"]},
        {"version": 2, "parent": 1, "source": "cpt", "heldout": {"hi": 3.9, "te": 4.4}, "absorbed": []},
    ]
    assert data["refused_bases"] == [{"source": "merge", "parent": 2,
                                      "reason": "merge-gate: te 4.400 -> 4.600 (+0.200) beyond tolerance 0.050"}]
    assert (out / "bases.png").stat().st_size > 10_000 and data["bases_figure"] == str(out / "bases.png")
    assert json.loads((out / "summary.json").read_text()) == data
    assert "Held-out loss per base version" in table
    assert [line.replace("│", " ").split() for line in table.splitlines() if line.startswith("te ")] == [
        ["te", "-", "4.500", "4.400"]]
