"""The public ledger at hub scale: does `fedem site` render 100,000 contributions in under a minute,
and does the ledger page stay usable?

A temporary hub is filled (bulk SQL in one transaction) with 24 adapters over 8 languages each,
2,000 contributors and 100,000 contributions (a third accepted, each a new adapter version; every
held-out evaluation on 8 languages, tokens reported), and a merge every 20,000 contributions that
absorbs each adapter's newest version. Then `fedem site --out` runs as a user would, timed. With
Chromium and its driver installed, the ledger is also opened headless from file:// and timed: the
first page, and a filter by one contributor (which reads every data file).

    python benchmarks/site_build.py                          # 100,000 contributions
    python benchmarks/site_build.py --contributions 10000    # quicker
    python benchmarks/site_build.py --save base.json         # keep the numbers
    python benchmarks/site_build.py --baseline base.json     # compare; exit 1 on a regression
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from baseline import regressions
from click.testing import CliRunner

from fedem_flwr.cli import cli
from fedem_flwr.hub.registry import Registry

T0 = 1_700_000_000.0
LANGUAGES = tuple(f"l{i:02d}" for i in range(24))
MERGE_EVERY = 20_000
BOUND_S = 60.0  # the site of 100,000 contributions must build within a minute
# name -> (unit, higher is better)
METRICS = {"site_build_s": ("s", False), "site_mb": ("MB", False), "ledger_first_page_s": ("s", False),
           "ledger_filter_by_contributor_s": ("s", False)}


def populate(hub: Path, n_contributions: int, n_contributors: int, n_adapters: int, seed: int) -> None:
    """Fill a hub's registry with a plausible history (see the module docstring)."""
    rng = random.Random(seed)
    with Registry.open(hub) as registry:
        registry.add_checkpoint(None, "init", "fedem/base", None, "0" * 64,
                                {"heldout": {lang: 5.5 for lang in LANGUAGES}}, T0)
        names = [f"a{i:02d}" for i in range(n_adapters)]
        own = {name: [LANGUAGES[(i + k) % len(LANGUAGES)] for k in range(8)] for i, name in enumerate(names)}
        with registry.atomic():
            for name in names:
                registry.add_adapter(name, own[name][:2], "causal-lm", {"r": 8}, T0)
                registry.add_adapter_version(name, 0, None, f"fedem/adapter-{name}", None, "1" * 64,
                                             {"heldout": {lang: 5.5 for lang in own[name]}}, T0)
            aliases = [registry.pseudonym(f"node:{i}", seen=T0) for i in range(n_contributors)]
        latest = dict.fromkeys(names, 0)
        base = 0
        conn = registry._conn  # bulk load: one transaction, executemany (as benchmarks/registry.py)
        for start in range(0, n_contributions, MERGE_EVERY):
            versions, contributions = [], []
            with registry.atomic():
                for i in range(start, min(start + MERGE_EVERY, n_contributions)):
                    name = names[rng.randrange(n_adapters)]
                    t = T0 + 6 * i
                    progress = i / max(1, n_contributions)
                    heldout = {lang: round(5.5 - 2 * progress + rng.uniform(-0.3, 0.3), 4) for lang in own[name]}
                    evaluation = json.dumps({"heldout": heldout, "train": {"tokens": rng.randrange(2000, 9000),
                                                                           "steps": 8}})
                    accepted = rng.random() < 1 / 3
                    version = None
                    if accepted:
                        latest[name] += 1
                        version = latest[name]
                        versions.append((name, version, base, version - 1, "2" * 64, f"fedem/adapter-{name}",
                                         f"v{version}", json.dumps({"heldout": heldout}), t, "push"))
                    reason = (f"loss {heldout[own[name][0]] + 0.1:.3f} -> {heldout[own[name][0]]:.3f} on "
                              f"{own[name][0]} (-0.100); others within 0.050" if accepted
                              else f"worse beyond tolerance 0.050 on {own[name][1]}")
                    contributions.append((aliases[rng.randrange(n_contributors)], name, t, "3" * 64, '{"ok": true}',
                                          evaluation, "accepted" if accepted else "rejected", reason, version, base,
                                          base))
                conn.executemany("INSERT INTO adapter_versions (adapter, version, base_version, parent_version, "
                                 "digest, repo, revision, metrics, created, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 versions)
                conn.executemany("INSERT INTO contributions (pseudonym, adapter, lease_token, received, digest, "
                                 "validation, evaluation, decision, reason, adapter_version, base_version, "
                                 "judged_base_version) VALUES (?, ?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)", contributions)
            absorbed = [(name, latest[name], 1.0, "sum", None) for name in names if latest[name] > 0]
            done = min(start + MERGE_EVERY, n_contributions) / n_contributions
            registry.add_checkpoint(base, "merge", "fedem/base", None, "4" * 64,
                                    {"heldout": {lang: round(5.5 - 2 * done, 4) for lang in LANGUAGES}},
                                    T0 + 6 * (start + MERGE_EVERY), absorbed=absorbed)
            base += 1


def browse(site: Path, pseudonym: str) -> dict[str, float]:
    """Seconds to the ledger's first page and to a filter by one contributor, in headless Chromium."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    profile = tempfile.mkdtemp(prefix="fedem-bench-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    ready = "return document.body.dataset.ledgerReady === 'true'"
    try:
        start = time.perf_counter()
        driver.get((site / "ledger.html").as_uri())
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(ready))
        first = time.perf_counter() - start
        start = time.perf_counter()
        driver.get((site / "ledger.html").as_uri() + f"#contributor={pseudonym}")
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(ready))
        filtered = time.perf_counter() - start
        rows = driver.execute_script("return document.querySelectorAll('#ledger tbody tr').length")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {"ledger_first_page_s": first, "ledger_filter_by_contributor_s": filtered, "filtered_rows_shown": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contributions", type=int, default=100_000)
    parser.add_argument("--contributors", type=int, default=2_000)
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-browser", action="store_true", help="Skip the headless Chromium timing.")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--baseline", type=Path, help="compare with a saved JSON; exit 1 on a regression")
    parser.add_argument("--tolerance", type=float, default=0.3, help="allowed fraction worse than the baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedem-site-bench-") as tmp:
        hub, out = Path(tmp) / "hub", Path(tmp) / "site"
        start = time.perf_counter()
        populate(hub, args.contributions, args.contributors, args.adapters, args.seed)
        seeded = time.perf_counter() - start
        start = time.perf_counter()
        result = CliRunner().invoke(cli, ["--hub", str(hub), "site", "--out", str(out), "--json"],
                                    catch_exceptions=False)
        built = time.perf_counter() - start
        if result.exit_code != 0:
            print(result.output, file=sys.stderr)
            return 1
        data = json.loads(result.output)
        files = [p for p in out.rglob("*") if p.is_file()]
        numbers = {"contributions": data["contributions"], "contributors": data["contributors"],
                   "seed_s": round(seeded, 2), "site_build_s": round(built, 2), "files": len(files),
                   "ledger_data_files": data["ledger_files"],
                   "site_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1)}
        if not args.no_browser and shutil.which("chromedriver") and (shutil.which("chromium")
                                                                     or shutil.which("chromium-browser")):
            with Registry.open(hub, readonly=True) as registry:
                pseudonym = registry.contributions(limit=1)[0].pseudonym
            numbers.update({k: round(v, 2) for k, v in browse(out, pseudonym).items()})
    for key, value in numbers.items():
        print(f"{key:32s} {value}")
    report = {"config": {k: getattr(args, k) for k in ("contributions", "contributors", "adapters", "seed")},
              "results": numbers}
    if args.save:
        args.save.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    failed = []
    if args.contributions >= 100_000 and built > BOUND_S:
        failed.append(f"the site took {built:.1f} s to build; the bound is {BOUND_S:.0f} s")
    if args.baseline:
        baseline = json.loads(args.baseline.read_text())
        present = {k: v for k, v in METRICS.items() if k in numbers}
        failed += regressions(numbers, baseline, present, args.tolerance, fmt=",.2f")
    for line in failed:
        print(f"REGRESSION {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
