"""Reliability, round four (issue 34): no silent wrong result, no unbounded work, no file
replaced unasked. Each reported case, then its class with generated cases, through the CLI
(exit 2, one line naming the key or file) and the API:

- every registry (metrics, loss kinds) x collision (a built-in's name, a Gram key, another
  plugin file's name, a result key of a built-in or of another plugin);
- weights files x model.arch (h5 layouts, .npz with and without its recorded arch), and
  `weights convert` inferring the arch or refusing to guess;
- every derived size x huge (cells of a sweep, dims of a stored sweep.json, image sizes for
  metrics);
- every on_progress outcome x raise / sys.exit / KeyboardInterrupt, in memory and into a
  directory;
- every writer x foreign existing file (report.html, bench --out, weights convert, run --out,
  sweep --out), and an optional extra that is installed but broken;
- numbers as the schema takes them (`1e-5`) in every numeric loss option; options checked
  against every image they apply to; empty paths;
- a rebuilt report equal to the sweep's own; plugin files announced and hashed in run.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import quiet_cli, write_tiny
from PIL import Image
from sweep_helpers import prepared, write_sweep
from weights_helpers import TINY, TINY19, make_params, write_keras3, write_legacy

import nstjax
from nstjax import cli, config, kinds, losses, metrics, report, results, svg
from nstjax import weights as W
from nstjax.errors import PluginError, UserError
from nstjax.sweep import execute, store
from nstjax.sweep import report as sweep_report


def one_error(capsys, *argv: str, code: int = 2) -> str:
    """`nstjax argv`: exit `code`, exactly one `nstjax: error:` line, no traceback."""
    got = cli.main(list(argv))
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.startswith("nstjax: error:")]
    assert got == code, out.err
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    return lines[0]


def plugin(path: Path, code: str) -> Path:
    path.write_text(code)
    return path


# ================================================================ registries x collisions

BUILTIN_METRICS = ("gram", "structure", "edges", "weave", "color", "swd")
BUILTIN_KINDS = ("gram", "mean_std", "sliced_wasserstein", "mrf")


@pytest.mark.parametrize("name", [*BUILTIN_METRICS, "style", "content"])
def test_a_metric_plugin_cannot_take_a_builtin_name(env, capsys, name):
    p = plugin(env / "m.py", "from nstjax import metrics\n"
               f"metrics.register({name!r}, lambda inp: 1.0, replace=True)\n")
    with pytest.raises(UserError, match=rf"m\.py: importing the metric plugin failed.*"
                       rf"metric '{name}' \(.*m\.py\).*(built-in metric|key of the built-in)"):
        metrics.load_plugins([str(p)])
    assert metrics.get("gram").builtin and name not in metrics.names() or metrics.get(
        name).builtin
    write_tiny(env / "c.yaml", eval={"plugins": ["m.py"]})
    line = one_error(capsys, "config", "show", "c.yaml")
    assert "eval.plugins" in line and "m.py" in line and f"'{name}'" in line, line


def test_two_metric_plugins_cannot_share_a_name(env, capsys):
    for f in ("a", "b"):
        plugin(env / f"{f}.py", "from nstjax import metrics\n"
               "metrics.register('mine', lambda inp: 1.0, replace=True)\n")
    write_tiny(env / "c.yaml", eval={"plugins": ["a.py", "b.py"], "metrics": ["mine"]})
    line = one_error(capsys, "config", "show", "c.yaml")
    assert re.search(r"b\.py.*metric 'mine' \(.*b\.py\).*taken by metric 'mine' \(.*a\.py\)",
                     line), line
    # the same file again (a notebook cell re-run) may replace its own
    metrics.register("own", lambda inp: 1.0)
    metrics.register("own", lambda inp: 2.0, replace=True)
    assert metrics.get("own").fn(None) == 2.0


RESULT_KEYS = [*BUILTIN_METRICS, "style", "content", "style.block1_conv1", "content.x",
               "other"]


@pytest.mark.parametrize("key", RESULT_KEYS)
def test_a_metric_result_key_never_replaces_another_metrics(env, capsys, vgg_free_spec, key):
    """`nstjax metrics --json` and `metrics.evaluate`: a plugin returning a key of a built-in
    metric (or of another plugin, `other`) is refused naming both; the other's value stays."""
    plugin(env / "other.py", "from nstjax import metrics\n"
           "metrics.register('other', lambda inp: 7.0)\n")
    plugin(env / "sly.py", "from nstjax import metrics\n"
           f"metrics.register('sly', lambda inp: {{{key!r}: 123.0, 'sly.ok': 1.0}})\n")
    write_tiny(env / "c.yaml", eval={"plugins": ["other.py", "sly.py"],
                                     "metrics": ["structure", "other", "sly"]})
    img = env / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(img)
    assert cli.main(["metrics", "c.yaml", str(img), "--json"]) == 0
    out = capsys.readouterr()
    got = json.loads(out.out)[str(img)]
    warned = [ln for ln in out.err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "metric 'sly'" in warned[0] and f"'{key}'" in warned[0], out.err
    assert "sly.ok" not in got and got.get(key) != 123.0
    assert got["other"] == 7.0 and 0 < got["structure"] <= 1

    head = key.split(".")[0]
    whose = "gram" if head in ("style", "content") else head
    cfg = config.load(env / "c.yaml")
    with pytest.raises(PluginError, match=rf"metric 'sly' \(.*sly\.py\): returned the key "
                       rf"'{re.escape(key)}', which belongs to .*metric '{whose}'"):
        metrics.evaluate({}, *vgg_free_spec, cfg.eval.spec())


@pytest.fixture
def vgg_free_spec():
    """x, content, style for metrics that need no VGG params (structure and plugins)."""
    rng = np.random.default_rng(1)
    x, c, s = (rng.normal(0, 40, (1, 32, 32, 3)).astype(np.float32) for _ in range(3))
    return x, c, s


@pytest.mark.parametrize("name", BUILTIN_KINDS)
def test_a_loss_plugin_cannot_take_a_builtin_kind(env, capsys, name):
    plugin(env / "k.py", "from nstjax import losses\n"
           f"g = losses.kind('gram')\n"
           f"losses.register({name!r}, targets=g.targets, terms=g.terms, replace=True)\n")
    before = losses.kind(name)
    write_tiny(env / "c.yaml", loss={"plugins": ["k.py"], "kind": name})
    line = one_error(capsys, "config", "show", "c.yaml")
    assert "loss.plugins" in line and f"the built-in loss kind '{name}'" in line, line
    assert losses.kind(name) is before and before.builtin


def test_two_loss_plugins_cannot_share_a_kind(env, capsys):
    for f in ("ka", "kb"):
        plugin(env / f"{f}.py", "from nstjax import losses\n"
               "g = losses.kind('gram')\n"
               "losses.register('t_shared', targets=g.targets, terms=g.terms, replace=True)\n")
    write_tiny(env / "c.yaml", loss={"plugins": ["ka.py", "kb.py"], "kind": "t_shared"})
    with kinds.isolated():
        line = one_error(capsys, "config", "show", "c.yaml")
    assert re.search(r"kb\.py.*'t_shared' \(.*kb\.py\).*taken by loss kind 't_shared' "
                     r"\(.*ka\.py\)", line), line


# ================================================================ weights x arch


@pytest.fixture
def tiny_tables(monkeypatch):
    monkeypatch.setattr(W, "VGG16_CONVS", TINY)
    monkeypatch.setitem(W.ARCHS, "vgg19", TINY19)


WRITERS = {"legacy": lambda p, params: write_legacy(p.with_suffix(".h5"), params, "kernel"),
           "keras3": lambda p, params: write_keras3(p.with_suffix(".weights.h5"), params)}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_convert_infers_the_arch_or_refuses_to_guess(tmp_path, capsys, tiny_tables, layout):
    v19 = WRITERS[layout](tmp_path / "v19", make_params(TINY19))
    assert cli.main(["weights", "convert", str(v19), str(tmp_path / "a.npz")]) == 0
    assert "vgg19, 16 layers" in capsys.readouterr().out
    params, meta = W.read_npz(tmp_path / "a.npz", convs=TINY19)
    assert meta["arch"] == "vgg19" and list(params) == [n for n, _, _ in TINY19]
    v16 = WRITERS[layout](tmp_path / "v16", make_params(TINY))
    assert W.convert(v16, tmp_path / "b.npz")["arch"] == "vgg16"
    # VGG19's file as VGG16: its extra layers would be dropped -> refused, naming them
    line = one_error(capsys, "weights", "convert", str(v19), str(tmp_path / "c.npz"),
                     "--arch", "vgg16")
    assert "VGG19's layers (block3_conv4, block4_conv4, block5_conv4)" in line, line
    assert "model.arch is vgg16" in line and not (tmp_path / "c.npz").exists()
    # too few layers to tell: refused; with --arch, read as that arch
    few = WRITERS[layout](tmp_path / "few", make_params(TINY[:4]))
    line = one_error(capsys, "weights", "convert", str(few), str(tmp_path / "d.npz"))
    assert "cannot tell VGG16 from VGG19" in line and "--arch" in line, line
    line = one_error(capsys, "weights", "convert", str(few), str(tmp_path / "d.npz"),
                     "--arch", "vgg16")
    assert "block3_conv1 not found" in line


@pytest.mark.parametrize("source", ["legacy", "keras3", "npz", "npz-no-arch"])
def test_every_reader_checks_the_file_against_model_arch(tmp_path, tiny_tables, source):
    def made(arch: str) -> str:
        params = make_params(TINY19 if arch == "vgg19" else TINY)
        if source in WRITERS:
            return str(WRITERS[source](tmp_path / arch, params))
        meta = {} if source == "npz-no-arch" else {"arch": arch}
        W.save_npz(params, tmp_path / f"{arch}.npz", meta)
        return str(tmp_path / f"{arch}.npz")

    for file_arch in ("vgg16", "vgg19"):
        for arch in ("vgg16", "vgg19"):
            if file_arch == arch:
                got, _ = W.load(made(file_arch), arch=arch)
                assert len(got) == (16 if arch == "vgg19" else 13)
                continue
            with pytest.raises(UserError) as e:
                W.load(made(file_arch), arch=arch)
            msg = str(e.value)
            assert "\n" not in msg and f"model.arch{'=' if arch == 'vgg19' else ' is '}" in msg
            if file_arch == "vgg19":  # the silent case: VGG19's extra layers dropped
                assert "VGG19's layers" in msg or "metadata says arch 'vgg19'" in msg, msg


def test_a_wrong_shape_names_the_arch_it_was_read_as(tmp_path, tiny_tables):
    params = make_params(TINY19)
    params["block3_conv4"]["kernel"] = np.zeros((3, 3, 2, 5), np.float32)
    for src in (write_keras3(tmp_path / "w.weights.h5", params),):
        with pytest.raises(UserError, match=r"block3_conv4 has kernel shape \(3,3,2,5\), "
                           r"VGG19 needs \(3,3,2,2\)"):
            W.load(str(src), arch="vgg19")
    W.save_npz(params, tmp_path / "w.npz", {"arch": "vgg19"})
    with pytest.raises(UserError, match=r"VGG19 needs \(3,3,2,2\)"):
        W.load(str(tmp_path / "w.npz"), arch="vgg19")


# ================================================================ derived sizes x huge


HUGE_SWEEPS = {
    "six axes of ten": {"axes": {f"loss.{k}": [float(i + 1) for i in range(10)]
                                 for k in ("style_to_content_ratio", "tv_weight")}
                        | {"seed": list(range(10)), "solver.maxiter": list(range(1, 11)),
                           "solver.learning_rate": [float(i + 1) for i in range(10)],
                           "style_scale": [0.5 + i / 10 for i in range(10)]}},
    "axis x zip": {"axes": {"seed": list(range(101))},
                   "zip": [{"solver.maxiter": list(range(1, 101)),
                            "solver.learning_rate": [float(i + 1) for i in range(100)]}]},
    "two axes": {"axes": {"seed": list(range(5001)), "solver.maxiter": [1, 2]}},
}


@pytest.mark.parametrize("case", list(HUGE_SWEEPS))
def test_a_sweep_past_the_cell_limit_is_refused_before_any_work(tmp_path, capsys, case):
    p = write_sweep(tmp_path / "huge.yaml", **HUGE_SWEEPS[case])
    t0 = time.perf_counter()
    line = one_error(capsys, "sweep", str(p), "--dry-run", "--out", str(tmp_path / "o"))
    assert time.perf_counter() - t0 < 5.0
    assert f"more than the limit of {results.MAX_CELLS}" in line and "huge.yaml" in line, line
    assert not (tmp_path / "o").exists()
    # the limit itself is allowed (expansion not run here)
    from nstjax import sweep

    ok = write_sweep(tmp_path / "ok.yaml", axes={"seed": list(range(100)),
                                                 "solver.maxiter": list(range(1, 101))})
    assert math.prod(len(d) for d in sweep.load(ok).dims) == results.MAX_CELLS


@pytest.mark.parametrize("sizes", [(60,) * 6, (results.MAX_CELLS + 1,), (2, 5001)])
def test_a_stored_sweep_past_the_cell_limit_is_refused(tmp_path, capsys, sizes):
    d = tmp_path / "sw"
    d.mkdir()
    dims = [{"keys": [f"k{i}"], "values": [[j] for j in range(n)],
             "labels": [f"l{j}" for j in range(n)] if i == 0 else None}
            for i, n in enumerate(sizes)]
    (d / "sweep.json").write_text(json.dumps({"format": store.MARK, "name": "x", "dims": dims,
                                              "cells": [{"name": "a", "index": 7}]}))
    t0 = time.perf_counter()
    with pytest.raises(results.ResultsError, match=rf"sweep\.json: field 'dims' multiplies "
                       rf"to {math.prod(sizes)} cells, more than the limit"):
        results.load_sweep(d)
    line = one_error(capsys, "report", str(d))
    assert "field 'dims'" in line and time.perf_counter() - t0 < 5.0
    assert not (d / "report.html").exists()


def test_labels_of_a_stored_sweep_by_index(tmp_path):
    """A cell's labels from its index in the product of the dims (first dim slowest)."""
    d = tmp_path / "sw"
    d.mkdir()
    dims = [{"keys": ["a"], "values": [[1], [2], [3]], "labels": ["x", "y", "z"]},
            {"keys": ["b"], "values": [[1], [2]], "labels": ["p", "q"]}]
    cells = [{"name": f"c{i}", "index": i, "values": {}} for i in range(6)]
    (d / "sweep.json").write_text(json.dumps({"name": "s", "dims": dims, "cells": cells}))
    got = [(c.labels["label0"], c.labels["label1"]) for c in results.load_sweep(d).cells]
    assert got == [(a, b) for a in "xyz" for b in "pq"]


@pytest.mark.parametrize("wh", [(8, 8), (16, 8), (65_537, 16)])
def test_metrics_names_an_image_too_small_or_large(env, capsys, wh):
    img = env / f"img{wh[0]}x{wh[1]}.png"
    Image.new("RGB", wh, (90, 120, 30)).save(img)
    line = one_error(capsys, "metrics", "ok.yaml", str(img))
    assert str(img) in line and f"{wh[0]}x{wh[1]} px" in line and "image.size:" not in line, line
    with pytest.raises(UserError, match=re.escape(str(img))):
        from nstjax import problem

        problem.score_file(config.load("ok.yaml"), str(img))


# ================================================================ callbacks x outcomes


def _raise(p):
    raise ValueError("user callback broke")


def _exit(p):
    sys.exit(3)


def _interrupt(p):
    raise KeyboardInterrupt


CALLBACKS = {"raise": (_raise, "failed", ValueError),
             "exit": (_exit, "failed", SystemExit),
             "interrupt": (_interrupt, "interrupted", None)}


@pytest.mark.slow
@pytest.mark.parametrize("where", ["memory", "dir"])
@pytest.mark.parametrize("what", list(CALLBACKS))
def test_every_callback_outcome_ends_the_run_complete(env, what, where):
    fn, status, raised = CALLBACKS[what]
    out = "r" if where == "dir" else None
    if raised is None:
        r = nstjax.stylize("ok.yaml", out=out, quiet=True, compile_cache=False, on_progress=fn)
        rec = r.record
    else:
        with pytest.raises(raised) as e:
            nstjax.stylize("ok.yaml", out=out, quiet=True, compile_cache=False, on_progress=fn)
        if raised is SystemExit:
            assert e.value.code == 3
        rec = json.loads((env / "r" / "run.json").read_text()) if out else None
    if out is None:
        if rec is not None:
            assert rec["status"] == status
        return
    rec = json.loads((env / "r" / "run.json").read_text())
    assert rec["status"] == status, rec
    for f in ("final.png", "last.npy", "history.csv", "config.yaml"):
        assert (env / "r" / f).is_file(), f
    if status == "failed":
        assert ("SystemExit: 3" if what == "exit" else "user callback broke") in rec["error"]
    assert np.load(env / "r" / "last.npy").shape == (1, 32, 32, 3)


# ================================================================ writers x foreign files


def _sweep_dir(tmp: Path) -> Path:
    """A directory holding the user's own summary.csv (no sweep.json)."""
    d = tmp / "mine"
    d.mkdir()
    (d / "summary.csv").write_text("cell,group,status\na,g,done\n")
    return d


def _run_dir(tmp: Path) -> Path:
    d = tmp / "run"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"status": "done"}))
    return d


@pytest.mark.parametrize("make", [_sweep_dir, _run_dir])
def test_report_never_replaces_a_foreign_report_html(tmp_path, capsys, make):
    d = make(tmp_path)
    mine = "<html><body>my own notes</body></html>\n"
    (d / "report.html").write_text(mine)
    line = one_error(capsys, "report", str(d))
    assert str(d / "report.html") in line and "--force" in line
    assert (d / "report.html").read_text() == mine
    with pytest.raises(UserError, match="not written by nstjax report"):
        report.write(d)
    assert cli.main(["report", str(d), "--force"]) == 0
    ours = (d / "report.html").read_text()
    assert report.GENERATOR in ours and report.ours(d / "report.html")
    assert cli.main(["report", str(d)]) == 0  # its own page: rebuilt without --force
    capsys.readouterr()


def _existing(tmp: Path, name: str) -> Path:
    """A file of the user's at tmp/name (its directory made)."""
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("the user's file\n")
    return p


WRITER_CASES = {
    "bench --out": lambda t: ["bench", "--out", str(_existing(t, "b.json")), "--quiet"],
    "bench --race --out": lambda t: ["bench", "--race", "ok.yaml", "--out",
                                     str(_existing(t, "r.json")), "--quiet"],
    "weights convert": lambda t: ["weights", "convert", str(write_legacy(
        t / "in.h5", make_params(TINY), "kernel")), str(_existing(t, "w.npz"))],
    "run --out": lambda t: ["run", "ok.yaml", "--out", str(_existing(t, "rdir/x.txt").parent),
                            "--quiet"],
    "sweep --out": lambda t: ["sweep", str(write_sweep(t / "s.yaml", axes={"seed": [0, 1]})),
                              "--out", str(_existing(t, "sdir/x.txt").parent), "--quiet"],
}


@pytest.mark.parametrize("case", list(WRITER_CASES))
def test_no_writer_replaces_a_foreign_file(env, capsys, tiny_tables, case):
    argv = WRITER_CASES[case](env)
    before = {p: p.read_bytes() for p in env.rglob("*") if p.is_file() and "home" not in p.parts}
    line = one_error(capsys, *argv)
    assert "exists" in line, line
    after = {p: p.read_bytes() for p in env.rglob("*") if p.is_file() and "home" not in p.parts}
    assert after == before


def test_a_broken_optional_extra_is_reported_at_start(env, capsys, monkeypatch):
    broken = env / "site" / "tensorboardX"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libfake.so: cannot open shared "
                                        "object file')\n")
    monkeypatch.syspath_prepend(str(env / "site"))
    for mod in [m for m in sys.modules if m == "tensorboardX" or m.startswith("tensorboardX.")]:
        monkeypatch.delitem(sys.modules, mod)
    t0 = time.perf_counter()
    code, err = quiet_cli(capsys, "run", "ok.yaml", "output.tensorboard=true", "--out", "r")
    assert code == 2 and time.perf_counter() - t0 < 10
    line = err.strip().splitlines()[-1]
    assert "tensorboardX is installed but importing it failed" in line, err
    assert "libfake.so: cannot open shared object file" in line and not (env / "r").exists()
    with pytest.raises(UserError, match="libfake.so"):
        nstjax.stylize("ok.yaml", ["output.tensorboard=true"], out="r2", quiet=True)
    assert not (env / "r2").exists()


# ================================================================ numbers, options, paths


NUMERIC_OPTIONS = [(k, n, o) for k in BUILTIN_KINDS for n, o in losses.kind(k).options.items()
                   if type(o.default) in (int, float)]


@pytest.mark.parametrize(("kind", "name", "opt"), NUMERIC_OPTIONS,
                         ids=[f"{k}.{n}" for k, n, _ in NUMERIC_OPTIONS])
def test_every_numeric_option_takes_exponent_notation(env, capsys, kind, name, opt):
    """`1e-5` is a float in YAML 1.2 (a string in PyYAML's 1.1): as loss.tv_weight takes it,
    so does every numeric option, in a file, an override and the API."""
    value = opt.high if opt.high is not None else 1.0  # in range for every option
    text = f"{float(value):e}"  # e.g. 1.500000e+01
    want = float(text) if type(opt.default) is float else int(float(text))
    raw = yaml.safe_load((env / "ok.yaml").read_text())
    del raw["loss"]
    (env / "c.yaml").write_text(yaml.safe_dump(raw) + f"loss:\n  kind: {kind}\n"
                                "  tv_weight: 1e-5\n"  # plain text: YAML 1.1 has no float here
                                f"  options:\n    {name}: {text}\n"
                                "  content_layers: [block1_conv1]\n"
                                "  style_layers: [block1_conv1]\n  style_weights: [1.0]\n")
    cfg = config.load(env / "c.yaml")
    assert cfg.loss.options[name] == want and type(cfg.loss.options[name]) is type(opt.default)
    assert cfg.loss.tv_weight == 1e-5
    cfg = config.load("ok.yaml", [f"loss.kind={kind}", f"loss.options.{name}={text}"])
    assert cfg.loss.options[name] == want
    assert losses.resolve_options(kind, {name: text})[name] == want
    assert cli.main(["config", "show", "c.yaml"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["loss"]["options"][name] == want


def test_eps_1e_5_is_accepted_and_nan_text_is_not(env):
    cfg = config.load("ok.yaml", ["loss.kind=mean_std", "loss.options.eps=1e-5"])
    assert cfg.loss.options["eps"] == 1e-5
    for bad in ("nan", "inf", "1e-5x"):
        with pytest.raises(UserError, match=r"loss\.options\.eps: must be"):
            losses.resolve_options("mean_std", {"eps": bad})


def test_patch_size_is_checked_against_the_output_image_too(env, capsys):
    """style_scale 2: the style's block3 map is 16x16, the 32 px output's 8x8; patch_size 10
    fits the style's but not the output's."""
    line = one_error(capsys, "run", "ok.yaml", "loss.kind=mrf", "loss.options.patch_size=10",
                     "style_scale=2", "loss.style_layers=[block3_conv1]",
                     "loss.content_layers=[block1_conv1]", "loss.style_weights=[1.0]",
                     "--out", "r", "--quiet", "--no-compile-cache")
    assert "loss.options.patch_size: 10" in line and "(8x8) of the output image" in line, line
    assert not (env / "r").exists()
    line = one_error(capsys, "run", "ok.yaml", "loss.kind=mrf", "loss.options.patch_size=10",
                     "style_scale=0.5", "loss.style_layers=[block3_conv1]",
                     "loss.style_weights=[1.0]", "--out", "r", "--quiet")
    assert "(4x4) of the style image" in line, line


PATH_KEYS = ["content", "style", "init", "model.weights", "masks.content"]


@pytest.mark.parametrize("key", PATH_KEYS)
def test_an_empty_path_names_its_key(env, capsys, key):
    raw = yaml.safe_load((env / "ok.yaml").read_text())
    config._set(raw, key, "")
    (env / "c.yaml").write_text(yaml.safe_dump(raw))
    line = one_error(capsys, "run", "c.yaml", "--quiet")
    assert f"c.yaml: {key}: is an empty path" in line and "directory" not in line, line
    with pytest.raises(UserError, match=rf"{re.escape(key)}: is an empty path"):
        config.validate(raw)


# ================================================================ reports


def _fake_sweep(tmp: Path, values: dict[str, float], label_metric: str | None = "structure"):
    """A sweep directory as `nstjax sweep` leaves it, with the cells' run.json written here
    (metric values given): (sweep, cells, groups, out). Nothing is solved."""
    extra = {"sweep": {"label_metric": label_metric}} if label_metric else {}
    p = write_sweep(tmp / "s.yaml", axes={"loss.style_to_content_ratio": [1, 5],
                                          "seed": [0, 1]}, **extra)
    sw, cells, groups = prepared(p)
    out = tmp / "out"
    store.claim(out, sw)
    store.write_plan(out, execute.plan_json(sw, cells, groups))
    for i, c in enumerate(cells):
        d = store.cell_dir(out, c)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(store.config_text(c))
        ms = {k: v * (i + 1) if abs(v) < 1e300 else v for k, v in values.items()}
        (d / "run.json").write_text(json.dumps({"status": "done", "metrics": ms,
                                                "final_loss": {"total": 1.0 + i}}))
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(d / "final.png")
    return sw, cells, groups, out


def _body(page: str) -> str:
    return re.sub(r"page written [0-9: -]+", "", page)


def test_a_rebuilt_report_equals_the_sweeps_own(tmp_path, capsys, monkeypatch):
    sw, cells, groups, out = _fake_sweep(tmp_path, {"structure": 0.25, "style": 2.0})
    sweep_report.summarize(out, sw, cells, groups)
    own = (out / "report.html").read_text()
    assert own.count("structure=") == len(cells)  # the tiles' captions
    plan = json.loads((out / "sweep.json").read_text())
    assert plan["label_metric"] == "structure" and Path(plan["file"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "s.yaml").write_text("not: the sweep file\n")  # the stored name, elsewhere
    assert cli.main(["report", str(out)]) == 0
    rebuilt = (out / "report.html").read_text()
    assert _body(rebuilt) == _body(own)
    assert "not: the sweep file" not in rebuilt and "axes:" in rebuilt  # the real sweep file


def test_an_old_relative_sweep_file_is_not_embedded(tmp_path, monkeypatch):
    sw, cells, groups, out = _fake_sweep(tmp_path, {"structure": 0.5})
    plan = json.loads((out / "sweep.json").read_text())
    plan["file"] = "s.yaml"  # as sweep.json held it before: the path as typed
    (out / "sweep.json").write_text(json.dumps(plan))
    monkeypatch.chdir(tmp_path / "out")
    (tmp_path / "out" / "s.yaml").write_text("secret: something else\n")
    page = report.sweep_page(out)
    assert "secret: something else" not in page and "sweep file" not in page


def test_a_deleted_cell_directory_is_not_linked(tmp_path):
    import shutil

    sw, cells, groups, out = _fake_sweep(tmp_path, {"structure": 0.5})
    gone = store.cell_dir(out, cells[1])
    shutil.rmtree(gone)
    page = report.write(out).read_text()
    assert f'href="cells/{gone.name}/"' not in page and gone.name in page
    assert f'href="cells/{store.cell_dir(out, cells[0]).name}/"' in page


@pytest.mark.parametrize("big", [sys.float_info.max, -sys.float_info.max, 1e300])
def test_huge_metric_values_still_make_every_page_and_plot(tmp_path, capsys, big):
    sw, cells, groups, out = _fake_sweep(tmp_path, {"structure": big, "style": big,
                                                    "content": 1e-300})
    paths = sweep_report.summarize(out, sw, cells, groups)
    assert out / "report.html" in paths and (out / "summary_seeds.csv").is_file()
    page = (out / "report.html").read_text()
    charts = re.findall(r"<svg.*?</svg>", page, re.S)
    assert charts and not any(re.search(r"\bnan\b|\binf\b", c.lower()) for c in charts)
    assert cli.main(["report", str(out)]) == 0
    capsys.readouterr()
    mean, std = report.mean_std([big, big])
    assert mean == big and std == 0.0


def test_mean_std_against_numpy_float64():
    rng = np.random.default_rng(3)
    for scale in (1.0, 1e-300, 1e300):
        u = rng.normal(2.0, 1.0, 7)
        m, s = report.mean_std(list(u * scale))
        # numpy on the unscaled values (its std of u * 1e300 overflows to inf)
        assert m == pytest.approx(np.mean(u) * scale, rel=1e-12)
        assert s == pytest.approx(np.std(u, ddof=1) * scale, rel=1e-12)


def test_chart_ticks_stay_finite_at_any_magnitude():
    big = sys.float_info.max
    for ys in ([big, 1.0], [big, -big], [1e-300, big], [5e-324, big]):
        for ylog in (None, True, False):
            out = svg.chart([svg.Series("a", [1.0, big], ys, [big, 0.0])], ylog=ylog,
                            xlog=True)
            assert "nan" not in out and "inf" not in out
            nums = [float(x) for x in re.findall(r'[xy][12]?="(-?[0-9.e+-]+)"', out)]
            assert nums and all(math.isfinite(x) and abs(x) < 1e6 for x in nums)


# ================================================================ plugins announced


def test_plugin_files_are_announced_and_hashed_in_run_json(env, capsys):
    lp = plugin(env / "kind.py", "from nstjax import losses\n"
                "g = losses.kind('gram')\n"
                "losses.register('t_announced', targets=g.targets, terms=g.terms)\n")
    mp = plugin(env / "met.py", "from nstjax import metrics\n"
                "metrics.register('t_mean', lambda inp: float(abs(inp.x).mean()))\n")
    write_tiny(env / "c.yaml", loss={"plugins": ["kind.py"], "kind": "t_announced",
                                     "content_layers": ["block1_conv1"],
                                     "style_layers": ["block1_conv1"], "style_weights": [1.0]},
               eval={"plugins": ["met.py"], "metrics": ["t_mean"]}, solver={"name": "adam",
                                                                         "maxiter": 2})
    with kinds.isolated():
        code, err = quiet_cli(capsys, "run", "c.yaml", "--out", "r")
    assert code == 0, err
    said = [ln for ln in err.splitlines() if "imported" in ln and "sha256" in ln]
    assert len(said) == 2 and str(lp) in said[0] and str(mp) in said[1], err
    rec = json.loads((env / "r" / "run.json").read_text())
    got = {p["key"]: (p["path"], p["sha256"]) for p in rec["plugins"]}
    assert got == {"loss.plugins": (str(lp), hashlib.sha256(lp.read_bytes()).hexdigest()),
                   "eval.plugins": (str(mp), hashlib.sha256(mp.read_bytes()).hexdigest())}
    assert said[0].split("sha256 ")[1][:16] == got["loss.plugins"][1][:16]


def test_h5_layer_names_are_read_without_data(tmp_path, monkeypatch):
    from weights_helpers import no_data_reads

    from nstjax import keras_h5

    src = write_keras3(tmp_path / "w.weights.h5", make_params(TINY19))
    no_data_reads(monkeypatch)
    assert sorted(keras_h5.layer_names(src)) == sorted(n for n, _, _ in TINY19)
    with h5py.File(src, "r"):
        pass
