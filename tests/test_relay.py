"""The relay end to end over an in-process Grid with the real ClientApp, model, data and hub."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from fedem_flwr.client_app import app as client_app
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.errors import DataError
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.adapter_spec import load_adapter_file
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.relay.strategy import RelayStrategy
from tests.support.fake_grid import InProcessGrid

OVERRIDES = (
    "data.languages=[hi,ta,mr,de] train.max_steps=8 train.batch_size=4 train.progress=false "
    "relay.lease_ttl_s=600 relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=300"
)


def _relay(hub_dir, max_accepted, nodes=2):
    run_config = {"overrides": f"{OVERRIDES} relay.max_accepted={max_accepted}", "hub": str(hub_dir / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, hub_dir / "hub")
    node_configs = {
        100 + i: {"partition-id": i, "num-partitions": nodes, "cache-dir": str(hub_dir / f"cache-{i}")}
        for i in range(nodes)
    }
    grid = InProcessGrid(client_app, node_configs, run_config)
    strategy = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps,
                             training_rows=hub.training_rows)
    return hub, grid, strategy.start(grid)


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    return _relay(tmp_path_factory.mktemp("relay"), max_accepted=4)


def test_adapters_advance_through_versions(relayed):
    hub, _, result = relayed
    assert (result.accepted, result.stopped_by) == (4, "4 accepted contributions"), result
    versions = hub.registry.adapter_versions()
    assert sum(1 for v in versions if v.version > 0) == 4
    assert len({v.adapter for v in versions if v.version > 0}) >= 2


def test_accepted_versions_are_no_worse_than_their_parents(relayed):
    hub, _, _ = relayed
    versions = {(v.adapter, v.version): v for v in hub.registry.adapter_versions()}
    for (adapter, number), version in versions.items():
        if number == 0:
            continue
        parent = versions[(adapter, version.parent_version)]
        (language,) = hub.registry.adapter(adapter).languages
        assert version.metrics["heldout"][language] <= parent.metrics["heldout"][language]


def test_leases_never_overlap_and_all_end(relayed):
    hub, _, _ = relayed
    leases = hub.registry.leases()
    assert not hub.registry.leases(active_only=True)
    assert len({lease.token for lease in leases}) == len(leases)
    for adapter in {lease.adapter for lease in leases}:
        mine = sorted((lease for lease in leases if lease.adapter == adapter), key=lambda lease: lease.issued)
        for earlier, later in zip(mine, mine[1:]):
            assert earlier.ended is not None and earlier.ended <= later.issued


def test_base_v0_carries_its_held_out_losses_so_every_curve_starts_there(relayed):
    hub, _, _ = relayed
    v0 = hub.registry.checkpoint(0)
    bare = hub.workbench.evaluate(hub.workbench.initial_state)  # a fresh LoRA (B = 0) scores the base itself

    assert sorted(v0.metrics["heldout"]) == sorted(hub.workbench.heldout) == ["de", "hi", "mr", "ta"]
    assert v0.metrics["heldout"] == pytest.approx(bare)
    assert v0.metrics["heldout-split"] == hub.split_id
    for adapter in hub.registry.adapters():  # each fresh v0 was scored on base v0 with the same losses
        assert hub.registry.adapter_version(adapter.name, 0).metrics["heldout"] == v0.metrics["heldout"]


def test_base_travels_once_per_node_then_comes_from_its_cache(relayed):
    _, grid, _ = relayed
    assert sum(1 for m in grid.delivered if "base-files" in m.content) == 2


def test_simulated_nodes_train_on_the_rows_the_hub_hands_them(relayed):
    hub, grid, _ = relayed
    trains = [m for m in grid.delivered if m.metadata.message_type == messages.TRAIN]
    assert trains
    for message in trains:
        pid = grid.nodes[message.metadata.dst_node_id].node_config["partition-id"]
        expected = hub.training_rows(pid, 2)
        # text alone: no adapter here trains on conversations or a domain (test_catalog_hub: one does)
        assert messages.node_rows(message) == {"text": expected["text"], "language": expected["language"]}


def test_client_app_answers_typed_replies_when_it_cannot_train(relayed, tmp_path):
    hub, _, _ = relayed
    base = hub.registry.latest_checkpoint()
    version = hub.registry.latest_adapter_version("hi")
    base_ref = ArtifactRef(base.repo, base.revision, base.digest)
    state = load_adapter_file(hub.store.get(ArtifactRef(version.repo, version.revision, version.digest))
                              / "adapter_model.safetensors")
    instruction = messages.TrainInstruction("hi", version.version, ("hi",), 99, base_ref, base.version, 60.0, 1)
    run_config = {"overrides": OVERRIDES}
    node_config = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path / "cache")}
    InProcessGrid(client_app, {}, run_config)  # sets the task identity messages need

    def ask(base_folder=None, rows=None):
        message = messages.train_message(100, instruction, adapter_to_arrays(state), ttl=60,
                                         base_folder=base_folder, rows=rows)
        message.metadata.__dict__["_message_id"] = "m"
        reply = client_app(message, Context(7, 100, node_config, RecordDict(), run_config))
        return messages.parse_train_reply(reply, instruction)

    # the base is neither cached nor sent
    assert ask().status == messages.MISSING_BASE
    # sent now (and cached); the rows the hub hands out hold no Hindi
    german = {"text": ["Guten Tag", "Wie geht es?"], "language": ["de", "de"]}
    no_data = ask(base_folder=hub.store.get(base_ref), rows=german)
    assert (no_data.status, no_data.token, no_data.adapter) == (messages.NO_DATA, 99, "hi")
    # a simulated node never falls back to its own corpus partition, which holds held-out rows
    with pytest.raises(DataError, match="trains on the rows the hub sends"):
        ask()


def test_every_push_is_a_pseudonymous_contribution(relayed):
    hub, _, result = relayed
    contributions = hub.registry.contributions()
    assert len(contributions) == result.accepted + result.rejected
    identities = hub.registry.identities()
    assert {identities[c.pseudonym] for c in contributions} <= {"sim:0", "sim:1"}
    assert all("sim:" not in c.pseudonym for c in contributions)


def test_restart_resumes_from_the_registry(tmp_path):
    first_hub, _, first = _relay(tmp_path, max_accepted=1)
    first_hub.registry.close()
    hub, _, second = _relay(tmp_path, max_accepted=1)
    # Replies that arrive together are all judged, so a stop at 1 may accept a few.
    assert first.accepted >= 1 and second.accepted >= 1
    assert sum(1 for v in hub.registry.adapter_versions() if v.version > 0) == first.accepted + second.accepted
    assert len(hub.registry.checkpoints()) == 1  # the seed is not redone


def test_relay_publishes_to_a_hugging_face_hub_store(tmp_path, hf_env):
    """With `hub.store=hf` every base and adapter version is a tagged commit on the Hub endpoint,
    and the relay works the same (the hub serves bases to nodes from its download cache)."""
    from huggingface_hub import HfApi

    overrides = f"{OVERRIDES} relay.max_accepted=1 hub.store=hf hub.repo_prefix=org/seshu"
    run_config = {"overrides": overrides, "hub": str(tmp_path / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, tmp_path / "hub")
    grid = InProcessGrid(client_app, {100: {"partition-id": 0, "num-partitions": 1,
                                            "cache-dir": str(tmp_path / "cache")}}, run_config)
    result = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=2,
                           training_rows=hub.training_rows).start(grid)

    assert result.accepted >= 1
    api = HfApi(endpoint=hf_env.endpoint)
    assert [t.name for t in api.list_repo_refs("org/seshu-base").tags] == ["v0"]
    (accepted,) = [v for v in hub.registry.adapter_versions() if v.version == 1][:1]
    tags = {t.name for t in api.list_repo_refs(hub.store.repo_id(accepted.repo)).tags}
    assert {"v0", "v1"} <= tags
