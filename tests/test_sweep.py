"""The sweep: grid expansion, cell keys, fresh hubs with the study secret, resume, failures, the
results table, parallel cells and the report -- with a cheap real cell function that writes a
cell's result and trace through the simulation recorder."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedem_flwr.cli import cli
from fedem_flwr.hub.paths import secret_path
from fedem_flwr.simulation.record import Counters, Trace, read_result, write_result
from simulations import cells as cells_mod
from simulations import report
from simulations.cells import CellError, cell_key, fresh_hub, hydra_overrides, normalize, run_cell, study_secret
from simulations.report import write_report
from simulations.sweep import expand, run_sweep

RUNS_LOG = "runs.log"
CHECKOUT = Path(__file__).resolve().parents[1]


def cheap_cell(cell, cell_dir, hub, **_):
    """Writes a result and a 3-row trace whose numbers follow from the cell's seed and method."""
    Path(cell_dir).parent.joinpath(RUNS_LOG).open("a").write(f"{cell_key(cell)} {os.getpid()}\n")
    if cell.get("test.together"):  # wait until this many cells have started: proof they run at once
        Path(cell_dir).parent.joinpath(f"started-{cell_key(cell)}").touch()
        deadline = time.monotonic() + 20
        while len(list(Path(cell_dir).parent.glob("started-*"))) < cell["test.together"]:
            if time.monotonic() > deadline:
                raise TimeoutError("the other cells never started")
            time.sleep(0.05)
    if cell.get("test.fail"):
        raise RuntimeError(f"`test.fail` is {cell['test.fail']!r}")
    if cell.get("test.no_result"):
        return {}
    seed, fed = cell["seed"], cell["method"] != "centralized"
    trace = Trace(hub)
    for step in range(3):
        counters = Counters(tokens=100 * (step + 1), accepted=step, leases=step + 1)
        trace.row(3600.0 * step, counters, leases_active=1, online=2 + step,
                  losses={"en": 3.0 - step + seed, "hi": 4.0 - step})
    trace.close()
    counters = Counters(tokens=300 + seed, tokens_wasted=10 * seed, bytes_moved=1000, accepted=2 + seed, rejected=1)
    write_result(hub, method=cell["method"], losses={"en": 1.0 + seed, "hi": 2.0}, counters=counters,
                 sim_seconds=7200.0 if fed else None, wall_seconds=1.5,
                 extra={"pid": os.getpid(), "contributors": 1, "initial_losses": {"en": 5.0}})
    return read_result(hub)


CHEAP = {m: cheap_cell for m in cells_mod.METHODS}


def _rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _runs(out: Path) -> list[str]:
    path = out / "cells" / RUNS_LOG
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_grid_is_the_product_of_its_lists_and_baselines_ignore_relay_dimensions():
    # Prepare
    grid = {"method": ["relay", "centralized"], "seed": [0, 1], "policy": ["random", "language"],
            "merge": [True, False], "contributors": 20}

    # Execute
    cells = expand(grid)

    # Assert: relay 2 seeds x 2 policies x 2 merge; centralized once per seed
    assert sum(c["method"] == "relay" for c in cells) == 8
    assert [c for c in cells if c["method"] == "centralized"] == [
        {"method": "centralized", "seed": 0, "contributors": 20},
        {"method": "centralized", "seed": 1, "contributors": 20}]
    assert len({cell_key(c) for c in cells}) == len(cells)
    # a list of grids is their union, duplicates once
    assert len(expand([grid, {"method": "centralized", "seed": 0}])) == 10


def test_cell_key_is_the_hash_of_the_canonical_cell():
    cell = {"method": "relay", "seed": 2, "policy": "random", "train.max_steps": 3}
    canonical = json.dumps(normalize(cell), sort_keys=True, separators=(",", ":"))
    assert cell_key(cell) == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    # order, stated defaults and dimensions that do not apply leave it unchanged
    assert cell_key(dict(reversed(list(cell.items())))) == cell_key(cell)
    assert cell_key({**cell, "contributors": 20, "clock": "virtual"}) == cell_key(cell)
    assert cell_key({"method": "local-only", "policy": "random", "relay.drain_s": 5}) == cell_key(
        {"method": "local-only"})
    assert cell_key({**cell, "seed": 3}) != cell_key(cell)
    # stable across versions, so an old sweep folder resumes
    assert cell_key({"method": "centralized", "seed": 0}) == "88c97c62fd2c"


def test_bad_cells_are_refused_with_the_key_and_value():
    with pytest.raises(CellError, match="`method` is 'fedprox'"):
        normalize({"method": "fedprox"})
    with pytest.raises(CellError, match="unknown dimension `polcy`"):
        normalize({"method": "relay", "polcy": "random"})
    with pytest.raises(CellError, match="`contributors` is 0"):
        normalize({"method": "relay", "contributors": 0})


def test_overrides_compose_into_the_config_the_cell_describes():
    from fedem_flwr.config.loader import load_config

    cell = {"method": "relay", "seed": 4, "policy": "random", "lease_ttl_s": 600, "merge": False, "cpt": True,
            "vanish_prob": 0.1, "max_tokens": 5000, "overrides": "train.max_steps=3"}
    cfg = load_config(hydra_overrides(cell))
    assert (cfg.seed, cfg.relay.policy, cfg.relay.lease_ttl_s, cfg.cpt.enabled) == (4, "random", 600, True)
    assert (cfg.merge.every_accepted, cfg.merge.every_s) == (None, None)
    assert (cfg.sim.method, cfg.sim.clock, cfg.sim.vanish_prob, cfg.sim.max_tokens) == ("relay", "virtual", 0.1, 5000)
    assert cfg.train.max_steps == 3
    assert "sim.method=centralized" not in hydra_overrides({"method": "centralized"})


def test_fresh_hub_is_empty_and_holds_the_seeds_secret(tmp_path):
    hub = fresh_hub(tmp_path / "a", 7)
    (hub / "registry.sqlite").write_text("stale")
    again = fresh_hub(tmp_path / "a", 7)
    other = fresh_hub(tmp_path / "b", 8)
    assert [p.name for p in again.iterdir()] == ["secret"]
    assert secret_path(again).read_text() == study_secret(7).hex() + "\n"
    assert secret_path(again).stat().st_mode & 0o777 == 0o600
    assert secret_path(other).read_text() != secret_path(again).read_text()


def test_second_run_runs_nothing_and_an_interrupted_cell_reruns_from_an_empty_hub(tmp_path):
    # Prepare: one cell cut short (no status, junk in its hub)
    cells = expand({"method": ["relay", "centralized"], "seed": [0, 1]})
    cut = tmp_path / "cells" / cell_key(cells[0])
    (cut / "hub").mkdir(parents=True)
    (cut / "hub" / "junk").write_text("half a run")
    (cut / "cell.json").write_text(json.dumps(cells[0]))

    # Execute (a cell given twice runs once)
    first = run_sweep([*cells, dict(reversed(list(cells[1].items())))], tmp_path, runners=CHEAP, progress=False)
    second = run_sweep(cells, tmp_path, runners=CHEAP, progress=False)

    # Assert
    assert first == {"skipped": 0, "ok": 4, "failed": 0}
    assert second == {"skipped": 4, "ok": 0, "failed": 0}
    assert len(_runs(tmp_path)) == 4
    assert not (cut / "hub" / "junk").exists()
    assert [r["status"] for r in _rows(tmp_path)] == ["ok"] * 4


def test_a_failed_cell_is_recorded_with_its_reason_and_the_sweep_goes_on(tmp_path):
    cells = expand({"method": "relay", "seed": [0, 1, 2], "test.fail": [False]})
    cells[1]["test.fail"] = "yes"
    cells.append(normalize({"method": "relay", "test.no_result": True}))

    counts = run_sweep(cells, tmp_path, runners=CHEAP, progress=False)

    rows = {r["key"]: r for r in _rows(tmp_path)}
    assert counts == {"skipped": 0, "ok": 2, "failed": 2}
    assert rows[cell_key(cells[1])]["status"] == "failed"
    assert rows[cell_key(cells[1])]["reason"] == "RuntimeError: `test.fail` is 'yes'"
    assert "left no sim/result.json" in rows[cell_key(cells[3])]["reason"]
    assert rows[cell_key(cells[1])]["loss_mean"] == ""
    # failed cells have no result, so the next sweep tries them again, and only them
    run_sweep(cells, tmp_path, runners=CHEAP, progress=False)
    assert len(_runs(tmp_path)) == 6


def test_results_table_merges_sweeps_into_one_row_per_cell(tmp_path):
    run_sweep(expand({"method": "centralized", "seed": [0, 1]}), tmp_path, runners=CHEAP, progress=False)
    run_sweep(expand({"method": "relay", "seed": 0, "policy": "random"}), tmp_path, runners=CHEAP, progress=False)

    rows = _rows(tmp_path)
    header = list(rows[0])
    assert sorted(r["method"] for r in rows) == ["centralized", "centralized", "relay"]
    assert header[:4] == ["key", "status", "reason", "cell_wall_s"]
    assert header[-2:] == ["loss.en", "loss.hi"]
    relay = next(r for r in rows if r["method"] == "relay")
    assert (relay["policy"], relay["loss.en"], relay["tokens"], relay["accepted"]) == ("random", "1.0", "300", "2")
    assert next(r for r in rows if r["method"] == "centralized")["policy"] == ""
    # a result named like a setting does not overwrite it; a nested one is JSON
    assert (relay["contributors"], relay["result_contributors"], relay["initial_losses"]) == ("20", "1", '{"en": 5.0}')


def test_parallel_cells_run_at_once_in_several_processes(tmp_path):
    cells = expand({"method": "relay", "seed": [0, 1, 2, 3], "test.together": 2})

    counts = run_sweep(cells, tmp_path, jobs=2, runners=CHEAP, progress=False)

    assert counts == {"skipped": 0, "ok": 4, "failed": 0}
    pids = {line.split()[1] for line in _runs(tmp_path)}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert {r["pid"] for r in _rows(tmp_path)} == pids


def test_run_cell_records_status_and_returns_the_result(tmp_path):
    status = run_cell({"method": "relay", "seed": 1}, tmp_path / "c", runners=CHEAP)
    saved = json.loads((tmp_path / "c" / "status.json").read_text())
    assert (status["status"], status["loss_mean"], saved["status"]) == ("ok", 2.0, "ok")
    assert json.loads((tmp_path / "c" / "cell.json").read_text())["key"] == cell_key({"method": "relay", "seed": 1})


def test_report_tables_mean_and_spread_over_seeds_and_draws_the_plots(tmp_path):
    # Prepare: relay and centralized over seeds 0, 1, 2 (loss.en = 1 + seed), one failed cell
    cells = expand({"method": ["relay", "centralized"], "seed": [0, 1, 2]})
    cells.append(normalize({"method": "relay", "seed": 5, "test.fail": "x"}))
    run_sweep(cells, tmp_path, runners=CHEAP, progress=False)

    # Execute
    report = write_report(tmp_path).read_text()

    # Assert
    en = f"{statistics.fmean([1.0, 2.0, 3.0]):.3f} ± {statistics.stdev([1.0, 2.0, 3.0]):.3f}"
    mean = f"{statistics.fmean([1.5, 2.0, 2.5]):.3f} ± {statistics.stdev([1.5, 2.0, 2.5]):.3f}"
    lines = report.splitlines()
    relay_rows = [line for line in lines if line.startswith("| relay")]
    assert len(relay_rows) == 2  # totals and per language, seeds pooled; the failed cell is listed apart
    assert "held-out loss (mean) | base alone (mean) |" in report  # no test split in these cells
    assert relay_rows[0].startswith(f"| relay | 3 | {mean} | - | 301 ± 1 | 10 ± 10 | 0.0 ± 0.0 | 3.0 ± 1.0 |")
    # simulated hours to a mean loss of 3.5: the trace's mean is (7 + seed) / 2 - hour: 0, 1 and 1 h
    to_target = f"{statistics.fmean([0.0, 1.0, 1.0]):.2f} ± {statistics.stdev([0.0, 1.0, 1.0]):.2f}"
    assert relay_rows[0].endswith(f"| - | - | 2.00 ± 0.00 | {to_target} | 2 ± 0 |")
    assert relay_rows[1] == f"| relay | {en} | 2.000 ± 0.000 |"
    assert "| centralized | 3 |" in report and "| - | - | 2 ± 0 |" in report  # no simulated time
    assert "1 cell(s) without a result" in report and "RuntimeError" in report
    for name in ("loss_vs_tokens.png", "loss_vs_sim_time.png", "lease_utilisation.png"):
        assert (tmp_path / name).stat().st_size > 1000 and f"({name})" in report
    assert not (tmp_path / "merge_jumps.png").exists()  # no merges


def study_cell(cell, cell_dir, hub, **_):
    """A cell of a study with a test split: its trace follows the test loss (the held-out one stays
    at 9), the relay beats FedAvg by 0.5 on en and 0.2 on hi every seed, and each relay cell
    published one merge whose absorbed en got 0.1 * (seed + 1) worse."""
    seed, relay = cell["seed"], cell["method"] == "relay"
    slope = 1.0 if relay else (0.0 if seed == 1 else 0.25)  # FedAvg's seed 1 never reaches 3.5
    trace = Trace(hub)
    for step in range(3):
        trace.row(3600.0 * step, Counters(tokens=100 * (step + 1)), losses={"en": 9.0, "hi": 9.0},
                  test_losses={"en": 4.0 - slope * step, "hi": 4.0 - slope * step})
    trace.close()
    losses = {"en": 2.0 + seed + (0.0 if relay else 0.5), "hi": 2.8 if relay else 3.0}
    extra: dict = {"final_split": "test", "base_loss_mean": 5.0, "token_shares": {"en": 0.6, "hi": 0.4} if relay
                   else {"en": 0.5, "hi": 0.5}}
    if relay:
        extra.update(merge_attempts=2, merge_published=1, merges=[
            {"version": 1, "parent": 0, "sim_s": 3600.0, "base_losses": {"en": 5.0, "hi": 5.0},
             "absorbed": {"en": {"adapter": "en", "version": 3, "before": 2.5, "after": 2.5 + 0.1 * (seed + 1)}}}])
    write_result(hub, method=cell["method"], losses=losses, counters=Counters(tokens=300), sim_seconds=7200.0,
                 wall_seconds=1.0, extra=extra)
    return read_result(hub)


def test_a_study_report_gives_test_losses_paired_differences_merges_shares_and_time_to_target(tmp_path):
    # Prepare: two arms over seeds 0, 1, 2
    grid = [{"method": "relay", "arm": "relay centre", "seed": [0, 1, 2]},
            {"method": "fedavg-language", "arm": "fedavg-language", "seed": [0, 1, 2]}]
    run_sweep(expand(grid), tmp_path, runners={m: study_cell for m in cells_mod.METHODS}, progress=False)

    # Execute
    report = write_report(tmp_path).read_text()  # the reference defaults to fedavg-language

    # Assert: arms name the groups; the losses, curves and time to 3.5 are the test split's
    lines = report.splitlines()
    assert "| method | seeds | test loss (mean) | base alone (mean) |" in report
    assert "| h to test loss 3.5 | wall s |" in report
    relay = next(line for line in lines if line.startswith("| relay centre | 3 |"))
    fedavg = next(line for line in lines if line.startswith("| fedavg-language | 3 |"))
    assert relay.endswith("| 2.0 ± 0.0 | 1.0 ± 0.0 | 2.00 ± 0.00 | 1.00 ± 0.00 | 1 ± 0 |")
    assert fedavg.endswith("| - | - | 2.00 ± 0.00 | 2.00 ± 0.00 (2/3) | 1 ± 0 |")
    # relay minus FedAvg, per seed: -0.5 on en, -0.2 on hi, -0.35 on the mean
    assert "Paired difference from `fedavg-language`" in report
    assert "| relay centre | 3 | -0.350 ± 0.000 | -0.500 ± 0.000 | -0.200 ± 0.000 |" in lines
    # absorbed en: 2.5 before, 2.6 / 2.7 / 2.8 after
    assert "| relay centre | 3 | 0.200 ± 0.100 | 2.500 ± 0.000 | 2.700 ± 0.100 | 0.300 |" in lines
    assert "| relay centre | 0.600 ± 0.000 | 0.400 ± 0.000 |" in lines
    assert "| fedavg-language | 0.500 ± 0.000 | 0.500 ± 0.000 |" in lines
    assert (tmp_path / "merge_jumps.png").stat().st_size > 1000 and "(merge_jumps.png)" in report
    # another reference, named
    other = write_report(tmp_path, reference="relay centre").read_text()
    assert "| fedavg-language | 3 | 0.350 ± 0.000 | 0.500 ± 0.000 | 0.200 ± 0.000 |" in other.splitlines()


def test_a_grid_file_shares_settings_through_x_anchors(tmp_path):
    from simulations.sweep import load_grid

    (tmp_path / "grid.yaml").write_text(
        "x-setup: &setup\n  seed: [0, 1]\n  contributors: 4\n"
        "x-relay: &relay\n  method: relay\n  train.lr: 0.01\n"
        "grids:\n  - {<<: [*setup, *relay], arm: centre}\n  - {<<: [*setup, *relay], arm: fast, train.lr: 0.02}\n")
    (tmp_path / "bad.yaml").write_text("setup: {seed: 1}\ngrids: []\n")

    cells = expand(load_grid(tmp_path / "grid.yaml"))

    assert [(c["arm"], c["seed"], c["train.lr"], c["contributors"]) for c in cells] == [
        ("centre", 0, 0.01, 4), ("centre", 1, 0.01, 4), ("fast", 0, 0.02, 4), ("fast", 1, 0.02, 4)]
    assert "train.lr=0.02" in hydra_overrides(cells[2]) and not any(o.startswith("arm") for o in hydra_overrides(cells[2]))
    with pytest.raises(CellError, match="beside only `x-...` keys .*found setup"):
        load_grid(tmp_path / "bad.yaml")


def test_the_studys_grid_files_expand_on_the_reference_setup():
    from simulations.sweep import load_grid

    results = CHECKOUT / "simulations" / "results"
    for name, seeds in (("tuning", {100, 101, 102}), ("study", {0, 1, 2, 3, 4})):
        cells = expand(load_grid(results / f"{name}.yaml"))
        arms = {c["arm"] for c in cells}
        assert {c["seed"] for c in cells} == seeds and len(cells) == len(arms) * len(seeds)  # every arm, every seed
        for cell in cells:
            assert (cell["contributors"], cell["max_tokens"]) == (20, 300000)
            assert cell["overrides"].split() == ["data.languages=[hi,ta,bn,de,es,ru]", "train.max_steps=10",
                                                 "gate.check_others=false", "sim.fedavg_fraction=0.2",
                                                 "tokenizer.chat=false", "data.test_fraction=0.1"]
            assert cell.get("vanish_prob", 0.05) == 0.05
    study = {c["arm"] for c in expand(load_grid(results / "study.yaml"))}
    assert {"fedavg-language", "fedavg-global", "centralized", "local-only", "relay no merges"} <= study


def sim(*args: str, code: int = 0):
    """`fedem sim ARGS` from the checkout's top folder."""
    result = CliRunner().invoke(cli, ["sim", *args])
    assert result.exit_code == code, result.output
    return result


def test_cli_dry_run_lists_the_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(CHECKOUT)
    grid = tmp_path / "grid.yaml"
    grid.write_text("method: [relay, local-only]\nseed: [0, 1]\npolicy: random\n")
    args = ["sweep", "--grid", str(grid), "--seed", "3", "--merge", "on,off", "--out", str(tmp_path), "--dry-run"]

    lines = sim(*args).output.splitlines()
    listed = json.loads(sim(*args, "--json").output)

    assert len(lines) == 3  # relay x merge on/off at seed 3, local-only at seed 3
    assert all(" todo " in line and '"seed": 3' in line for line in lines)
    assert [(c["cell"]["method"], c["cell"].get("merge"), c["done"]) for c in listed] == [
        ("relay", True, False), ("relay", False, False), ("local-only", None, False)]


def test_cli_refuses_a_bad_grid_as_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(CHECKOUT)
    (tmp_path / "grid.yaml").write_text("method: [relay\n")

    assert "no `method`" in sim("sweep", "--seed", "1", "--dry-run", code=2).output
    assert "`--seed x`: invalid literal for int()" in sim("sweep", "--method", "relay", "--seed", "x", "--dry-run",
                                                          code=2).output
    assert "is not valid YAML" in sim("sweep", "--grid", str(tmp_path / "grid.yaml"), "--dry-run", code=2).output
    assert "`--set x=1` must read KEY=V1,V2" in sim("sweep", "--method", "relay", "--set", "x=1", "--dry-run",
                                                    code=2).output


def test_cli_sweep_runs_the_cells_and_writes_the_report(tmp_path, monkeypatch):
    # Prepare: the cheap cell function stands in for every method
    monkeypatch.chdir(CHECKOUT)
    monkeypatch.setattr(cells_mod, "RUNNERS", CHEAP)

    # Execute
    result = sim("sweep", "--method", "centralized,relay", "--seed", "0,1", "--jobs", "1", "--out", str(tmp_path))

    # Assert
    assert result.stdout.splitlines()[-2:] == [
        f"4 cells: 4 ok, 0 already done, 0 failed; table: {tmp_path / 'results.csv'}",
        f"report: {tmp_path / 'report.md'}"]
    assert len(_rows(tmp_path)) == 4 and (tmp_path / "report.md").is_file()
    assert sim("report", str(tmp_path)).output == f"{tmp_path / 'report.md'}\n"


def test_a_cell_on_a_ray_cluster_passes_no_cpu_count_to_ray(monkeypatch):
    from simulations.cells import federation_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cell = {"method": "relay", "contributors": 7}
    assert federation_config(cell, cell_cpus=2) == "num-supernodes=7 client-resources-num-cpus=1 init-args-num-cpus=2"
    # ray.init refuses num_cpus when it connects to a cluster
    assert federation_config(cell, ray_address="10.0.0.1:6379") == "num-supernodes=7 client-resources-num-cpus=1"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert "init-args" not in federation_config(cell)


def test_a_setting_some_cells_of_a_method_leave_at_its_default_splits_that_method_only():
    rows = [{"method": "relay", "seed": "0", "merge": ""}, {"method": "relay", "seed": "0", "merge": "False"},
            {"method": "relay", "seed": "1", "merge": ""}, {"method": "centralized", "seed": "0", "merge": ""}]
    varying, groups = report.group_by(rows)
    assert varying == ["merge"]
    assert {report.label(varying, key): len(members) for key, members in groups.items()} == {
        "relay": 2, "relay, merge=False": 1, "centralized": 1}
