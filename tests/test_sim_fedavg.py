"""Flower's FedAvg over one global adapter and per language adapter, on the in-process Grid with
the real ClientApp handler, model, data and hub."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedem_flwr.client_app import app as client_app
from fedem_flwr.client_app import query_profile
from fedem_flwr.config.loader import load_run_config
from fedem_flwr.hub.paths import registry_path
from fedem_flwr.hub.registry import Registry
from fedem_flwr.protocol import messages
from fedem_flwr.relay.bootstrap import open_hub
from fedem_flwr.simulation.clock import VirtualClock
from fedem_flwr.simulation.fedavg import round_lr, run_fedavg
from fedem_flwr.simulation.fedavg_client import fedavg_train
from fedem_flwr.simulation.record import read_result, read_trace
from fedem_flwr.simulation.virtual_grid import SIM_PLAN
from tests.support.fake_grid import InProcessGrid

pytestmark = pytest.mark.slow  # FedAvg rounds that train real adapters

NODES = 6
OVERRIDES = ("data.languages=[hi,ta,mr,de] train.max_steps=4 train.batch_size=4 train.progress=false "
             "sim.clock=virtual relay.no_node_grace_s=0")
STEP_TOKENS = 4 * 128
ROUND = NODES * 4 * STEP_TOKENS  # the most a round of every node trains


class RecordingGrid(InProcessGrid):
    """Keeps every train message pushed and every reply handed back, round by round; ``plans``
    maps a node to the ``sim-plan`` its first train message gets (as a virtual grid attaches one)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[tuple[list[Message], list[Message]]] = []
        self.plans: dict[int, dict[str, int]] = {}

    def push_messages(self, messages):
        messages = list(messages)
        for message in messages:
            plan = self.plans.pop(message.metadata.dst_node_id, None) if message.metadata.message_type == "train" else None
            if plan is not None:
                message.content[SIM_PLAN] = ConfigRecord(plan)
        return super().push_messages(messages)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == "train":
            self.rounds.append((messages, replies))
        return replies


def _setup(tmp_path, method, budget, app=client_app):
    run_config = {"overrides": f"{OVERRIDES} sim.method={method} sim.max_tokens={budget}", "hub": str(tmp_path / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, tmp_path / "hub")
    node_configs = {100 + i: {"partition-id": i, "num-partitions": NODES, "cache-dir": str(tmp_path / f"cache-{i}")}
                    for i in range(NODES)}
    return hub, cfg, RecordingGrid(app, node_configs, run_config)


def _holdings(hub):
    return {100 + pid: set(hub.training_rows(pid, NODES)["language"]) for pid in range(NODES)}


def _fresh_losses(hub):
    registry = Registry.open(registry_path(hub.path))
    return {a.name: registry.adapter_versions(a.name)[0].metrics["heldout"][a.name] for a in registry.adapters()}


# -- fedavg-global ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def global_run(tmp_path_factory):
    hub, cfg, grid = _setup(tmp_path_factory.mktemp("global"), "fedavg-global", budget=int(1.5 * ROUND))
    return hub, cfg, grid, run_fedavg(grid, hub, cfg, VirtualClock(0.0))


def test_global_adapter_is_the_weighted_average_of_the_replies(global_run):
    _, _, grid, result = global_run
    assert result["rounds"] == len(grid.rounds) >= 2
    (_, replies), (next_messages, _) = grid.rounds[0], grid.rounds[1]
    weights = [r.content["metrics"]["num-examples"] for r in replies]
    assert len(replies) == NODES and len(set(weights)) > 1  # every node, with its own weight
    sent = next_messages[0].content["arrays"]
    for key in sent:
        expected = sum(w * r.content["arrays"][key].numpy() for w, r in zip(weights, replies)) / sum(weights)
        np.testing.assert_allclose(sent[key].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert {m.content["config"]["languages"] for m in next_messages} == {"de,hi,mr,ta"}


def test_each_round_trains_at_its_learning_rate_annealed_across_rounds(global_run):
    _, cfg, grid, _ = global_run
    rates = [{m.content["config"]["lr"] for m in sent} for sent, _ in grid.rounds]
    assert rates == [{round_lr(t, cfg.train)} for t in range(len(grid.rounds))]
    assert rates[0] == {cfg.train.lr}  # no warmup across rounds, as FlowerTune: round 0 at the peak


def test_global_adapter_lowers_every_language(global_run):
    hub, _, _, result = global_run
    fresh = _fresh_losses(hub)
    assert sorted(result["losses"]) == sorted(fresh)
    for language, loss in result["losses"].items():
        assert loss < fresh[language], (language, loss, fresh[language])


def test_budget_stops_the_rounds(global_run):
    _, cfg, grid, result = global_run
    assert result["stopped_by"] == f"token budget {cfg.sim.max_tokens}"
    sent = sum(int(r.content["metrics"]["tokens"]) for _, replies in grid.rounds for r in replies)
    assert result["tokens"] == sent
    assert abs(result["tokens"] - cfg.sim.max_tokens) <= NODES * STEP_TOKENS  # a last round cut to fit
    last, _ = grid.rounds[-1]
    assert 0 < last[0].content["config"]["max-steps"] < cfg.train.max_steps


def test_base_travels_once_per_node(global_run):
    _, _, grid, _ = global_run
    with_base = [m.metadata.dst_node_id for messages_, _ in grid.rounds for m in messages_
                 if messages.BASE_FILES in m.content]
    assert sorted(with_base) == sorted(grid.nodes)


def test_result_and_trace_are_written(global_run):
    hub, _, _, result = global_run
    assert read_result(hub.path) == result and result["method"] == "fedavg-global"
    rows = read_trace(hub.path)
    assert len(rows) == result["rounds"] + 1 and rows[0]["tokens"] == 0
    assert rows[-1]["tokens"] == result["tokens"] and rows[-1]["accepted"] == result["accepted"] == NODES * result["rounds"]


# -- fedavg-language, with a node that fails and one that answers badly ------------------------------


@pytest.fixture(scope="module")
def language_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("language")
    faulty = ClientApp()
    faults = {}

    @faulty.query("profile")
    def profile(message: Message, context: Context) -> Message:
        return query_profile(message, context)

    @faulty.train()
    def train(message: Message, context: Context) -> Message:
        first = message.content["config"]["server-round"] == 1
        if first and context.node_id == faults.get("raises"):
            raise RuntimeError("disk full")
        reply = fedavg_train(message, context)
        if first and context.node_id == faults.get("malformed"):
            del reply.content["metrics"]["num-examples"]  # FedAvg's own check would end the round
        return reply

    hub, cfg, grid = _setup(tmp, "fedavg-language", budget=int(1.5 * ROUND), app=faulty)
    holdings = _holdings(hub)
    shared = next(lang for lang in sorted(hub.workbench.heldout) if sum(lang in h for h in holdings.values()) > 1)
    others = sorted(nid for nid, held in holdings.items() if shared not in held)
    faults.update(raises=others[0], malformed=others[1], vanishes=others[2])
    grid.plans[others[2]] = {"steps": 2, "vanish": 1}
    return hub, cfg, grid, run_fedavg(grid, hub, cfg, VirtualClock(0.0)), holdings, shared, faults


def test_each_language_samples_only_nodes_holding_it(language_run):
    _, _, grid, _, holdings, _, _ = language_run
    for messages_, _ in grid.rounds:
        languages = [m.content["config"]["languages"] for m in messages_]
        assert sorted(languages) == sorted(lang for held in holdings.values() for lang in held)  # all in one batch
        for message in messages_:
            assert message.content["config"]["languages"] in holdings[message.metadata.dst_node_id]
            rows = message.content[messages.NODE_ROWS]
            assert set(rows["language"]) == {message.content["config"]["languages"]}


def test_a_language_adapter_averages_its_holders_only(language_run):
    _, _, grid, _, _, shared, _ = language_run
    (sent, replies), (next_messages, _) = grid.rounds[0], grid.rounds[1]
    by_id = {m.metadata.message_id: m for m in sent}
    mine = [r for r in replies if by_id[r.metadata.reply_to_message_id].content["config"]["languages"] == shared]
    assert len(mine) > 1
    weights = [r.content["metrics"]["num-examples"] for r in mine]
    nxt = next(m for m in next_messages if m.content["config"]["languages"] == shared).content["arrays"]
    for key in nxt:
        expected = sum(w * r.content["arrays"][key].numpy() for w, r in zip(weights, mine)) / sum(weights)
        np.testing.assert_allclose(nxt[key].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_failed_and_malformed_replies_are_dropped_and_the_run_goes_on(language_run):
    hub, cfg, grid, result, _, _, faults = language_run
    assert result["rejected"] == 2
    assert result["stopped_by"] == f"token budget {cfg.sim.max_tokens}" and result["rounds"] >= 2
    first_sent, first_replies = grid.rounds[0]
    assert sum(r.has_error() for r in first_replies) == 1
    assert result["accepted"] == sum(len(s) for s, _ in grid.rounds) - 3  # and one vanished
    fresh = _fresh_losses(hub)
    for language, loss in result["losses"].items():
        assert loss < fresh[language], (language, loss, fresh[language])
    # A node that failed is asked its profile again: the one that raised before caching the base
    # gets it again, the one that trained keeps its copy.
    with_base = Counter(m.metadata.dst_node_id for s, _ in grid.rounds for m in s if messages.BASE_FILES in m.content)
    assert with_base == {nid: 2 if nid == faults["raises"] else 1 for nid in grid.nodes}
    assert read_result(hub.path)["method"] == "fedavg-language"


def test_a_vanished_node_trains_its_planned_steps_for_nothing(language_run):
    _, _, grid, result, _, _, faults = language_run
    sent, replies = grid.rounds[0]
    by_id = {m.metadata.message_id: m for m in sent}
    (vanished,) = [r for r in replies if not r.has_error() and r.content["metrics"]["vanished"] == 1]
    assert by_id[vanished.metadata.reply_to_message_id].metadata.dst_node_id == faults["vanishes"]
    assert vanished.content["metrics"]["steps"] == 2  # the plan's steps, not train.max_steps
    assert result["tokens_wasted"] == vanished.content["metrics"]["tokens"] > 0
    later = [r for _, rs in grid.rounds[1:] for r in rs if not r.has_error()]
    assert all(r.content["metrics"]["vanished"] == 0 for r in later)


def test_a_run_whose_replies_all_fail_or_that_has_no_node_ends(tmp_path):
    broken = ClientApp()

    @broken.query("profile")
    def profile(message: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        return messages.profile_reply(message, {"languages": ["hi"], "device": "cpu", "data-bytes": 1,
                                                "base-digests": [], "partition-id": pid, "num-partitions": 2})

    @broken.train()
    def train(message: Message, context: Context) -> Message:
        raise RuntimeError("out of disk")

    run_config = {"overrides": "data.languages=[hi,ta] sim.method=fedavg-language sim.clock=virtual "
                               "relay.no_node_grace_s=0", "hub": str(tmp_path / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, tmp_path / "hub")
    grid = RecordingGrid(broken, {100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}, run_config)
    result = run_fedavg(grid, hub, cfg, VirtualClock(0.0))
    assert result["stopped_by"] == "no reply accepted in 10 rounds"
    assert (result["rounds"], result["rejected"], result["accepted"], result["tokens"]) == (10, 20, 0, 0)
    for node_id in list(grid.nodes):
        grid.kill(node_id)
    result = run_fedavg(grid, hub, cfg, VirtualClock(0.0))
    assert (result["stopped_by"], result["rounds"]) == ("no node holding a language online", 0)
