"""Restoring a hub (``hub.restore``, ``fedem restore``): a snapshot plus a copy of the store rebuild the
hub, the store's later revisions are re-registered from their cards (or left as orphans), and no number
ever published or leased is used again. The last test loses the disk in the middle of a real relay."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from fedem_flwr.cli import cli
from fedem_flwr.errors import HubError
from fedem_flwr.hub.backup import SnapshotKey, write_snapshot
from fedem_flwr.hub.lineage import publish_base, store_adapter_version, version_card, write_adapter_card
from fedem_flwr.hub.model_card import base_card, write_card
from fedem_flwr.hub.paths import store_path
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.restore import restore_hub
from fedem_flwr.hub.store import LocalStore

T0 = 1_700_000_000.0
PASS = b"restore me"
FAST_N = 2 ** 12


class HandHub:
    """A hub written as the relay and the base keeper write one (cards first, then rows), without torch."""

    def __init__(self, path: Path, base_content: str = "{}", store=None, prefix: str = "t") -> None:
        self.path, self.prefix = path, prefix
        self.registry = Registry.open(path)
        self.store = store if store is not None else LocalStore(store_path(path))
        self.now = T0
        setting = {"kind": "hf", "endpoint": store.endpoint} if store is not None else {"kind": "local"}
        self.registry.put_setting("store", {**setting, "repo_prefix": prefix}, T0)
        ref = self.store.put(f"{prefix}/base", "v0", self.folder("base-v0", {"config.json": base_content},
                                                                  base_card(f"{prefix}/base", 0, None, "init")),
                             message="seed")
        self.registry.add_checkpoint(None, "init", ref.repo, ref.revision, ref.digest, {"heldout": {"hi": 5.0}}, T0)
        self.fresh("hi")

    def tick(self) -> float:
        self.now += 60
        return self.now

    def folder(self, name: str, files: dict[str, str], card=None) -> Path:
        folder = self.path.parent / "work" / f"{self.path.name}-{name}"
        folder.mkdir(parents=True)
        for file, text in files.items():
            (folder / file).write_text(text)
        if card is not None:
            write_card(folder, card)
        return folder

    def fresh(self, adapter: str) -> None:
        folder = self.folder(f"{adapter}-v0", {"adapter_model.safetensors": f"{adapter} fresh"})
        repo = f"{self.prefix}/adapter-{adapter}"
        write_adapter_card(folder, self.registry, self.store, repo=repo, adapter=adapter, version=0,
                           base_version=self.base, parent_version=None, kind="fresh", heldout={adapter: 5.0},
                           languages=[adapter])
        ref = self.store.put(repo, "v0", folder, message="fresh")
        with self.registry.atomic():
            self.registry.add_adapter(adapter, [adapter], "causal-lm", {"r": 8, "alpha": 16}, self.tick())
            self.registry.add_adapter_version(adapter, self.base, None, ref.repo, ref.revision, ref.digest,
                                              {"heldout": {adapter: 5.0}}, self.now)

    @property
    def base(self) -> int:
        return self.registry.latest_checkpoint().version

    def lease(self, adapter: str, identity: str) -> Lease:
        parent = self.registry.latest_adapter_version(adapter)
        lease = Lease(self.registry.max_lease_token() + 1, adapter, identity, self.base, parent.version, self.tick(),
                      self.now + 600)
        self.registry.save_lease(lease)
        return lease

    def push(self, adapter: str, identity: str, loss: float) -> int:
        """An accepted push, as the coordinator records it: lease, card, artifact, then the rows."""
        lease = self.lease(adapter, identity)
        parent = self.registry.latest_adapter_version(adapter)
        version = parent.version + 1
        folder = self.folder(f"{adapter}-v{version}", {"adapter_model.safetensors": f"{adapter} {version}"})
        write_adapter_card(folder, self.registry, self.store, repo=parent.repo, adapter=adapter, version=version,
                           base_version=self.base, parent_version=parent.version, kind="push",
                           heldout={adapter: loss}, contributor=self.registry.pseudonym(identity))
        ref = self.store.put(parent.repo, f"v{version}", folder, message=f"lease {lease.token}")
        with self.registry.atomic():
            self.registry.add_adapter_version(adapter, self.base, parent.version, ref.repo, ref.revision, ref.digest,
                                              {"heldout": {adapter: loss}, "train": {"tokens": 512}}, self.tick())
            self.registry.add_contribution(self.registry.pseudonym(identity), adapter, lease.token, self.now, "s",
                                           {"ok": True}, {"heldout": {adapter: loss}}, "accepted", "better", version,
                                           base_version=lease.base_version, judged_base_version=self.base)
            self.registry.save_lease(replace(lease, state="released", ended=self.now, outcome="accepted"))
        return version

    def reject(self, adapter: str, identity: str) -> None:
        """A rejected push: a lease and a contribution, and nothing in the store."""
        lease = self.lease(adapter, identity)
        with self.registry.atomic():
            self.registry.add_contribution(self.registry.pseudonym(identity), adapter, lease.token, self.tick(), "s",
                                           {"ok": True}, {}, "rejected", "worse", None)
            self.registry.save_lease(replace(lease, state="released", ended=self.now, outcome="rejected"))

    def merge(self, adapter: str) -> int:
        top = self.registry.latest_adapter_version(adapter)
        folder = self.folder(f"base-merge-{top.version}", {"config.json": f'{{"merged": {top.version}}}'})
        row = publish_base(self.registry, self.store, folder, parent=self.base, source="merge",
                           metrics={"heldout": {"hi": 4.0}, "merge": {"method": "sum", "seed": None}},
                           created=self.tick(), absorbed=[(adapter, top.version, 1.0, "sum", None)])
        rest = self.folder(f"{adapter}-rebase-{row.version}", {"adapter_model.safetensors": f"{adapter} residual"})
        store_adapter_version(self.registry, self.store, rest, adapter=adapter, base_version=row.version,
                              parent_version=top.version, kind="rebase", created=self.tick(),
                              metrics={"heldout": {adapter: 3.9}, "rebase": {"mode": "residual", "absorbed": True,
                                                                             "truncation": {"relative": 0.1}}})
        return row.version

    def cpt(self) -> int:
        folder = self.folder(f"base-cpt-{self.base}", {"config.json": '{"cpt": 1}'})
        return publish_base(self.registry, self.store, folder, parent=self.base, source="cpt",
                            metrics={"heldout": {"hi": 3.8}, "cpt": {"steps": 40, "tokens": 4096}},
                            created=self.tick()).version

    def facts(self) -> dict:
        """Everything numbered that existed: the "before the loss" record."""
        r = self.registry
        return {"versions": {(v.adapter, v.version): v.digest for v in r.adapter_versions()},
                "bases": {c.version: (c.digest, c.parent, c.source) for c in r.checkpoints()},
                "leases": {lease.token for lease in r.leases()}, "contributions": {c.id: c for c in r.contributions()}}


def snapshot_of(hub: HandHub, tmp_path: Path) -> Path:
    return write_snapshot(hub.path, tmp_path / "backups", SnapshotKey.new(PASS, n=FAST_N), hub.now).path


def lose_the_disk(hub: HandHub, tmp_path: Path) -> Path:
    """Copy the store aside, then delete the whole hub folder; return the copy."""
    hub.registry.close()
    copy = tmp_path / "store-copy"
    shutil.copytree(store_path(hub.path), copy)
    shutil.rmtree(hub.path)
    return copy


def after_the_snapshot(hub: HandHub) -> None:
    """Pushes, a rejection, a merge and its rebase, CPT, a new adapter, a new contributor."""
    hub.push("hi", "sim:0", 4.2)  # hi v2
    hub.reject("hi", "sim:1")  # a lease and a contribution that leave no artifact
    hub.merge("hi")  # base v1 absorbs hi v2; hi v3 continues from its residual
    hub.cpt()  # base v2
    hub.fresh("ta")  # a new adapter, with v0 on base v2
    hub.push("ta", "sim:1", 4.0)  # ta v1 by a known contributor
    hub.push("hi", "sim:9", 3.5)  # hi v4 by a contributor first seen after the snapshot


@pytest.fixture
def lost(tmp_path):
    """Hub A: a snapshot after hi v1, then more work (``after_the_snapshot``, and a stray revision), then the
    disk is lost but for a copy of the store."""
    hub = HandHub(tmp_path / "a")
    hub.push("hi", "sim:0", 4.5)
    hub.reject("hi", "sim:1")  # sim:1 is known to the snapshot
    snapshot = snapshot_of(hub, tmp_path)
    after_the_snapshot(hub)
    stray = hub.folder("hi-v6", {"adapter_model.safetensors": "hi 6"})
    write_adapter_card(stray, hub.registry, hub.store, repo="t/adapter-hi", adapter="hi", version=6, base_version=2,
                       parent_version=5, kind="push", heldout={"hi": 3.0})
    hub.store.put("t/adapter-hi", "v6", stray, message="a crash's orphan")  # no v5: it cannot be rebuilt
    facts = hub.facts()
    cards = {v: (hub.store.local_path("t/adapter-hi", f"v{v}") / "README.md").read_text() for v in (2, 4)}
    return snapshot, lose_the_disk(hub, tmp_path), facts, cards


def test_a_restore_rebuilds_the_hub_and_re_registers_what_came_after_the_snapshot(tmp_path, lost):
    snapshot, copy, before, cards = lost

    # Execute
    report = restore_hub(snapshot, tmp_path / "b", PASS, copy, now=T0 + 9999)

    # Assert: what was written, re-registered (in lineage order) and left as an orphan
    assert sorted(report.restored) == ["registry.sqlite", "secret"]
    assert report.store == {"kind": "local", "source": str(copy), "revisions": 11, "files": 25, "linked": True}
    assert sorted((r["revision"], r.get("version_kind") or r["source"]) for r in report.reregistered) == [
        ("t/adapter-hi@v2", "push"), ("t/adapter-hi@v3", "rebase"), ("t/adapter-hi@v4", "push"),
        ("t/adapter-ta@v0", "fresh"), ("t/adapter-ta@v1", "push"), ("t/base@v1", "merge"), ("t/base@v2", "cpt")]
    order = [r["revision"] for r in report.reregistered]  # each after what it needs
    assert order.index("t/adapter-hi@v2") < order.index("t/base@v1") < order.index("t/adapter-hi@v3")
    assert order.index("t/base@v2") < order.index("t/adapter-ta@v0") < order.index("t/adapter-ta@v1")
    assert report.orphans == [{"revision": "t/adapter-hi@v6", "reason": "hi v6 is not its next version (5)"}]
    assert report.missing == []
    with Registry.open(tmp_path / "b") as registry:
        # every version that existed is back with its own bytes, in one lineage
        assert {(v.adapter, v.version): v.digest for v in registry.adapter_versions()} == before["versions"]
        assert {c.version: (c.digest, c.parent, c.source) for c in registry.checkpoints()} == before["bases"]
        assert [(a.adapter, a.adapter_version) for a in registry.absorbed(1)] == [("hi", 2)]
        assert registry.adapter_version("hi", 3).metrics["rebase"]["mode"] == "residual"
        assert registry.checkpoint(2).metrics["cpt"] == {"steps": 40, "tokens": 4096}
        assert registry.parent_losses("hi", 4, 2) == {"hi": 3.5}
        assert (registry.adapter("ta").languages, registry.adapter("ta").lora_spec) == (["ta"], {"r": 8, "alpha": 16})
        # the contributions of known contributors are back under their own ids, with their lease tokens
        restored = {c["revision"]: c for c in report.contributions}
        for revision in ("t/adapter-hi@v2", "t/adapter-ta@v1"):
            adapter, version = revision[len("t/adapter-"):].split("@v")
            (old,) = [c for c in before["contributions"].values()
                      if (c.adapter, c.adapter_version) == (adapter, int(version))]
            assert (restored[revision]["id"], restored[revision]["lease"]) == (old.id, old.lease_token)
            row = [c for c in registry.contributions() if c.id == old.id][0]
            assert (row.pseudonym, row.decision, row.validation["restored"]["lease"]) == (old.pseudonym, "accepted",
                                                                                        old.lease_token)
        assert restored["t/adapter-hi@v4"]["id"] is None
        assert "first seen after the snapshot" in restored["t/adapter-hi@v4"]["skipped"]
        # a rebuilt row gives back the card its version was stored with (what `fedem publish` pushes)
        v2 = registry.adapter_version("hi", 2)
        assert version_card(registry, v2, "t/adapter-hi", "t/base", "v0").content == cards[2]
        # counters: past every number the registry, the store (the orphan v6 too) and the cards hold
        assert registry.next_adapter_version("hi") == 7 and registry.next_adapter_version("ta") == 2
        assert registry.next_checkpoint_version() == 3
        card_leases = [ModelCard(text).data.fedem_record["lease"] for text in cards.values()]
        assert report.floors["lease"] == max(card_leases) + 1 + 1000 > max(before["leases"])
        assert registry.max_lease_token() + 1 == report.floors["lease"]
        assert report.floors["contribution"] > max(before["contributions"])
        # fedem verify: the orphan is reported, nothing else
        rows = {(r.repo, r.revision, r.digest) for r in [*registry.checkpoints(), *registry.adapter_versions()]}
    problems = LocalStore(store_path(tmp_path / "b")).verify_all(rows)
    assert [(p.kind, p.repo, p.revision) for p in problems] == [("orphan", "t/adapter-hi", "v6")]
    assert oct((tmp_path / "b" / "secret").stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_the_store_of_another_hub_is_refused(tmp_path, lost):
    snapshot, _copy, _before, _cards = lost
    other = HandHub(tmp_path / "other", base_content='{"other": true}')
    other.registry.close()

    with pytest.raises(HubError, match="does not hold this hub's artifacts .* is it another hub's store"):
        restore_hub(snapshot, tmp_path / "b", PASS, store_path(other.path))

    assert not (tmp_path / "b").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_restore_never_writes_over_a_hub_or_anything_else(tmp_path, lost):
    snapshot, copy, _before, _cards = lost
    restore_hub(snapshot, tmp_path / "b", PASS, copy)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")

    for target, what in ((tmp_path / "b", "holds a hub"), (tmp_path / "c", "holds files (notes.txt)")):
        with pytest.raises(HubError, match=f"cannot restore into .*: it {what.replace('(', '.').replace(')', '.')}"):
            restore_hub(snapshot, target, PASS, copy)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
    with pytest.raises(HubError, match="pass --store PATH"):
        restore_hub(snapshot, tmp_path / "d", PASS)
    assert not (tmp_path / "d").exists()


def test_fedem_restore_prints_what_it_restored_re_registered_and_left(tmp_path, lost):
    snapshot, copy, _before, _cards = lost
    (tmp_path / "b").mkdir()  # an empty folder is a fine target

    result = CliRunner().invoke(cli, ["restore", str(snapshot), "--hub", str(tmp_path / "b"), "--store", str(copy),
                                      "--passphrase-env", "FEDEM_TEST_PASS", "--copy", "--skip", "10"],
                                env={"FEDEM_TEST_PASS": PASS.decode()})

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"restored hub {snapshot.name[15:31]} into {tmp_path / 'b'} from {snapshot}")
    assert "  re-registered t/base@v1: base v1 (merge)" in lines
    assert "  re-registered t/adapter-hi@v3: hi v3 (rebase)" in lines
    assert "  orphan t/adapter-hi@v6: hi v6 is not its next version (5)" in lines
    assert any(line.startswith("  contribution of t/adapter-hi@v4 not restored: contributor c-") for line in lines)
    assert lines[-1].startswith("  next numbers: adapter:hi 7, adapter:ta 2, checkpoint 3, contribution ")
    with Registry.open(tmp_path / "b", readonly=True) as registry:
        assert registry.floor("lease") == 6 + 1 + 10  # hi v4's lease, the last one a card names, then --skip


def hostile_card(fedem: str, rest: str = "") -> str:
    return f"---\nfedem: {fedem}\n{rest}---\n\n# a card anyone could have written\n"


def test_cards_with_types_no_hub_writes_leave_orphans_with_why_and_the_restore_goes_on(tmp_path):
    # Prepare: after the snapshot, three revisions whose cards no hub wrote (the store's files are anyone's)
    hub = HandHub(tmp_path / "a")
    hub.push("hi", "sim:0", 4.5)  # hi v1
    snapshot = snapshot_of(hub, tmp_path)
    push = "{kind: adapter, adapter: hi, version: %d, version_kind: push, base_version: %s, parent_version: %d}"
    cards = {("t/adapter-hi", "v2"): hostile_card(push % (2, "0", 1), "fedem_record: {contributor: [sim], "
                                                  "contribution: 5, lease: 9}\nmodel-index: {bad: 1}\n"),
             ("t/adapter-hi", "v3"): hostile_card(push % (3, "[0]", 2)),
             ("t/base", "v1"): hostile_card("[unclosed")}
    for (repo, revision), card in cards.items():
        folder = hub.folder(f"{repo.replace('/', '-')}-{revision}", {"README.md": card, "x.bin": revision})
        hub.store.put(repo, revision, folder, message="hostile")
    copy = lose_the_disk(hub, tmp_path)

    # Execute
    report = restore_hub(snapshot, tmp_path / "b", PASS, copy, now=T0 + 9999)

    # Assert: each is an orphan with its reason, nothing was re-registered, and every number stays used
    reasons = {o["revision"]: o["reason"] for o in report.orphans}
    assert report.reregistered == [] and set(reasons) == {"t/adapter-hi@v2", "t/adapter-hi@v3", "t/base@v1"}
    assert reasons["t/adapter-hi@v2"] == "its card's `fedem` block is malformed (`fedem_record.contributor`)"
    assert reasons["t/adapter-hi@v3"] == "its card's `fedem` block is malformed (`base_version`)"
    assert reasons["t/base@v1"].startswith("unreadable: ")
    assert report.floors["adapter:hi"] == 4 and report.floors["checkpoint"] == 2
    assert report.floors["lease"] >= 10 and report.floors["contribution"] >= 6


def test_a_hub_whose_store_is_a_hugging_face_hub_is_restored_from_it(tmp_path, local_hub):
    from fedem_flwr.hub.hf_store import HfStore

    # Prepare: the artifacts live on the (local) Hub; the hub folder is lost whole
    store = HfStore("org/proj", endpoint=local_hub.endpoint, cache_dir=tmp_path / "cache", sleep=lambda s: None)
    hub = HandHub(tmp_path / "a", store=store, prefix="org/proj")
    hub.push("hi", "sim:0", 4.5)
    hub.reject("hi", "sim:1")
    snapshot = snapshot_of(hub, tmp_path)
    after_the_snapshot(hub)
    before = hub.facts()
    hub.registry.close()
    shutil.rmtree(hub.path)

    # Execute: no --store: the recorded setting names the Hub
    report = restore_hub(snapshot, tmp_path / "b", PASS)
    with pytest.raises(HubError, match="--store is for a hub whose store is local"):
        restore_hub(snapshot, tmp_path / "c", PASS, tmp_path)

    # Assert
    assert report.store == {"kind": "hf", "endpoint": local_hub.endpoint, "revisions": 10}
    assert len(report.reregistered) == 7 and report.orphans == [] and report.missing == []
    with Registry.open(tmp_path / "b", readonly=True) as registry:
        assert {(v.adapter, v.version): v.digest for v in registry.adapter_versions()} == before["versions"]
        assert registry.floor("adapter:hi") == 5 and registry.floor("checkpoint") == 3


# -- the test that loses the disk ----------------------------------------------------------------

OVERRIDES = (
    "data.languages=[hi,ta,mr,de] train.max_steps=8 train.batch_size=4 train.progress=false "
    "relay.lease_ttl_s=600 relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=300"
)


def open_relay_hub(path: Path, max_accepted: int):
    from fedem_flwr.config.loader import load_run_config
    from fedem_flwr.relay.bootstrap import open_hub

    run_config = {"overrides": f"{OVERRIDES} relay.max_accepted={max_accepted}", "hub": str(path)}
    return open_hub(load_run_config(run_config), path), run_config


def relay(hub, run_config, tmp_path: Path, between_turns=None):
    """The relay on the in-process Grid with two nodes running the real ClientApp (``relay_in_process``)."""
    from fedem_flwr.client_app import app as client_app
    from fedem_flwr.relay.strategy import RelayStrategy
    from tests.support.fake_grid import InProcessGrid

    node_configs = {100 + i: {"partition-id": i, "num-partitions": 2, "cache-dir": str(tmp_path / f"cache-{i}")}
                    for i in range(2)}
    grid = InProcessGrid(client_app, node_configs, run_config)
    strategy = RelayStrategy(hub.coordinator, hub.cfg.relay, hub.workbench.spec, max_steps=hub.cfg.train.max_steps,
                             training_rows=hub.training_rows, between_turns=between_turns)
    return strategy.start(grid)


class SnapshotMidRun:
    """The relay loop's hook: once two pushes are accepted, ``fedem backup`` leaves a request (as it does
    while the hub runs) and the hub's own hook (``run_backups``, what ``BaseKeeper.turn`` calls) takes it."""

    def __init__(self, hub, folder: Path) -> None:
        self.hub, self.folder, self.request, self.accepted_then = hub, folder, None, None

    def __call__(self, busy: bool) -> None:
        from fedem_flwr.config.schema import BackupConfig
        from fedem_flwr.hub.backup_request import request_backup, run_backups

        accepted = self.hub.registry.contribution_counts()["accepted"]
        if self.request is None and accepted >= 2:
            self.request = request_backup(self.hub.path, self.folder, SnapshotKey.new(PASS, n=FAST_N), T0)
            self.accepted_then = accepted
        run_backups(self.hub.path, BackupConfig())


@pytest.mark.slow
def test_a_hub_that_loses_its_disk_mid_run_comes_back_from_a_snapshot_and_a_store_copy(tmp_path):
    from fedem_flwr.hub.backup_request import backup_result

    # Prepare: a relay that is snapshotted mid-run (after 2 accepted) and goes on to 6 accepted
    hub, run_config = open_relay_hub(tmp_path / "hub", max_accepted=6)
    hook = SnapshotMidRun(hub, tmp_path / "backups")
    first = relay(hub, run_config, tmp_path, between_turns=hook)
    assert first.accepted >= 6, first
    answer = backup_result(hub.path, hook.request)
    assert answer["error"] is None, answer
    snapshot = Path(answer["path"])
    r = hub.registry
    before = {"versions": {(v.adapter, v.version): v.digest for v in r.adapter_versions()},
              "bases": {c.version: c.digest for c in r.checkpoints()},
              "leases": {lease.token for lease in r.leases()},
              "contributions": {c.id: c.lease_token for c in r.contributions()},
              "pseudonyms": r.identities(), "split": (hub.split_id, r.setting("heldout-split")),
              "key": r.derived_key("heldout-split")}
    later = first.accepted - hook.accepted_then
    assert later >= 3, (first.accepted, hook.accepted_then)

    # Execute: the disk is lost but for a copy of the store; restore into a new folder, open it, relay on
    r.close()
    copy = tmp_path / "store-copy"
    shutil.copytree(store_path(hub.path), copy)
    shutil.rmtree(hub.path)
    report = restore_hub(snapshot, tmp_path / "new", PASS, copy)
    again, run_config = open_relay_hub(tmp_path / "new", max_accepted=2)
    second = relay(again, run_config, tmp_path)

    # Assert: the restore re-registered the 3 versions written after the snapshot, and left no orphan
    assert [row["version_kind"] for row in report.reregistered] == ["push"] * later and report.orphans == []
    # each accepted push's contribution is back under its id, its card naming its lease (the coordinator's card)
    assert [c["lease"] for c in report.contributions] == [before["contributions"][c["id"]]
                                                          for c in report.contributions], report.contributions
    assert second.accepted >= 2, second
    r = again.registry
    # the same contributors under the same pseudonyms, the same keyed held-out split
    assert {r.pseudonym(identity): identity for identity in before["pseudonyms"].values()} == before["pseudonyms"]
    assert set(r.identities()) == set(before["pseudonyms"])  # the resumed relay's nodes are the same contributors
    assert (again.split_id, r.setting("heldout-split")) == before["split"]
    assert r.derived_key("heldout-split") == before["key"]
    # every version accepted before the loss is back with its own bytes; the lineage is contiguous
    after = {(v.adapter, v.version): v for v in r.adapter_versions()}
    assert {key: v.digest for key, v in after.items() if key in before["versions"]} == before["versions"]
    for adapter in {name for name, _ in after}:
        versions = sorted(n for name, n in after if name == adapter)
        assert versions == list(range(len(versions)))
        assert all(after[(adapter, n)].parent_version == n - 1 for n in versions[1:])
    assert {c.version: c.digest for c in r.checkpoints()} == before["bases"]
    # nothing numbered before the loss is numbered again after it
    new_versions = set(after) - set(before["versions"])
    assert len(new_versions) == second.accepted
    assert all(n > max(m for name, m in before["versions"] if name == a) for a, n in new_versions)
    new_leases = {lease.token for lease in r.leases()} - before["leases"]
    assert new_leases and min(new_leases) > max(before["leases"])
    new_ids = {c.id for c in r.contributions()} - set(before["contributions"])
    restored_ids = {c["id"] for c in report.contributions}
    assert restored_ids <= set(before["contributions"])
    assert min(new_ids - restored_ids) > max(before["contributions"])
    r.close()
