"""``fedem`` through click's CliRunner: exit codes, exact JSON, pseudonyms unless --reveal, verify."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from fedem_flwr import __version__
from fedem_flwr.cli import cli
from fedem_flwr.hub.paths import HubWriterLock
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.stores import open_store

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20+00:00
ISO0 = "2023-11-14T22:13:20+00:00"
IDENTITIES = ("sim:3", "node:7", "pk:0badc0de")


def put(store, tmp: Path, repo: str, revision: str, files: dict[str, str]):
    folder = tmp / f"src-{repo.replace('/', '-')}-{revision}"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return store.put(repo, revision, folder, message=f"{repo} {revision}")


def adapter_files(version: int) -> dict[str, str]:
    return {"adapter_config.json": json.dumps({"base_model_name_or_path": "fedem/base", "r": 8}),
            "adapter_model.safetensors": f"weights {version}"}


@pytest.fixture
def hub(tmp_path) -> Path:
    return make_hub(tmp_path)


def make_hub(tmp_path: Path) -> Path:
    """A hub with base v0, adapters hi (v0, v1) and te (v0), one active and one ended lease."""
    path = tmp_path / "hub"
    store = open_store(path)
    with Registry.open(path) as registry:
        ref = put(store, tmp_path, "fedem/base", "v0", {"config.json": "{}"})
        registry.add_checkpoint(None, "init", ref.repo, ref.revision, ref.digest, {"loss": 5.5}, T0)
        for name, versions in (("hi", 2), ("te", 1)):
            registry.add_adapter(name, [name], "causal-lm", {"r": 8}, T0)
            for n in range(versions):
                ref = put(store, tmp_path, f"fedem/adapter-{name}", f"v{n}", adapter_files(n))
                registry.add_adapter_version(name, 0, n - 1 if n else None, ref.repo, ref.revision, ref.digest,
                                             {}, T0 + 60 * n)
        registry.save_lease(Lease(1, "hi", "sim:3", 0, 0, T0, T0 + 10800, "released", T0 + 60, "accepted"))
        registry.save_lease(Lease(2, "te", "node:7", 0, 0, T0 + 60, T0 + 10860))
        registry.add_contribution(registry.pseudonym("sim:3"), "hi", 1, T0 + 60, "d1", {"ok": True},
                                  {"heldout": {"hi": 2.5}}, "accepted", "own languages improved", 1)
        registry.add_contribution(registry.pseudonym("pk:0badc0de"), "te", None, T0 + 120, "d2", {"ok": False}, {},
                                  "rejected", "stale-token: lease 9 unknown")
    return path


def pseudonyms(hub: Path) -> dict[str, str]:
    with Registry.open(hub, readonly=True) as registry:
        return {identity: alias for alias, identity in registry.identities().items()}


def invoke(hub: Path, *args: str, code: int = 0):
    result = CliRunner().invoke(cli, ["--hub", str(hub), *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def as_json(hub: Path, *args: str):
    return json.loads(invoke(hub, *args, "--json").output)


def commands(group: click.Group, path: tuple[str, ...] = ()):
    """Every command and subcommand of ``group``, as its argument path."""
    for name, command in group.commands.items():
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def test_every_command_has_help_and_the_group_a_version():
    runner = CliRunner()
    for path in commands(cli):
        for flag in ("--help", "-h"):
            result = runner.invoke(cli, [*path, flag])
            assert result.exit_code == 0, path
            assert "Example: fedem" in result.output, path
    assert runner.invoke(cli, ["--version"]).output == f"fedem, version {__version__}\n"
    assert "FEDEM_HUB" in runner.invoke(cli, ["-h"]).output
    assert sorted(" ".join(path) for path in commands(cli)) == [
        "adapters", "backup", "certs", "checkpoints", "connection", "contributions", "leases", "merge", "node-key",
        "peers", "prune", "publish", "report", "restore", "run", "sim", "sim baseline", "sim report", "sim sweep",
        "site", "status", "superlink", "superlink status", "superlink stop", "verify"]


def test_status_json(hub):
    alias = pseudonyms(hub)
    store = hub / "store"
    assert as_json(hub, "status") == {
        "hub": str(hub),
        "writer": None,
        "base": {"version": 0, "path": str(store / "fedem/base/v0"), "source": "init", "created": ISO0},
        "lanes": "unknown",
        "adapters": [
            {"name": "hi", "version": 1, "path": str(store / "fedem/adapter-hi/v1"), "holders": [],
             "languages": ["hi"], "task": "causal-lm"},
            {"name": "te", "version": 0, "path": str(store / "fedem/adapter-te/v0"),
             "holders": [{"lane": 0, "holder": alias["node:7"], "token": 2}], "languages": ["te"],
             "task": "causal-lm"},
        ],
        "leases": [{"adapter": "te", "lane": 0, "holder": alias["node:7"], "token": 2,
                    "deadline": "2023-11-15T01:14:20+00:00"}],
        "contributions": {"accepted": 1, "rejected": 1},
        "lineage": {
            "merges": 0, "cpt": 0, "refused": {"merge": 0, "cpt": 0},
            "next_merge": {"base_version": 0, "since": ISO0, "accepted_since": 0, "every_accepted": "unknown",
                           "every_s": "unknown", "due_at": "unknown", "requested_at": None},
            "next_cpt": {"enabled": "unknown", "steps": None, "checkpoint_every": "unknown", "next_at_step": None},
        },
        "recent": [
            {"id": 2, "adapter": "te", "contributor": alias["pk:0badc0de"], "decision": "rejected",
             "reason": "stale-token: lease 9 unknown", "received": "2023-11-14T22:15:20+00:00"},
            {"id": 1, "adapter": "hi", "contributor": alias["sim:3"], "decision": "accepted",
             "reason": "own languages improved", "received": "2023-11-14T22:14:20+00:00"},
        ],
    }


def test_paths_load_as_plain_folders(hub):
    status = as_json(hub, "status")
    assert json.loads((Path(status["base"]["path"]) / "config.json").read_text()) == {}
    assert (Path(status["adapters"][0]["path"]) / "adapter_model.safetensors").read_text() == "weights 1"


def test_leases_json_active_and_all(hub):
    alias = pseudonyms(hub)
    active = {"token": 2, "adapter": "te", "lane": 0, "holder": alias["node:7"], "state": "active",
              "issued": "2023-11-14T22:14:20+00:00", "deadline": "2023-11-15T01:14:20+00:00", "ended": None,
              "outcome": None, "base_version": 0, "adapter_version": 0}
    ended = {"token": 1, "adapter": "hi", "lane": 0, "holder": alias["sim:3"], "state": "released", "issued": ISO0,
             "deadline": "2023-11-15T01:13:20+00:00", "ended": "2023-11-14T22:14:20+00:00", "outcome": "accepted",
             "base_version": 0, "adapter_version": 0}
    assert as_json(hub, "leases") == [active]
    assert as_json(hub, "leases", "--all") == [ended, active]


def hold_te_on_two_lanes(hub: Path, lanes: int = 0) -> None:
    """A second active lease on te, on lane 1 (sim:3, token 3); with ``lanes``, the hub's recorded `relay.lanes`."""
    with Registry.open(hub) as registry:
        registry.save_lease(Lease(3, "te", "sim:3", 0, 0, T0 + 120, T0 + 10920, lane=1))
        if lanes:
            registry.put_setting("relay", {"lanes": lanes}, updated=T0)


def test_status_and_leases_show_every_holder_of_an_adapter_with_its_lane(hub):
    # Prepare: te held on lane 0 (node:7, token 2) and lane 1 (sim:3, token 3); 3 lanes recorded
    hold_te_on_two_lanes(hub, lanes=3)
    alias = pseudonyms(hub)

    # Execute
    status = as_json(hub, "status")
    leases = as_json(hub, "leases")
    revealed = as_json(hub, "status", "--reveal")

    # Assert
    assert status["lanes"] == 3
    assert {a["name"]: a["holders"] for a in status["adapters"]} == {
        "hi": [],
        "te": [{"lane": 0, "holder": alias["node:7"], "token": 2}, {"lane": 1, "holder": alias["sim:3"], "token": 3}]}
    assert status["leases"] == [
        {"adapter": "te", "lane": 0, "holder": alias["node:7"], "token": 2, "deadline": "2023-11-15T01:14:20+00:00"},
        {"adapter": "te", "lane": 1, "holder": alias["sim:3"], "token": 3, "deadline": "2023-11-15T01:15:20+00:00"}]
    assert [(r["token"], r["adapter"], r["lane"], r["holder"]) for r in leases] == [
        (2, "te", 0, alias["node:7"]), (3, "te", 1, alias["sim:3"])]
    assert [h["holder"] for h in revealed["adapters"][1]["holders"]] == ["node:7", "sim:3"]
    assert [h["holder"] for h in as_json(hub, "adapters")[1]["holders"]] == [alias["node:7"], alias["sim:3"]]
    shown = [invoke(hub, *args).output + invoke(hub, *args, "--json").output for args in (("status",), ("leases",),
                                                                                          ("adapters",))]
    assert not any(identity in out for out in shown for identity in IDENTITIES)


def table(hub: Path, title: str, *args: str) -> list[list[str]]:
    """The heading and rows of the table ``title`` that ``fedem *args`` prints 150 columns wide, as cells."""
    lines = CliRunner().invoke(cli, ["--hub", str(hub), *args], env={"COLUMNS": "150"}).output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return [[cell.strip() for cell in re.split("[┃│]", line)] for line in lines[start:end] if "━" not in line]


def test_status_text_counts_holders_against_the_recorded_lanes(hub):
    # Prepare: te held on lanes 0 and 1 of the 3 the hub recorded
    hold_te_on_two_lanes(hub, lanes=3)
    alias = pseudonyms(hub)

    # Execute
    out = invoke(hub, "status").output

    # Assert: the lanes line, te's row naming both holders with their lanes, a lease row per lane
    assert "lanes      3 per adapter (relay.lanes)" in out.splitlines()
    assert table(hub, "Adapters", "status") == [
        ["adapter", "version", "languages", "task", "held", "holders"],
        ["hi", "1", "hi", "causal-lm", "0/3 lanes", "-"],
        ["te", "0", "te", "causal-lm", "2/3 lanes", f"{alias['node:7']} (lane 0), {alias['sim:3']} (lane 1)"]]
    assert table(hub, "Active leases", "status") == [
        ["token", "adapter", "lane", "holder", "deadline", "left"],
        ["2", "te", "0", alias["node:7"], "2023-11-15 01:14:20", "due"],
        ["3", "te", "1", alias["sim:3"], "2023-11-15 01:15:20", "due"]]


def test_status_text_without_recorded_lanes_counts_holders_only(hub):
    hold_te_on_two_lanes(hub)

    out = invoke(hub, "status").output

    assert as_json(hub, "status")["lanes"] == "unknown"
    assert "lanes      unknown (relay settings not recorded): holders are counted only" in out.splitlines()
    assert [row[4] for row in table(hub, "Adapters", "status")] == ["held", "0 holders", "2 holders"]


def test_leases_text_has_a_lane_column(hub):
    hold_te_on_two_lanes(hub)
    alias = pseudonyms(hub)

    active = table(hub, "Active leases", "leases")
    everything = table(hub, "Leases", "leases", "--all")

    assert [row[:4] for row in active] == [["token", "adapter", "lane", "holder"], ["2", "te", "0", alias["node:7"]],
                                           ["3", "te", "1", alias["sim:3"]]]
    assert [row[:5] for row in everything] == [
        ["token", "adapter", "lane", "holder", "state"], ["1", "hi", "0", alias["sim:3"], "released"],
        ["2", "te", "0", alias["node:7"], "active"], ["3", "te", "1", alias["sim:3"], "active"]]


def test_checkpoints_json(hub):
    (row,) = as_json(hub, "checkpoints")
    assert row == {"version": 0, "parent": None, "source": "init", "path": str(hub / "store/fedem/base/v0"),
                   "repo": "fedem/base", "revision": "v0", "digest": row["digest"], "created": ISO0,
                   "metrics": {"loss": 5.5}, "absorbed": [], "where": ["local"], "pruned": None}
    assert len(row["digest"]) == 64


def test_contributions_json_and_filters(hub):
    alias = pseudonyms(hub)
    rows = as_json(hub, "contributions")
    assert [r["id"] for r in rows] == [2, 1]
    assert rows[1] == {"id": 1, "contributor": alias["sim:3"], "adapter": "hi", "lease_token": 1,
                       "received": "2023-11-14T22:14:20+00:00", "decision": "accepted",
                       "reason": "own languages improved", "adapter_version": 1, "digest": "d1",
                       "validation": {"ok": True}, "evaluation": {"heldout": {"hi": 2.5}},
                       "base_version": None, "judged_base_version": None}
    assert [r["id"] for r in as_json(hub, "contributions", "--limit", "1")] == [2]
    assert [r["id"] for r in as_json(hub, "contributions", "--adapter", "hi")] == [1]


def test_adapters_json_and_versions(hub):
    rows = as_json(hub, "adapters")
    assert [(r["name"], r["version"], r["base_version"], r["task"], r["lora_spec"]) for r in rows] == [
        ("hi", 1, 0, "causal-lm", {"r": 8}), ("te", 0, 0, "causal-lm", {"r": 8})]
    versions = as_json(hub, "adapters", "hi")
    assert [(v["version"], v["parent_version"], v["kind"], v["revision"]) for v in versions] == [
        (0, None, "fresh", "v0"), (1, 0, "push", "v1")]
    assert versions[1]["path"] == str(hub / "store/fedem/adapter-hi/v1")
    result = invoke(hub, "adapters", "xx", code=1)
    assert "no adapter named 'xx' (adapters: hi, te)" in result.output


def test_identities_only_with_reveal(hub):
    # Prepare: every listing, as tables and as JSON
    listings = [("status",), ("leases", "--all"), ("contributions",), ("adapters",)]
    outputs = [invoke(hub, *args).output + invoke(hub, *args, "--json").output for args in listings]
    # Assert: no identity anywhere, so joining the outputs reveals nobody
    assert not any(identity in out for out in outputs for identity in IDENTITIES)
    assert pseudonyms(hub)["node:7"] in invoke(hub, "status").output
    revealed = as_json(hub, "status", "--reveal")
    assert revealed["leases"][0]["holder"] == "node:7"
    assert [r["contributor"] for r in revealed["recent"]] == ["pk:0badc0de", "sim:3"]
    assert [r["holder"] for r in as_json(hub, "leases", "--all", "--reveal")] == ["sim:3", "node:7"]


def test_tables_render(hub):
    out = invoke(hub, "status").output
    assert "Active leases" in out and "1 accepted, 1 rejected" in out and "none running" in out
    assert "Base checkpoints" in invoke(hub, "checkpoints").output


def test_status_names_a_running_writer_and_does_not_block(hub):
    with HubWriterLock(hub), Registry.open(hub) as writer, writer.atomic():
        writer.add_adapter("ta", ["ta"], "causal-lm", {}, T0)  # uncommitted while the reader runs
        status = as_json(hub, "status")
    assert status["writer"]["pid"] > 0 and status["writer"]["since"].endswith("+00:00")
    assert [a["name"] for a in status["adapters"]] == ["hi", "te"]


def test_hub_from_environment(hub):
    result = CliRunner().invoke(cli, ["checkpoints", "--json"], env={"FEDEM_HUB": str(hub)})
    assert result.exit_code == 0 and json.loads(result.output)[0]["version"] == 0


@pytest.mark.parametrize("command", ["status", "adapters", "leases", "checkpoints", "contributions", "verify"])
def test_missing_hub_is_a_clear_error(tmp_path, command):
    result = invoke(tmp_path / "nowhere", command, code=1)
    assert result.output.startswith(f"Error: no hub state at '{tmp_path / 'nowhere'}' (the folder does not exist)")


def test_newer_schema_is_a_clear_error(hub):
    with sqlite3.connect(hub / "registry.sqlite") as conn:
        conn.execute("PRAGMA user_version = 99")
    assert "schema version 99" in invoke(hub, "status", code=1).output


def test_verify_ok(hub):
    assert invoke(hub, "verify").output == "ok: 1 checkpoint(s), 3 adapter version(s) verified\n"
    assert as_json(hub, "verify") == {"ok": True, "checked": {"checkpoints": 1, "adapter_versions": 3, "pruned": 0},
                                      "problems": []}


def test_verify_names_each_problem(hub, tmp_path):
    # Prepare: a corrupt artifact, a missing revision, and an orphan (stored, never registered)
    (hub / "store/fedem/adapter-hi/v1/adapter_model.safetensors").write_text("tampered")
    for path in sorted((hub / "store/fedem/adapter-te/v0").iterdir()):
        path.unlink()
    (hub / "store/fedem/adapter-te/v0").rmdir()
    put(open_store(hub), tmp_path, "fedem/adapter-hi", "v2", adapter_files(2))
    # Execute
    result = invoke(hub, "verify", code=1)
    report = CliRunner().invoke(cli, ["--hub", str(hub), "verify", "--json"])
    # Assert
    lines = result.output.splitlines()
    assert any(line.startswith("mismatch: fedem/adapter-hi@v1: ") and "adapter_model.safetensors" in line
               for line in lines)
    assert any(line.startswith("missing: fedem/adapter-te@v0: ") for line in lines)
    assert any(line.startswith("orphan: fedem/adapter-hi@v2: ") for line in lines)
    assert lines[-1].endswith("problem(s) in 1 checkpoint(s), 3 adapter version(s)")
    assert report.exit_code == 1
    kinds = {(p["kind"], p["repo"], p["revision"]) for p in json.loads(report.output)["problems"]}
    assert {("mismatch", "fedem/adapter-hi", "v1"), ("orphan", "fedem/adapter-hi", "v2")} <= kinds
    assert ("missing", "fedem/adapter-te", "v0") in kinds


def test_verify_repair_removes_orphans_and_leftovers_and_lists_them(hub, tmp_path):
    # Prepare: an orphan (stored, never registered) and a temporary folder left by a crash
    put(open_store(hub), tmp_path, "fedem/adapter-hi", "v2", adapter_files(2))
    (hub / "store/.tmp/fedem--adapter-hi--v3--put-0000").mkdir(parents=True)
    before = json.loads(invoke(hub, "verify", "--json", code=1).output)
    assert [p["kind"] for p in before["problems"]] == ["orphan", "leftover"]

    # Execute
    result = invoke(hub, "verify", "--repair")

    # Assert
    assert result.output.splitlines() == [
        "removed orphan: fedem/adapter-hi@v2",
        "removed leftover: fedem--adapter-hi--v3--put-0000",
        "ok: 1 checkpoint(s), 3 adapter version(s) verified",
    ]
    assert not (hub / "store/fedem/adapter-hi/v2").exists()
    assert as_json(hub, "verify") == {"ok": True, "checked": {"checkpoints": 1, "adapter_versions": 3, "pruned": 0},
                                      "problems": []}


def test_verify_repair_keeps_what_it_cannot_repair_and_refuses_while_the_hub_runs(hub, tmp_path):
    put(open_store(hub), tmp_path, "fedem/adapter-hi", "v2", adapter_files(2))
    (hub / "store/fedem/adapter-hi/v1/adapter_model.safetensors").write_text("tampered")

    with HubWriterLock(hub):
        locked = invoke(hub, "verify", "--repair", code=1)
    report = json.loads(invoke(hub, "verify", "--repair", "--json", code=1).output)

    assert "locked by another writer" in locked.output
    assert [(p["kind"], p["revision"]) for p in report["removed"]] == [("orphan", "v2")]
    assert [(p["kind"], p["revision"]) for p in report["problems"]] == [("mismatch", "v1")]


def test_status_and_verify_read_a_hugging_face_hub_store_from_the_recorded_settings(local_hub, tmp_path):
    """The hub was set up with `hub.store=hf`: `fedem` finds endpoint and prefix in the registry,
    with no HF_ENDPOINT in its environment; `hub.private=true` made the repos private."""
    from huggingface_hub import HfApi

    from fedem_flwr.config.loader import load_config
    from fedem_flwr.relay.bootstrap import open_hub
    from tests.support.hf_server import hub_environment

    overrides = ["data.languages=[hi]", "hub.store=hf", "hub.repo_prefix=org/seshu", "hub.private=true"]
    with hub_environment(local_hub.endpoint, tmp_path / "hf-home"):
        open_hub(load_config(overrides), tmp_path / "hub").registry.close()

    status = as_json(tmp_path / "hub", "status")
    verify = invoke(tmp_path / "hub", "verify")

    assert status["base"]["path"] is not None and (Path(status["base"]["path"]) / "config.json").is_file()
    assert [(a["name"], a["version"]) for a in status["adapters"]] == [("hi", 0)]
    assert verify.output == "ok: 1 checkpoint(s), 1 adapter version(s) verified\n"
    api = HfApi(endpoint=local_hub.endpoint)
    assert [(m.id, api.model_info(m.id).private) for m in api.list_models(author="org")] == [
        ("org/seshu-adapter-hi", True), ("org/seshu-base", True)]


def test_publish_to_a_local_hub_endpoint(hub, tmp_path):
    from tests.support.hf_server import hub_environment, serve_hub

    with serve_hub(tmp_path / "remote") as remote, hub_environment(remote.endpoint, tmp_path / "hf-home"):
        result = invoke(hub, "publish", "--to", "hf", "--repo-prefix", "org/seshu", "--endpoint", remote.endpoint,
                        "--token", "test", "--json")
        again = invoke(hub, "publish", "--to", "hf", "--repo-prefix", "org/seshu", "--endpoint", remote.endpoint,
                       "--token", "test", "--json")
    assert json.loads(result.output) == {"target": "hf", "repos": [
        "org/seshu-base@v0", "org/seshu-adapter-hi@v0", "org/seshu-adapter-hi@v1", "org/seshu-adapter-te@v0"]}
    assert json.loads(again.output) == {"target": "hf", "repos": []}  # idempotent: nothing new to push


def test_report_writes_a_figure_and_a_summary(hub, tmp_path):
    out = tmp_path / "report"

    data = as_json(hub, "report", "--out", str(out))

    assert (data["accepted"], data["rejected"], data["leases"]) == (1, 1, 2)
    assert data["rejections"] == {"stale-token": 1}
    assert data["adapters"] == {}  # no held-out metrics recorded in this hub
    assert (out / "relay.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text()) == data


# ---- fedem run, fedem superlink, fedem sim: what needs no Flower process ---------------------


def test_run_refuses_a_folder_that_is_not_a_flower_app(tmp_path):
    result = CliRunner().invoke(cli, ["run", str(tmp_path)])

    assert result.exit_code == 1
    assert result.output == f"Error: `{tmp_path.resolve()}` holds no pyproject.toml: not a Flower app\n"


def test_superlink_status_and_stop_when_none_runs(tmp_path):
    runner = CliRunner()
    home = tmp_path / "flwr"

    status = runner.invoke(cli, ["superlink", "status", "--flwr-home", str(home)])
    as_json = runner.invoke(cli, ["superlink", "status", "--flwr-home", str(home), "--json"])
    stop = runner.invoke(cli, ["superlink", "stop", str(tmp_path)])

    assert status.output == f"No kept SuperLink runs for FLWR_HOME={home.resolve()}.\n"
    assert (as_json.exit_code, as_json.output) == (0, "null\n")
    assert (stop.exit_code, stop.output) == (0, f"No SuperLink runs for FLWR_HOME={(tmp_path / '.flwr').resolve()}.\n")


@pytest.mark.parametrize("args", [["sim", "sweep", "--method", "relay", "--dry-run"], ["sim", "report", "."]])
def test_sim_outside_a_checkout_says_to_run_it_from_one(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)

    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 1
    assert result.output.startswith("Error: `fedem sim` runs from a checkout of the fedem-flwr repository")
    assert f"{tmp_path.resolve()} holds no simulations/" in result.output


def test_sim_report_needs_a_sweep_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])

    result = CliRunner().invoke(cli, ["sim", "report", str(tmp_path)])

    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path} holds no results.csv: run `fedem sim sweep --out {tmp_path}` first.\n"


def test_sim_baseline_needs_a_hub_named_for_it():
    result = CliRunner().invoke(cli, ["sim", "baseline", "--method", "centralized"], env={"FEDEM_HUB": None})

    assert result.exit_code == 2
    assert "a baseline writes into its own hub folder" in result.output


def test_sim_baseline_offers_the_baselines_of_the_package():
    from fedem_flwr.cli.sim import BASELINES
    from fedem_flwr.simulation.baselines import METHODS

    assert BASELINES == METHODS
