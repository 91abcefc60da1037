"""report.html: a sweep's and a run's page, built from the directory; the axis statistics
against numpy; the page rendered by headless Chromium (skipped only where it is absent: CI
installs it) with every cell in the DOM, every linked file present and no network address."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from sweep_helpers import copy_of
from sweep_helpers import ratio_sweep as _ratio_sweep

from nstjax import cli, report, results

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def ratio_sweep(tmp_path_factory):
    return _ratio_sweep(tmp_path_factory)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.links += [a[k] for k in ("src", "href") if a.get(k)]
        if a.get("id"):
            self.ids.add(a["id"])


def _parsed(text: str) -> _Links:
    p = _Links()
    p.feed(text)
    return p


def _check_links(page: Path, text: str) -> list[str]:
    """Every src/href is relative and names a file or directory that exists."""
    from urllib.parse import unquote

    links = _parsed(text).links
    for link in links:
        assert not re.match(r"^[a-z]+:", link), link  # no http:, file:, data: ... addresses
        assert (page.parent / unquote(link)).exists(), link
    assert "http://" not in text and "https://" not in text and "url(" not in text
    return links


def test_sweep_page_has_every_cell_image_and_link(ratio_sweep, tmp_path):
    _, cells, outs = ratio_sweep
    out = copy_of(outs[1].out, tmp_path / "out")
    text = (out / "report.html").read_text()  # written by the sweep itself
    links = _check_links(out / "report.html", text)
    ids = _parsed(text).ids
    for c in cells:
        assert f"cell-{c.name}" in ids
        assert f"cells/{c.name}/final.png" in links and f"cells/{c.name}/" in links
    assert text.count("<svg") >= 3 + 1  # loss curves (total, content, style) + an axis chart
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report.html").read_text().count("<tr id=\"cell-") == len(cells)


def test_run_page_and_errors(ratio_sweep, tmp_path, capsys):
    _, cells, outs = ratio_sweep
    run = copy_of(outs[1].out / "cells" / cells[0].name, tmp_path / "run")
    assert cli.main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    text = (run / "report.html").read_text()
    _check_links(run / "report.html", text)
    assert "final.png" in text and "Resolved config" in text and "<svg" in text
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_axis_series_mean_and_std_over_seeds(tmp_path):
    """Two categorical values x 3 seeds, two pooling series: mean and std (ddof 1) as numpy;
    grouped series sit side by side around each category."""
    rng = np.random.default_rng(0)
    dims = [{"keys": ["loss.kind"], "values": [["gram"], ["adain"]], "labels": None},
            {"keys": ["seed"], "values": [[0], [1], [2]], "labels": None},
            {"keys": ["model.pooling"], "values": [["avg"], ["max"]], "labels": None}]
    cells, want = [], {}
    for kind in ("gram", "adain"):
        for pool in ("avg", "max"):
            vs = rng.uniform(1, 10, 3)
            want[kind, pool] = (vs.mean(), vs.std(ddof=1))
            for seed, v in enumerate(vs):
                name = f"{kind}-{seed}-{pool}"
                cells.append(results.Cell(name, tmp_path / name, len(cells), "g", {
                    "loss.kind": kind, "seed": seed, "model.pooling": pool}, status="done",
                    metrics={"style": float(v)}))
    sw = results.Sweep(tmp_path, cells, "s", ["loss.kind", "seed", "model.pooling"], dims)
    series = report.axis_series(sw, report._dims(sw), 0, "style")
    assert [s.name for s in series] == ["model.pooling=avg", "model.pooling=max"]
    for s, pool in zip(series, ("avg", "max")):
        np.testing.assert_allclose(s.ys, [want["gram", pool][0], want["adain", pool][0]])
        np.testing.assert_allclose(s.errs, [want["gram", pool][1], want["adain", pool][1]])
    assert series[0].xs[0] < 0 < series[1].xs[0] < 1 and series[0].xs[1] < 1 < series[1].xs[1]


def _chromium(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}",
         "--host-resolver-rules=MAP * ~NOTFOUND", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it)")
def test_sweep_page_in_headless_chromium(ratio_sweep, tmp_path):
    """Rendered by a real browser (no network: every host name resolves to nothing): the DOM
    after scripts has every cell's row and image; a screenshot is written."""
    _, cells, outs = ratio_sweep
    page = outs[1].out / "report.html"
    r = _chromium(page, tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = _parsed(r.stdout)
    for c in cells:
        assert f"cell-{c.name}" in dom.ids
        assert f"cells/{c.name}/final.png" in dom.links
    _check_links(page, r.stdout)
    shot = tmp_path / "page.png"
    r = _chromium(page, tmp_path, "--window-size=1200,1600", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.stat().st_size > 10_000


def test_zip_of_many_keys_gets_short_labels_and_full_values_on_hover(tmp_path):
    """A zip over six keys without labels: the table's header names the keys in short (full
    dotted keys in a title attribute), each value cell holds at most report.SHORT characters
    with every key=value in its title; chart legends are cut to fit, full names in <title>."""
    import json as _json

    keys = ["loss.style_to_content_ratio", "loss.tv_weight", "solver.learning_rate",
            "loss.style_weights", "model.pooling", "solver.maxiter"]
    values = [[1000.0, 0.25, 5.0, [0.2, 0.2, 0.2, 0.2, 0.2], "avg", 300],
              [90000.0, 0.125, 2.5, [0.1, 0.3, 0.3, 0.2, 0.1], "max", 600]]
    d = tmp_path / "sw"
    d.mkdir()
    cells = [{"name": f"c{i}-{s}", "index": 2 * i + s, "group": "g",
              "values": {**dict(zip(keys, v)), "loss.kind": ("gram", "mrf")[s]}}
             for i, v in enumerate(values) for s in (0, 1)]
    (d / "sweep.json").write_text(_json.dumps({
        "name": "z", "dims": [{"keys": keys, "values": values},
                              {"keys": ["loss.kind"], "values": [["gram"], ["mrf"]]}],
        "cells": cells}))
    for i, c in enumerate(cells):
        (d / "cells" / c["name"]).mkdir(parents=True)
        (d / "cells" / c["name"] / "run.json").write_text(_json.dumps(
            {"status": "done", "metrics": {"style": 1.0 + i, "content": 2.0 + i}}))
    text = report.sweep_page(d)
    head = "ratio+tv+lr+style_w+pool+iters"
    assert f'title="{" + ".join(keys)}">{head}</th>' in text
    row = re.search(r'<tr id="cell-c1-0">(.*?)</tr>', text).group(1)
    tds = re.findall(r'<td class="t" title="([^"]*)">([^<]*)</td>', row)
    full, shown = tds[0]
    assert len(shown) <= report.SHORT and shown.startswith("90000_0.125_2.5")
    assert full.startswith("loss.style_to_content_ratio=9e+04") or "=90000" in full
    assert "model.pooling=max" in full and "solver.maxiter=600" in full
    # legends: cut to the chart's width, the full name on hover
    legends = re.findall(r"<text x=\"\d+\" y=\"\d+\">([^<]*)<title>([^<]*)</title></text>", text)
    assert legends and all(len(t) <= (480 - 64 - 20) // 6 for t, _ in legends)
    assert any(t.endswith("\u2026") and "solver.maxiter=" in full for t, full in legends)


def test_mean_over_pairs_and_seeds_against_numpy(tmp_path):
    """Two kinds x two image pairs x two seeds: per kind, each metric's mean over the four
    replicates with std (n - 1) and the 95% t band (t = 3.1824 for 3 degrees of freedom), as
    summary_mean.csv and the page's table show them."""
    import csv
    import io
    import json as _json

    rng = np.random.default_rng(4)
    pairs = [["/i/a.png", "/i/x.png"], ["/i/b.png", "/i/y.png"]]
    d = tmp_path / "sw"
    cells, want = [], {}
    for kind in ("gram", "mrf"):
        vs = rng.uniform(0, 1, 4)
        want[kind] = vs
        for i, (pair, seed) in enumerate([(p, s) for p in pairs for s in (0, 1)]):
            name = f"{kind}-{i}"
            cells.append({"name": name, "index": len(cells), "group": "g", "values": {
                "loss.kind": kind, "content": pair[0], "style": pair[1], "seed": seed}})
            (d / "cells" / name).mkdir(parents=True)
            (d / "cells" / name / "run.json").write_text(_json.dumps(
                {"status": "done", "metrics": {"swd": float(vs[i])}}))
    (d / "sweep.json").write_text(_json.dumps({"name": "p", "cells": cells, "dims": [
        {"keys": ["loss.kind"], "values": [["gram"], ["mrf"]]},
        {"keys": ["content", "style"], "values": pairs, "labels": ["a~x", "b~y"]},
        {"keys": ["seed"], "values": [[0], [1]]}]}))
    sw = results.load_sweep(d)
    rows = list(csv.DictReader(io.StringIO(report.replicate_csv(sw))))
    assert [r["loss.kind"] for r in rows] == ["gram", "mrf"]
    for r in rows:
        v = want[r["loss.kind"]]
        half = 3.182446305284263 * v.std(ddof=1) / 2
        assert float(r["metric.swd.mean"]) == pytest.approx(v.mean(), rel=1e-8)
        assert float(r["metric.swd.std"]) == pytest.approx(v.std(ddof=1), rel=1e-8)
        assert float(r["metric.swd.ci_lo"]) == pytest.approx(v.mean() - half, rel=1e-8)
        assert float(r["metric.swd.ci_hi"]) == pytest.approx(v.mean() + half, rel=1e-8)
        assert r["metric.swd.n"] == "4" and r["cells"] == "4"
    page = report.sweep_page(d)
    assert "Over image pairs and seeds" in page and "<th class=\"t\">pair</th>" not in page


def test_page_leads_with_metrics_no_kind_minimizes(tmp_path):
    """The cells table's metric columns start with color, weave and swd (no built-in kind
    minimizes them) and end with the Gram distances; each metric says what it favours."""
    import json as _json

    d = tmp_path / "sw"
    (d / "cells" / "c").mkdir(parents=True)
    (d / "cells" / "c" / "run.json").write_text(_json.dumps({"status": "done", "metrics": {
        "style": 1.0, "content": 2.0, "structure": 0.7, "swd": 3.0, "color": 0.1, "weave": 0.2,
        "style.block1_conv1": 0.5}}))
    (d / "sweep.json").write_text(_json.dumps({"name": "m", "dims": [{"keys": ["seed"],
                                                                      "values": [[0]]}],
                                               "cells": [{"name": "c", "index": 0,
                                                          "values": {"seed": 0}}]}))
    page = report.sweep_page(d)
    head = re.findall(r"<th[^>]*>metric\.([\w.]+)</th>", page)
    assert head == ["color", "weave", "swd", "structure", "style", "style.block1_conv1",
                    "content"]
    notes = dict(re.findall(r"<dt>metric\.(\w+)</dt><dd>([^<]*)</dd>", page))
    assert "favours gram" in notes["style"] and "no kind minimizes" in notes["color"]
    assert "sliced_wasserstein" in notes["swd"] and "under-stylized" in notes["structure"]
