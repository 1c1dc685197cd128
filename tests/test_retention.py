"""Retention: the pure plan (each rule, and a property over random histories), and carrying it out on a
real registry and local store, where ``fedem verify`` tells pruned from lost."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedem_flwr.hub import views
from fedem_flwr.hub.optimizer_states import FORMAT, OptimizerStates
from fedem_flwr.hub.prune import HUB_STORE, history_of, prune
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.retention import (
    ADAPTER_BASE,
    KEEP_ALL,
    LATEST,
    LEASED,
    NEWEST,
    REBASE_PARENT,
    RECENT,
    UNPUBLISHED,
    BaseRow,
    History,
    LeaseRow,
    Settings,
    VersionRow,
    needs,
    plan,
)
from fedem_flwr.hub.store import LocalStore

NOW = 1_700_000_000.0


def base(n: int, pruned: bool = False) -> BaseRow:
    return BaseRow(n, "t/base", f"v{n}", pruned)


def version(adapter: str, n: int, on: int, kind: str = "push", pruned: bool = False) -> VersionRow:
    kind = "fresh" if n == 0 else kind
    return VersionRow(adapter, n, on, f"t/adapter-{adapter}", f"v{n}", pruned, kind, n - 1 if n else None)


# -- the rules, one by one ---------------------------------------------------------------------------
def test_the_newest_base_stays_and_the_count_keeps_the_newest_others():
    history = History(bases=tuple(base(n) for n in range(4)))

    decided = plan(history, Settings(bases=2))

    assert decided.bases == [0, 1] and decided.versions == []
    assert decided.kept_bases == {2: (RECENT,), 3: (NEWEST, RECENT)}


def test_a_base_an_adapters_latest_version_refers_to_stays():
    history = History(bases=tuple(base(n) for n in range(4)),
                      versions=(version("hi", 0, 0), version("hi", 1, 1), version("ta", 0, 0)))

    decided = plan(history, Settings(bases=1))

    assert decided.bases == [2]  # v1 (hi's latest), v0 (ta's fresh start) and v3 (the newest) stay
    assert decided.kept_bases[0] == (ADAPTER_BASE,) and decided.kept_bases[1] == (ADAPTER_BASE,)


def test_a_base_an_active_lease_refers_to_stays():
    history = History(bases=tuple(base(n) for n in range(3)), versions=(version("hi", 0, 2),),
                      leases=(LeaseRow("hi", 0, 1),))

    decided = plan(history, Settings(bases=1))

    assert decided.bases == [0] and decided.kept_bases[1] == (LEASED,)


def test_each_adapters_latest_version_stays_and_version_0_is_not_special():
    history = History(bases=(base(0),), versions=tuple(version("hi", n, 0) for n in range(4)))

    decided = plan(history, Settings(adapter_versions=1))

    assert decided.versions == [("hi", 0), ("hi", 1), ("hi", 2)]
    assert decided.kept_versions == {("hi", 3): (LATEST, RECENT)}


def test_an_active_lease_keeps_every_version_from_its_start_to_the_latest():
    # Two lanes: one lease started from v1, another pushed v2 and v3 since; the first push lands as an update.
    history = History(bases=(base(0),), versions=tuple(version("hi", n, 0) for n in range(5)),
                      leases=(LeaseRow("hi", 1, 0), LeaseRow("hi", 4, 0)))

    decided = plan(history, Settings(adapter_versions=1))

    assert decided.versions == [("hi", 0)]
    assert decided.kept_versions == {
        ("hi", 1): (LEASED,), ("hi", 2): (LEASED,), ("hi", 3): (LEASED,), ("hi", 4): (LATEST, LEASED, RECENT)}


def test_the_parent_of_a_needed_rebase_version_stays_for_its_optimizer_state():
    rows = (version("hi", 0, 0), version("hi", 1, 0), version("hi", 2, 1, kind="rebase"))
    history = History(bases=(base(0), base(1)), versions=rows)

    decided = plan(history, Settings(bases=1, adapter_versions=1))

    assert decided.versions == [("hi", 0)] and decided.kept_versions[("hi", 1)] == (REBASE_PARENT,)
    assert decided.bases == [0]  # the parent's own base is not needed


def test_publish_first_keeps_what_was_not_published():
    rows = tuple(version("hi", n, 0) for n in range(3))
    history = History(bases=(base(0), base(1)), versions=rows,
                      published=frozenset({("t/adapter-hi", "v0")}))

    decided = plan(history, Settings(bases=1, adapter_versions=1, publish_first=True))

    assert decided.versions == [("hi", 0)] and decided.bases == []
    assert decided.kept_versions[("hi", 1)] == (UNPUBLISHED,) and decided.kept_bases[1] == (NEWEST, UNPUBLISHED,
                                                                                           RECENT)


def test_what_was_pruned_is_neither_removed_again_nor_listed_as_kept():
    history = History(bases=(base(0, pruned=True), base(1), base(2)),
                      versions=(version("hi", 0, 2, pruned=False),))

    decided = plan(history, Settings(bases=1))

    assert decided.bases == [1] and 0 not in decided.kept_bases


def test_null_counts_keep_everything():
    history = History(bases=tuple(base(n) for n in range(3)), versions=tuple(version("hi", n, 0) for n in range(3)))

    decided = plan(history, Settings())

    assert decided.empty and set(decided.kept_bases) == {0, 1, 2} and decided.kept_bases[0] == (ADAPTER_BASE,
                                                                                                 KEEP_ALL)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_a_count_is_an_integer_of_at_least_one(bad):
    with pytest.raises(ValueError, match="integer >= 1 or None"):
        Settings(bases=bad)


# -- the property: whatever happens, nothing the hub reads later is gone ------------------------------
ADAPTERS = ("hi", "ta", "mr")
LANES = 2


@dataclass
class Hub:
    """A hub's history, as the relay coordinator and the keeper make it, with what each step reads."""

    bases: dict[int, bool] = field(default_factory=lambda: {0: False})  # version -> pruned
    versions: dict[str, list[VersionRow]] = field(default_factory=lambda: {a: [version(a, 0, 0)] for a in ADAPTERS})
    leases: list[LeaseRow] = field(default_factory=list)
    published: set[tuple[str, str]] = field(default_factory=set)

    def history(self) -> History:
        return History(tuple(base(n, p) for n, p in self.bases.items()),
                       tuple(v for rows in self.versions.values() for v in rows), tuple(self.leases),
                       frozenset(self.published))

    def newest(self) -> int:
        return max(self.bases)

    def read_base(self, n: int, why: str) -> None:
        assert not self.bases[n], f"base v{n} was pruned, but {why} reads it"

    def read_version(self, adapter: str, n: int, why: str) -> None:
        row = self.versions[adapter][n]
        assert not row.pruned, f"{adapter} v{n} was pruned, but {why} reads it"

    def read_optimizer(self, adapter: str, n: int, why: str) -> None:
        """A version's optimizer state; a rebase keeps none and its lease continues from its parent's."""
        self.read_version(adapter, n, why)
        row = self.versions[adapter][n]
        if row.kind == "rebase":
            self.read_version(adapter, row.parent_version, f"{why} (the optimizer state of a rebase's parent)")

    def add(self, adapter: str, kind: str) -> None:
        n = len(self.versions[adapter])
        self.versions[adapter].append(VersionRow(adapter, n, self.newest(), f"t/adapter-{adapter}", f"v{n}", False,
                                                 kind, n - 1))

    # -- what happens ------------------------------------------------------------------------------
    def new_base(self, rebased: list[bool]) -> None:
        """A merge or CPT checkpoint: the newest base is loaded, absorbed adapters read and rebased."""
        self.read_base(self.newest(), "a merge")
        self.bases[self.newest() + 1] = False
        for adapter, rebase in zip(ADAPTERS, rebased):
            if rebase:
                self.read_version(adapter, len(self.versions[adapter]) - 1, "a merge")
                self.add(adapter, "rebase")

    def open_lease(self, adapter: str) -> None:
        if sum(lease.adapter == adapter for lease in self.leases) >= LANES:
            return
        latest = len(self.versions[adapter]) - 1  # a lease starts from the latest version, as the coordinator's
        self.read_version(adapter, latest, "a new lease")
        self.read_optimizer(adapter, latest, "a new lease")
        self.read_base(self.newest(), "a new lease")
        self.leases.append(LeaseRow(adapter, latest, self.newest()))

    def push(self, which: int, accepted: bool) -> None:
        """A push ends its lease: judged against the latest version, as an update from its start if moved."""
        if not self.leases:
            return
        lease = self.leases.pop(which % len(self.leases))
        self.read_base(lease.base_version, "a lease's node")
        latest = len(self.versions[lease.adapter]) - 1
        for n in range(lease.adapter_version, latest + 1):  # the start, each lane's push since and its parent
            self.read_version(lease.adapter, n, "a push landing as an update")
        self.read_optimizer(lease.adapter, lease.adapter_version, "a push's optimizer state")
        self.read_optimizer(lease.adapter, latest, "a push's optimizer state")
        if accepted:
            self.add(lease.adapter, "push")

    def use(self, adapter: str) -> None:
        """Someone loads an adapter's latest version on the base it names."""
        row = self.versions[adapter][-1]
        self.read_version(adapter, row.version, "loading the adapter")
        self.read_base(row.base_version, "loading the adapter")

    def publish(self, pick: int) -> None:
        present = [(r.repo, r.revision) for rows in self.versions.values() for r in rows if not r.pruned]
        present += [("t/base", f"v{n}") for n, p in self.bases.items() if not p]
        self.published.add(sorted(present)[pick % len(present)])

    def prune(self, keep: Settings) -> None:
        history = self.history()
        decided = plan(history, keep)
        need = needs(history, keep)
        if keep.keeps_all:
            assert decided.empty
        for n in decided.bases:
            assert n not in need.bases and not self.bases[n]
            self.bases[n] = True
        for adapter, n in decided.versions:
            assert (adapter, n) not in need.versions and not self.versions[adapter][n].pruned
            self.versions[adapter][n] = replace(self.versions[adapter][n], pruned=True)
        if keep.publish_first:
            assert all(("t/base", f"v{n}") in self.published for n in decided.bases)
            assert all((f"t/adapter-{a}", f"v{n}") in self.published for a, n in decided.versions)
        after = needs(self.history(), keep)
        assert not any(self.bases[n] for n in after.bases)
        assert not any(self.versions[a][n].pruned for a, n in after.versions)


counts = st.one_of(st.none(), st.integers(1, 3))
steps = st.lists(st.one_of(
    st.tuples(st.just("base"), st.lists(st.booleans(), min_size=3, max_size=3)),
    st.tuples(st.just("lease"), st.sampled_from(ADAPTERS)),
    st.tuples(st.just("push"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("use"), st.sampled_from(ADAPTERS)),
    st.tuples(st.just("publish"), st.integers(0, 1000)),
    st.tuples(st.just("prune"), st.builds(Settings, counts, counts, st.booleans())),
), max_size=50)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_nothing_pruned_is_ever_read_again(history):
    hub = Hub()
    for step in history:
        kind, *args = step
        {"base": hub.new_base, "lease": hub.open_lease, "push": hub.push, "use": hub.use,
         "publish": hub.publish, "prune": hub.prune}[kind](*args)
    for adapter in ADAPTERS:  # and the end: every adapter can still be leased, pushed and loaded
        hub.use(adapter)
        hub.open_lease(adapter)
    while hub.leases:
        hub.push(0, accepted=True)


# -- carrying it out on a real registry and local store -------------------------------------------------
def schedule_state(step: int) -> bytes:
    """A valid optimizer state of ``train.carry=schedule`` (no moments): a safetensors header only."""
    header = json.dumps({"__metadata__": {"format": FORMAT, "step": str(step), "warmup_from": "0"}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def put(store: LocalStore, tmp: Path, repo: str, revision: str, size: int = 100):
    folder = tmp / "src" / repo.replace("/", "-") / revision
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"revision": "{revision}"}}')
    (folder / "weights.bin").write_bytes(bytes(size))
    return store.put(repo, revision, folder, message=revision)


@pytest.fixture
def hub(tmp_path) -> Path:
    """Bases v0..v2; adapter ``hi`` v0 (on v0), v1 (on v1), v2 (on v2), v0 and v1 with optimizer states."""
    path = tmp_path / "hub"
    store, states = LocalStore(path / "store"), OptimizerStates(path)
    with Registry.open(path / "registry.sqlite") as registry:
        registry.add_adapter("hi", ["hi"], "causal-lm", {"r": 2}, NOW)
        for n in range(3):
            ref = put(store, tmp_path, "t/base", f"v{n}", size=1000)
            registry.add_checkpoint(n - 1 if n else None, "init" if n == 0 else "cpt", ref.repo, ref.revision,
                                    ref.digest, {}, NOW + n)
            ref = put(store, tmp_path, "t/adapter-hi", f"v{n}")
            registry.add_adapter_version("hi", n, n - 1 if n else None, ref.repo, ref.revision, ref.digest, {},
                                         NOW + n)
            if n < 2:
                states.put("hi", n, schedule_state(n))
    return path


def sizes(hub: Path, repo: str, revision: str) -> int:
    return sum(p.stat().st_size for p in (hub / "store" / repo / revision).rglob("*") if p.is_file())


def verify(hub: Path, repair: bool = False) -> dict:
    with Registry.open(hub / "registry.sqlite") as registry:
        return views.verify_view(registry, views.StoreView(hub), repair=repair)


def test_prune_removes_files_and_states_keeps_rows_and_verify_counts_them_pruned(hub):
    expected = (sizes(hub, "t/base", "v0") + sizes(hub, "t/base", "v1") + sizes(hub, "t/adapter-hi", "v0")
                + sizes(hub, "t/adapter-hi", "v1") + len(schedule_state(0)) + len(schedule_state(1)))
    with Registry.open(hub / "registry.sqlite") as registry:
        store = LocalStore(hub / "store")
        keep = Settings(bases=1, adapter_versions=1)
        dry = prune(registry, store, hub, keep, NOW + 10, dry_run=True)
        assert (hub / "store/t/base/v0").is_dir() and registry.checkpoint(0).pruned is None  # a dry run only reads

        report = prune(registry, store, hub, keep, NOW + 10)
        again = prune(registry, store, hub, keep, NOW + 20)

        assert [i.name for i in dry.removed] == [i.name for i in report.removed] == [
            "base v0", "base v1", "hi v0", "hi v1"]
        assert dry.bytes_freed == report.bytes_freed == expected
        assert report.summary().startswith("removed 4 (base v0, base v1, hi v0, hi v1), ")
        assert [(i.name, i.reasons) for i in report.kept] == [("base v2", (NEWEST, ADAPTER_BASE, RECENT)),
                                                              ("hi v2", (LATEST, RECENT))]
        assert report.kept_by_reason() == {ADAPTER_BASE: 1, LATEST: 1, NEWEST: 1, RECENT: 2}
        assert again.removed == [] and again.finished == [] and again.bytes_freed == 0  # never twice
        assert [c.pruned for c in registry.checkpoints()] == [NOW + 10, NOW + 10, None]  # the rows stay
        assert [v.pruned for v in registry.adapter_versions("hi")] == [NOW + 10, NOW + 10, None]
        assert store.revisions("t/base") == ["v2"] and store.revisions("t/adapter-hi") == ["v2"]
        assert OptimizerStates(hub).listing() == []
        rows = views.checkpoints_view(registry, views.StoreView(hub), views.Names(registry, False))
    assert [(r["where"], r["path"] is None) for r in rows] == [(["pruned"], True), (["pruned"], True),
                                                               (["local"], False)]
    assert not (hub / "store/t/base/v0").exists() and not any((hub / "store/.tmp").glob("*"))
    assert verify(hub) == {"ok": True, "checked": {"checkpoints": 3, "adapter_versions": 3, "pruned": 4},
                           "problems": []}


def test_an_active_lease_and_publish_first_keep_what_they_need(hub):
    with Registry.open(hub / "registry.sqlite") as registry:
        registry.save_lease(Lease(1, "hi", "sim:1", 1, 1, NOW, NOW + 600))
        registry.record_publication("t/base", "v0", registry.checkpoint(0).digest, "hf:http://hub", NOW)
        assert history_of(registry).leases == (LeaseRow("hi", 1, 1),)

        report = prune(registry, LocalStore(hub / "store"), hub, Settings(1, 1, publish_first=True), NOW + 10)

        assert [i.name for i in report.removed] == ["base v0"]  # published, and nothing needs it
        assert dict((i.name, i.reasons) for i in report.kept)["hi v1"] == (LEASED, UNPUBLISHED)
        versions = views.version_view(registry.adapter_version("hi", 1), views.StoreView(hub))
        base = views.checkpoint_view(registry.checkpoint(0), views.StoreView(hub))
    assert versions["where"] == ["local"] and base["where"] == ["pruned", "hf:http://hub@v0"]


def test_a_file_deleted_without_pruning_is_missing(hub):
    shutil.rmtree(hub / "store/t/adapter-hi/v1")

    view = verify(hub)

    assert not view["ok"] and view["checked"]["pruned"] == 0
    assert ("missing", "t/adapter-hi", "v1") in {(p["kind"], p["repo"], p["revision"]) for p in view["problems"]}


def _marked_not_removed(hub: Path) -> None:
    """A prune cut short: the rows are marked, the files are still there."""
    with Registry.open(hub / "registry.sqlite") as registry:
        registry.mark_checkpoint_pruned(0, NOW + 5)
        registry.mark_version_pruned("hi", 0, NOW + 5)


def test_a_prune_cut_short_is_pruned_present_and_repair_removes_it(hub):
    _marked_not_removed(hub)

    before = verify(hub)
    repaired = verify(hub, repair=True)

    assert not before["ok"]
    assert sorted((p["kind"], p["repo"], p["revision"]) for p in before["problems"]) == [
        ("pruned-present", "t/adapter-hi", "v0"), ("pruned-present", "t/adapter-hi", "v0"),  # folder, state
        ("pruned-present", "t/base", "v0")]
    assert repaired["ok"] and repaired["checked"]["pruned"] == 2
    assert len(repaired["removed"]) == 3 and {p["kind"] for p in repaired["removed"]} == {"pruned-present"}
    assert not (hub / "store/t/base/v0").exists() and OptimizerStates(hub).get("hi", 0) is None
    assert verify(hub)["ok"]


def test_the_next_prune_finishes_one_cut_short(hub):
    _marked_not_removed(hub)
    leftover = sizes(hub, "t/base", "v0") + sizes(hub, "t/adapter-hi", "v0") + len(schedule_state(0))

    with Registry.open(hub / "registry.sqlite") as registry:
        report = prune(registry, LocalStore(hub / "store"), hub, Settings(bases=3), NOW + 10)

    assert report.removed == [] and [i.name for i in report.finished] == ["base v0", "hi v0"]
    assert report.bytes_freed == leftover and "finished 2 interrupted" in report.summary()
    assert verify(hub)["ok"]


def test_a_hugging_face_hub_store_is_never_pruned(hub):
    with Registry.open(hub / "registry.sqlite") as registry:
        report = prune(registry, object(), hub, Settings(bases=1, adapter_versions=1), NOW)

        assert report.skipped == HUB_STORE and report.removed == [] and report.summary() == HUB_STORE
        assert all(c.pruned is None for c in registry.checkpoints())


def test_the_keeper_prunes_after_a_new_base_by_hub_retention(hub):
    """What ``BaseKeeper._adopt`` calls after each published base (the full keeper, with a real model and a
    relay, is too heavy here): ``retain`` prunes by ``hub.retention`` and does nothing when both are null."""
    from types import SimpleNamespace

    from fedem_flwr.config.schema import RetentionConfig
    from fedem_flwr.relay.keeper import BaseKeeper

    with Registry.open(hub / "registry.sqlite") as registry:
        keeper = BaseKeeper.__new__(BaseKeeper)  # no model: only what `retain` uses
        keeper.clock = lambda: NOW + 10
        keeper.hub = SimpleNamespace(registry=registry, store=LocalStore(hub / "store"), path=hub)
        newest = registry.latest_checkpoint()

        keeper.cfg = SimpleNamespace(hub=SimpleNamespace(retention=RetentionConfig()))
        keeper.retain(newest)
        assert all(c.pruned is None for c in registry.checkpoints())

        keeper.cfg = SimpleNamespace(hub=SimpleNamespace(retention=RetentionConfig(bases=1)))
        keeper.retain(newest)
        assert [c.pruned for c in registry.checkpoints()] == [NOW + 10, NOW + 10, None]
        assert not (hub / "store/t/base/v1").exists() and (hub / "store/t/adapter-hi/v0").exists()


@pytest.mark.slow  # a real hub: relays one push with the real ClientApp and model, then merges
def test_after_a_merge_with_retention_bases_1_the_older_base_goes_and_its_row_stays(tmp_path):
    from fedem_flwr.relay.keeper import BaseKeeper
    from tests.support.relay import KEEPER_OVERRIDES, open_real_hub, relay_in_process

    hub, run_config = open_real_hub(tmp_path, f"{KEEPER_OVERRIDES} data.languages=[hi] relay.max_accepted=1 "
                                              "merge.every_accepted=null merge.method=sum hub.retention.bases=1")
    relay_in_process(hub, run_config, tmp_path, nodes=1)

    new = BaseKeeper(hub).merge("requested")

    assert new is not None and new.version == 1
    old = hub.registry.checkpoint(0)
    assert old.pruned is not None and old.digest and not (tmp_path / "hub/store" / old.repo / old.revision).exists()
    assert hub.registry.latest_adapter_version("hi").base_version == 1  # rebased: nothing refers to v0 now
    assert all(v.pruned is None for v in hub.registry.adapter_versions())  # `adapter_versions` is null
    view = views.verify_view(hub.registry, views.StoreView(hub.path))
    assert view["ok"] and view["checked"]["pruned"] == 1, view["problems"]
