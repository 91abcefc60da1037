"""nstjax.results: typed records from run and sweep directories (real tiny runs, hand-made)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from nstjax import cli, results
from nstjax.errors import UserError

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real `nstjax run` (random weights, 32x24, 2 iterations) and a real 2-cell sweep."""
    tmp = tmp_path_factory.mktemp("results")
    base = {"content": str(DEMO / "content.png"), "style": str(DEMO / "style.png"),
            "init": "content", "image": {"size": [32, 24]}, "model": {"weights": "random"},
            "loss": {"content_layers": ["block1_conv2"],
                     "style_layers": ["block1_conv1", "block1_conv2"],
                     "style_weights": [0.5, 0.5]},
            "solver": {"maxiter": 2}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp / "sw.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml",
        "zip": [{"label": ["low", "high"], "loss.style_to_content_ratio": [1, 15.5],
                 "loss.style_weights": [[0.5, 0.5], [1, 0]]}]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NSTJAX_HOME", str(tmp / "home"))
        assert cli.main(["run", str(tmp / "base.yaml"), "--out", str(tmp / "run"), "--quiet",
                         "--no-compile-cache"]) == 0
        assert cli.main(["sweep", str(tmp / "sw.yaml"), "--out", str(tmp / "sweep"), "--quiet",
                         "--no-compile-cache"]) == 0
    return tmp


def test_load_run_of_a_real_run(made):
    r = results.load_run(made / "run")
    assert r.status == "done" and r.dir == made / "run"
    assert r.config["loss"]["style_layers"] == ["block1_conv1", "block1_conv2"]
    assert r.config["image"]["size"] == [32, 24] and r.config["solver"]["maxiter"] == 2
    h = r.history
    assert {"iter", "total", "content", "style", "tv", "seconds"} <= set(h)
    assert h["iter"].dtype == np.int64 and h["iter"].tolist() == [0, 1, 2]
    assert h["total"].dtype == np.float64 and h["total"].shape == (3,)
    # The last row is the final loss run.json recorded (history.csv keeps 9 digits).
    for k in ("total", "content", "style", "tv"):
        assert h[k][-1] == pytest.approx(r.record["final_loss"][k], rel=1e-8)
        assert h[k][0] == pytest.approx(r.record["initial_loss"][k], rel=1e-8)
    assert r.image_path == made / "run" / "final.png"
    assert isinstance(r.metrics, dict)


def test_load_sweep_of_a_real_sweep(made):
    sw = results.load_sweep(made / "sweep")
    assert sw.keys == ["loss.style_to_content_ratio", "loss.style_weights"]
    assert [c.status for c in sw.cells] == ["done", "done"]
    by_label = {c.labels["label"]: c for c in sw.cells}
    low, high = by_label["low"], by_label["high"]
    # YAML types survive: 1 an int, 15.5 a float, the weights lists.
    r1 = low.values["loss.style_to_content_ratio"]
    assert r1 == 1 and type(r1) is int
    assert type(high.values["loss.style_to_content_ratio"]) is float
    assert low.values["loss.style_weights"] == [0.5, 0.5]
    assert high.values["loss.style_weights"] == [1, 0]
    # The cell's run matches the values it was run with.
    run = high.run()
    assert run.config["loss"]["style_to_content_ratio"] == 15.5
    assert run.config["loss"]["style_weights"] == [1.0, 0.0]
    rows = sw.rows()
    assert [r["cell"] for r in rows] == [c.name for c in sw.cells]
    row = rows[[c.name for c in sw.cells].index(high.name)]
    assert row["label"] == "high" and row["status"] == "done" and row["iterations"] == 2
    assert row["total"] == pytest.approx(run.history["total"][-1], rel=1e-8)
    assert sw.cell(low.name) is low
    with pytest.raises(KeyError):
        sw.cell("nope")


def _write(d: Path, name: str, text: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(text)


def test_hand_made_sweep_without_sweep_json(tmp_path):
    """summary.csv only: axis columns, label, metric.* columns; values typed from config.yaml
    (or the CSV text), metrics from run.json else summary.csv; a cell that never ran."""
    d = tmp_path / "sw"
    _write(d, "summary.csv",
           "cell,group,loss.tv_weight,init,image.size,label,status,error,total,content,style,tv,"
           "iterations,evaluations,compile_seconds,solve_seconds,metric.style,metric.content\n"
           "a,g0,1e-06,noise,\"[64, 48]\",x,done,,3.5,1,2,0.5,10,30,1.5,2.5,7.25,0.125\n"
           "b,g0,0,content,\"[64, 48]\",y,failed,boom,,,,,,,,,8.5,0.25\n"
           "c,g1,2,style,\"[32, 24]\",z,pending,,,,,,,,,,,\n")
    _write(d / "cells" / "a", "config.yaml",
           yaml.safe_dump({"loss": {"tv_weight": 1e-6}, "init": "noise",
                           "image": {"size": [64, 48]}}))
    _write(d / "cells" / "a", "run.json", json.dumps({
        "status": "done", "final_loss": {"total": 3.5, "content": 1.0, "style": 2.0, "tv": 0.5},
        "iterations": 10, "metrics": {"style": 7.0, "content": 0.5, "style.block1_conv1": 3.0}}))
    _write(d / "cells" / "a", "history.csv", "iter,total\n0,4\n10,3.5\n")
    _write(d / "cells" / "b", "run.json", json.dumps({"status": "failed", "error": "boom"}))
    sw = results.load_sweep(d)
    assert sw.keys == ["loss.tv_weight", "init", "image.size"] and sw.name == "sw"
    a, b, c = sw.cells
    assert a.values == {"loss.tv_weight": 1e-6, "init": "noise", "image.size": [64, 48]}
    assert type(b.values["loss.tv_weight"]) is int and b.values["image.size"] == [64, 48]
    assert c.values == {"loss.tv_weight": 2, "init": "style", "image.size": [32, 24]}
    assert (a.status, b.status, c.status) == ("done", "failed", "pending")
    assert b.error == "boom" and [x.labels for x in sw.cells] == [{"label": "x"},
                                                                   {"label": "y"},
                                                                   {"label": "z"}]
    # run.json wins over summary.csv; summary.csv fills in when run.json has none.
    assert a.metrics == {"style": 7.0, "content": 0.5, "style.block1_conv1": 3.0}
    assert b.metrics == {"style": 8.5, "content": 0.25} and c.metrics == {}
    rows = sw.rows()
    assert len({tuple(r) for r in rows}) == 1  # same columns in every row
    assert rows[0]["metric.style.block1_conv1"] == 3.0
    assert rows[1]["metric.style.block1_conv1"] is None
    assert rows[0]["total"] == 3.5 and rows[1]["total"] is None and rows[0]["iterations"] == 10
    assert a.run().history["iter"].tolist() == [0, 10]
    with pytest.raises(UserError, match="cells/c: does not exist"):
        c.run()  # never ran


def test_labels_from_sweep_json_index(tmp_path):
    """Two labelled dims: label0/label1 from each cell's product index (first dim slowest)."""
    d = tmp_path / "sw"
    dims = [{"keys": ["a"], "values": [[1], [2]], "labels": ["one", "two"]},
            {"keys": ["b"], "values": [[True], [None], ["s"]], "labels": ["t", "n", "s"]}]
    cells = [{"name": f"c{i}", "index": i, "group": "g0",
              "values": {"a": dims[0]["values"][i // 3][0], "b": dims[1]["values"][i % 3][0]}}
             for i in range(6)]
    _write(d, "sweep.json", json.dumps({"name": "two", "dims": dims, "cells": cells}))
    sw = results.load_sweep(d)
    assert sw.name == "two" and sw.keys == ["a", "b"]
    assert [(c.labels["label0"], c.labels["label1"]) for c in sw.cells] == [
        ("one", "t"), ("one", "n"), ("one", "s"), ("two", "t"), ("two", "n"), ("two", "s")]
    assert sw.cells[4].values == {"a": 2, "b": None} and sw.cells[0].values["b"] is True
    assert all(c.status == "pending" for c in sw.cells)


def test_history_types_and_missing_values(tmp_path):
    p = tmp_path / "history.csv"
    p.write_text("iter,total,style/block1_conv2,seconds,scale\n0,1.5,,0,0\n5,1.25,0.5,2.5,1\n")
    h = results.read_history(p)
    assert h["iter"].tolist() == [0, 5] and h["scale"].dtype == np.int64
    assert np.isnan(h["style/block1_conv2"][0]) and h["style/block1_conv2"][1] == 0.5
    assert results.read_history(tmp_path / "none.csv") == {}
    p.write_text("iter,total\nx,1\n")
    with pytest.raises(UserError, match="history.csv: bad value in column 'iter'"):
        results.read_history(p)


def test_errors_are_one_line_user_errors(tmp_path):
    cases = [(lambda: results.load_run(tmp_path / "missing"), "does not exist"),
             (lambda: results.load_run(tmp_path), "not a run directory"),
             (lambda: results.load_sweep(tmp_path), "not a sweep directory"),
             (lambda: results.load_sweep(tmp_path / "missing"), "no such sweep directory")]
    _write(tmp_path / "bad", "run.json", "{not json")
    cases.append((lambda: results.load_run(tmp_path / "bad"), "run.json: unreadable"))
    for call, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)


def test_to_pandas_is_optional(tmp_path, monkeypatch):
    d = tmp_path / "sw"
    _write(d, "sweep.json", json.dumps({"name": "x", "dims": [{"keys": ["k"], "values": [[1]]}],
                                        "cells": [{"name": "c", "index": 0, "values": {"k": 1}}]}))
    sw = results.load_sweep(d)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(UserError, match=r"to_pandas\(\) needs pandas, which is not installed"):
        sw.to_pandas()
    fake = types.ModuleType("pandas")
    fake.DataFrame = lambda rows: ("frame", rows)
    monkeypatch.setitem(sys.modules, "pandas", fake)
    kind, rows = sw.to_pandas()
    assert kind == "frame" and rows[0]["cell"] == "c" and rows[0]["axis.k"] == 1
    assert rows[0]["dir"] == str(d / "cells" / "c")  # as summary.csv's dir, from here


def _gallery():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_gallery.py"
    spec = importlib.util.spec_from_file_location("make_gallery", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_gallery_from_real_dirs(made, tmp_path, capsys):
    from PIL import Image

    g = _gallery()
    out = tmp_path / "gal"
    run_dir, sw = made / "run", results.load_sweep(made / "sweep")
    cell = str(sw.cells[0].dir)
    assert g.main(["--out-dir", str(out), "pair", str(run_dir), cell, "--height", "48"]) == 0
    assert g.main(["--out-dir", str(out), "sheet", str(made / "sweep"), "--tile", "40"]) == 0
    assert g.main(["--out-dir", str(out), "plot", str(run_dir), cell]) == 0
    pair = Image.open(out / "pair.jpg")
    # content, style, two results: four 48-px-high tiles (32x24 inputs -> 64 wide) + gaps.
    assert pair.size == (4 * 64 + 3 * 4, 48 + g.LABEL_H)
    sheet = Image.open(out / "sweep.jpg")
    assert sheet.size == (2 * 53 + 4, 40 + g.LABEL_H)  # one zip dim of 2: a 2x1 grid
    assert Image.open(out / "loss.png").size[0] > 100
    assert g.main(["--out-dir", str(out), "plot", str(run_dir), "--column", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def test_make_gallery_demo_images(tmp_path):
    from PIL import Image

    g = _gallery()
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, wh in (("tubingen.jpg", (1024, 768)), ("starry_night.jpg", (1024, 640)),
                     ("the_scream.jpg", (1200, 1528))):
        Image.fromarray(rng.integers(0, 255, (wh[1], wh[0], 3), np.uint8)).save(src / name)
    dest = tmp_path / "demo"
    assert g.main(["demo-images", "--src", str(src), "--dest", str(dest), "--size", "256"]) == 0
    assert Image.open(dest / "tubingen.jpg").size == (256, 192)
    assert Image.open(dest / "starry_night.jpg").size == (256, 160)
    assert Image.open(dest / "the_scream.jpg").size == (201, 256)
    credits = (dest / "CREDITS.md").read_text(encoding="utf-8")
    assert "Andreas Praefcke" in credits and "CC BY 3.0" in credits and "public domain" in \
        credits.lower() and "The Scream" in credits


def test_every_cell_row_has_metric_and_term_columns(made):
    """load_sweep rows: metric.* (from each cell's run.json) and per-layer terms for every cell;
    the run's history has the per-layer terms as arrays."""
    sw = results.load_sweep(made / "sweep")
    rows = sw.rows()
    for c, r in zip(sw.cells, rows):
        rec = json.loads((c.dir / "run.json").read_text())
        assert rec["metrics"] and {f"metric.{k}" for k in rec["metrics"]} <= set(r)
        for k, v in rec["metrics"].items():
            assert r[f"metric.{k}"] == v and isinstance(r[f"metric.{k}"], float)
        for n in ("block1_conv1", "block1_conv2"):
            assert r[f"style/{n}"] == rec["final_loss"][f"style/{n}"]
    h = results.load_run(made / "run").history
    assert h["style/block1_conv1"].dtype == np.float64 and h["style/block1_conv1"].shape == (3,)
    np.testing.assert_allclose(h["style/block1_conv1"] + h["style/block1_conv2"], h["style"],
                               rtol=1e-6)


# --------------------------------------------------------------------------- damaged records


def _tiny_run(d: Path, record: dict, history: str = "iter,total,seconds\n0,1.5,0.0\n") -> Path:
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"status": "done", **record}))
    (d / "history.csv").write_text(history)
    return d


@pytest.mark.parametrize(("record", "field"), [
    ({"metrics": [1, 2]}, "'metrics'"),
    ({"final_loss": "low"}, "'final_loss'"),
    ({"final_loss": {"total": "1.0"}}, "'final_loss.total'"),
    ({"metrics": {"style": [1]}}, "'metrics.style'"),
    ({"status": 3}, "'status'"),
    ({"evaluations": "many"}, "'evaluations'"),
])
def test_load_run_names_file_and_field(tmp_path, record, field):
    d = _tiny_run(tmp_path / "r", record)
    with pytest.raises(results.ResultsError, match=f"run.json: field {field}") as e:
        results.load_run(d)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


@pytest.mark.parametrize("line", ["1", "1,2.5,0.1,9"])
def test_load_run_refuses_a_short_or_long_history_row(tmp_path, line):
    d = _tiny_run(tmp_path / "r", {}, f"iter,total,seconds\n0,1.5,0.0\n{line}\n")
    with pytest.raises(results.ResultsError, match=r"history.csv: line 3 has \d fields, the "
                       r"header 3"):
        results.load_run(d)


@pytest.mark.parametrize(("cells", "field"), [
    ([{"index": 0}], "'cells\\[0\\].name'"),
    ([{"name": "a", "index": "0"}], "'cells\\[0\\].index'"),
    ([{"name": "a", "index": 1.5}], "'cells\\[0\\].index'"),
    ([{"name": "a", "values": [1]}], "'cells\\[0\\].values'"),
    ("abc", "'cells'"),
])
def test_load_sweep_names_file_and_field(tmp_path, cells, field):
    d = tmp_path / "sw"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps({"name": "s", "dims": [], "cells": cells}))
    with pytest.raises(results.ResultsError, match=f"sweep.json: field {field}"):
        results.load_sweep(d)


def test_load_sweep_refuses_string_dims(tmp_path):
    d = tmp_path / "sw"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps({"name": "s", "dims": "ab", "cells": []}))
    with pytest.raises(results.ResultsError, match="sweep.json: field 'dims'"):
        results.load_sweep(d)


def test_an_axis_named_like_a_loss_term_keeps_both_columns(tmp_path):
    """A `style` axis (style images) and the style loss term: rows() and summary.csv name the
    axis `axis.style`, so neither hides the other (before, rows()['style'] was the loss)."""
    d = tmp_path / "sw"
    _write(d, "sweep.json", json.dumps({
        "name": "x", "dims": [{"keys": ["style"], "values": [["/imgs/a.png"]]}],
        "cells": [{"name": "c", "index": 0, "values": {"style": "/imgs/a.png"}}]}))
    _write(d / "cells" / "c", "run.json", json.dumps({
        "status": "done", "final_loss": {"total": 3.0, "content": 1.0, "style": 2.0, "tv": 0.0},
        "metrics": {"style": 7.0}}))
    row = results.load_sweep(d).rows()[0]
    assert row["axis.style"] == "/imgs/a.png" and row["style"] == 2.0
    assert row["metric.style"] == 7.0


def test_axis_values_keep_yaml_12_floats(tmp_path):
    """`1e-5` and `9.0e5` are floats in a sweep file (PyYAML alone reads them as strings), as
    the cells' configs hold; an older sweep.json holding "9.0e5" reads back as the config's
    number, a summary.csv field `1e-05` as a float."""
    from sweep_helpers import write_sweep

    from nstjax import sweep

    p = write_sweep(tmp_path / "s.yaml", axes={"loss.tv_weight": [0.0]})
    p.write_text(p.read_text().replace("loss.tv_weight:\n  - 0.0",
                                       "loss.tv_weight: [1e-5, 9.0e5, 2]"))
    sw = sweep.load(p)
    vals = [v[0] for v in sw.dims[0].values]
    assert vals == [1e-5, 9.0e5, 2] and [type(v) for v in vals] == [float, float, int]
    cells = sweep.expand(sw)
    assert [c.cfg.loss.tv_weight for c in cells] == [1e-5, 9.0e5, 2.0]

    d = tmp_path / "old"
    _write(d, "sweep.json", json.dumps({
        "name": "x", "dims": [{"keys": ["loss.tv_weight"], "values": [["9.0e5"]]}],
        "cells": [{"name": "c", "index": 0, "values": {"loss.tv_weight": "9.0e5"}}]}))
    _write(d / "cells" / "c", "config.yaml", yaml.safe_dump({"loss": {"tv_weight": 9.0e5}}))
    v = results.load_sweep(d).cells[0].values["loss.tv_weight"]
    assert v == 9.0e5 and type(v) is float
    e = tmp_path / "csv"
    _write(e, "summary.csv", "cell,group,dir,axis.loss.tv_weight,status\nc,g0,cells/c,1e-05,done\n")
    sw2 = results.load_sweep(e)
    assert sw2.keys == ["loss.tv_weight"] and sw2.cells[0].values == {"loss.tv_weight": 1e-5}
