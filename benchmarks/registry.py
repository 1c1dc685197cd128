"""Registry throughput at hub scale: is SQLite's bookkeeping negligible next to training?

A temporary registry is filled with 10,000 adapters (each with its version 0), 1,000 contributors
and 1,000,000 contributions (bulk-loaded with ``executemany`` in one transaction), then timed:

- lease acquire / release: ``save_lease`` of a new active lease, then of its release, each its own
  transaction, while 1,000 nodes hold one lease each (the partial unique indexes are populated);
- contribution insert: ``add_contribution``, one transaction each;
- accept: the hub's whole acceptance transaction (new adapter version + contribution + lease end);
- the reads ``fedem status`` makes (counts, newest version of every adapter, recent contributions);
- the size of the database file.

    python benchmarks/registry.py                          # full size (1,000,000 contributions)
    python benchmarks/registry.py --contributions 100000   # quicker
    python benchmarks/registry.py --save base.json         # keep the numbers
    python benchmarks/registry.py --baseline base.json     # compare; exit 1 on a regression
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baseline import regressions

from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry

T0 = 1_700_000_000.0
TTL = 10800.0
LANGUAGES = tuple(f"l{i:02d}" for i in range(24))
# name -> (unit, higher is better)
METRICS = {
    "lease_acquire_per_s": ("ops/s", True),
    "lease_release_per_s": ("ops/s", True),
    "contribution_insert_per_s": ("ops/s", True),
    "accept_txn_per_s": ("ops/s", True),
    "status_reads_ms": ("ms", False),
    "bulk_load_rows_per_s": ("rows/s", True),
    "db_size_mb": ("MB", False),
    "bytes_per_contribution": ("B", False),
}


def populate(registry: Registry, n_adapters: int, n_contributors: int, n_contributions: int, seed: int) -> float:
    """Fill the registry; returns the bulk-load rate of contributions (rows/s)."""
    rng = random.Random(seed)
    registry.add_checkpoint(None, "init", "fedem/base", None, "0" * 64, {}, T0)
    with registry.atomic():
        for i in range(n_adapters):
            name = f"a{i:05d}"
            registry.add_adapter(name, [LANGUAGES[i % len(LANGUAGES)]], "causal-lm", {"r": 8, "alpha": 16}, T0)
            registry.add_adapter_version(name, 0, None, f"fedem/adapter-{name}", None, "1" * 64,
                                         {"heldout": {LANGUAGES[i % len(LANGUAGES)]: 5.5}}, T0)
        aliases = [registry.pseudonym(f"node:{i}", seen=T0) for i in range(n_contributors)]
    sql = ("INSERT INTO contributions (pseudonym, adapter, lease_token, received, digest, validation, evaluation, "
           "decision, reason, adapter_version) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, NULL)")
    registry._conn.execute("PRAGMA cache_size = -262144")  # 256 MiB while bulk-loading only
    start = time.perf_counter()
    with registry.atomic():
        chunk = 50_000
        for offset in range(0, n_contributions, chunk):
            rows = []
            for i in range(offset, min(offset + chunk, n_contributions)):
                lang = LANGUAGES[i % len(LANGUAGES)]
                rows.append((aliases[rng.randrange(n_contributors)], f"a{rng.randrange(n_adapters):05d}", T0 + i,
                             f"{rng.getrandbits(256):064x}", '{"ok": true}',
                             json.dumps({"heldout": {lang: round(rng.uniform(2, 6), 4)}}),
                             "rejected", "no gain on own languages"))
            registry._conn.executemany(sql, rows)
    elapsed = time.perf_counter() - start
    registry._conn.execute("PRAGMA cache_size = -2000")  # SQLite's default again for the timed part
    return n_contributions / elapsed if n_contributions else 0.0


def rate(ops: int, body: Callable[[int], None]) -> float:
    start = time.perf_counter()
    for i in range(ops):
        body(i)
    return ops / (time.perf_counter() - start)


def measure(registry: Registry, n_adapters: int, n_nodes: int, ops: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    token = registry.max_lease_token()
    held: dict[int, Lease] = {}
    busy: set[str] = set()

    def acquire(node: int) -> Lease:
        nonlocal token
        token += 1
        name = f"a{rng.randrange(n_adapters):05d}"
        while name in busy:
            name = f"a{rng.randrange(n_adapters):05d}"
        lease = Lease(token, name, f"node:{node}", 0, 0, T0 + token, T0 + token + TTL)
        registry.save_lease(lease)
        busy.add(name)
        held[node] = lease
        return lease

    def release(node: int) -> None:
        lease = held.pop(node)
        registry.save_lease(Lease(lease.token, lease.adapter, lease.holder, 0, 0, lease.issued, lease.deadline,
                                  "released", lease.issued + 1, "rejected"))
        busy.discard(lease.adapter)

    for node in range(n_nodes):  # every node holds a lease, as in a busy relay
        acquire(node)
    spent = {"release": 0.0, "acquire": 0.0}
    for i in range(ops):  # a node pushes (its lease ends), then takes another adapter
        t0 = time.perf_counter()
        release(i % n_nodes)
        t1 = time.perf_counter()
        acquire(i % n_nodes)
        spent["release"] += t1 - t0
        spent["acquire"] += time.perf_counter() - t1
    results = {"lease_release_per_s": ops / spent["release"], "lease_acquire_per_s": ops / spent["acquire"]}
    alias = registry.pseudonym("node:0")
    results["contribution_insert_per_s"] = rate(ops, lambda i: registry.add_contribution(
        alias, f"a{i % n_adapters:05d}", None, T0 + i, "2" * 64, {"ok": True}, {"heldout": {"l00": 3.2}},
        "rejected", "no gain on own languages"))

    def accept(i: int) -> None:
        node = i % n_nodes
        lease = held[node]
        with registry.atomic():
            version = registry.add_adapter_version(lease.adapter, 0, None, f"fedem/adapter-{lease.adapter}", None,
                                                   "3" * 64, {"heldout": {"l00": 3.0}}, T0 + i)
            registry.add_contribution(registry.pseudonym(lease.holder), lease.adapter, lease.token, T0 + i, "3" * 64,
                                      {"ok": True}, {"heldout": {"l00": 3.0}}, "accepted", "better", version.version)
            release(node)
        acquire(node)

    results["accept_txn_per_s"] = rate(ops, accept)
    start = time.perf_counter()
    reads = 5
    for _ in range(reads):
        with registry.snapshot():
            registry.contribution_counts()
            registry.latest_adapter_versions()
            registry.leases(active_only=True)
            registry.contributions(limit=5)
    results["status_reads_ms"] = (time.perf_counter() - start) / reads * 1000
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedem-registry-bench-") as tmp:
        path = Path(tmp) / "registry.sqlite"
        registry = Registry.open(path, durable=not args.fast, secret=b"b" * 32)
        t = time.perf_counter()
        bulk = populate(registry, args.adapters, args.contributors, args.contributions, args.seed)
        setup_s = time.perf_counter() - t
        results = measure(registry, args.adapters, args.nodes, args.ops, args.seed)
        registry._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        registry.close()
        size = path.stat().st_size
    total = args.contributions + 2 * args.ops
    results.update(bulk_load_rows_per_s=bulk, db_size_mb=size / 2**20,
                   bytes_per_contribution=size / total if total else 0.0)
    return {"config": {k: getattr(args, k) for k in ("adapters", "contributors", "contributions", "nodes", "ops",
                                                     "fast", "seed")},
            "setup_s": setup_s, "python": sys.version.split()[0], "results": results}


def table(report: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    cfg = report["config"]
    lines = [f"registry: {cfg['adapters']:,} adapters, {cfg['contributions']:,} contributions, {cfg['nodes']:,} "
             f"nodes holding leases, {cfg['ops']:,} timed ops each, synchronous="
             f"{'NORMAL' if cfg['fast'] else 'FULL'}; setup {report['setup_s']:.1f} s",
             f"{'metric':<28}{'value':>14}  {'unit':<7}" + ("  baseline      change" if baseline else "")]
    for name, (unit, _) in METRICS.items():
        value = report["results"][name]
        line = f"{name:<28}{value:>14,.1f}  {unit:<7}"
        if baseline and name in baseline["results"]:
            old = baseline["results"][name]
            line += f"  {old:>12,.1f}  {(value / old - 1) * 100 if old else 0.0:>+6.1f}%"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--contributors", type=int, default=1_000)
    parser.add_argument("--contributions", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=1_000, help="nodes holding a lease while timing")
    parser.add_argument("--ops", type=int, default=2_000, help="timed operations of each kind")
    parser.add_argument("--fast", action="store_true", help="synchronous=NORMAL (no fsync per commit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="compare with a saved JSON; exit 1 on a regression")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed fraction worse than the baseline")
    args = parser.parse_args(argv)
    if args.nodes > args.adapters:
        parser.error("--nodes must not exceed --adapters (one active lease per adapter)")
    report = run(args)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    print(table(report, baseline))
    if args.save:
        args.save.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if baseline:
        worse = regressions(report["results"], baseline, METRICS, args.tolerance, fmt=",.1f")
        for line in worse:
            print(f"REGRESSION {line}")
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
