"""Per-lease cost and memory as leases are served: does a long run stay flat?

A lease cycle = ``acquire`` + ``check_push`` + ``release``, on 48 adapters and 48 nodes while 16
other nodes hold a lease throughout. Two setups:

- ``memory``: the ``LeaseBook`` alone (its changes popped and dropped);
- ``sqlite``: the book built as ``RelayCoordinator`` builds it (active leases, max token + 1,
  ``lookup=registry.lease``, ``latest=registry.latest_lease_tokens()``) on a temporary SQLite
  registry, each cycle's changes persisted through ``Registry.save_lease`` in two transactions (the
  acquire, then the release), as the coordinator's ``_flush`` does.

At each checkpoint (after 1,000 and 100,000 leases served by default) ``--sample`` cycles are timed:
wall and CPU ms per lease; a stale push (a token ended long ago: ``duplicate`` through the
registry lookup); the start-up reads (``leases(active_only)``, ``max_lease_token``,
``latest_lease_tokens``); and the process's resident memory (RSS). The ``sqlite`` samples run on the
durable path (an fsync per commit, the hub's default); filling between checkpoints uses
``durable=False`` (the same SQL without the fsync), because 200,000 durable commits would take tens
of minutes on a plain disk. Each checkpoint reopens the registry durable and rebuilds the book from
it, as a hub restart does.

    python benchmarks/lease_growth.py                          # 1,000 and 100,000 leases
    python benchmarks/lease_growth.py --checkpoints 1000,10000 # quicker
    python benchmarks/lease_growth.py --save base.json         # keep the numbers
    python benchmarks/lease_growth.py --baseline base.json     # compare; exit 1 on a regression
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedem_flwr.hub.registry import Registry
from fedem_flwr.relay.leases import LeaseBook, PushRejected

T0 = 1_700_000_000.0
TTL = 10800.0
CYCLING = 48  # adapters and nodes that lease, push and release
HOLDING = 16  # more nodes holding a lease on more adapters all along


@dataclass
class Result:
    setup: str
    served: int
    wall_ms: float
    cpu_ms: float
    stale_push_us: float
    startup_ms: float
    rss_mb: float


class Run:
    """One setup's book (and registry), its clock and the first lease it released."""

    def __init__(self, registry: Registry | None) -> None:
        self.registry = registry
        self.book = book_from(registry) if registry is not None else LeaseBook()
        self.now = T0
        self.served = 0
        self.first_token: int | None = None
        for i in range(HOLDING):
            self.book.acquire(f"a{CYCLING + i}", f"node:{CYCLING + i}", 0, 0, self.now, 1e9)
        self.persist()

    def persist(self) -> None:
        changes = self.book.pop_changes()
        if self.registry is not None and changes:
            with self.registry.atomic():
                for lease in changes:
                    self.registry.save_lease(lease)

    def cycle(self) -> None:
        i = self.served % CYCLING
        lease = self.book.acquire(f"a{i}", f"node:{i}", 0, 0, self.now, TTL)
        self.persist()
        self.book.check_push(lease.token, self.now + 1)
        self.book.release(lease.token, self.now + 1, "rejected")
        self.persist()
        self.first_token = self.first_token or lease.token
        self.served += 1
        self.now += 2

    def stale_push(self) -> float:
        """Microseconds to reject a push naming the first lease, released long ago (``duplicate``
        through the registry; ``unknown-token`` for the book alone, which keeps no ended lease)."""
        started = time.perf_counter()
        try:
            self.book.check_push(self.first_token, self.now)
        except PushRejected:
            pass
        return (time.perf_counter() - started) * 1e6


def book_from(registry: Registry) -> LeaseBook:
    """The book as ``RelayCoordinator.__init__`` builds it."""
    return LeaseBook(registry.leases(active_only=True), next_token=registry.max_lease_token() + 1,
                     lookup=registry.lease, latest=registry.latest_lease_tokens())


def open_registry(path: Path, durable: bool) -> Registry:
    return Registry.open(path, durable=durable)


def seed(path: Path) -> None:
    with open_registry(path, durable=False) as registry, registry.atomic():
        registry.add_checkpoint(None, "init", "fedem/base", None, "0" * 64, {}, T0)
        for i in range(CYCLING + HOLDING):
            registry.add_adapter(f"a{i}", [f"l{i % 24:02d}"], "causal-lm", {}, T0)


def measure(run: Run, setup: str, sample: int, startup_ms: float) -> Result:
    served = run.served
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(sample):
        run.cycle()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stale = sorted(run.stale_push() for _ in range(21))[10]  # the median of 21
    rss = psutil.Process().memory_info().rss / 2**20
    return Result(setup, served, wall * 1e3 / sample, cpu * 1e3 / sample, stale, startup_ms, rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default="1000,100000", help="leases served before each measurement")
    parser.add_argument("--sample", type=int, default=1000, help="lease cycles timed at each checkpoint")
    parser.add_argument("--setups", default="memory,sqlite")
    parser.add_argument("--save", type=Path)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--max-regression", type=float, default=0.5, help="allowed CPU-time increase (0.5 = 50%%)")
    args = parser.parse_args()
    checkpoints = sorted(int(c) for c in args.checkpoints.split(","))

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fedem-bench-") as tmp:
        path = Path(tmp) / "registry.sqlite"
        setups = args.setups.split(",")
        if "sqlite" in setups:
            seed(path)
        runs = {s: Run(open_registry(path, durable=False) if s == "sqlite" else None) for s in setups}
        for checkpoint in checkpoints:
            for setup, run in runs.items():
                while run.served < checkpoint:
                    run.cycle()
                startup_ms = 0.0
                if run.registry is not None:  # restart on the durable path, then measure there
                    run.registry.close()
                    run.registry = open_registry(path, durable=True)
                    started = time.perf_counter()
                    run.book = book_from(run.registry)
                    startup_ms = (time.perf_counter() - started) * 1e3
                results.append(measure(run, setup, args.sample, startup_ms))
                print_row(results[-1], header=len(results) == 1)
                if run.registry is not None:
                    run.registry.close()
                    run.registry = open_registry(path, durable=False)
                    run.book = book_from(run.registry)
        for run in runs.values():
            if run.registry is not None:
                run.registry.close()

    verdict = compare(results, json.loads(args.baseline.read_text()), args.max_regression) if args.baseline else 0
    if args.save:
        args.save.write_text(json.dumps([r.__dict__ for r in results], indent=2, sort_keys=True) + "\n")
    print_growth(results)
    return verdict


def print_row(r: Result, header: bool) -> None:
    if header:
        print(f"{'served':>8} {'setup':<7} {'ms/lease':>9} {'cpu ms':>7} {'stale push us':>14} "
              f"{'startup ms':>11} {'RSS MB':>7}")
    print(f"{r.served:>8} {r.setup:<7} {r.wall_ms:>9.3f} {r.cpu_ms:>7.3f} {r.stale_push_us:>14.1f} "
          f"{r.startup_ms:>11.2f} {r.rss_mb:>7.1f}")


def print_growth(results: list[Result]) -> None:
    """CPU per lease at the last checkpoint against the first, per setup, and the RSS gained."""
    print()
    for setup in dict.fromkeys(r.setup for r in results):
        mine = [r for r in results if r.setup == setup]
        first, last = mine[0], mine[-1]
        print(f"{setup:<7} {first.served} -> {last.served} leases: cpu/lease x{last.cpu_ms / first.cpu_ms:.2f}, "
              f"stale push x{last.stale_push_us / first.stale_push_us:.2f}, RSS {last.rss_mb - first.rss_mb:+.1f} MB")


def compare(results: list[Result], baseline: list[dict], max_regression: float) -> int:
    """Compare CPU time per lease: on a shared machine wall time mostly measures the neighbours."""
    before = {(b["setup"], b["served"]): b["cpu_ms"] for b in baseline}
    worst = 0
    print(f"\n{'served':>8} {'setup':<7} {'base cpu':>9} {'now cpu':>9} {'ratio':>6}")
    for r in results:
        old = before.get((r.setup, r.served))
        if old is None:
            continue
        ratio = r.cpu_ms / old if old else float("inf")
        flag = "  REGRESSION" if ratio > 1 + max_regression else ""
        worst |= bool(flag)
        print(f"{r.served:>8} {r.setup:<7} {old:>9.3f} {r.cpu_ms:>9.3f} {ratio:>6.2f}{flag}")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
