"""Trade-off frontiers (`nstjax.sweep.frontier`): t bands, Pareto front, interpolation at equal
x, bootstrap CIs and the verdicts, each against numpy float64 references written here; and
`nstjax frontier` on a hand-made sweep directory (frontier.csv, frontier.png, report.html)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from nstjax import cli
from nstjax.sweep import frontier as F


def test_t_band_against_the_formula():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    t975_df3 = 3.182446305284263  # Student t, 97.5% quantile, 3 degrees of freedom
    half = t975_df3 * v.std(ddof=1) / math.sqrt(4)
    m, lo, hi = F.t_band(v)
    assert (m, lo, hi) == pytest.approx((3.5, 3.5 - half, 3.5 + half), rel=1e-12)
    assert math.isnan(F.t_band([2.0])[1]) and F.t_band([2.0])[0] == 2.0


def _dominated_brute(x, y, i):
    """Point i is dominated: another point has x >= and y <= with one strict (x higher is
    better, y lower is better)."""
    return any((x[j] >= x[i] and y[j] <= y[i]) and (x[j] > x[i] or y[j] < y[i])
               for j in range(len(x)) if j != i)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pareto_front_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = np.round(rng.uniform(0, 1, 60), 1)  # rounded: ties in x and y, and duplicates
    y = np.round(rng.uniform(0, 1, 60), 1)
    want = np.array([not _dominated_brute(x, y, i) for i in range(60)])
    np.testing.assert_array_equal(F.pareto(x, y), want)
    # the other directions: flipping the signs of both gives the same front
    np.testing.assert_array_equal(F.pareto(-x, -y, "lower", "higher"), want)
    x[3] = np.nan
    assert not F.pareto(x, y)[3]


def test_interpolate_linear_in_x_without_extrapolation():
    xs, ys = [0.9, 0.5, 0.7, 0.7], [1.0, 3.0, 2.0, 2.4]  # unordered; x = 0.7 twice
    # between (0.5, 3.0) and (0.7, 2.2): at 0.6 -> 2.6; between (0.7, 2.2) and (0.9, 1.0)
    assert F.interpolate(0.6, xs, ys) == pytest.approx(3.0 + (2.2 - 3.0) * 0.5, rel=1e-12)
    assert F.interpolate(0.8, xs, ys) == pytest.approx(2.2 + (1.0 - 2.2) * 0.5, rel=1e-12)
    assert F.interpolate(0.9, xs, ys) == 1.0
    assert math.isnan(F.interpolate(0.95, xs, ys)) and math.isnan(F.interpolate(0.4, xs, ys))


def _boot_reference(v, seed, n_boot, level):
    v = np.asarray(v, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    means = np.array([v[row].sum() / len(v) for row in idx])
    return v.mean(), np.percentile(means, 100 * (1 - level) / 2), np.percentile(
        means, 100 * (1 + level) / 2)


def test_bootstrap_ci_against_numpy_and_its_coverage():
    rng = np.random.default_rng(5)
    v = rng.normal(2.0, 1.0, 12)
    got = F.bootstrap_ci(v, seed=7, n_boot=500, level=0.9)
    assert got == pytest.approx(_boot_reference(v, 7, 500, 0.9), rel=1e-12)
    assert F.bootstrap_ci(v, seed=7, n_boot=500) == F.bootstrap_ci(v, seed=7, n_boot=500)
    # 95% intervals of samples of 30 cover the true mean about 95% of the time
    hits = sum(lo <= 2.0 <= hi for lo, hi in
               (F.bootstrap_ci(rng.normal(2.0, 1.0, 30), seed=s, n_boot=400)[1:]
                for s in range(200)))
    assert 0.88 <= hits / 200 <= 0.99


def _points(offsets: dict[str, float], noise: float, seed: int = 0) -> list[F.Point]:
    """Per group, 6 units, 4 ratios: x = 0.9 - 0.1 log10(ratio) (+ unit jitter), y = offset +
    2 (1 - x) + noise."""
    rng = np.random.default_rng(seed)
    pts = []
    for g, off in offsets.items():
        for u in range(6):
            jit = rng.normal(0, 0.01)
            for r in (1.0, 10.0, 100.0, 1000.0):
                x = 0.9 - 0.1 * math.log10(r) + jit
                pts.append(F.Point(g, f"u{u}", r, x, off + 2 * (1 - x) + rng.normal(0, noise)))
    return pts


def test_iso_table_values_ci_and_verdicts():
    # gram and swd drawn alike (seed 1: seed 0 draws one of the 5% false differences)
    pts = _points({"gram": 0.0, "swd": 0.0, "mrf": 0.5}, noise=0.01, seed=1)
    at = 0.75
    rows = {r.group: r for r in F.iso_table(pts, at, "lower", seed=3, n_boot=1000)}
    per = {}
    for g in ("gram", "swd", "mrf"):
        per[g] = {}
        for u in range(6):
            mine = sorted((p.x, p.y) for p in pts if p.group == g and p.unit == f"u{u}")
            per[g][f"u{u}"] = np.interp(at, [a for a, _ in mine], [b for _, b in mine])
    for g, r in rows.items():
        vals = np.array(list(per[g].values()))
        assert r.n == 6 and r.y == pytest.approx(vals.mean(), rel=1e-12)
        assert (r.lo, r.hi) == pytest.approx(_boot_reference(vals, 3, 1000, 0.95)[1:], rel=1e-12)
    best = min(rows, key=lambda g: rows[g].y)
    other = ({"gram", "swd"} - {best}).pop()
    assert best in ("gram", "swd") and rows[best].verdict == "best"
    assert math.isnan(rows[best].diff)
    diffs = np.array([per["mrf"][u] - per[best][u] for u in per[best]])
    assert rows["mrf"].diff == pytest.approx(diffs.mean(), rel=1e-12)
    assert rows["mrf"].verdict == "worse" and rows["mrf"].diff_lo > 0
    assert rows[other].verdict == "no difference"
    assert rows[other].diff_lo <= 0 <= rows[other].diff_hi
    # a target no unit reaches: no data, never a verdict
    far = F.iso_table(pts, 2.0)
    assert all(r.n == 0 and r.verdict == "no data" for r in far)


def test_curves_mean_and_band_per_ratio():
    pts = _points({"a": 0.0}, noise=0.05, seed=1)
    c = F.curves(pts)["a"]
    assert [p.ratio for p in c] == [1.0, 10.0, 100.0, 1000.0] and {p.n for p in c} == {6}
    ys = np.array([p.y for p in pts if p.ratio == 10.0])
    assert c[1].y == pytest.approx(ys.mean(), rel=1e-12)
    assert (c[1].y_hi - c[1].y_lo) / 2 == pytest.approx(
        2.570581835636314 * ys.std(ddof=1) / math.sqrt(6), rel=1e-9)  # t 97.5%, df 5


def _sweep_dir(tmp_path, pts: list[F.Point]):
    """A sweep directory as `nstjax sweep` leaves it (sweep.json, run.json per cell) with the
    points' metrics: axes loss.kind x ratio x seed."""
    kinds = list(dict.fromkeys(p.group for p in pts))
    ratios = sorted({p.ratio for p in pts})
    units = list(dict.fromkeys(p.unit for p in pts))
    d = tmp_path / "sw"
    cells = []
    for p in pts:
        name = f"{p.group}-{p.ratio:g}-{p.unit}"
        seed = units.index(p.unit)
        cells.append({"name": name, "index": len(cells), "group": "g0", "values": {
            "loss.kind": p.group, "loss.style_to_content_ratio": p.ratio, "seed": seed}})
        (d / "cells" / name).mkdir(parents=True)
        (d / "cells" / name / "run.json").write_text(json.dumps(
            {"status": "done", "metrics": {"structure": p.x, "swd": p.y}}))
    (d / "sweep.json").write_text(json.dumps({"format": "nstjax-sweep/1", "name": "sw", "dims": [
        {"keys": ["loss.kind"], "values": [[k] for k in kinds]},
        {"keys": ["loss.style_to_content_ratio"], "values": [[r] for r in ratios]},
        {"keys": ["seed"], "values": [[i] for i in range(len(units))]}], "cells": cells}))
    return d


def test_frontier_command_writes_csv_plot_and_report(tmp_path, capsys):
    pts = _points({"gram": 0.0, "mrf": 0.5}, noise=0.01)
    d = _sweep_dir(tmp_path, pts)
    assert cli.main(["frontier", str(d), "--at", "0.75", "--seed", "3", "--boot", "1000"]) == 0
    out = capsys.readouterr().out
    assert "metric.swd at metric.structure = 0.75" in out and "worse" in out
    with open(d / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    iso = {r["group"]: r for r in rows if r["kind"] == "iso"}
    want = {r.group: r for r in F.iso_table(
        [F.Point(p.group, f"seed={int(p.unit[1:])}", p.ratio, p.x, p.y) for p in pts], 0.75,
        seed=3, n_boot=1000)}
    for g in ("gram", "mrf"):
        assert float(iso[g]["y"]) == pytest.approx(want[g].y, rel=1e-8)
        assert iso[g]["verdict"] == want[g].verdict
    assert len([r for r in rows if r["kind"] == "curve"]) == 2 * 4
    assert (d / "frontier.png").stat().st_size > 5000
    page = (d / "report.html").read_text()
    assert "Trade-off frontier" in page and "<b>worse</b>" in page and "<b>best</b>" in page


def test_frontier_without_a_ratio_axis_is_one_line_exit_2(tmp_path, capsys):
    d = _sweep_dir(tmp_path, _points({"gram": 0.0}, 0.01))
    assert cli.main(["frontier", str(d), "--ratio", "loss.tv_weight"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no axis loss.tv_weight" in err
