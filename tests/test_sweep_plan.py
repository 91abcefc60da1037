"""`nstjax sweep` planning: grouping by structure, each process's share, the dry run (which
writes nothing) and the shipped sweep files."""

from __future__ import annotations

import pytest
from sweep_helpers import ROOT, base_config, prepared, write_sweep

from nstjax import cli, sweep
from nstjax.sweep import plan


def test_grouping_by_structure(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={
        "loss.style_to_content_ratio": [1, 15],      # numbers: same program
        "model.pooling": ["avg", "max"],             # structure
        "seed": [0, 1],                              # numbers (x0)
        "image.size": [[32, 32], [48, 32]],          # structure (shapes)
        "init": ["noise", "content"],                # numbers (x0)
    }, zip=[{"loss.style_weights": [[0.5, 0.5], [1, 0]], "loss.tv_weight": [0, 1e-3]}])
    sw, cells, groups = prepared(p)
    assert len(cells) == 64 and len(groups) == 4
    assert sorted(len(g.cells) for g in groups) == [16] * 4
    for g in groups:
        assert len({(c.cfg.model.pooling, str(c.cfg.image.size)) for c in g.cells}) == 1
    assert [g.name for g in groups] == ["g0-pool-avg__size-32x32", "g1-pool-avg__size-48x32",
                                        "g2-pool-max__size-32x32", "g3-pool-max__size-48x32"]
    assert groups[1].hw == (32, 48)
    sw2, _, groups2 = prepared(write_sweep(tmp_path / "t.yaml", axes={
        "loss.content_layers": [["block2_conv1"], ["block1_conv2"]],
        "solver.name": ["jaxopt_lbfgs", "scipy_lbfgsb"], "solver.maxevals": [0, 7]}))
    assert len(groups2) == 8
    assert sum(g.host for g in groups2) == 4  # scipy runs cell by cell, as `nstjax run`


def test_ownership_covers_every_cell_once(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"model.pooling": ["avg", "max"],
                                               "seed": [0, 1, 2, 3, 4]})
    sw, cells, groups = prepared(p)
    for count in (1, 2, 3, 4, 11):
        parts = [sweep.owned(groups, cells, i, count) for i in range(count)]
        names = [c.name for part in parts for c in part]
        assert sorted(names) == sorted(c.name for c in cells)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dry_run_prints_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NSTJAX_COSTS", str(tmp_path / "costs.json"))  # nothing measured
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.style_to_content_ratio": [1, 5, 15],
                                               "model.pooling": ["avg", "max"]})
    assert cli.main(["sweep", str(p), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "6 cell(s), 2 group(s)" in out and "compilations: 2" in out
    assert "ratio-5__pool-max" in out and "estimate (a rough model" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, cells, groups", [
    ("ratio", 8, 1), ("pooling", 2, 2), ("content_layer", 2, 2), ("style_weights", 6, 1)])
def test_shipped_sweeps_plan(name, cells, groups):
    sw, c, g = prepared(ROOT / "configs" / "sweeps" / "ablations" / f"{name}.yaml")
    assert (len(c), len(g)) == (cells, groups)
    assert all(x.cfg is not None and x.cfg.model.weights == "hed" for x in c)


def test_dry_run_refuses_a_directory_it_could_not_run_into(tmp_path, capsys):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [0, 1]})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main(["sweep", str(p), "--dry-run", "--out", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a sweep directory" in err and str(foreign) in err
    assert [f.name for f in foreign.iterdir()] == ["notes.txt"]


def test_arch_is_a_structure_axis(tmp_path):
    p = write_sweep(tmp_path / "a.yaml", axes={"model.arch": ["vgg16", "vgg19"], "seed": [0, 1]})
    sw, cells, groups = prepared(p)
    assert len(cells) == 4 and len(groups) == 2
    for g in groups:
        assert len({c.cfg.model.arch for c in g.cells}) == 1 and len(g.cells) == 2
        assert g.spec.arch == g.cells[0].cfg.model.arch
    # The cost model counts VGG19's extra conv (block3_conv4) on the way to block4.
    deep = write_sweep(tmp_path / "d.yaml", base=base_config(loss={
        "content_layers": ["block4_conv1"], "style_layers": ["block4_conv1"],
        "style_weights": [1]}), axes={"model.arch": ["vgg16", "vgg19"]})
    _, _, g2 = prepared(deep)
    n = {g.spec.arch: len(plan._conv_layers(g.spec, g.hw)) for g in g2}
    assert n == {"vgg16": 8, "vgg19": 9}
