"""The docs' research-bench guides (Custom losses, Metrics, Results), run as written at tiny size.

The fenced code blocks of those pages are extracted from docs/guides/research/: the plugin and the
YAML files must be the shipped ones, the commands run through the CLI (32x24, random weights,
2 iterations), and the Python snippets are executed with only their paths and weights swapped.
Numbers are checked against float64 numpy (the AdaIN terms, the reference evaluation) and
against each other's files (summary.csv vs run.json, summary_seeds.csv vs numpy).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import np_vgg16

from nstjax import cli, config, image, weights

ROOT = Path(__file__).resolve().parents[1]
GUIDES = {"Custom losses": "custom-losses.md", "Metrics": "metrics.md", "Results": "results.md"}
INCLUDE = re.compile(r'^--8<-- "([^"]+)"\n', re.M)  # pymdownx.snippets, as mkdocs.yml sets it
TINY = ["image.size=[32,24]", "solver.maxiter=2", "model.weights=random"]
POST = [f"block{i}_conv2" for i in range(1, 6)]
EVAL = [f"block{i}_conv{j}" for i in range(1, 6) for j in (1, 2)]


def blocks(title: str, expand: bool = True) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks of the guide `title`; with `expand`, a block that
    includes a file (`--8<-- "path"`) holds the file's text, as the built page shows it."""
    page = ROOT / "docs/guides/research" / GUIDES[title]
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {title}\n"), page
    found = re.findall(r"```(\w*)\n(.*?)```", text, re.S)
    if expand:
        found = [(lg, INCLUDE.sub(lambda m: (ROOT / m.group(1)).read_text(), code))
                 for lg, code in found]
    return found


def block(title: str, lang: str, i: int = 0, expand: bool = True) -> str:
    return [code for lg, code in blocks(title, expand) if lg == lang][i]


def swap(code: str, pairs: dict[str, str]) -> str:
    """`code` with each key replaced (each must occur: the docs must not drift silently)."""
    for a, b in pairs.items():
        assert a in code, f"docs snippet no longer contains {a!r}"
        code = code.replace(a, b)
    return code


def run_snippet(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs", "exec"), {"__name__": "docs"})  # noqa: S102
    return out.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The guide's `nstjax run` and `nstjax sweep` commands, at tiny size, in a temp dir."""
    tmp = tmp_path_factory.mktemp("research")
    cmds = [shlex.split(line) for line in block("Custom losses", "bash").splitlines()
            if line.startswith("nstjax ")]
    assert [c[:2] for c in cmds] == [["nstjax", "run"], ["nstjax", "sweep"]]
    dirs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NSTJAX_HOME", str(tmp / "home"))
        for c in cmds:
            args = [str(ROOT / a) if a.startswith("configs/") else a for a in c[1:]]
            if "--out" in args:
                i = args.index("--out") + 1
                args[i] = str(tmp / args[i])
            else:  # the sweep's default: RUNS_DIR/sweeps/<name>
                args += ["--runs-dir", str(tmp / "runs")]
            assert cli.main([*args, *TINY, "--quiet", "--no-compile-cache"]) == 0, c
        dirs["run"] = tmp / "runs" / "adain"
        dirs["sweep"] = tmp / "runs" / "sweeps" / "loss_kind"
    return dirs


def test_guide_shows_the_shipped_files():
    shipped = ["configs/plugins/adain_loss.py", "configs/examples/adain.yaml",
               "configs/sweeps/ablations/loss_kind.yaml"]
    raw = [code for lg, code in blocks("Custom losses", expand=False) if lg in ("python", "yaml")]
    assert raw == [f'--8<-- "{f}"\n' for f in shipped]
    assert block("Custom losses", "python") == (ROOT / shipped[0]).read_text()
    code = [ln for ln in block("Custom losses", "python").splitlines()
            if ln.strip() and not ln.lstrip().startswith(("#", '"""'))]
    assert len(code) <= 26  # "a custom loss in ~20 lines"


def np_stats(f):
    f = f.reshape(-1, f.shape[-1])
    mean = f.mean(0)
    return mean, np.sqrt(((f - mean) ** 2).mean(0) + 1e-5)


def test_custom_loss_run_records_every_term_against_numpy(made):
    d = made["run"]
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["loss"]["kind"] == "adain"
    assert cfg["loss"]["plugins"] == [str(ROOT / "configs/plugins/adain_loss.py")]
    rec = json.loads((d / "run.json").read_text())
    assert rec["status"] == "done" and rec["loss"]["kind"] == "adain"
    with open(d / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iter", "total", "content", "style", "tv",
                             *[f"style/{n}" for n in POST], "seconds"]
    assert [int(r["iter"]) for r in rows] == [0, 1, 2]
    # The last row against float64 numpy: the plugin's terms of last.npy.
    params, _ = weights.load("random", seed=0)
    x = np.load(d / "last.npy")
    c = image.load(cfg["content"], [32, 24])
    s = image.load(cfg["style"], [32, 24])
    fx, fc, fs = (np_vgg16(params, a, "block5_conv2") for a in (x, c, s))
    ref = {}
    for n, w in zip(POST, cfg["loss"]["style_weights"]):
        (mx, sx), (ms, ss) = np_stats(fx[n][0]), np_stats(fs[n][0])
        ref[f"style/{n}"] = w * np.sum((mx - ms) ** 2 + (sx - ss) ** 2) / np.sum(ms**2 + ss**2)
    ref["style"] = sum(ref.values())
    f, p = fx["block4_conv2"], fc["block4_conv2"]
    ref["content"] = np.sum(np.mean((f - p) ** 2, -1)) / f.size
    dy, dx = np.diff(x.astype(np.float64), axis=1), np.diff(x.astype(np.float64), axis=2)
    ref["tv"] = (np.sum(dy**2) + np.sum(dx**2)) / (24 * 32)
    ref["total"] = ref["style"] + ref["content"] / 15.0
    for k, v in ref.items():
        assert float(rows[-1][k]) == pytest.approx(v, rel=2e-3), k
        assert rec["final_loss"][k] == pytest.approx(float(rows[-1][k]), rel=1e-8)


def np_metrics(params, x, c, s) -> dict:
    """The default reference evaluation in float64: Grams per position, gatys distances."""
    fx, fc, fs = (np_vgg16(params, a, "block5_conv2") for a in (x, c, s))
    out = {}
    for n in EVAL:
        gx, gs = (f[0].reshape(-1, f.shape[-1]) for f in (fx[n], fs[n]))
        gx, gs = gx.T @ gx / gx.shape[0], gs.T @ gs / gs.shape[0]
        out[f"style.{n}"] = np.sum((gx - gs) ** 2) / (4 * gx.shape[0] ** 2)
    out["style"] = sum(out.values())
    out["content"] = 0.5 * np.sum((fx["block4_conv2"] - fc["block4_conv2"]) ** 2)
    return out


def test_metrics_of_the_saved_image_against_numpy(made):
    d = made["run"]
    rec = json.loads((d / "run.json").read_text())
    params, _ = weights.load("random", seed=0)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    x = image.load(d / "final.png")  # the saved image, quantized as saved
    c, s = image.load(cfg["content"], [32, 24]), image.load(cfg["style"], [32, 24])
    ref = np_metrics(params, x, c, s)
    assert set(ref) <= set(rec["metrics"])  # the gram keys, beside the other metrics
    assert {"structure", "edges", "weave", "color", "swd"} <= set(rec["metrics"])
    for k, v in ref.items():
        assert rec["metrics"][k] == pytest.approx(v, rel=1e-3), k


def test_metrics_snippet_gives_the_runs_metrics(made):
    code = swap(block("Metrics", "python"), {
        'weights.load("hed")': 'weights.load("random")',
        '"runs/adain/final.png"': repr(str(made["run"] / "final.png")),
        '"configs/demo/': repr(str(ROOT / "configs/demo")) + ' + "/'})
    printed = [float(v) for v in run_snippet(code).split()]
    rec = json.loads((made["run"] / "run.json").read_text())
    want = [rec["metrics"][k] for k in ("structure", "weave", "style", "style.block1_conv1")]
    assert printed == pytest.approx(want, rel=1e-5)


def test_eval_section_snippet_is_a_valid_config():
    raw = yaml.safe_load(block("Metrics", "yaml"))
    cfg = config.validate({"content": "c.png", "style": "s.png", **raw}, "README eval:")
    spec = cfg.eval.spec()
    assert spec.style_layers == tuple(f"block{i}_conv1" for i in range(1, 6))
    assert spec.normalization == "gatys" and spec.precision == "highest"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_summary_has_terms_metrics_and_seed_statistics(made):
    out = made["sweep"]
    rows = read_csv(out / "summary.csv")
    assert [(r["axis.loss.kind"], r["axis.seed"]) for r in rows] == [
        (k, str(s)) for k in ("gram", "adain") for s in (0, 1, 2)]
    assert all(r["status"] == "done" for r in rows)
    assert len({r["group"] for r in rows}) == 2  # one structure group (compilation) per kind
    assert {r["group"] for r in rows if r["axis.loss.kind"] == "gram"} != {
        r["group"] for r in rows if r["axis.loss.kind"] == "adain"}
    for r in rows:
        rec = json.loads((out / r["dir"] / "run.json").read_text())
        assert rec["loss"]["kind"] == r["axis.loss.kind"]
        for k, v in rec["metrics"].items():
            assert float(r[f"metric.{k}"]) == pytest.approx(v, rel=1e-8)
        for n in POST:
            assert float(r[f"style/{n}"]) == pytest.approx(rec["final_loss"][f"style/{n}"],
                                                           rel=1e-8)
        assert {f"metric.{n}" for n in ("style", "content")} <= set(r)
    seeds = read_csv(out / "summary_seeds.csv")
    assert [s["axis.loss.kind"] for s in seeds] == ["gram", "adain"]
    for s in seeds:
        kind = s["axis.loss.kind"]
        vals = {k: np.array([float(r[k]) for r in rows if r["axis.loss.kind"] == kind])
                for k in ("metric.style", "metric.content", "total", "style/block3_conv2")}
        assert s["seeds"] == "3"
        for k, v in vals.items():
            assert float(s[f"{k}.mean"]) == pytest.approx(v.mean(), rel=1e-7)
            assert float(s[f"{k}.std"]) == pytest.approx(v.std(ddof=1), rel=1e-6)
    for name in ("axis-loss.kind.png", "axis-seed.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert (out / "contact_sheet.png").is_file()


def test_results_snippet_reads_typed_rows(made):
    # axis columns are `axis.<key>` (an axis never shadows a loss term), as the guide reads them
    code = swap(block("Results", "python"), {
        '"runs/adain"': repr(str(made["run"])),
        '"runs/sweeps/loss_kind"': repr(str(made["sweep"]))})
    assert 'row["axis.loss.kind"]' in code
    lines = run_snippet(code).splitlines()
    rec = json.loads((made["run"] / "run.json").read_text())
    assert lines[0].split() == ["done", "adain", repr(rec["metrics"]["style"])]
    assert lines[1].split()[0] == "2"
    cells = [ln.split() for ln in lines[2:]]
    assert [(c[0], c[1], c[2]) for c in cells] == [
        (k, str(s), "done") for k in ("gram", "adain") for s in (0, 1, 2)]
    summary = read_csv(made["sweep"] / "summary.csv")
    for c, r in zip(cells, summary):
        assert float(c[3]) == pytest.approx(float(r["metric.style"]), rel=1e-8)
        assert float(c[4]) == pytest.approx(float(r["metric.content"]), rel=1e-8)


PAPERS = ROOT / "configs" / "papers"


@pytest.mark.parametrize("name", ["gatys2015_texture", "gatys2016", "li_wand2016", "heitz2021"])
def test_paper_configs_validate_with_measured_headers(name):
    p = PAPERS / f"{name}.yaml"
    head = [ln for ln in p.read_text().splitlines() if ln.startswith("#")]
    text = "\n".join(head)
    assert "# Run:" in text and "# Expected:" in text and "MEASURED" not in text, name
    assert f"nstjax run configs/papers/{name}.yaml" in text
    assert re.search(r"measured \d", text), name  # a measured time, not a guess
    cfg = config.load(p)
    # offline-capable weights (pip-fetched), each on the arch it fits
    assert (cfg.model.arch, cfg.model.weights) in {("vgg16", "hed"), ("vgg19", "imagenet_q8")}
    assert cfg.solver.name == ("adam" if cfg.loss.kind == "mrf" else "lbfgs")  # header: why
    assert all(Path(f).is_file() for f in [*cfg.styles, *([cfg.content] if cfg.content else [])])
    if "texture" in name or "heitz" in name:
        assert cfg.content is None and cfg.init == "noise"


def test_kinds_sweep_has_every_built_in_kind_on_two_pairs_with_seeds():
    from nstjax import losses, sweep

    sw = sweep.load(ROOT / "configs/sweeps/ablations/kinds_two_pairs.yaml")
    cells = sweep.expand(sw)
    assert all(c.cfg is not None for c in cells), [c.error for c in cells if c.cfg is None]
    got = {(c.cfg.loss.kind, Path(c.cfg.styles[0]).name, c.cfg.seed) for c in cells}
    kinds = {k for k in losses.kinds() if losses.kind(k).builtin}
    assert kinds == {"gram", "mean_std", "sliced_wasserstein", "mrf"}
    assert got == {(k, s, seed) for k in kinds for s in ("starry_night.jpg", "the_scream.jpg")
                   for seed in (0, 1)}
    assert {c.cfg.loss.style_norm for c in cells} == {"content"}
    assert len({c.cfg.loss.style_to_content_ratio for c in cells}) == 1


SHIPWRECK = ROOT.parent / "shared" / "images" / "shipwreck.jpg"


@pytest.mark.skipif(not SHIPWRECK.is_file(), reason="The Shipwreck is not beside the repo "
                    "(../shared/images), where the sweep file expects users to have it")
def test_kinds_frontier_sweep_spans_kinds_pairs_ratios_and_seeds():
    """Every built-in kind x 3 pairs (the demo pairs and The Shipwreck) x 5 ratios x 2 seeds,
    one structure group per kind (ratios, styles and seeds are numbers of one program), the
    balance meant at 128x96 pixels."""
    from nstjax import losses, sweep

    sw = sweep.load(ROOT / "configs/sweeps/kinds_frontier.yaml")
    cells = sweep.expand(sw)
    assert all(c.cfg is not None for c in cells), [c.error for c in cells if c.cfg is None]
    kinds = {k for k in losses.kinds() if losses.kind(k).builtin}
    got = {(c.cfg.loss.kind, Path(c.cfg.styles[0]).name, c.cfg.loss.style_to_content_ratio,
            c.cfg.seed) for c in cells}
    ratios = (4.0e5, 1.6e6, 6.4e6, 2.56e7, 1.024e8)
    assert got == {(k, s, r, seed) for k in kinds
                   for s in ("starry_night.jpg", "the_scream.jpg", "shipwreck.jpg")
                   for r in ratios for seed in (0, 1)}
    assert {c.cfg.loss.reference_pixels for c in cells} == {128 * 96}
    assert len(sweep.make_groups(sw, cells)) == 4  # one per kind (one content, one shape)
