"""The deployment guide, run as written on loopback: a real `flower-superlink` with TLS and SuperNode
authentication, three real authenticated `flower-supernode`s with their own data, the app submitted
with `flwr run`, and then the faults a hub on the internet meets, in sequence on that one deployment:

a SuperNode with no registered key, a SuperNode killed with SIGKILL while it holds a lease (and
restarted with its key: same identity), a reply after its lease expired, replies with another
lease's token or a malformed or oversized adapter, the ServerApp killed and the run resubmitted,
and the SuperLink restarted with its database and the run resubmitted. After each, no accepted
contribution is lost and the lease table is consistent. Every process is stopped by pid.

The tests of this module run in order and share the deployment; each leaves it running.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TypeVar

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fedem_flwr.config.loader import load_config
from fedem_flwr.data.corpus import load_corpus
from fedem_flwr.errors import HubError
from fedem_flwr.hub.paths import REGISTRY_FILE
from fedem_flwr.hub.registry import Registry
from fedem_flwr.launch import flwr_cli
from fedem_flwr.launch.processes import (
    FlowerProcess,
    cmdline,
    descendants,
    free_ports,
    http_ok,
    kill_tree,
    pid_alive,
    stop_trees,
)
from fedem_flwr.relay.nodes import key_identity
from tests.support.flower import SuperLink, node_ids, run_logs, wait_for_nodes
from tests.support.guide import Guide, untested_steps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedem-hub"
# Long enough for a ClientApp's start and 4 steps on a loaded machine (45 s was not, with three
# test runs at once on 2 cores: every push came after its lease's end).
LEASE_TTL_S = 90
OVERRIDES = (
    "data.languages=[hi,mr,ta] train.max_steps=4 train.batch_size=4 train.progress=false "
    f"relay.lease_ttl_s={LEASE_TTL_S} relay.deadline_margin_s=15 relay.sweep_interval_s=2 "
    "relay.backoff_s=2 relay.backoff_max_s=8 relay.no_node_grace_s=600 relay.max_wall_s=1200 "
    "merge.every_accepted=null merge.every_s=null"
)
# The last run: each push is also judged by one peer, the other holder of its language (docs/peers.md).
# A question reaches a SuperNode only once it has started a ClientApp for it (tens of seconds on a
# loaded machine), so a push waits up to two minutes for its peer; the hub has the data, the peer may veto.
PEERS = "gate.peers=1 gate.peer_min=1 gate.peer_min_tokens=1 gate.peer_wait_s=120 gate.hub_min_tokens=0"
# Each node can train two of the three adapters, so every adapter has a second taker.
CONTRIBUTORS = {"alice": ["hi", "mr"], "bob": ["ta", "hi"], "mallory": ["mr", "ta"]}
# Mallory's three hostile replies, in order, and how the reason the hub records for each names it.
HOSTILE_REASONS: dict[str, Callable[[str], bool]] = {
    "wrong-token": lambda reason: "claim-mismatch" in reason and "token" in reason,
    "malformed-adapter": lambda reason: "missing" in reason.lower() or "keys" in reason.lower(),
    "oversized-adapter": lambda reason: "bytes" in reason,
}
HOSTILE = "".join(f"{fault}\n" for fault in HOSTILE_REASONS)
# How long to wait for Flower to mark a run failed after its ServerApp died: it does once the
# run's heartbeats have stopped for HEARTBEAT_PATIENCE intervals; twice that, for a loaded machine.
SERVERAPP_GONE_S = 2 * HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 60
T = TypeVar("T")


@dataclass
class Contributor:
    name: str
    languages: list[str]
    key: Path
    port: int
    variables: dict[str, str]
    faults: Path
    process: Optional[FlowerProcess] = None

    @property
    def identity(self) -> str:
        public = serialization.load_ssh_public_key(self.key.with_name(self.key.name + ".pub").read_bytes())
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return key_identity(0, pem)


@dataclass
class Deployment:
    guide: Guide
    root: Path
    hub: Path
    link: Optional[FlowerProcess]
    contributors: dict[str, Contributor]
    runs: list[int] = field(default_factory=list)
    hostile_since: Optional[int] = None  # the last contribution id before Mallory's faults were queued
    others: list[FlowerProcess] = field(default_factory=list)

    @property
    def superlink(self) -> SuperLink:
        return SuperLink(self.link, CONNECTION)

    def start_superlink(self) -> None:
        port = int(self.guide.variables["HUB_PORT"])
        self.link = self.guide.start("superlink", "superlink", port, self.root / "hub" / "superlink")
        ca = Path(self.guide.variables["HUB_DIR"]) / "certs" / "ca.crt"
        wait_until(lambda: http_ok(f"https://127.0.0.1:{port}/health", ca_cert=ca), 180,
                   lambda: f"the SuperLink to answer; its output:\n{self.link.log_tail()}")

    def start_node(self, who: Contributor) -> None:
        home = self.root / who.name / "flwr"
        who.process = self.guide.start("supernode", "supernode", who.port, home, env={
            **who.variables, "FLWR_HOME": str(home), "FEDEM_NODE_FAULTS": str(who.faults)})

    def submit(self, more_overrides: str = "") -> int:
        """The guide's `flwr run`, with this module's relay settings as one more run-config value."""
        extra = shlex.quote(flwr_cli.config_args({"overrides": f"{OVERRIDES} {more_overrides}".strip()}))
        done = self.guide.run("run", cwd=APP_DIR, extra_args=f"--run-config {extra} --format json")
        run_id = int(flwr_cli.json_output(done, "run")["run-id"])
        self.runs.append(run_id)
        return run_id

    def status(self, run_id: int) -> str:
        return flwr_cli.run_status(self.guide.flwr_home, CONNECTION, run_id)["status"]

    def finished_status(self, run_id: int, timeout: float) -> str:
        """The run's status once Flower reads it `finished:*`, polled; a failure naming the last
        status seen (and the run's logs) if that takes longer than ``timeout`` seconds."""
        status = flwr_cli.settled_status(self.guide.flwr_home, CONNECTION, run_id, timeout)["status"]
        if not status.startswith("finished"):
            pytest.fail(f"run {run_id} still `{status}` after {timeout:.0f} s; logs:\n"
                        f"{run_logs(self.superlink, run_id)[-3000:]}")
        return status

    def registry(self) -> Registry:
        return Registry.open(self.hub, readonly=True)

    def read(self, probe: Callable[[Registry], T]) -> Optional[T]:
        """``probe(registry)`` on a fresh read-only view; None while the hub has no registry yet."""
        if not (self.hub / REGISTRY_FILE).exists():
            return None
        try:
            registry = self.registry()
        except HubError:  # the hub is creating its registry (schema not written yet)
            return None
        with registry:
            return probe(registry)

    def wait_accepted(self, count: int, run_id: int, timeout: float) -> None:
        wait_until(lambda: (self.read(lambda r: len(accepted(r))) or 0) >= count, timeout,
                   lambda: f"{count} accepted contributions; logs:\n{run_logs(self.superlink, run_id)[-3000:]}")

    def processes(self) -> list[FlowerProcess]:
        return [p for p in [self.link, *(c.process for c in self.contributors.values()), *self.others] if p]


def wait_until(probe: Callable[[], T], timeout: float, what: Callable[[], str] | str, poll: float = 1.0) -> T:
    """``probe()``'s first truthy value within ``timeout`` seconds, else a failure naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what() if callable(what) else what}")
        time.sleep(poll)


def write_contributor_data(folder: Path, languages: list[str]) -> Path:
    """A contributor's own JSONL file (``text``, ``language``), cut from the demo corpus."""
    corpus = load_corpus(load_config([f"data.languages=[{','.join(languages)}]"]).data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mine.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for row in corpus:
            out.write(json.dumps({"text": row["text"], "language": row["language"]}, ensure_ascii=False) + "\n")
    return path


def accepted(registry: Registry) -> list:
    return [c for c in registry.contributions() if c.decision == "accepted"]


def latest_versions(registry: Registry) -> dict[str, int]:
    return {a.name: registry.adapter_versions(a.name)[-1].version for a in registry.adapters()}


def assert_hub_consistent(deployment: Deployment, after_kill: bool = False) -> None:
    """At most one active lease per adapter and per holder, every accepted version stored whole
    (`fedem verify`), versions contiguous: nothing accepted is lost. ``after_kill``: the ServerApp was
    just SIGKILLed, so a put it had under way may have left its crash debris (a temporary folder, an
    orphan revision), which the next write replaces and `verify --repair` removes; nothing else."""
    with deployment.registry() as registry:
        active = registry.leases(active_only=True)
        assert len({l.adapter for l in active}) == len(active)
        assert len({l.holder for l in active}) == len(active)
        for adapter in registry.adapters():
            versions = [v.version for v in registry.adapter_versions(adapter.name)]
            assert versions == list(range(len(versions)))
        assert len(accepted(registry)) == sum(len(registry.adapter_versions(a.name)) - 1 for a in registry.adapters())
    done = deployment.guide.run("status")  # the guide's `fedem status` reads it too
    assert "leases" in done.stdout.lower()
    verify = subprocess.run([sys.executable, "-m", "fedem_flwr.cli", "--hub", str(deployment.hub), "verify",
                             "--json"], capture_output=True, text=True, timeout=120)
    # Every stop here kills a ServerApp, which may be mid-put: its temporary folder is crash debris, never a loss.
    debris = ("leftover", "orphan") if after_kill else ("leftover",)
    problems = [p for p in json.loads(verify.stdout)["problems"] if p["kind"] not in debris]
    assert problems == [], verify.stdout + verify.stderr


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    hub_port, *node_ports = free_ports(1 + len(CONTRIBUTORS))
    hub_dir = root / "hub"
    variables = {"HUB_DIR": str(hub_dir), "HUB_HOST": "127.0.0.1", "HUB_PORT": str(hub_port), "LISTEN": "127.0.0.1"}
    guide = Guide(variables, root / "operator-flwr")
    contributors = {}
    for (name, languages), port in zip(CONTRIBUTORS.items(), node_ports):
        folder = root / name
        data = write_contributor_data(folder / "data", languages)
        config = {"CA": str(hub_dir / "certs" / "ca.crt"), "NODE_KEY": str(folder / "supernode-key"),
                  "DATA": str(data), "LANGUAGES": ",".join(languages), "CACHE": str(folder / "cache"),
                  "NODE_PORT": str(port)}
        contributors[name] = Contributor(name, languages, folder / "supernode-key", port, config, folder / "faults")
        contributors[name].faults.write_text("")
    deployment = Deployment(guide, root, hub_dir / "state", None, contributors)
    try:
        guide.run("certs")
        deployment.start_superlink()
        guide.run("connection")
        for who in contributors.values():
            # One key from ssh-keygen, as the guide offers, where it is installed.
            step = "node-key-ssh" if who.name == "bob" and shutil.which("ssh-keygen") else "node-key"
            guide.run(step, env=who.variables)
            guide.run("register", env={"PUBLIC_KEY": f"{who.key}.pub"})
            deployment.start_node(who)
        wait_for_nodes(deployment.superlink, len(contributors), timeout=120)
        yield deployment
    finally:
        procs = deployment.processes()
        stop_trees([(p.pid, p.popen) for p in procs], tags=[p.tag for p in procs])
    assert not any(pid_alive(p.pid) for p in procs)


def test_unregistered_supernode_cannot_join(deployment):
    # Prepare: Eve has a valid key and the hub's CA, but the operator never registered her key.
    eve_dir = deployment.root / "eve"
    eve = {**deployment.contributors["alice"].variables, "NODE_KEY": str(eve_dir / "supernode-key"),
           "NODE_PORT": str(free_ports(1)[0]), "FLWR_HOME": str(eve_dir / "flwr")}
    deployment.guide.run("node-key", env=eve)

    # Execute
    proc = deployment.guide.start("supernode", "supernode", int(eve["NODE_PORT"]), eve_dir / "flwr", env=eve)
    deployment.others.append(proc)

    # Assert: it gives up, and the SuperLink still lists only the three registered nodes.
    wait_until(lambda: "Failed to activate SuperNode" in proc.log_tail(20000), 180,
               lambda: f"Eve to be refused; her output:\n{proc.log_tail()}")
    assert len(node_ids(deployment.superlink)) == len(deployment.contributors)


def test_relay_runs_over_tls_with_authenticated_nodes(deployment):
    # Execute
    run_id = deployment.submit()

    # Assert: contributions come back and are judged; every holder is one of the registered keys.
    deployment.wait_accepted(2, run_id, timeout=300)
    identities = {who.identity: who.name for who in deployment.contributors.values()}
    with deployment.registry() as registry:
        holders = {lease.holder for lease in registry.leases()}
        assert holders <= set(identities), holders
        assert set(registry.identities().values()) <= set(identities)
    deployment.guide.run("ls")
    assert_hub_consistent(deployment)


def holder_lease(deployment: Deployment, names: set[str]):
    """An active lease held by one of ``names``, with that contributor (or None)."""
    by_identity = {who.identity: who for who in deployment.contributors.values() if who.name in names}
    leases = deployment.read(lambda r: r.leases(active_only=True)) or []
    return next(((lease, by_identity[lease.holder]) for lease in leases if lease.holder in by_identity), None)


def test_killed_supernode_lease_goes_to_a_live_node_from_the_last_accepted_version(deployment):
    # Prepare: wait until Alice holds a lease.
    lease, alice = wait_until(lambda: holder_lease(deployment, {"alice"}), 180, "a lease held by Alice")
    last_accepted = deployment.read(lambda r: r.adapter_versions(lease.adapter)[-1].version)

    # Execute: her machine dies.
    kill_tree(alice.process.pid, alice.process.popen)

    # Assert: the lease ends (node gone or TTL) and the adapter goes to a live node from its last version.
    ended = wait_until(lambda: next((l for l in deployment.read(lambda r: r.leases()) if l.token == lease.token
                                     and not l.active), None), LEASE_TTL_S + 90, "Alice's lease to end")
    assert ended.outcome in {"expired", "node-gone", "message-expired", "reply-after-ttl"}, ended.outcome
    successor = wait_until(lambda: next((l for l in deployment.read(lambda r: r.leases()) if l.adapter == lease.adapter
                                         and l.token > lease.token), None), 120, f"{lease.adapter!r} to be leased again")
    assert successor.holder != alice.identity
    assert successor.adapter_version == max(last_accepted, lease.adapter_version)
    assert_hub_consistent(deployment)


def test_restarted_supernode_keeps_its_identity(deployment):
    # Prepare
    alice = deployment.contributors["alice"]
    before = deployment.read(lambda r: {l.token for l in r.leases() if l.holder == alice.identity})

    # Flower refuses to activate a node whose earlier run it still counts online (for two heartbeat
    # intervals after a crash, about a minute): Alice restarts once the SuperLink shows her gone.
    wait_until(lambda: len(node_ids(deployment.superlink)) < len(deployment.contributors), 150,
               "the SuperLink to mark the killed Alice offline")

    # Execute: Alice starts her SuperNode again with the same key.
    deployment.start_node(alice)

    # Assert: her next lease is hers: same key, same identity, same history.
    lease = wait_until(lambda: next((l for l in deployment.read(lambda r: r.leases())
                                     if l.holder == alice.identity and l.token not in before), None),
                       240, "a new lease for the restarted Alice")
    assert lease.holder == alice.identity and before
    wait_for_nodes(deployment.superlink, len(deployment.contributors), timeout=60)
    assert len(node_ids(deployment.superlink)) == len(deployment.contributors)  # not a fourth node


def test_late_reply_expires_the_lease_and_nothing_is_merged(deployment):
    # Prepare: Bob's next reply waits until its message's TTL has passed.
    bob = deployment.contributors["bob"]
    ended_before = deployment.read(lambda r: {l.token for l in r.leases() if not l.active})
    bob.faults.write_text("late\n")
    deployment.hostile_since = deployment.read(lambda r: max((c.id for c in r.contributions()), default=0))
    # Mallory turns hostile meanwhile (the next test checks her), so the two waits overlap.
    deployment.contributors["mallory"].faults.write_text(HOSTILE)

    # Execute
    wait_until(lambda: bob.faults.read_text() == "", 240, "Bob to take the `late` fault")
    lease = deployment.read(lambda r: next(l for l in reversed(r.leases()) if l.holder == bob.identity))
    assert lease.token not in ended_before

    # Assert: the lease ends as expired; no contribution is credited to it; the late reply is noted.
    ended = wait_until(lambda: next((l for l in deployment.read(lambda r: r.leases())
                                     if l.token == lease.token and not l.active), None), LEASE_TTL_S + 60,
                       "Bob's lease to expire")
    assert ended.outcome in {"expired", "reply-after-ttl", "message-expired"}, ended.outcome
    # The SuperLink refuses the reply itself (the message's TTL is the lease's time); the hub notes
    # what it reported, as the lease's outcome or, when its own deadline came first, in the log.
    noted = f"Lease {lease.token} had already ended"
    wait_until(lambda: ended.outcome != "expired" or noted in run_logs(deployment.superlink, deployment.runs[-1]),
               180, "the late reply to be noted")
    credited = deployment.read(lambda r: [c for c in r.contributions() if c.lease_token == lease.token])
    assert all(c.decision != "accepted" for c in credited)
    assert_hub_consistent(deployment)


def refusals(deployment: Deployment, since: int, pseudonym: str) -> dict[str, object]:
    """Mallory's rejected contributions after contribution ``since``, keyed by the fault each reason names."""
    rows = deployment.read(lambda r: [c for c in r.contributions() if c.id > since and c.pseudonym == pseudonym
                                      and c.decision == "rejected"]) or []
    return {fault: next(c for c in rows if names(c.reason))
            for fault, names in HOSTILE_REASONS.items() if any(names(c.reason) for c in rows)}


def test_hostile_replies_are_refused_and_the_hub_keeps_running(deployment):
    # Prepare: Mallory's next three replies claim another lease's token, drop a tensor, inflate one.
    mallory = deployment.contributors["mallory"]
    if deployment.hostile_since is None:  # queued by the test before, unless this one runs alone
        deployment.hostile_since = deployment.read(lambda r: max((c.id for c in r.contributions()), default=0))
        mallory.faults.write_text(HOSTILE)
    first_id = deployment.hostile_since
    pseudonym = deployment.read(lambda r: r.pseudonym(mallory.identity))

    def her_leases():
        return [l for l in deployment.read(lambda r: r.leases()) or [] if l.holder == mallory.identity]

    # Execute: wait until she has sent her queued replies and the lease of the last one has ended. A
    # reply that reaches the SuperLink after its lease's TTL (a loaded machine) is refused there and
    # becomes no contribution: such a fault is queued again, until each kind has been judged. (A lease
    # ends in the transaction that records its contribution.)
    deadline, judged = time.monotonic() + 900, False
    while missing := [fault for fault in HOSTILE_REASONS if fault not in refusals(deployment, first_id, pseudonym)]:
        if time.monotonic() > deadline:
            pytest.fail(f"no refusal for {missing} from Mallory within 900 s; her leases: "
                        f"{[(l.token, l.state, l.outcome) for l in her_leases()]}")
        if judged:  # every reply sent so far was judged or refused by the SuperLink: queue what is missing
            mallory.faults.write_text("".join(f"{fault}\n" for fault in missing))
        wait_until(lambda: mallory.faults.read_text() == "", 300, "Mallory to send her hostile replies")
        last = max(lease.token for lease in her_leases())  # the lease her last hostile reply answers
        wait_until(lambda: any(l.token == last and not l.active for l in her_leases()), LEASE_TTL_S + 120,
                   lambda: f"Mallory's lease {last} to end; her leases: {[(l.token, l.outcome) for l in her_leases()]}")
        judged = True
    refused = refusals(deployment, first_id, pseudonym)

    # Assert: each refused with its reason, and the hub still accepts honest work afterwards.
    reasons = " | ".join(c.reason for c in refused.values())
    assert "claim-mismatch" in reasons and "token" in reasons, reasons
    assert "missing" in reasons.lower() or "keys" in reasons.lower(), reasons
    assert "bytes" in reasons, reasons
    last = max(c.id for c in refused.values())
    wait_until(lambda: deployment.read(lambda r: any(c.id > last and c.decision == "accepted"
                                                     for c in r.contributions())), 240,
               "an accepted contribution after Mallory's")
    assert deployment.status(deployment.runs[-1]).startswith("running")
    assert_hub_consistent(deployment)


def test_killed_serverapp_run_resubmitted_continues_from_last_accepted(deployment):
    # Prepare
    serverapps = [pid for pid in descendants(deployment.link.pid) if any("flwr-serverapp" in part
                                                                          for part in cmdline(pid))]
    assert serverapps, "no ServerApp process under the SuperLink"

    # Execute: the ServerApp dies mid-run; the operator submits the run again.
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(pid) for pid in serverapps), 60, "the ServerApp to die")
    assert_hub_consistent(deployment, after_kill=True)  # Flower marks the run failed later (checked in the next test)
    repair = subprocess.run([sys.executable, "-m", "fedem_flwr.cli", "--hub", str(deployment.hub), "verify", "--repair"],
                            capture_output=True, text=True, timeout=120)  # what the operator does with the hub stopped
    assert repair.returncode == 0, repair.stdout + repair.stderr
    versions = deployment.read(latest_versions)
    tokens = deployment.read(lambda r: r.max_lease_token())
    resubmitted = deployment.submit()

    # Assert: leases left by the dead run end as `hub-restart`; new leases start from the last versions.
    wait_until(lambda: deployment.read(lambda r: [l for l in r.leases() if l.token > tokens]), 180,
               "a lease from the resubmitted run")
    with deployment.registry() as registry:
        for lease in registry.leases():
            if lease.token <= tokens:
                assert not lease.active
            elif lease.adapter in versions:
                assert lease.adapter_version >= versions[lease.adapter]
        first_new = min(l.token for l in registry.leases() if l.token > tokens)
        new = next(l for l in registry.leases() if l.token == first_new)
        assert new.adapter_version == versions[new.adapter]
    assert deployment.status(resubmitted).startswith("running")


@pytest.mark.timeout(1800)  # a restart, a resubmitted run and its two contributions, on a loaded machine too
def test_superlink_restart_keeps_nodes_and_a_resubmitted_run_completes(deployment):
    # Prepare
    killed, resubmitted = deployment.runs[-2:]
    # Flower marks a run whose ServerApp died failed once its heartbeats stop for
    # HEARTBEAT_PATIENCE intervals (about a minute): wait for it, whatever the machine's load.
    assert deployment.finished_status(killed, timeout=SERVERAPP_GONE_S) == "finished:failed"
    count = deployment.read(lambda r: len(accepted(r)))
    deployment.guide.run("stop", env={"RUN_ID": str(resubmitted)})
    deployment.finished_status(resubmitted, timeout=120)

    # Execute: the SuperLink restarts with its database; the nodes reconnect by themselves.
    old = deployment.link
    stop_trees([(old.pid, old.popen)], tags=[old.tag])
    deployment.start_superlink()
    wait_for_nodes(deployment.superlink, len(deployment.contributors), timeout=120)
    run_id = deployment.submit("relay.max_accepted=2")
    deployment.guide.run("log", env={"RUN_ID": str(run_id)}, timeout=1200)  # streams until the run ends

    # Assert: the run completes, with two more accepted contributions, and nothing is lost.
    status = deployment.finished_status(run_id, timeout=180)
    assert status == flwr_cli.COMPLETED, run_logs(deployment.superlink, run_id)[-4000:]
    assert deployment.read(lambda r: len(accepted(r))) >= count + 2
    assert_hub_consistent(deployment)


def test_the_hub_is_pruned_backed_up_and_restored_as_the_guide_says(deployment):
    # Prepare: the relay has stopped (the last run completed), so `fedem backup` writes the snapshot itself.
    guide, hub_dir = deployment.guide, Path(deployment.guide.variables["HUB_DIR"])
    before = deployment.read(lambda r: (r.identities(), r.derived_key("heldout-split"),
                                        [(v.adapter, v.version, v.digest) for v in r.adapter_versions()]))

    # Execute
    dry = guide.run("prune")
    guide.run("backup-key")
    guide.run("backup")
    restored = guide.run("restore")

    # Assert: the dry run removed nothing; the restored hub is the same hub, verified whole.
    assert "would" in dry.stdout.lower() or "nothing" in dry.stdout.lower(), dry.stdout
    assert deployment.read(lambda r: [(v.adapter, v.version, v.digest) for v in r.adapter_versions()]) == before[2]
    assert (hub_dir / "backup.key").stat().st_mode & 0o077 == 0
    with Registry.open(hub_dir / "restored" / REGISTRY_FILE, readonly=True) as registry:
        assert (registry.identities(), registry.derived_key("heldout-split")) == before[:2]
        assert [(v.adapter, v.version, v.digest) for v in registry.adapter_versions()] == before[2]
    assert "ok" in restored.stdout.lower(), restored.stdout
    assert untested_steps(guide.ran) == []


@pytest.mark.timeout(1200)
def test_each_authenticated_node_judges_a_push_of_another(deployment):
    # Prepare: a run whose pushes are judged by peers too.
    run_id = deployment.submit(PEERS)
    identities = {who.identity: who.name for who in deployment.contributors.values()}

    def judges() -> set[str]:
        def probe(registry: Registry) -> set[str]:
            by_pseudonym = registry.identities()
            reports = [r for r in registry.peer_reports() if r.outcome == "counted"]
            assert all(r.peer != r.pusher for r in reports)
            return {identities.get(by_pseudonym.get(r.peer, ""), "?") for r in reports}
        return deployment.read(probe) or set()

    # Execute: peers are nodes by key: every judge is one registered contributor, never the pusher, and
    # each of the three judges at least one push of another.
    seen = wait_until(lambda: (found := judges()) >= set(identities.values()) and found, 600,
                      lambda: f"all three contributors to judge a push; judges so far: {sorted(judges())}; logs:\n"
                              f"{run_logs(deployment.superlink, run_id)[-3000:]}")
    deployment.guide.run("stop", env={"RUN_ID": str(run_id)})
    deployment.finished_status(run_id, timeout=120)

    # Assert
    assert seen == set(identities.values())
    judged = deployment.read(lambda r: [c for c in r.contributions() if "peers" in c.evaluation])
    assert judged and all(c.evaluation["peers"]["asked"] <= 1 for c in judged)
