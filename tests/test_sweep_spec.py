"""`nstjax sweep` files: expansion (product and zip), base/set/overrides, validation with the key
named, readable and safe cell names."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml
from sweep_helpers import DEMO, base_config, write_sweep

from nstjax import cli, sweep
from nstjax.errors import UserError

SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def test_product_and_zip_expansion(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.style_to_content_ratio": [1, 15],
                                               "seed": [0, 1, 2]},
                    zip=[{"label": ["post", "flat"],
                          "loss.style_weights": [[0.2, 0.8], [0.5, 0.5]],
                          "loss.tv_weight": [0.0, 1.0]}])
    sw = sweep.load(p)
    cells = sweep.expand(sw)
    assert len(cells) == 2 * 3 * 2
    combos = [(c.values["loss.style_to_content_ratio"], c.values["seed"],
               c.values["loss.tv_weight"]) for c in cells]
    assert combos[:3] == [(1, 0, 0.0), (1, 0, 1.0), (1, 1, 0.0)]  # first axis slowest
    assert len(set(combos)) == len(cells)
    for c in cells:  # zip keys vary together
        assert (c.values["loss.style_weights"] == [0.2, 0.8]) == (c.values["loss.tv_weight"] == 0)
        assert c.cfg.loss.style_to_content_ratio == c.values["loss.style_to_content_ratio"]
        assert c.cfg.seed == c.values["seed"] and c.cfg.loss.tv_weight == c.values["loss.tv_weight"]
    assert cells[1].name == "ratio-1__seed-0__style_w-flat"
    assert [c.name for c in cells[:1]] == ["ratio-1__seed-0__style_w-post"]


def test_base_path_set_and_overrides(tmp_path):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "b.yaml").write_text(yaml.safe_dump(base_config()))
    p = write_sweep(tmp_path / "s.yaml", base="cfgs/b.yaml", set={"solver.maxiter": 3},
                    axes={"model.pooling": ["avg", "max"]})
    cells = sweep.expand(sweep.load(p, ["seed=7"]))
    assert [c.cfg.model.pooling for c in cells] == ["avg", "max"]
    assert all(c.cfg.solver.maxiter == 3 and c.cfg.seed == 7 for c in cells)
    assert cells[0].cfg.content == str(DEMO / "content.png")


@pytest.mark.parametrize("doc, message", [
    ({"axes": {"loss.style_to_content_ratoi": [1]}}, "loss.style_to_content_ratio"),
    ({"axes": {"loss.tv_weight": []}}, "axes.loss.tv_weight: must be a non-empty list"),
    ({"axes": {"seed": 3}}, "axes.seed: must be a non-empty list"),
    ({"zip": [{"seed": [1, 2], "loss.tv_weight": [0]}]}, "unequal length"),
    ({"axis": {"seed": [1]}}, "unknown key axis (did you mean axes?)"),
    ({"axes": {"seed": [1]}, "sweep": {"batch_size": 0}}, "sweep.batch_size"),
    ({"axes": {"seed": [1]}, "sweep": {"batchsize": 2}}, "unknown key sweep.batchsize"),
    ({"axes": {"seed": [1, 1]}}, "twice"),
    ({"axes": {"seed": [1]}, "zip": [{"seed": [2]}]}, "seed is swept twice"),
    ({"base": 3, "axes": {"seed": [1]}}, "base: must be a config path"),
    ({"base": "nope.yaml", "axes": {"seed": [1]}}, "base: config file not found"),
    ({"axes": {"seed": [1]}, "sweep": {"label_metric": "beauty"}}, "sweep.label_metric: must "
     "name a metric such as style, style.block1_conv1 or one of "),
    ({"axes": {"seed": [1]}, "sweep": {"label_metric": "style.block9_conv9"}},
     "sweep.label_metric"),
    ({"axes": {"seed": [1]}, "sweep": {"label_metric": 3}}, "sweep.label_metric"),
    ({"axes": {"loss.kind": ["nope"]}}, "loss.kind: unknown loss kind 'nope'"),
])
def test_bad_sweep_files_name_the_key(tmp_path, doc, message):
    p = write_sweep(tmp_path / "s.yaml", **doc)
    with pytest.raises(UserError, match=re.escape(message)):
        sweep.expand(sweep.load(p))


def test_override_of_an_axis_and_all_invalid_cells(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [1, 2]})
    with pytest.raises(UserError, match="seed is also a sweep axis"):
        sweep.load(p, ["seed=3"])
    p = write_sweep(tmp_path / "t.yaml", axes={"loss.style_to_content_ratio": [-1, -2]})
    with pytest.raises(UserError, match="style_to_content_ratio"):
        sweep.expand(sweep.load(p))


def test_cli_bad_sweep_is_one_line_exit_2(tmp_path, capsys):
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.nope": [1]})
    assert cli.main(["sweep", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key loss.nope" in err


def test_cell_names_are_readable_and_safe(tmp_path):
    evil = ["../../etc/passwd", "/abs/x/../y.png", ".hidden", "a b\\c:d*?", "é" * 80, "..", "."]
    p = write_sweep(tmp_path / "s.yaml", axes={"init": evil},
                    zip=[{"label": ["../up", "x/y"], "loss.tv_weight": [1.0e38, 2.5e-6]}])
    cells = sweep.expand(sweep.load(p))
    names = [c.name for c in cells]
    assert len(set(names)) == len(names)
    for n in names:
        assert SAFE.match(n) and ".." not in n and "/" not in n and len(n) <= 120, n
    sw = sweep.load(write_sweep(tmp_path / "r.yaml", axes={
        "loss.style_to_content_ratio": [15, 1.5], "image.size": [[64, 48]],
        "loss.content_layers": [["block5_conv2"]], "style": [str(DEMO / "style.png")],
        "loss.tv_weight": [1.0e38]}))
    assert [c.name for c in sweep.expand(sw)] == [
        "ratio-15__size-64x48__content-block5_conv2__style-style__tv-1e38",
        "ratio-1.5__size-64x48__content-block5_conv2__style-style__tv-1e38"]
    assert sweep.safe_name("x" * 300, 48) != sweep.safe_name("x" * 301, 48)
    assert len(sweep.safe_name("x" * 300, 48)) <= 48


def test_out_of_range_seed_names_the_key_and_the_cell(tmp_path, capsys):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [-1, 0]})
    cells = sweep.expand(sweep.load(p))
    assert cells[0].cfg is None and cells[0].error.startswith(f"{p} cell seed-1: seed: ")
    assert "-1" in cells[0].error and not cells[1].error and cells[1].cfg.seed == 0
    # Every cell invalid: the command fails with that one line (exit 2).
    p = write_sweep(tmp_path / "t.yaml", axes={"seed": [-1, 2**63]})
    assert cli.main(["sweep", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cell seed-1: seed: " in err and "Traceback" not in err


def test_label_metric_and_kind_axis(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.kind": ["gram", "nope"]},
                    sweep={"label_metric": "style.block2_conv1"})
    sw = sweep.load(p)
    assert sw.label_metric == "style.block2_conv1"
    gram, nope = sweep.expand(sw)
    assert gram.cfg.loss.kind == "gram" and nope.cfg is None
    assert "cell kind-nope: loss.kind: unknown loss kind 'nope'; registered kinds: " in nope.error
    assert sweep.load(write_sweep(tmp_path / "t.yaml", axes={"seed": [1]})).label_metric is None


def test_label_metric_takes_registered_metrics(tmp_path):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [1]}, sweep={"label_metric": "structure"})
    assert sweep.load(p).label_metric == "structure"
    listed = r"one of (\w+, )*color, edges, (\w+, )*structure.*\(got 'gram'\)"
    with pytest.raises(UserError, match=listed):
        sweep.load(write_sweep(tmp_path / "t.yaml", axes={"seed": [1]},
                               sweep={"label_metric": "gram"}))


def test_built_in_kinds_are_sweep_axes_in_a_fresh_process(tmp_path):
    """The built-in kinds register on first lookup; a cell's isolated registry must not drop
    them when it is restored (they were once only 'gram' for the cells after the first)."""
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.kind": ["mean_std", "sliced_wasserstein"],
                                               "seed": [0, 1]})
    code = ("import sys; from nstjax import sweep; cells = sweep.expand(sweep.load(sys.argv[1]));"
            "print([(c.cfg.loss.kind if c.cfg else c.error) for c in cells])")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == str(["mean_std", "mean_std", "sliced_wasserstein",
                               "sliced_wasserstein"])


def test_a_solver_axis_drops_the_base_keys_its_solver_ignores(tmp_path):
    """Base keys serve the solvers that use them (a scipy_lbfgsb cell drops the base's adam
    learning_rate and maxiter); a key a cell sets itself is checked: that cell fails."""
    base = base_config(solver={"name": "adam", "maxiter": 6, "learning_rate": 1.0})
    sw = sweep.load(write_sweep(tmp_path / "a.yaml", base=base,
                                axes={"solver.name": ["adam", "scipy_lbfgsb"]}))
    adam, scipy = sweep.expand(sw)
    assert adam.cfg.solver.learning_rate == 1.0 and adam.cfg.solver.maxiter == 6
    assert not scipy.error and scipy.cfg.solver.learning_rate == 5.0  # the default
    assert scipy.cfg.solver.maxiter == 200
    sw = sweep.load(write_sweep(tmp_path / "b.yaml", base=base,
                                axes={"solver.name": ["adam", "scipy_lbfgsb"],
                                      "solver.learning_rate": [1.0, 2.0]}))
    cells = sweep.expand(sw)
    assert [c.cfg is not None for c in cells] == [True, True, False, False]
    assert all("solver.learning_rate" in c.error and "scipy_lbfgsb" in c.error
               for c in cells[2:])


def _images(d, names, seed=0):
    """Small generated RGB images (random smooth patterns), one per name."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        a = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(a).resize((40, 32), Image.BILINEAR).save(d / n)
    return [d / n for n in names]


def test_pairs_cross_and_zip_from_lists_and_globs(tmp_path):
    """`pairs:` makes one dim of (content, style): globs (sorted) and paths relative to the
    sweep file, crossed (every content with every style) or zipped (i-th with i-th), labelled
    content~style; each cell's config holds its pair."""
    c1, c2, c3 = _images(tmp_path / "photos", ["a.png", "b.png", "c.jpg"])
    s1, s2 = _images(tmp_path / "art", ["x.png", "y.png"], seed=1)
    p = write_sweep(tmp_path / "s.yaml", pairs={"content": ["photos/*.png", "photos/c.jpg"],
                                                "style": "art/*.png"},
                    axes={"seed": [0, 1]})
    sw = sweep.load(p)
    assert sw.dims[0].keys == ("content", "style")
    assert sw.dims[0].labels == ("a~x", "a~y", "b~x", "b~y", "c~x", "c~y")
    cells = sweep.expand(sw)
    assert len(cells) == 12 and cells[0].name == "pair-a-x__seed-0"
    got = {(c.cfg.content, c.cfg.style, c.cfg.seed) for c in cells}
    assert got == {(str(c), str(s), k) for c in (c1, c2, c3) for s in (s1, s2) for k in (0, 1)}
    p = write_sweep(tmp_path / "z.yaml", pairs={"content": ["photos/a.png", "photos/b.png"],
                                                "style": ["art/y.png", "art/x.png"],
                                                "mode": "zip"})
    sw = sweep.load(p)
    assert sw.dims[0].values == ((str(c1), str(s2)), (str(c2), str(s1)))


@pytest.mark.parametrize(("pairs", "what"), [
    ({"content": "photos/*.gif", "style": "art/x.png"}, "pairs.content: photos/*.gif matches no"),
    ({"content": "photos/a.png", "style": "art/none.png"}, "pairs.style: art/none.png: no such"),
    ({"content": ["photos/a.png", "photos/b.png"], "style": "art/x.png", "mode": "zip"},
     "content has 2 image(s) and style 1"),
    ({"content": "photos/a.png", "style": "art/x.png", "mode": "both"}, "pairs.mode: must be"),
    ({"content": "photos/a.png"}, "pairs: must map content and style"),
])
def test_bad_pairs_are_one_line_naming_the_key(tmp_path, capsys, pairs, what):
    _images(tmp_path / "photos", ["a.png", "b.png"])
    _images(tmp_path / "art", ["x.png"])
    p = write_sweep(tmp_path / "s.yaml", pairs=pairs)
    assert cli.main(["sweep", str(p), "--dry-run", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and what in err and "s.yaml" in err
