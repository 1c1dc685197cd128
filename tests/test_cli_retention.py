"""``fedem prune`` through click's CliRunner: a dry run lists and changes nothing, a real prune removes
files under the writer lock and keeps rows, a running hub is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedem_flwr.cli import cli
from fedem_flwr.hub.paths import HubWriterLock
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.stores import open_store

T0 = 1_700_000_000.0


@pytest.fixture
def hub(tmp_path) -> Path:
    """Bases v0 and v1; adapter ``hi`` v0 (on v0), v1 and v2 (on v1)."""
    path = tmp_path / "hub"
    store = open_store(path)
    with Registry.open(path / "registry.sqlite") as registry:
        for n in range(2):
            ref = _put(store, tmp_path, "fedem/base", f"v{n}")
            registry.add_checkpoint(n - 1 if n else None, "init" if n == 0 else "merge", ref.repo, ref.revision,
                                    ref.digest, {}, T0 + n)
        registry.add_adapter("hi", ["hi"], "causal-lm", {"r": 8}, T0)
        for n in range(3):
            ref = _put(store, tmp_path, "fedem/adapter-hi", f"v{n}")
            registry.add_adapter_version("hi", min(n, 1), n - 1 if n else None, ref.repo, ref.revision, ref.digest,
                                         {}, T0 + n)
    return path


def _put(store, tmp: Path, repo: str, revision: str):
    folder = tmp / "src" / repo.replace("/", "-") / revision
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"revision": revision}))
    return store.put(repo, revision, folder, message=revision)


def invoke(hub: Path, *args: str, code: int = 0):
    result = CliRunner().invoke(cli, ["--hub", str(hub), "prune", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_a_dry_run_lists_what_would_go_and_why_the_rest_stays(hub):
    report = json.loads(invoke(hub, "--bases", "1", "--adapter-versions", "1", "--dry-run", "--json").output)

    assert report["dry_run"] is True and report["skipped"] is None
    assert report["settings"] == {"bases": 1, "adapter_versions": 1, "publish_first": False}
    assert [(i["kind"], i["adapter"], i["version"]) for i in report["removed"]] == [
        ("base", None, 0), ("adapter-version", "hi", 0), ("adapter-version", "hi", 1)]
    assert report["bytes_freed"] == sum(i["bytes"] for i in report["removed"]) > 0
    assert [(i["version"], i["reasons"]) for i in report["kept"]] == [
        (1, ["newest", "adapter-base", "recent"]), (2, ["latest", "recent"])]
    assert report["kept_by_reason"] == {"adapter-base": 1, "latest": 1, "newest": 1, "recent": 2}
    assert (hub / "store/fedem/base/v0").is_dir()  # nothing changed
    with Registry.open(hub / "registry.sqlite", readonly=True) as registry:
        assert all(c.pruned is None for c in registry.checkpoints())


def test_a_prune_removes_the_files_keeps_the_rows_and_verify_says_ok(hub):
    table = invoke(hub, "--adapter-versions", "2").output
    verify = json.loads(CliRunner().invoke(cli, ["--hub", str(hub), "verify", "--json"]).output)
    versions = json.loads(CliRunner().invoke(cli, ["--hub", str(hub), "adapters", "hi", "--json"]).output)

    assert "removed 1 (hi v0), " in table.splitlines()[-1] and "Retention" in table
    assert not (hub / "store/fedem/adapter-hi/v0").exists() and (hub / "store/fedem/base/v0").is_dir()
    assert [(v["version"], v["where"], v["path"] is None) for v in versions] == [
        (0, ["pruned"], True), (1, ["local"], False), (2, ["local"], False)]
    assert verify == {"ok": True, "checked": {"checkpoints": 2, "adapter_versions": 3, "pruned": 1}, "problems": []}


def test_prune_needs_a_count_and_refuses_while_the_hub_runs(hub):
    assert "give --bases N, --adapter-versions N or both" in invoke(hub, code=2).output
    with HubWriterLock(hub):
        refused = invoke(hub, "--bases", "1", code=1).output
        dry = json.loads(invoke(hub, "--bases", "1", "--dry-run", "--json").output)  # a dry run only reads

    assert "cannot prune while the hub is running" in refused and "locked by another writer" in refused
    assert [i["version"] for i in dry["removed"]] == [0]
    assert (hub / "store/fedem/base/v0").is_dir()
