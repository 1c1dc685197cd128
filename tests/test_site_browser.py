"""The public ledger in a real headless Chromium (the distribution's package, driven by Selenium; nothing
is downloaded): built with ``fedem site`` from a real hub after a relay run with merges, opened from
``file://`` and from a loopback HTTP server. Pages load without console errors, show the registry's
numbers, filter the ledger by pseudonym, and pass axe-core; a screenshot of each page is kept
(under the test's temporary folder, and in ``$FEDEM_TEST_ARTIFACTS`` when it is set).

Skipped, saying what to install, where Chromium, its driver or Selenium is missing.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedem_flwr.cli import cli
from fedem_flwr.hub.registry import Registry
from fedem_flwr.site import render
from fedem_flwr.site.build import build_site
from tests.support.relay import KEEPER_OVERRIDES, open_real_hub, relay_in_process

INSTALL = ("install Chromium and its driver (Debian: apt-get install chromium chromium-driver) and the dev extra "
           "(pip install -e '.[dev]': selenium, axe-selenium-python)")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # pragma: no cover - the dev extra installs it
    webdriver = None

pytestmark = pytest.mark.skipif(webdriver is None or not BROWSER or not DRIVER,
                                reason=f"no headless Chromium to drive: {INSTALL}")
PAGES = ("index.html", "progress.html", "ledger.html", "contributors.html")
AXE = "node_modules/axe-core/axe.min.js"
# Every axe-core rule runs; these, on headings, table headers and image alternatives, must be among them.
# The axe-core that axe-selenium-python ships (3.1) predates `svg-img-alt`: UNNAMED_IMAGES checks SVG figures.
AXE_RULES = ("page-has-heading-one", "heading-order", "empty-heading", "th-has-data-cells", "td-headers-attr",
             "scope-attr-valid", "image-alt")
UNNAMED_IMAGES = """
return Array.prototype.filter.call(document.querySelectorAll("img, svg, [role=img]"), function (el) {
  if (el.getAttribute("aria-hidden") === "true" || el.closest("[aria-hidden=true]")) { return false; }
  if (el.tagName.toLowerCase() === "img") { return el.getAttribute("alt") === null; }
  var ids = (el.getAttribute("aria-labelledby") || "").split(/\\s+/).filter(Boolean);
  var named = ids.map(function (id) { var t = document.getElementById(id); return t ? t.textContent : ""; })
                 .join(" ").trim() || (el.getAttribute("aria-label") || "").trim();
  return el.getAttribute("role") !== "img" || !named;
}).map(function (el) { return el.outerHTML.slice(0, 160); });
"""


@pytest.fixture(scope="module")
def relayed(tmp_path_factory):
    """A real hub after a relay run on the in-process Grid (real ClientApp, model, gate), with merges.

    A fixed pseudonym secret fixes the held-out split, so the run is the same each time (about 20 s:
    5 accepted, 1 rejected, 2 merges); the tolerance keeps it from rejecting dozens first.
    """
    tmp_path = tmp_path_factory.mktemp("site-hub")
    secret = tmp_path / "hub" / "secret"
    secret.parent.mkdir()
    secret.write_text("5e" * 32 + "\n")
    secret.chmod(0o600)
    hub, run_config = open_real_hub(tmp_path, f"{KEEPER_OVERRIDES} relay.max_accepted=5 merge.every_accepted=2 "
                                               "gate.tolerance=0.12 relay.max_wall_s=90")
    from fedem_flwr.relay.keeper import BaseKeeper

    relay_in_process(hub, run_config, tmp_path, BaseKeeper(hub))
    hub.registry.close()
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def site(relayed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = CliRunner().invoke(cli, ["--hub", str(relayed), "site", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def registry(relayed):
    with Registry.open(relayed, readonly=True) as reg:
        yield reg


@pytest.fixture(scope="module")
def server(site):
    """The site served over loopback HTTP by the standard library."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the tests' output stays readable
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> list[Path]:
    folders = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("FEDEM_TEST_ARTIFACTS"):
        folders.append(Path(os.environ["FEDEM_TEST_ARTIFACTS"]) / "site")
        folders[-1].mkdir(parents=True, exist_ok=True)
    return folders


def base_url(kind: str, site: Path, server: str) -> str:
    return site.as_uri() + "/" if kind == "file" else server


def open_page(driver, url: str) -> list[dict]:
    """Load ``url``, wait for the ledger to draw where there is one; return the console's entries."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    if driver.find_elements(By.ID, "ledger"):
        wait_ledger(driver)
    return driver.get_log("browser")


def wait_ledger(driver) -> None:
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ledgerReady === 'true'"))


def ledger_ids(driver) -> list[int]:
    return [int(td.text) for td in driver.find_elements(By.CSS_SELECTOR, "#ledger tbody tr td:first-child")]


def act(driver, action) -> None:
    """Do something that redraws the ledger, then wait until it has."""
    driver.execute_script("document.body.removeAttribute('data-ledger-ready')")
    action()
    wait_ledger(driver)


def axe_violations(driver) -> list[tuple[str, int, str]]:
    """Every axe-core rule (the copy axe-selenium-python ships) on the page; its violations, briefly."""
    axe_selenium_python = pytest.importorskip("axe_selenium_python", reason=f"no axe-core to run: {INSTALL}")
    driver.execute_script((Path(axe_selenium_python.__file__).parent / AXE).read_text(encoding="utf-8"))
    rules = set(driver.execute_script("return axe.getRules().map(function (r) { return r.ruleId; })"))
    assert set(AXE_RULES) <= rules, sorted(set(AXE_RULES) - rules)
    result = driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "axe.run(document).then(function (r) { done(r.violations); }, function (e) { done([{id: String(e), nodes: []}]); });")
    found = [(v["id"], len(v["nodes"]), v["nodes"][0]["html"] if v["nodes"] else "") for v in result]
    return found + [("unnamed-image", 1, html) for html in driver.execute_script(UNNAMED_IMAGES)]


@pytest.mark.parametrize("kind", ["file", "http"])
def test_every_page_loads_without_console_errors_and_passes_axe(kind, site, server, browser, artifacts, registry):
    pseudonym = registry.contributions()[0].pseudonym
    root = base_url(kind, site, server)
    for name in (*PAGES, f"contributors/{render.slug(pseudonym)}"):
        logs = open_page(browser, root + name)
        assert [e for e in logs if e["level"] in ("SEVERE", "ERROR")] == [], (kind, name, logs)
        assert browser.find_element(By.TAG_NAME, "h1").text
        for folder in artifacts:
            browser.save_screenshot(str(folder / f"{kind}-{name.replace('/', '-')}.png"))
        assert axe_violations(browser) == [], (kind, name)
        assert "FedEm public ledger" in browser.title
    assert (artifacts[0] / f"{kind}-ledger.html.png").stat().st_size > 10_000


def test_the_numbers_on_the_pages_match_the_registry(site, browser, registry):
    counts = registry.contribution_counts()
    contributions = list(reversed(registry.contributions()))
    bases = registry.checkpoints()
    assert len(bases) >= 2 and counts["accepted"] >= 5  # the run merged

    open_page(browser, site.as_uri() + "/index.html")
    stats = {el.get_attribute("data-stat"): el.text for el in browser.find_elements(By.CSS_SELECTOR, "[data-stat]")}
    tokens = sum(c.evaluation["train"]["tokens"] for c in contributions)
    assert stats == {"contributors": str(len({c.pseudonym for c in contributions})),
                     "contributions": str(len(contributions)), "accepted": str(counts["accepted"]),
                     "rejected": str(counts["rejected"]), "tokens": render.tokens(tokens)}
    table = browser.find_element(By.ID, "bases")
    languages = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")][4:-1]
    shown = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")] for tr in table.find_elements(By.CSS_SELECTOR,
                                                                                                     "tbody tr")]
    assert [(r[0], r[2], r[4:-1]) for r in shown] == [
        (f"v{b.version}", b.source, [render.loss(b.metrics.get("heldout", {}).get(lang)) for lang in languages])
        for b in bases]

    open_page(browser, site.as_uri() + "/ledger.html")
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#ledger tbody tr")]
    assert [(int(r[0]), r[2], r[3], r[5], r[10], r[11]) for r in rows] == [
        (c.id, c.pseudonym, c.adapter, c.decision, render.losses(c.evaluation["heldout"]), c.reason)
        for c in contributions]


@pytest.mark.parametrize("kind", ["file", "http"])
def test_filtering_the_ledger_by_a_pseudonym_shows_exactly_their_rows(kind, site, server, browser, registry):
    contributions = registry.contributions()
    open_page(browser, base_url(kind, site, server) + "ledger.html")
    field = browser.find_element(By.ID, "f-contributor")
    for pseudonym in sorted({c.pseudonym for c in contributions}):
        field.clear()
        field.send_keys(pseudonym)
        act(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#ledger-filters button[type=submit]").click())
        assert ledger_ids(browser) == sorted(c.id for c in contributions if c.pseudonym == pseudonym)
        assert {td.text for td in browser.find_elements(By.CSS_SELECTOR, "#ledger tbody td:nth-child(3)")} == {pseudonym}
    # adapter and decision together, then newest first
    adapter = contributions[0].adapter
    act(browser, lambda: browser.find_element(By.CSS_SELECTOR, "#ledger-filters button[type=reset]").click())
    act(browser, lambda: Select(browser.find_element(By.ID, "f-adapter")).select_by_value(adapter))
    act(browser, lambda: Select(browser.find_element(By.ID, "f-decision")).select_by_value("accepted"))
    expected = sorted(c.id for c in contributions if c.adapter == adapter and c.decision == "accepted")
    assert ledger_ids(browser) == expected
    act(browser, lambda: browser.find_element(By.CSS_SELECTOR, "button[data-sort=id]").click())  # was ascending
    assert ledger_ids(browser) == expected[::-1]
    # a contributor's page links to the ledger filtered to them
    pseudonym = contributions[-1].pseudonym
    open_page(browser, base_url(kind, site, server) + f"contributors/{render.slug(pseudonym)}")
    browser.find_element(By.PARTIAL_LINK_TEXT, "See these contributions in the ledger").click()
    wait_ledger(browser)
    assert ledger_ids(browser) == sorted(c.id for c in contributions if c.pseudonym == pseudonym)


def test_the_ledger_pages_across_its_data_files(relayed, registry, browser, tmp_path):
    # Prepare: three rows a data file, four a page, so pages cross file boundaries
    out = tmp_path / "paged"
    build_site(registry, out, time.time(), chunk_rows=3, shown_rows=4)
    ids = sorted(c.id for c in registry.contributions())
    assert len(list((out / "data").glob("ledger-0*.js"))) == -(-len(ids) // 3)
    # Execute / Assert: every page in id order, then backwards from the newest
    assert not [e for e in open_page(browser, out.as_uri() + "/ledger.html") if e["level"] == "SEVERE"]
    seen = ledger_ids(browser)
    while browser.find_element(By.ID, "next").is_enabled():
        act(browser, lambda: browser.find_element(By.ID, "next").click())
        seen += ledger_ids(browser)
    assert seen == ids
    act(browser, lambda: browser.find_element(By.CSS_SELECTOR, "button[data-sort=id]").click())
    assert ledger_ids(browser) == ids[::-1][:4]
    assert browser.find_element(By.ID, "page-label").text == f"Page 1 of {-(-len(ids) // 4)}"
