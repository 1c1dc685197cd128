"""The real app on Flower's simulation engine (`flwr run` on a local simulation SuperLink).

Checks what a user of `make run` relies on: the run completes, several adapters advance through
several versions, leases never overlap on an adapter, accepted versions are no worse than their
parents, and nothing is left active.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedem_flwr.hub.registry import Registry
from fedem_flwr.launch.local import run_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

APP_DIR = Path(__file__).resolve().parent.parent
OVERRIDES = (
    "data.languages=[hi,ta,mr,de] train.max_steps=6 train.batch_size=4 train.progress=false "
    "relay.max_accepted=6 relay.max_wall_s=420 relay.no_node_grace_s=60"
)


@pytest.fixture(scope="module")
def simulated_hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    hub = tmp / "hub"
    with open(tmp / "flwr.log", "w") as log:
        outcome = run_app(
            APP_DIR, flwr_home=tmp / "flwr",
            federation_config="num-supernodes=3 client-resources-num-cpus=1",
            run_config={"hub": str(hub), "overrides": OVERRIDES}, log_output=log, echo=lambda _: None,
        )
    assert outcome.ok, f"{outcome.summary()}\n{(tmp / 'flwr.log').read_text()[-4000:]}"
    with Registry.open(hub, readonly=True) as registry:
        yield registry


def test_several_adapters_advance_through_several_versions(simulated_hub):
    versions = [v for v in simulated_hub.adapter_versions() if v.version > 0]
    assert len(versions) >= 6
    assert len({v.adapter for v in versions}) >= 2
    assert max(v.version for v in versions) >= 2


def test_no_two_leases_ever_overlap_on_an_adapter(simulated_hub):
    leases = simulated_hub.leases()
    assert not simulated_hub.leases(active_only=True)
    for adapter in {lease.adapter for lease in leases}:
        mine = sorted((lease for lease in leases if lease.adapter == adapter), key=lambda lease: lease.issued)
        for earlier, later in zip(mine, mine[1:]):
            assert earlier.ended <= later.issued


def test_accepted_versions_are_no_worse_than_their_parents(simulated_hub):
    versions = {(v.adapter, v.version): v for v in simulated_hub.adapter_versions()}
    for (adapter, number), version in versions.items():
        if number:
            (language,) = simulated_hub.adapter(adapter).languages
            parent = versions[(adapter, version.parent_version)]
            assert version.metrics["heldout"][language] <= parent.metrics["heldout"][language]


def test_simulated_contributors_are_keyed_by_partition(simulated_hub):
    assert set(simulated_hub.identities().values()) <= {"sim:0", "sim:1", "sim:2"}
