"""Scheduler overhead per lease, without training: is the relay's bookkeeping negligible?

One lease cycle = a node pushes (``check_push`` + ``release``), the policy chooses its next adapter
among the free ones (an indexed ``AdapterPool``; ``--scan`` hands it a plain list instead), and the
node acquires it. With 10,000 adapters and 1,000 nodes, 1,000 leases
are active and about 9,000 adapters free at every choice. The in-memory ``LeaseBook`` is measured
alone, and, when the registry is available, with each cycle's two lease rows persisted through
``Registry.save_lease`` in one transaction on a temporary SQLite file: ``sqlite`` is the durable
default (an fsync per commit), ``sqlite-fast`` opens it with ``durable=False`` (crash-consistent, the
last commits can be lost on power failure). Target: under 2 ms a lease.

Columns: wall ms and CPU ms per lease, then wall microseconds in the lease book, the adapter pool,
the policy's choice and the registry. On a shared machine compare CPU time (``--baseline`` does).

    python benchmarks/relay_scheduler.py                      # table
    python benchmarks/relay_scheduler.py --save base.json     # keep the numbers
    python benchmarks/relay_scheduler.py --baseline base.json # compare; exit 1 on a regression
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fedem_flwr.relay.leases import LeaseBook
from fedem_flwr.relay.policies import POLICY_NAMES, AdapterInfo, NodeProfile, make_policy
from fedem_flwr.relay.pool import AdapterPool

TARGET_MS = 2.0
LANGUAGES = tuple(f"l{i:02d}" for i in range(24))
TTL = 10800.0


@dataclass
class Result:
    policy: str
    backend: str
    leases: int
    total_ms: float
    cpu_ms: float
    book_us: float
    pool_us: float
    policy_us: float
    persist_us: float


def open_registry(folder: Path, adapters: list[AdapterInfo], durable: bool) -> Any:
    """A temp-file registry holding the adapter pool (leases reference adapters by name)."""
    from fedem_flwr.hub.registry import Registry

    registry = Registry.open(folder / "registry.sqlite", durable=durable)
    with registry.atomic():
        for info in adapters:
            registry.add_adapter(info.name, list(info.languages), "lm", None, created=0.0)
    return registry


class ListPool(dict):
    """The unindexed alternative: free adapters by name, handed to the policy as a fresh list."""

    def put(self, info: AdapterInfo) -> None:
        self[info.name] = info

    def take(self, name: str) -> AdapterInfo:
        return self.pop(name)

    def free(self) -> list[AdapterInfo]:
        return list(self.values())


def run(policy_name: str, n_adapters: int, n_nodes: int, n_leases: int, seed: int, registry: Any,
        backend: str, scan: bool = False) -> Result:
    rng = random.Random(seed)
    policy = make_policy(policy_name, rng)
    free = ListPool() if scan else AdapterPool()
    for i in range(n_adapters):
        free.put(AdapterInfo(f"a{i:05d}", (LANGUAGES[i % len(LANGUAGES)],), 0, None))
    nodes = [NodeProfile(f"node:{i}", tuple(rng.sample(LANGUAGES, 2)), "cpu", 1000) for i in range(n_nodes)]
    book = LeaseBook()
    now = 1_000.0

    def persist() -> float:
        if registry is None:
            book.pop_changes()
            return 0.0
        start = time.perf_counter()
        with registry.atomic():
            for lease in book.pop_changes():
                registry.save_lease(lease)
        return time.perf_counter() - start

    # Fill: every node takes an adapter (one assign, as the Strategy does at start; not timed)
    for node, info in policy.assign(nodes, free.free()):
        book.acquire(info.name, node.node, 0, info.version, now, TTL)
        free.take(info.name)
    persist()

    book_s = pool_s = policy_s = persist_s = 0.0
    order = [nodes[rng.randrange(n_nodes)] for _ in range(n_leases)]
    clock = time.perf_counter
    wall, cpu = clock(), time.process_time()
    for node in order:
        now += 1.0
        t0 = clock()
        lease = book.lease_of(node.node)
        book.check_push(lease.token, now)
        book.release(lease.token, now, "accepted")
        t1 = clock()
        free.put(AdapterInfo(lease.adapter, (LANGUAGES[int(lease.adapter[1:]) % len(LANGUAGES)],),
                             lease.adapter_version + 1, now))
        t2 = clock()
        chosen = policy.choose(node, free.free())
        t3 = clock()
        free.take(chosen.name)
        t4 = clock()
        book.acquire(chosen.name, node.node, 0, chosen.version, now, TTL)
        t5 = clock()
        persist_s += persist()
        book_s += (t1 - t0) + (t5 - t4)
        pool_s += (t2 - t1) + (t4 - t3)
        policy_s += t3 - t2
    total, cpu = clock() - wall, time.process_time() - cpu
    backend += "+scan" if scan else ""
    per = 1e6 / n_leases
    return Result(policy_name, backend, n_leases, total * 1e3 / n_leases, cpu * 1e3 / n_leases,
                  book_s * per, pool_s * per, policy_s * per, persist_s * per)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--leases", type=int, default=2_000, help="measured lease cycles per row")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument("--registry", choices=("auto", "on", "off"), default="auto",
                        help="also persist through the SQLite registry (auto: when it is importable)")
    parser.add_argument("--scan", action="store_true", help="policies scan a plain list (no pool indexes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="compare with saved results")
    parser.add_argument("--max-regression", type=float, default=0.5, help="allowed CPU-time slowdown vs the baseline")
    args = parser.parse_args(argv)

    backends = ["memory"]
    if args.registry != "off":
        try:
            import fedem_flwr.hub.registry  # noqa: F401
        except ImportError:
            if args.registry == "on":
                raise
        else:
            backends += ["sqlite", "sqlite-fast"]

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fedem-bench-") as tmp:
        for backend in backends:
            for name in args.policies.split(","):
                registry = None
                if backend != "memory":
                    pool = [AdapterInfo(f"a{i:05d}", (LANGUAGES[i % len(LANGUAGES)],), 0, None)
                            for i in range(args.adapters)]
                    registry = open_registry(Path(tmp) / f"{backend}-{name}", pool, durable=backend == "sqlite")
                try:
                    results.append(run(name, args.adapters, args.nodes, args.leases, args.seed, registry, backend,
                                       args.scan))
                finally:
                    if registry is not None:
                        registry.close()
                print_row(results[-1], header=len(results) == 1)

    verdict = 0
    if args.baseline:
        verdict = compare(results, json.loads(args.baseline.read_text()), args.max_regression)
    if args.save:
        args.save.write_text(json.dumps([r.__dict__ for r in results], indent=2, sort_keys=True) + "\n")
    slowest = max(r.total_ms for r in results)
    print(f"\n{args.adapters} adapters, {args.nodes} nodes; slowest {slowest:.3f} ms/lease "
          f"(target < {TARGET_MS} ms): {'OK' if slowest < TARGET_MS else 'OVER TARGET'}")
    return verdict


def print_row(r: Result, header: bool) -> None:
    if header:
        print(f"{'policy':<13} {'backend':<11} {'leases':>6} {'ms/lease':>9} {'cpu ms':>7} {'book us':>8} "
              f"{'pool us':>8} {'policy us':>10} {'persist us':>11}")
    print(f"{r.policy:<13} {r.backend:<11} {r.leases:>6} {r.total_ms:>9.3f} {r.cpu_ms:>7.3f} {r.book_us:>8.1f} "
          f"{r.pool_us:>8.1f} {r.policy_us:>10.1f} {r.persist_us:>11.1f}")


def compare(results: list[Result], baseline: list[dict], max_regression: float) -> int:
    """Compare CPU time per lease: on a shared machine wall time mostly measures the neighbours."""
    before = {(b["policy"], b["backend"]): b["cpu_ms"] for b in baseline}
    worst = 0
    print(f"\n{'policy':<13} {'backend':<11} {'base cpu':>9} {'now cpu':>9} {'ratio':>6}")
    for r in results:
        old = before.get((r.policy, r.backend))
        if old is None:
            continue
        ratio = r.cpu_ms / old if old else float("inf")
        flag = "  REGRESSION" if ratio > 1 + max_regression else ""
        worst |= bool(flag)
        print(f"{r.policy:<13} {r.backend:<11} {old:>9.3f} {r.cpu_ms:>9.3f} {ratio:>6.2f}{flag}")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
