"""Crashes leave nothing that blocks: a hub process killed with SIGKILL between an artifact write
and its registry commit (kill point ``after-artifact-write``) restarts, replaces the orphan it left
and advances the same adapter; an orphan base checkpoint does not block the first start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedem_flwr.cli import cli
from fedem_flwr.hub.manifest import digest
from fedem_flwr.hub.registry import Registry
from fedem_flwr.hub.store import LocalStore, adapter_repo

ROOT = Path(__file__).parents[1]
REPO = adapter_repo("fedem", "hi")


def run_hub(hub: Path, max_accepted: int, overrides: str = "", kill_at: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("FEDEM_KILL_AT", None)
    if kill_at:
        env["FEDEM_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(ROOT / "tests" / "hub_process.py"), str(hub), str(max_accepted),
                           overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_hub_killed_between_artifact_write_and_registry_commit_advances_after_restart(tmp_path):
    # Prepare / Execute: the first accepted push writes hi@v1, then the process dies before the commit
    hub = tmp_path / "hub"
    killed = run_hub(hub, 1, kill_at=f"after-artifact-write:{REPO}@v1")

    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = LocalStore(hub / "store")
    orphan = store.verify_all()  # refs.json lists v1: it was stored whole
    assert store.revisions(REPO) == ["v0", "v1"] and orphan == []
    orphan_digest = digest(store.local_path(REPO, "v1"))
    with Registry.open(hub) as registry:
        assert [v.version for v in registry.adapter_versions("hi")] == [0]  # the commit never happened
        assert [lease.state for lease in registry.leases()] == ["active"]

    # Execute: restart without the kill point; nodes train other steps, so the push differs from the orphan
    restarted = run_hub(hub, 2, overrides="train.max_steps=6")

    # Assert
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    result = json.loads(restarted.stdout.strip().splitlines()[-1])
    assert result["accepted"] >= 2, result
    with Registry.open(hub, readonly=True) as registry:
        versions = registry.adapter_versions("hi")
        leases = registry.leases()
    assert [v.version for v in versions] == list(range(len(versions))) and len(versions) >= 3
    v1 = versions[1]
    assert v1.digest == digest(store.local_path(REPO, "v1")) != orphan_digest
    assert leases[0].state == "expired" and leases[0].outcome == "hub-restart"
    assert not [lease for lease in leases if lease.state == "active"]
    verify = CliRunner().invoke(cli, ["--hub", str(hub), "verify"])
    assert verify.exit_code == 0, verify.output


def test_an_orphan_base_checkpoint_does_not_block_the_first_start(tmp_path):
    """A first start that stored base v0 and died before recording it: the next start replaces it."""
    from fedem_flwr.config.loader import load_config
    from fedem_flwr.hub.store import base_repo
    from fedem_flwr.relay.bootstrap import open_hub

    # Prepare: other content under fedem/base@v0, no registry row
    hub = tmp_path / "hub"
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "config.json").write_text("{}")
    LocalStore(hub / "store").put(base_repo("fedem"), "v0", lost, "an earlier start")

    # Execute
    opened = open_hub(load_config(["data.languages=[hi]"]), hub)

    # Assert
    (base,) = opened.registry.checkpoints()
    assert base.digest == digest(LocalStore(hub / "store").local_path(base.repo, "v0")) != digest(lost)
    assert LocalStore(hub / "store").verify_all({(base.repo, base.revision, base.digest)} | {
        (v.repo, v.revision, v.digest) for v in opened.registry.adapter_versions()}) == []
    opened.registry.close()
