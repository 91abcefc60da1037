"""nstjax.multiscale: scale sizes and budgets, and a coarse-to-fine run stopped by a signal."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from nstjax import cli, config, image, multiscale, solvers
from nstjax.errors import UserError


def make_cfg(**extra) -> config.Config:
    raw = {**TINY, "loss": {"content_layers": ["block2_conv2"],
                            "style_layers": ["block1_conv2", "block3_conv2"],
                            "style_weights": [1.0, 1.0]}}
    return config.validate(config.merge(raw, extra))


def test_sizes_and_iterations():
    cfg = make_cfg(image={"size": 400}, solver={"maxiter": 100},
                   multiscale={"factor": 2, "steps": 3})
    assert multiscale.scale_sizes(cfg, (400, 300)) == [(100, 75), (200, 150), (400, 300)]
    assert multiscale.scale_iters(cfg, 3) == [33, 33, 34]  # the remainder to the finest
    cfg = make_cfg(multiscale={"sizes": [100, 200], "maxiter": [5, 6, 7]})
    assert multiscale.scale_sizes(cfg, (400, 300)) == [(100, 75), (200, 150), (400, 300)]
    assert multiscale.scale_iters(cfg, 3) == [5, 6, 7]
    with pytest.raises(UserError, match="not below the final size 400"):
        multiscale.scale_sizes(make_cfg(multiscale={"sizes": [400]}), (400, 300))
    with pytest.raises(UserError, match="coarsest scale is 4x3 pixels, but layer block3_conv2"):
        multiscale.scale_sizes(make_cfg(multiscale={"sizes": [4]}), (400, 300))


def test_scale_config_is_single_scale():
    cfg = make_cfg(multiscale={"sizes": [16]})
    one = multiscale.scale_config(cfg, (16, 12), 3)
    assert one.image.size == [16, 12] and one.solver.maxiter == 3 and not one.multiscale.count


def test_upsample_is_bicubic_and_keeps_a_constant():
    x = np.full((1, 4, 6, 3), 2.5, np.float32)
    y = multiscale.upsample(x, (12, 8))
    assert y.shape == (1, 8, 12, 3) and np.allclose(y, 2.5, atol=1e-5)


def test_sigterm_in_the_coarse_scale_ends_the_run_there(env, capsys, monkeypatch):
    """A signal during scale 1 of 2: exit 143, status interrupted, no finer scale, final.* is
    scale 1's image (last.npy), the directory complete and unlocked."""
    real = solvers.minimize

    def minimize(*a, on_chunk=None, **kw):
        def term(x, rows):
            os.kill(os.getpid(), signal.SIGTERM)
            return on_chunk(x, rows)

        return real(*a, on_chunk=term, **kw)

    monkeypatch.setattr(solvers, "minimize", minimize)
    code = cli.main(["run", "ok.yaml", "multiscale.sizes=[16]", "solver.maxiter=8", "--out", "r",
                     "--quiet", "--no-compile-cache"])
    assert code == 143, capsys.readouterr().err
    d = env / "r"
    rec = json.loads((d / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["signal"] == signal.SIGTERM
    assert [s["scale"] for s in rec["scales"]] == [1] and rec["iterations"] == 2
    x = np.load(d / "last.npy")
    assert x.shape == (1, 16, 16, 3)
    assert np.array_equal(np.asarray(Image.open(d / "final.png")), image.deprocess(x))
    assert not (d / "run.lock").exists() and not list(d.glob("scale1_final*"))


def test_multiscale_run_has_scale_and_term_columns_and_metrics(env, capsys):
    """Two scales: history has `scale`, the terms, per-layer terms; run.json's metrics score the
    final (finest) image, checked against float64 numpy at the `eval:` layers chosen."""
    from conftest import np_vgg16

    from nstjax import weights

    code = cli.main(["run", "ok.yaml", "multiscale.sizes=[16]", "solver.maxiter=4",
                     "output.save_every=0", "eval.style_layers=[block1_conv1, block1_conv2]",
                     "eval.content_layers=[block1_conv2]", "--out", "r", "--quiet",
                     "--no-compile-cache"])
    assert code == 0, capsys.readouterr().err
    d = env / "r"
    head = (d / "history.csv").read_text().splitlines()[0]
    assert head == "scale,iter,total,content,style,tv,style/block1_conv1,seconds"
    rec = json.loads((d / "run.json").read_text())
    assert rec["loss"] == {"kind": "gram", "plugins": [], "options": {}, "style_norm": "none"}
    assert [s["size"] for s in rec["scales"]] == [[16, 16], [32, 32]]
    params, _ = weights.load("random", seed=0)
    x = image.load(d / "final.png")
    cfg = config.load("ok.yaml")
    c = image.load(cfg.content, [32, 32])
    s = image.load(cfg.style, [32, 32])
    fx, fc, fs = (np_vgg16(params, a, "block1_conv2") for a in (x, c, s))
    want = {}
    for n in ("block1_conv1", "block1_conv2"):
        gx, gs = (f[0].reshape(-1, f.shape[-1]) for f in (fx[n], fs[n]))
        gx, gs = gx.T @ gx / gx.shape[0], gs.T @ gs / gs.shape[0]
        want[f"style.{n}"] = np.sum((gx - gs) ** 2) / (4 * gx.shape[0] ** 2)
    want["style"] = want["style.block1_conv1"] + want["style.block1_conv2"]
    want["content"] = 0.5 * np.sum((fx["block1_conv2"] - fc["block1_conv2"]) ** 2)
    assert set(want) <= set(rec["metrics"])
    for k, v in want.items():
        assert rec["metrics"][k] == pytest.approx(v, rel=1e-3), k
