"""`nstjax sweep` reports: summary.csv, contact sheet and loss plots, and --summarize-only, which
rebuilds them only in a directory a sweep wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sweep_helpers import copy_of, summary, tree
from sweep_helpers import ratio_sweep as _ratio_sweep

from nstjax import cli, sweep


@pytest.fixture(scope="module")
def ratio_sweep(tmp_path_factory):
    return _ratio_sweep(tmp_path_factory)


def test_summary_contact_sheet_and_plots(ratio_sweep):
    from PIL import Image

    p, cells, outs = ratio_sweep
    out = outs[1].out
    rows = summary(out)
    assert list(rows) == ["ratio-1", "ratio-5", "ratio-15"]
    r = rows["ratio-5"]
    assert r["axis.loss.style_to_content_ratio"] == "5" and r["status"] == "done"
    assert r["group"] == "g0" and int(r["iterations"]) == 6 and int(r["evaluations"]) >= 6
    assert float(r["total"]) > 0 and float(r["solve_seconds"]) > 0
    # one compilation, reused by later batches; each batch's compile seconds shared out
    # equally among its cells (a cell's own share, not all on the first cell)
    batch_c = [float(rows[c]["batch_compile_seconds"]) for c in rows]
    assert len({b for b in batch_c if b > 0}) == 1
    for r in rows.values():
        n = json.loads((out / r["dir"] / "run.json").read_text())["batch_cells"]
        assert float(r["compile_seconds"]) == pytest.approx(float(r["batch_compile_seconds"]) / n,
                                                            rel=1e-3, abs=2e-4)
    assert Image.open(out / "contact_sheet.png").size[0] > 3 * 100
    assert Image.open(out / "plots" / "g0.png").size[0] > 300
    plan = json.loads((out / "sweep.json").read_text())
    assert [g["name"] for g in plan["groups"]] == ["g0"] and len(plan["cells"]) == 3


def test_cell_seconds_add_up_to_the_batch(ratio_sweep):
    """Three cells in one batch (lanes 3): each cell's solve_seconds is its own share of the
    batch's (batch_solve_seconds, the same on every cell), in proportion to its evaluations,
    so the column sums to the batch's time."""
    _, _, outs = ratio_sweep
    rows = summary(outs[3].out)
    batch = {float(r["batch_solve_seconds"]) for r in rows.values()}
    assert len(batch) == 1
    b = batch.pop()
    assert b > 0
    evals = np.array([float(r["evaluations"]) for r in rows.values()])
    own = np.array([float(r["solve_seconds"]) for r in rows.values()])
    assert own == pytest.approx(b * evals / evals.sum(), rel=1e-3, abs=2e-4)
    total = sum(float(r["solve_seconds"]) for r in rows.values())
    # the records round seconds to 0.1 ms (three cells and the batch: up to 2e-4 in all); on a
    # fast machine the batch takes ~0.1 s, so the rounding alone can exceed rel=1e-3 of it
    assert total == pytest.approx(float(rows["ratio-1"]["batch_solve_seconds"]), rel=1e-3,
                                  abs=2e-4)
    assert outs[3].solve_seconds == pytest.approx(total, rel=1e-3, abs=2e-4)


def test_summarize_only_rebuilds_from_the_cells(ratio_sweep, tmp_path, capsys):
    p, cells, outs = ratio_sweep
    out = copy_of(outs[1].out, tmp_path / "out")
    cells_before = tree(out / "cells")
    (out / "summary.csv").unlink()
    (out / "contact_sheet.png").unlink()
    assert cli.main(["sweep", str(p), "--out", str(out), "--summarize-only"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == [str(out / "summary.csv"), str(out / "contact_sheet.png")]
    assert summary(out) == summary(outs[1].out)
    assert tree(out / "cells") == cells_before
    assert json.loads((out / "sweep.json").read_text())["format"] == "nstjax-sweep/1"


def test_metric_columns_axis_plot_and_metric_labels(ratio_sweep, tmp_path):
    """Every cell has metric.* columns (its run.json's); plots/axis-<key>.png is written; a
    `label_metric` adds one caption line per tile, so the sheet grows by one line per row."""
    import io

    from PIL import Image

    from nstjax.sweep import report

    p, cells, outs = ratio_sweep
    out = copy_of(outs[1].out, tmp_path / "out")
    sw = sweep.load(p)
    cells = sweep.expand(sw)
    groups = sweep.make_groups(sw, cells)
    sweep.store.locate(out, cells)
    paths = sweep.summarize(out, sw, cells, groups)
    assert out / "plots" / "axis-loss.style_to_content_ratio.png" in paths
    assert not (out / "summary_seeds.csv").exists()  # no seed axis
    for r in summary(out).values():
        rec = json.loads((out / r["dir"] / "run.json").read_text())
        assert float(r["metric.style"]) == pytest.approx(rec["metrics"]["style"], rel=1e-8)
        assert float(r["metric.content"]) == pytest.approx(rec["metrics"]["content"], rel=1e-8)
    plain = Image.open(io.BytesIO(report.contact_sheet(out, sw, cells)))
    sw.label_metric = "style"
    labelled = Image.open(io.BytesIO(report.contact_sheet(out, sw, cells)))
    assert labelled.width == plain.width and labelled.height == plain.height + 16
    assert report.metric_text("style", "12345.6") == "style=1.23e+04"
    assert report.metric_text("style", "") == "style=?"


def test_cell_seconds_are_each_cells_own():
    """A cell that stopped after 10 of the batch's 40 evaluations is charged a quarter of the
    solve time, not an equal share; compile time in equal shares; both sum to the batch."""
    from nstjax.sweep.execute import cell_seconds

    solve, comp = cell_seconds(np.array([10, 30]), 8.0, 3.0)
    assert solve == pytest.approx([2.0, 6.0]) and comp == pytest.approx([1.5, 1.5])
    solve, _ = cell_seconds([0, 0, 0], 3.0, 0.0)  # no evaluations recorded: equal shares
    assert solve == pytest.approx([1.0, 1.0, 1.0])


def test_a_sweep_over_image_pairs_and_seeds(tmp_path):
    """Two generated pairs (zip) x two seeds run as one batched group: four cell directories,
    each with its own pair in config.yaml; summary_mean.csv holds the mean over the four of
    every metric (as numpy over summary.csv) and the page its table."""
    import csv

    from PIL import Image
    from sweep_helpers import prepared, write_sweep

    rng = np.random.default_rng(0)
    for name in ("c1.png", "c2.png", "s1.png", "s2.png"):
        a = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(a).resize((32, 32), Image.BILINEAR).save(tmp_path / name)
    p = write_sweep(tmp_path / "pairs.yaml", set={"solver.maxiter": 2},
                    pairs={"content": ["c1.png", "c2.png"], "style": ["s1.png", "s2.png"],
                           "mode": "zip"}, axes={"seed": [0, 1]})
    sw, cells, groups = prepared(p)
    o = sweep.run_sweep(sw, cells, groups, tmp_path / "out", quiet=True)
    assert o.exit_code == 0 and len(groups) == 1
    rows = summary(tmp_path / "out")
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"done"}
    for r in rows.values():
        cfg = (tmp_path / "out" / r["dir"] / "config.yaml").read_text()
        assert r["axis.content"] in cfg and r["axis.style"] in cfg
    with open(tmp_path / "out" / "summary_mean.csv", newline="") as f:
        (mean,) = list(csv.DictReader(f))
    for m in ("metric.structure", "metric.swd"):
        v = np.array([float(r[m]) for r in rows.values()])
        assert float(mean[f"{m}.mean"]) == pytest.approx(v.mean(), rel=1e-7)
        assert mean[f"{m}.n"] == "4"
    assert "Over image pairs and seeds" in (tmp_path / "out" / "report.html").read_text()
