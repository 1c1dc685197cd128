"""``fedem site``: the public ledger's data and pages from a seeded hub (fast, no browser), its
paging and figures, the identities it must never show, and ``fedem publish --site`` to a local Hub."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli import T0, invoke, pseudonyms
from test_cli_lineage import lineage_hub  # noqa: F401 - the fixture

from fedem_flwr.cli import cli
from fedem_flwr.hub.records import Lease
from fedem_flwr.hub.registry import Registry
from fedem_flwr.site import render
from fedem_flwr.site.build import build_site
from fedem_flwr.site.charts import line_chart, ticks, time_labels
from fedem_flwr.site.data import LEDGER_COLUMNS, as_dict, pages, site_data, thin

NOW = T0 + 1500  # lease 2 (te, node:7) has its deadline at T0 + 10860


@pytest.fixture
def hub(lineage_hub):  # noqa: F811
    """``lineage_hub`` plus two pushes that report tokens (one from sim:3 with a reason to escape)."""
    with Registry.open(lineage_hub) as registry:
        registry.add_contribution(registry.pseudonym("sim:3"), "hi", None, T0 + 1300, "d4", {"ok": True},
                                  {"heldout": {"hi": 3.25, "te": 4.5}, "train": {"tokens": 4096.0}}, "rejected",
                                  "no gain on hi <script>alert(1)</script>")
        registry.add_contribution(registry.pseudonym("sim:5"), "te", None, T0 + 1400, "d5", {"ok": True},
                                  {"heldout": {"te": 4.0}, "train": {"tokens": 1000.0}}, "rejected", "stale")
    return lineage_hub


def read(hub: Path):
    return Registry.open(hub, readonly=True)


def stat(page: str, key: str) -> str:
    return re.search(rf'data-stat="{key}">([^<]*)<', page).group(1)


def test_site_data_totals_and_contributors_match_the_registry(hub):
    alias = pseudonyms(hub)
    with read(hub) as registry:
        site = site_data(registry, NOW)
        counts = registry.contribution_counts()
        ids = [c.id for c in registry.contributions()]

    totals = site["overview"]["totals"]
    assert (totals["accepted"], totals["rejected"]) == (counts["accepted"], counts["rejected"])
    assert (totals["contributions"], totals["contributors"], totals["tokens"]) == (len(ids), 3, 5096.0)
    assert [as_dict(r)["id"] for r in site["ledger"]] == sorted(ids)  # oldest first
    sim3, sim5, pk = (site["contributors"][alias[i]] for i in ("sim:3", "sim:5", "pk:0badc0de"))
    # sim:3's accepted hi v1 went into base v1 by merge; sim:5's te v1 is in no base yet
    assert (sim3["contributions"], sim3["accepted"], sim3["acceptance"], sim3["absorbed_by"]) == (2, 1, 0.5, [1])
    assert (sim5["contributions"], sim5["accepted"], sim5["tokens"], sim5["absorbed_by"]) == (2, 1, 1000.0, [])
    assert (pk["accepted"], pk["acceptance"]) == (0, 0.0)
    te = {a["name"]: a for a in site["overview"]["adapters"]}["te"]
    assert te["holders"] == [{"lane": 0, "holder": alias["node:7"], "token": 2, "deadline": "2023-11-15T01:14:20+00:00",
                              "left_s": 10860 - 1500}]
    assert site["overview"]["lanes"] == "unknown"
    assert [b["version"] for b in site["overview"]["bases"]] == [0, 1, 2]
    assert "path" not in site["overview"]["bases"][0]
    assert site["progress"]["bases"] == {"hi": [(1, 4.0), (2, 3.9)], "te": [(1, 4.5), (2, 4.4)]}


def test_pages_cut_rows_in_order_and_thin_keeps_the_ends():
    rows = list(range(2501))
    assert [len(p) for p in pages(rows, 1000)] == [1000, 1000, 501]
    assert [x for p in pages(rows, 1000) for x in p] == rows
    assert pages([], 1000) == [[]]
    with pytest.raises(ValueError, match="`size` is 0"):
        pages(rows, 0)
    kept = thin(rows, 400)
    assert len(kept) == 400 and kept[0] == 0 and kept[-1] == 2500 and kept == sorted(set(kept))
    assert thin(rows[:10], 400) == rows[:10]


def test_ticks_cover_the_range_with_round_steps():
    assert ticks(3.9, 4.5) == [3.8, 4.0, 4.2, 4.4, 4.6]
    assert ticks(0, 100) == [0, 50, 100] and ticks(0, 100, count=6) == [0, 20, 40, 60, 80, 100]
    assert ticks(2.0, 2.0) == [2.0]


def test_a_chart_is_an_image_with_a_title_and_a_description():
    svg = render.svg(line_chart("c1", "Loss <by> base", "two lines", {"hi": [(0, 4.0), (1, 3.5)], "te": [(1, 4.2)]},
                                "base version", "held-out loss"))
    assert svg.startswith('<svg id="c1" class="chart"') and 'role="img"' in svg
    assert 'aria-labelledby="c1-title c1-desc"' in svg and "<title id=\"c1-title\">Loss &lt;by&gt; base</title>" in svg
    assert svg.count("<polyline") == 2 and ">v0<" in svg and ">v1<" in svg
    assert "nothing measured yet" in render.svg(line_chart("c2", "t", "d", {}, "x", "y"))
    assert [time_labels(span)(T0) for span in (60, 86400, 30 * 86400)] == ["22:13:20", "11-14 22:13", "2023-11-14"]


def test_the_site_shows_the_registry_and_never_an_identity(hub, tmp_path):
    out = tmp_path / "site"
    result = invoke(hub, "site", "--out", str(out), "--json")
    data = json.loads(result.output)
    alias = pseudonyms(hub)

    with read(hub) as registry:
        counts = registry.contribution_counts()
        contributions = list(reversed(registry.contributions()))
        identities = registry.identities()
    index = (out / "index.html").read_text()
    assert stat(index, "contributions") == str(len(contributions)) == str(data["contributions"])
    assert (stat(index, "accepted"), stat(index, "rejected")) == (str(counts["accepted"]), str(counts["rejected"]))
    assert stat(index, "contributors") == "3" and stat(index, "tokens") == "5,096"
    # te's holder has contributed nothing yet: named, with its lane, with no page to link to
    assert f"<td>{alias['node:7']} (lane 0)</td>" in index and f"{alias['node:7']}.html" not in index
    # every file of the site: no identity, no folder of the hub's machine, nothing unescaped
    text = "\n".join(p.read_text() for p in out.rglob("*") if p.is_file())
    assert identities and not [i for i in identities.values() if i in text]
    assert str(hub) not in text
    assert not [p for p in out.rglob("*.html") if "<script>alert" in p.read_text()]  # data files hold JSON
    # the ledger's data files hold every contribution, oldest first
    meta = json.loads((out / "data" / "ledger-meta.js").read_text().split("=", 1)[1].rstrip(";\n"))
    assert meta["columns"] == list(LEDGER_COLUMNS) and meta["total"] == len(contributions)
    rows = [r for f in meta["files"] for r in json.loads((out / f).read_text().split("] = ", 1)[1].rstrip(";\n"))]
    assert [(r[0], r[2], r[5], r[-1]) for r in rows] == [(c.id, c.pseudonym, c.decision, c.reason)
                                                          for c in contributions]
    # a page per pseudonym with their numbers and escaped reasons
    page = (out / "contributors" / f"{alias['sim:3']}.html").read_text()
    assert (stat(page, "contributions"), stat(page, "accepted"), stat(page, "acceptance")) == ("2", "1", "50%")
    assert stat(page, "tokens") == "4,096" and '<a href="../index.html#base-v1">v1</a>' in page
    assert "no gain on hi &lt;script&gt;alert(1)&lt;/script&gt;" in page and "hi 3.250, te 4.500" in page
    assert sorted(p.name for p in (out / "contributors").iterdir()) == sorted({f"{c.pseudonym}.html"
                                                                               for c in contributions})


def test_the_overview_shows_every_holder_of_an_adapter_with_its_lane(hub, tmp_path):
    # Prepare: te held on lane 0 (node:7, token 2) and lane 1 (sim:3, token 4); the hub recorded 3 lanes
    with Registry.open(hub) as registry:
        registry.save_lease(Lease(4, "te", "sim:3", 2, 1, T0 + 1300, T0 + 12100, lane=1))
        registry.put_setting("relay", {"lanes": 3}, T0)
    alias = pseudonyms(hub)

    # Execute
    with read(hub) as registry:
        site = site_data(registry, NOW)
        build_site(registry, tmp_path / "site", NOW)
        identities = registry.identities()
    index = (tmp_path / "site" / "index.html").read_text()

    # Assert: both holders, lane order, each with its own time left; counted against the 3 lanes
    adapters = {a["name"]: a for a in site["overview"]["adapters"]}
    assert site["overview"]["lanes"] == 3 and adapters["hi"]["holders"] == []
    assert adapters["te"]["holders"] == [
        {"lane": 0, "holder": alias["node:7"], "token": 2, "deadline": "2023-11-15T01:14:20+00:00",
         "left_s": 10860 - 1500},
        {"lane": 1, "holder": alias["sim:3"], "token": 4, "deadline": "2023-11-15T01:35:00+00:00",
         "left_s": 12100 - 1500}]
    te = index[index.index("<td>te</td>"):]
    te = te[:te.index("</tr>")]
    sim3 = f'<a href="contributors/{alias["sim:3"]}.html">{alias["sim:3"]}</a>'  # sim:3 has contributed: linked
    assert f"<td>2/3 lanes</td>\n<td>{alias['node:7']} (lane 0)<br>{sim3} (lane 1)</td>" in te
    assert ('<td><time datetime="2023-11-15T01:14:20+00:00" data-deadline="2023-11-15T01:14:20+00:00">2h36m</time><br>'
            '<time datetime="2023-11-15T01:35:00+00:00" data-deadline="2023-11-15T01:35:00+00:00">2h56m</time></td>'
            in te)
    assert "<td>0/3 lanes</td>\n<td>-</td>\n<td>-</td>" in index
    assert "Up to 3 nodes may hold one adapter at once, each on a lane of its own." in index
    assert not [i for i in identities.values() if i in index]


def test_a_hub_with_no_contribution_yet_has_a_site(fresh_db, tmp_path):
    fresh_db.add_checkpoint(None, "init", "fedem/base", None, "d0", {}, T0)
    data = build_site(fresh_db, tmp_path / "site", NOW)
    assert (data["contributions"], data["contributors"], data["ledger_files"], data["pages"]) == (0, 0, 1, 4)
    index = (tmp_path / "site" / "index.html").read_text()
    assert stat(index, "contributions") == "0" and "Adapters, their latest version and who holds them: none yet" in index
    assert "nothing measured yet" in (tmp_path / "site" / "progress.html").read_text()


def test_site_refuses_reveal_and_needs_out(hub, tmp_path):
    result = CliRunner().invoke(cli, ["--hub", str(hub), "site", "--out", str(tmp_path / "s"), "--reveal"])
    assert result.exit_code == 2 and "--reveal is refused for `fedem site`" in result.output
    assert not (tmp_path / "s").exists()
    assert "Missing option '--out'" in CliRunner().invoke(cli, ["--hub", str(hub), "site"]).output


def test_a_rebuild_replaces_the_ledger_files(hub, tmp_path):
    out = tmp_path / "site"
    with read(hub) as registry:
        first = build_site(registry, out, NOW, chunk_rows=1)
        second = build_site(registry, out, NOW)
    assert first["ledger_files"] == first["contributions"] > 1 and second["ledger_files"] == 1
    assert sorted(p.name for p in (out / "data").iterdir()) == ["ledger-00000.js", "ledger-meta.js"]


def test_a_folder_with_other_files_is_refused_and_left_alone(hub, tmp_path):
    # Prepare: a folder of the user's own, with a `data` folder a build would replace.
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("keep me")

    # Execute
    result = CliRunner().invoke(cli, ["--hub", str(hub), "site", "--out", str(out)])

    # Assert
    assert result.exit_code == 1 and "not empty" in result.output
    assert (out / "data" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["data"]


class Tags(HTMLParser):
    """Every element of a page, with its attributes and whether it holds text (for inline scripts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


SCRIPT, IMG = "<script>alert(1)</script>", '"><img src=x onerror=alert(2)>'


def test_names_from_the_catalog_come_out_escaped(fresh_db, tmp_path):
    """An operator's catalog names adapters and languages (a stranger cannot): hostile ones stay text."""
    # Prepare: an adapter and a language named to break out of the markup, on every page that shows them
    fresh_db.add_checkpoint(None, "init", "fedem/base", "v0", "d0", {"heldout": {SCRIPT: 5.0}}, T0)
    fresh_db.add_adapter(IMG, [SCRIPT], "causal-lm", {}, T0)
    fresh_db.add_adapter_version(IMG, 0, None, "fedem/adapter", "v0", "a0", {"heldout": {SCRIPT: 4.0}}, T0)
    fresh_db.add_adapter_version(IMG, 0, 0, "fedem/adapter", "v1", "a1", {"heldout": {SCRIPT: 3.5}}, T0 + 60)
    fresh_db.add_contribution(fresh_db.pseudonym("sim:1"), IMG, None, T0 + 60, "a1", {"ok": True},
                              {"heldout": {SCRIPT: 3.5}}, "accepted", f"better on {SCRIPT}", 1)

    # Execute
    build_site(fresh_db, tmp_path / "site", NOW)

    # Assert: no element but the pages' own, every script from a file, the names shown as text
    pages = {p.relative_to(tmp_path / "site").as_posix(): p.read_text() for p in (tmp_path / "site").rglob("*.html")}
    assert len(pages) == 5
    for name, text in pages.items():
        parsed = Tags()
        parsed.feed(text)
        assert not [tag for tag, _ in parsed.tags if tag == "img"], name
        assert all("src" in attrs for tag, attrs in parsed.tags if tag == "script") and not parsed.script_text.strip()
        assert SCRIPT not in text and "<img" not in text, name
    escaped_script, escaped_img = "&lt;script&gt;alert(1)&lt;/script&gt;", "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;"
    assert f'<th scope="col" data-type="number">{escaped_script}</th>' in pages["index.html"]
    assert f"<td>{escaped_img}</td><td>v1</td><td>{escaped_script}</td>" in pages["index.html"]
    assert f"<h4 id=\"adapter-{escaped_img}\">Adapter {escaped_img}</h4>" in pages["progress.html"]
    assert f'<option value="{escaped_img}">{escaped_img}</option>' in pages["ledger.html"]
    contributor = next(text for name, text in pages.items() if name.startswith("contributors/"))
    assert f"<td>{escaped_img}</td>" in contributor and f"<td>better on {escaped_script}</td>" in contributor
    assert f">{escaped_script}</text>" in pages["progress.html"]  # the charts' legends


@pytest.mark.parametrize("v0", [{"hi": 5.5, "te": 5.8}, {}])
def test_base_v0_is_drawn_when_measured_and_left_out_when_not(fresh_db, v0):
    # Prepare: v0 with or without the held-out losses the hub records for its seed
    fresh_db.add_checkpoint(None, "init", "fedem/base", "v0", "d0", {"heldout": v0}, T0)
    fresh_db.add_checkpoint(0, "merge", "fedem/base", "v1", "d1", {"heldout": {"hi": 4.0, "te": 4.5}}, T0 + 60)

    # Execute
    site = site_data(fresh_db, NOW)
    page = render.progress_page(site)

    # Assert: the chart's lines, its x axis and its description start at the first measured version
    figure = page[page.index('<svg id="chart-bases"'):page.index("</svg>")]
    if v0:
        assert site["progress"]["bases"] == {"hi": [(0, 5.5), (1, 4.0)], "te": [(0, 5.8), (1, 4.5)]}
        assert "over base versions v0 to v1;" in figure and ">v0</text>" in figure
    else:
        assert site["progress"]["bases"] == {"hi": [(1, 4.0)], "te": [(1, 4.5)]}
        assert "over base version v1;" in figure and ">v0</text>" not in figure and ">v1</text>" in figure
    # the table lists every base version, "-" where none was measured
    assert "<td>v0</td><td>init</td><td>" + ("5.500" if v0 else "-") in re.sub(r">\s+<", "><", page)


def test_formats_match_the_ledger_script():
    assert render.losses({"te": 4.5, "hi": None}) == "hi -, te 4.500"
    assert (render.tokens(4095.6), render.rate(2 / 3), render.left(3725), render.left(65)) == ("4,096", "67%",
                                                                                               "1h02m", "1m05s")
    assert render.slug("c-0a1b") == "c-0a1b.html" and render.slug("../x y") == ".._x_y.html"
    script = (Path(render.__file__).parent / "assets" / "site.js").read_text()
    assert 'x.toFixed(3)' in script and 'replace(/[^A-Za-z0-9_.-]/g, "_")' in script


def test_publish_site_uploads_a_static_space(hub, local_hub, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", "unused")
    alias = pseudonyms(hub)
    result = invoke(hub, "publish", "--to", "hf", "--repo-prefix", "org/seshu", "--site", "--endpoint",
                    local_hub.endpoint, "--json")
    assert json.loads(result.output) == {"target": "hf", "repos": ["org/seshu-site"]}
    api = HfApi(endpoint=local_hub.endpoint, token="unused")
    files = set(api.list_repo_files("org/seshu-site", repo_type="space"))
    assert {"index.html", "ledger.html", "assets/site.js", "data/ledger-00000.js",
            f"contributors/{alias['sim:5']}.html", "README.md"} <= files
    readme = Path(api.hf_hub_download("org/seshu-site", "README.md", repo_type="space")).read_text()
    assert "sdk: static" in readme and "app_file: index.html" in readme
    # a file an earlier site had and this one has not is deleted, so the Space is exactly the site
    api.upload_file(path_or_fileobj=b"old", path_in_repo="contributors/c-gone.html", repo_id="org/seshu-site",
                    repo_type="space")
    invoke(hub, "publish", "--to", "hf", "--repo-prefix", "org/seshu", "--site", "--endpoint", local_hub.endpoint)
    assert set(api.list_repo_files("org/seshu-site", repo_type="space")) == files
