"""Nodes fetch base checkpoints from the Hugging Face Hub themselves; the copy through Flower is the fallback.

The hub's store is an ``HfStore`` on the local Hub endpoint. Nodes run a ClientApp whose base
handling is the real one (in-band files into the ``BaseCache``, then ``base_fetch.ensure_base``
with the node's own environment) and whose training is scripted (it lowers the weight ``w`` that
the scripted workbench reads as the loss), so a scenario takes about a second. The last test runs
the real hub and ClientApp (``hub.store=hf``) end to end.
"""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedem_flwr.config.schema import RelayConfig
from fedem_flwr.errors import ConfigError
from fedem_flwr.hub.hf_store import HfStore
from fedem_flwr.hub.manifest import digest
from fedem_flwr.hub.store import ArtifactRef
from fedem_flwr.model.adapter_spec import AdapterSpec
from fedem_flwr.node.cache import BaseCache
from fedem_flwr.node.fetch import HfLocation, endpoint_and_token, ensure_base, fetch_mode, hf_location
from fedem_flwr.protocol import messages
from fedem_flwr.protocol.wire import adapter_to_arrays, arrays_to_adapter
from fedem_flwr.relay.strategy import RelayStrategy
from tests.support.fake_grid import InProcessGrid
from tests.support.relay import FakeClock, seeded_coordinator

PREFIX = "org/fedem"
BASE_HF_REPO = "org/fedem-base"  # the store's `t/base` under the prefix
TOKEN = "hf_read_only_token"
SPEC = AdapterSpec.from_state({"w": torch.zeros(1)})  # the scripted adapter: one weight


def _app(envs: dict[int, dict[str, str]]) -> ClientApp:
    """Node config: ``languages``, ``partition-id``, ``cache-dir`` (and ``base-fetch``), ``claims``
    (a base digest its profile lists without holding it); ``envs`` holds each node's environment
    (``HF_TOKEN``, ``HF_ENDPOINT``)."""
    app = ClientApp()

    @app.query("profile")
    def profile(message: Message, context: Context) -> Message:
        config = context.node_config
        digests = BaseCache.for_node(config).digests() + ([config["claims"]] if "claims" in config else [])
        answer = {"languages": [config["languages"]], "device": "cpu", "data-bytes": 100,
                  "base-digests": digests, "partition-id": config["partition-id"]}
        return messages.profile_reply(message, answer)

    @app.train("relay")
    def train(message: Message, context: Context) -> Message:
        instruction = messages.parse_train_instruction(message)
        cache = BaseCache.for_node(context.node_config)
        if messages.BASE_FILES in message.content:
            record = message.content[messages.BASE_FILES]
            cache.add(instruction.base.digest, lambda folder: messages.arrays_to_folder(record, folder))
        missing = ensure_base(cache, instruction.base.digest, instruction.base_hf, context.node_config,
                              envs.get(context.node_id, {}))
        if missing:
            return messages.status_reply(message, instruction, messages.MISSING_BASE, missing)
        assert digest(cache.use(instruction.base.digest)) == instruction.base.digest
        state = arrays_to_adapter(message.content["arrays"], SPEC)
        state["w"] = state["w"] - 0.25
        return messages.train_reply(message, instruction, adapter_to_arrays(state), {"steps": 1.0})

    return app


def _hf_store(local_hub, tmp_path, private=False):
    return HfStore(PREFIX, endpoint=local_hub.endpoint, token=TOKEN if private else None,
                   cache_dir=tmp_path / "hub-cache", private=private, sleep=lambda s: None)


def _relay(tmp_path, store=None, env=None, node_config=None, max_accepted=1, hub_caches_base=False, tamper=None,
           claims_base=False):
    """One node (``hi``, empty cache) relays until ``max_accepted``; returns the strategy, its
    result, the train messages pushed, the lease outcomes in order and the node's cache."""
    clock = FakeClock()
    coordinator, registry, store = seeded_coordinator(tmp_path, clock, store=store)
    base = registry.latest_checkpoint().ref
    if hub_caches_base:
        store.get(base)  # the hub has the base at hand (it evaluates on it)
    if tamper is not None:
        tamper()
    config = {"partition-id": 0, "languages": "hi", "cache-dir": str(tmp_path / "node-cache"), **(node_config or {})}
    if claims_base:
        config["claims"] = base.digest
    grid = InProcessGrid(_app({10: env or {}}), {10: config}, {}, clock=clock)
    pushed = []
    push = grid.push_messages
    grid.push_messages = lambda batch: push(pushed.extend(batch) or batch)
    relay = RelayConfig(lease_ttl_s=100, sweep_interval_s=10, poll_interval_s=1, no_node_grace_s=5,
                        deadline_margin_s=10, max_wall_s=60.0, max_accepted=max_accepted)
    strategy = RelayStrategy(coordinator, relay, SPEC, max_steps=1,
                             clock=clock, sleep=clock.sleep)
    result = strategy.start(grid)
    trains = [m for m in pushed if m.metadata.message_type == messages.TRAIN]
    outcomes = [lease.outcome for lease in sorted(registry.leases(), key=lambda lease: lease.token)]
    return strategy, result, trains, outcomes, BaseCache.for_node(config), base


def _in_band(trains) -> list[bool]:
    return [messages.BASE_FILES in m.content for m in trains]


# -- (a) the node fetches the base itself --------------------------------------------------------


def test_a_node_without_the_base_fetches_it_by_repo_and_revision_and_nothing_travels_in_band(local_hub, tmp_path):
    strategy, result, trains, outcomes, cache, base = _relay(tmp_path, _hf_store(local_hub, tmp_path), max_accepted=2)

    assert result.accepted == 2 and outcomes == ["accepted", "accepted"]
    assert _in_band(trains) == [False, False]
    config = trains[0].content["config"]
    assert (config["base-hf-repo"], config["base-revision"], config["base-hf-endpoint"]) == (
        BASE_HF_REPO, "v0", local_hub.endpoint)
    assert config["base-digest"] == base.digest and cache.digests() == [base.digest]
    assert digest(cache.path(base.digest)) == base.digest
    assert dict(strategy.bases) == {"hf": 1}  # the second lease found it cached
    assert any(r.startswith(f"GET /{BASE_HF_REPO}/resolve/") for r in local_hub.requests)


def test_a_node_that_lost_a_base_the_hub_thought_it_had_fetches_it_without_a_bounce(local_hub, tmp_path):
    strategy, result, trains, outcomes, cache, base = _relay(tmp_path, _hf_store(local_hub, tmp_path), claims_base=True)

    assert (_in_band(trains), outcomes) == ([False], ["accepted"])
    assert cache.digests() == [base.digest] and not strategy.bases  # the hub did not know it was missing


# -- (b) a private repo: the node's token, else in-band ------------------------------------------


@pytest.mark.parametrize(
    ("env", "fetched"),
    [
        ({}, False),
        ({"HF_TOKEN": TOKEN}, False),  # its token goes only to its own endpoint, not one a message names
        ({"HF_TOKEN": TOKEN, "HF_ENDPOINT": "LOCAL"}, True),
        ({"HF_TOKEN": "hf_wrong", "HF_ENDPOINT": "LOCAL"}, False),
    ],
    ids=["no-token", "token-for-another-endpoint", "token", "wrong-token"],
)
def test_a_private_base_is_fetched_with_the_nodes_token_else_sent_in_band(local_hub, tmp_path, caplog, env, fetched):
    local_hub.tokens.add(TOKEN)
    env = {k: local_hub.endpoint if v == "LOCAL" else v for k, v in env.items()}
    with caplog.at_level(logging.WARNING):
        strategy, result, trains, outcomes, cache, base = _relay(
            tmp_path, _hf_store(local_hub, tmp_path, private=True), env=env)

    assert result.accepted == 1 and cache.digests() == [base.digest]
    if fetched:
        assert (_in_band(trains), outcomes, dict(strategy.bases)) == ([False], ["accepted"], {"hf": 1})
    else:
        assert (_in_band(trains), outcomes) == ([False, True], [messages.MISSING_BASE, "accepted"])
        assert dict(strategy.bases) == {"hf-failed": 1, "in-band": 1}
        warning = next(r.getMessage() for r in caplog.records if "could not fetch base" in r.getMessage())
        assert BASE_HF_REPO in warning and "RepositoryNotFoundError" in warning


# -- (c) the Hub holds other content than the message's digest ------------------------------------


def test_a_hub_copy_that_does_not_match_the_digest_is_refused_and_the_base_comes_in_band(local_hub, tmp_path, caplog):
    def tamper():
        repo = local_hub.store.get("model", BASE_HF_REPO)
        blob = local_hub.store.resolve(repo, "v0").tree["config.json"]
        local_hub.store.blob_path(blob).write_bytes(b'{"x": 1}')

    with caplog.at_level(logging.WARNING):
        strategy, result, trains, outcomes, cache, base = _relay(
            tmp_path, _hf_store(local_hub, tmp_path), hub_caches_base=True, tamper=tamper)

    assert (_in_band(trains), outcomes) == ([False, True], [messages.MISSING_BASE, "accepted"])
    assert dict(strategy.bases) == {"hf-failed": 1, "in-band": 1}
    assert cache.digests() == [base.digest] and digest(cache.path(base.digest)) == base.digest
    assert not [p for p in (cache.root / "bases").iterdir() if p.name.startswith(".")]  # no half a base left
    assert any(f"is not base {base.digest[:12]}" in r.getMessage() for r in caplog.records)


# -- (d) and the other ways bases travel in-band --------------------------------------------------


def test_with_the_local_store_the_base_travels_in_band_and_no_hub_repo_is_named(tmp_path):
    strategy, result, trains, outcomes, cache, base = _relay(tmp_path, max_accepted=2)

    assert (_in_band(trains), outcomes) == ([True, False], ["accepted", "accepted"])
    assert not any("base-hf-repo" in m.content["config"] for m in trains)
    assert dict(strategy.bases) == {"in-band": 1} and cache.digests() == [base.digest]


def test_a_node_with_hub_fetch_off_asks_for_the_in_band_copy_without_reaching_the_hub(local_hub, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        strategy, result, trains, outcomes, cache, base = _relay(
            tmp_path, _hf_store(local_hub, tmp_path), node_config={"base-fetch": "inband"})

    assert (_in_band(trains), outcomes) == ([False, True], [messages.MISSING_BASE, "accepted"])
    assert dict(strategy.bases) == {"hf-failed": 1, "in-band": 1}
    assert any("base-fetch=inband" in r.getMessage() for r in caplog.records)


def test_a_hub_that_answers_an_error_gets_the_base_in_band(local_hub, tmp_path):
    local_hub.fail("GET", f"/api/models/{BASE_HF_REPO}/revision", status=404, times=1)

    strategy, result, trains, outcomes, cache, base = _relay(tmp_path, _hf_store(local_hub, tmp_path))

    assert (_in_band(trains), outcomes) == ([False, True], [messages.MISSING_BASE, "accepted"])
    assert dict(strategy.bases) == {"hf-failed": 1, "in-band": 1}


# -- the pieces ----------------------------------------------------------------------------------


def test_the_hub_names_its_endpoint_only_when_it_is_not_the_default(local_hub, tmp_path):
    ref = ArtifactRef("t/base", "v3", "0" * 64)

    assert hf_location(_hf_store(local_hub, tmp_path), ref) == HfLocation(BASE_HF_REPO, "v3", local_hub.endpoint)
    default = HfStore(PREFIX, endpoint="https://huggingface.co/", offline=True)
    assert hf_location(default, ref) == HfLocation(BASE_HF_REPO, "v3", "")


def test_a_token_goes_only_to_the_nodes_own_endpoint():
    mirror = "http://mirror.example:8080"
    named = HfLocation(BASE_HF_REPO, "v0", "http://hub.example")
    unnamed = HfLocation(BASE_HF_REPO, "v0")

    assert endpoint_and_token(unnamed, {"HF_TOKEN": "t", "HF_ENDPOINT": mirror + "/"}) == (mirror, "t")
    assert endpoint_and_token(named, {"HF_TOKEN": "t", "HF_ENDPOINT": mirror}) == ("http://hub.example", False)
    assert endpoint_and_token(named, {"HF_TOKEN": "t", "HF_ENDPOINT": "http://hub.example"}) == (
        "http://hub.example", "t")
    assert endpoint_and_token(unnamed, {}) == ("https://huggingface.co", False)


def test_base_fetch_key_is_checked(tmp_path):
    assert fetch_mode({}) == "hub" and fetch_mode({"base-fetch": "INBAND"}) == "inband"
    with pytest.raises(ConfigError, match="`base-fetch` is 'ftp'; allowed: hub, inband"):
        ensure_base(BaseCache(tmp_path), "0" * 64, None, {"base-fetch": "ftp"}, {})


def _instruction(base_hf):
    base = ArtifactRef("t/base", "v2", "a" * 64)
    return messages.TrainInstruction("hi", 1, ("hi",), 5, base, 2, 60.0, 1, base_hf=base_hf)


def _message(instruction):
    InProcessGrid(ClientApp(), {}, {})  # sets the task identity a Message needs
    return messages.train_message(10, instruction, adapter_to_arrays({"w": torch.zeros(1)}), ttl=60)


@pytest.mark.parametrize(
    "base_hf", [None, HfLocation(BASE_HF_REPO, "v2"), HfLocation(BASE_HF_REPO, "v2", "https://hub.example/x")])
def test_the_hub_location_survives_the_wire(base_hf):
    assert messages.parse_train_instruction(_message(_instruction(base_hf))) == _instruction(base_hf)


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        ("base-hf-repo", "a/b/c", "`base-hf-repo` is 'a/b/c'; it must be a Hugging Face repo id"),
        ("base-hf-repo", 7, "`base-hf-repo` is 7"),
        ("base-hf-repo", "../etc", "`base-hf-repo` is '../etc'"),
        ("base-hf-endpoint", "file:///etc/passwd", "`base-hf-endpoint` is 'file:///etc/passwd'; it must be an http"),
        ("base-hf-endpoint", "http://a b", "`base-hf-endpoint` is 'http://a b'"),
        ("base-revision", "main", "`base-revision` is 'main'; it must be a base revision like 'v3'"),
        ("base-digest", "abc", "`base-digest` is 'abc'; it must be a sha256 hex digest"),
    ],
)
def test_a_malformed_base_location_is_refused_naming_the_field(key, value, error):
    message = _message(_instruction(HfLocation(BASE_HF_REPO, "v2")))
    message.content["config"][key] = value

    with pytest.raises(messages.InvalidInstruction, match=error.replace("(", r"\(")):
        messages.parse_train_instruction(message)


def test_an_endpoint_without_a_repo_is_refused():
    message = _message(_instruction(None))
    message.content["config"]["base-hf-endpoint"] = "https://hub.example"

    with pytest.raises(messages.InvalidInstruction, match="`base-hf-endpoint` but no `base-hf-repo`"):
        messages.parse_train_instruction(message)


# -- the whole hop, with the real hub and ClientApp ----------------------------------------------


def test_the_real_client_app_fetches_the_hubs_base_from_the_hub(hf_env, tmp_path):
    from fedem_flwr.client_app import app as client_app
    from fedem_flwr.config.loader import load_run_config
    from fedem_flwr.relay.bootstrap import open_hub

    overrides = ("hub.store=hf data.languages=[hi] train.max_steps=4 train.batch_size=4 train.progress=false "
                 "relay.lease_ttl_s=600 relay.poll_interval_s=0.001 relay.no_node_grace_s=0 relay.max_wall_s=300 "
                 "relay.max_accepted=1")
    run_config = {"overrides": overrides, "hub": str(tmp_path / "hub")}
    cfg = load_run_config(run_config)
    hub = open_hub(cfg, tmp_path / "hub")
    nodes = {100: {"partition-id": 0, "num-partitions": 1, "cache-dir": str(tmp_path / "node-cache")}}
    grid = InProcessGrid(client_app, nodes, run_config)
    strategy = RelayStrategy(hub.coordinator, cfg.relay, hub.workbench.spec, max_steps=cfg.train.max_steps,
                             training_rows=hub.training_rows)

    result = strategy.start(grid)

    base = hub.registry.latest_checkpoint()
    trains = [m for m in grid.delivered if m.metadata.message_type == messages.TRAIN]
    assert result.accepted == 1 and trains and dict(strategy.bases) == {"hf": 1}
    assert not any(messages.BASE_FILES in m.content for m in trains)
    assert trains[0].content["config"]["base-hf-repo"] == "fedem/base"
    assert BaseCache.for_node(nodes[100]).digests() == [base.digest]
