"""The Python API: `nstjax.stylize` (in memory, equal to `nstjax run`), lazy submodules."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nstjax
from nstjax import cli, config


def _files(root) -> dict[str, int]:
    """Every file under root but the compilation cache (home/jax): path -> size."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and not p.relative_to(root).parts[:2] == ("home", "jax")}


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("color", ["none", "luminance"])
def test_stylize_equals_cli_final_png_and_writes_nothing(env, color):
    over = [f"color.preserve={color}"]
    before = _files(env)
    r = nstjax.stylize("ok.yaml", over, quiet=True)
    assert _files(env) == before  # nothing in cwd or NSTJAX_HOME but the compile cache
    assert r.dir is None and r.record["status"] == "done" and r.record["iterations"] == 6

    assert cli.main(["run", "ok.yaml", *over, "--out", "r", "--quiet",
                     "--no-compile-cache"]) == 0
    png = np.asarray(Image.open(env / "r" / "final.png"))
    assert r.image.mode == "RGB" and r.image.size == (32, 32)
    assert np.array_equal(np.asarray(r.image), png)
    assert np.array_equal(r.array, np.load(env / "r" / "last.npy"))
    rows = _csv(env / "r" / "history.csv")
    assert r.history["iter"].tolist() == [int(x["iter"]) for x in rows] == list(range(7))
    np.testing.assert_allclose(r.history["total"], [float(x["total"]) for x in rows], rtol=1e-8)
    rec = json.loads((env / "r" / "run.json").read_text())
    assert r.record["final_loss"] == pytest.approx(rec["final_loss"], rel=1e-9)
    assert r.record["metrics"] and r.record["metrics"] == pytest.approx(rec["metrics"], rel=1e-6)
    # The colour control is applied to .image (not to .array): luminance keeps the content's
    # colours, so the image differs from the bare optimized array's rendering.
    raw = np.clip(np.rint(r.array[0, ..., ::-1] + [123.68, 116.779, 103.939]), 0, 255)
    assert np.array_equal(np.asarray(r.image), raw.astype(np.uint8)) == (color == "none")


def test_stylize_with_out_is_a_run_directory_and_reuses_the_program(env):
    cfg = config.load("ok.yaml")
    first = nstjax.stylize(cfg, ["solver.maxiter=4"], quiet=True, compile_cache=False)
    r = nstjax.stylize(cfg, ["solver.maxiter=5"], out="o", quiet=True, compile_cache=False)
    assert r.dir.resolve() == env / "o" and r.record["iterations"] == 5
    assert {"config.yaml", "run.json", "history.csv", "final.png", "last.npy"} <= {
        p.name for p in (env / "o").iterdir()}
    assert np.array_equal(np.asarray(r.image), np.asarray(Image.open(env / "o" / "final.png")))
    assert json.loads((env / "o" / "run.json").read_text())["status"] == "done"
    # maxiter is no part of the program: the second call compiled nothing
    assert first.record["iterations"] == 4 and r.record["compile_seconds"] == 0.0
    np.testing.assert_array_equal(r.history["total"][:5], first.history["total"])


def test_stylize_compile_cache_switch(env, monkeypatch):
    monkeypatch.setenv("NSTJAX_COMPILE_CACHE", "0")
    nstjax.stylize("ok.yaml", ["solver.maxiter=1"], quiet=True)
    assert not (env / "home" / "jax").exists()
    monkeypatch.delenv("NSTJAX_COMPILE_CACHE")
    nstjax.stylize("ok.yaml", ["solver.maxiter=1"], quiet=True)
    assert (env / "home" / "jax").is_dir()


def test_stylize_multiscale_writes_nothing_here(env):
    over = ["multiscale.sizes=[16]", "solver.maxiter=4", "color.preserve=luminance"]
    before = _files(env)
    r = nstjax.stylize("ok.yaml", over, quiet=True, compile_cache=False)
    assert _files(env) == before and r.dir is None
    assert r.record["status"] == "done" and len(r.record["scales"]) == 2
    assert set(r.history["scale"].tolist()) == {1, 2}
    assert cli.main(["run", "ok.yaml", *over, "--out", "m", "--quiet",
                     "--no-compile-cache"]) == 0
    assert np.array_equal(np.asarray(r.image), np.asarray(Image.open(env / "m" / "final.png")))


def test_stylize_bad_input_is_a_user_error(env):
    from nstjax.errors import UserError

    with pytest.raises(UserError, match="solver.maxiter"):
        nstjax.stylize("ok.yaml", ["solver.maxiter=-1"], quiet=True)


def test_stylize_wrong_argument_types_are_one_line_errors(env):
    from nstjax.errors import UserError

    with pytest.raises(UserError, match=r"overrides must be a list.*\['solver.maxiter=2'\]"):
        nstjax.stylize("ok.yaml", "solver.maxiter=2", quiet=True)
    with pytest.raises(UserError, match="not a dict; for a dict use nstjax.config.validate"):
        nstjax.stylize({"content": "c.png", "style": "s.png"}, quiet=True)


def test_loss_plugins_empty_override_means_none(env):
    assert config.load("ok.yaml", ["loss.plugins="]).loss.plugins == []
    assert config.validate({"content": "c.png", "style": "s.png",
                            "loss": {"plugins": None}}).loss.plugins == []


def test_minimize_batched_chunk_must_be_positive():
    import jax.numpy as jnp

    from nstjax import batch, solvers
    from nstjax.errors import UserError

    for chunk in (0, -3, 2.5, True):
        with pytest.raises(UserError, match=f"chunk must be an integer >= 1.*{chunk!r}"):
            batch.minimize_batched(solvers.Settings(name="adam", maxiter=2),
                                   lambda x, a: (jnp.sum(x * x), {}), jnp.ones((2, 3)), (),
                                   chunk=chunk)


def test_import_nstjax_is_light_and_exposes_submodules():
    code = ("import sys, nstjax, nstjax.cli; heavy = [m for m in ('jax', 'numpy', 'yaml', 'PIL')"
            " if m in sys.modules]; print(heavy); print(nstjax.solvers.DEFAULT, "
            "nstjax.stylize.__name__, nstjax.batch.minimize_batched.__name__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    heavy, names = p.stdout.strip().splitlines()
    assert heavy == "[]"
    assert names.split()[1:] == ["stylize", "minimize_batched"]
    with pytest.raises(AttributeError):
        nstjax.no_such_module  # noqa: B018
    assert set(nstjax.SUBMODULES) <= set(dir(nstjax))


# ------------------------------------------------------- the README's and the docs' examples

ROOT = Path(__file__).resolve().parents[1]


def _snippet(heading: str, page: str = "docs/guides/python-api.md") -> str:
    """The first ```python block under the heading `heading` (any level) of `page`."""
    text = "\n" + (ROOT / page).read_text()
    start = re.search(rf"\n#+ {re.escape(heading)}\n", text).start()
    return text[start:].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_in_memory_runs_example(env, capsys):
    from conftest import write_tiny

    (env / "configs").mkdir()
    write_tiny(env / "configs" / "quickstart.yaml")  # the example, on the tiny problem
    ns: dict = {}
    exec(_snippet("In-memory runs"), ns)  # noqa: S102 - the README's own code
    r, r2 = ns["r"], ns["r2"]
    assert r.history["iter"][-1] == 30 and r.record["status"] == "done"
    assert (env / "quickstart.png").is_file()
    assert r2.record["compile_seconds"] == 0.0
    assert "0.0" in capsys.readouterr().out.splitlines()[-1]


def test_readme_python_example(env, capsys):
    """README.md's Python section, run as written on the tiny problem."""
    from conftest import write_tiny

    (env / "configs").mkdir()
    write_tiny(env / "configs" / "quickstart.yaml")
    ns: dict = {}
    exec(_snippet("Python", "README.md"), ns)  # noqa: S102 - the README's own code
    r, r2 = ns["r"], ns["r2"]
    assert r.record["status"] == "done" and r.history["iter"][-1] == 50
    assert Image.open(env / "tubingen_starry.png").size == r.image.size
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["done", "50"]
    assert float(lines[0].split()[2]) == pytest.approx(r.history["total"][-1], rel=1e-6)
    scores = {k: r.record["metrics"][k] for k in ("structure", "edges", "swd")}
    assert lines[1] == str(scores) and all(np.isfinite(v) for v in scores.values())
    assert r2.record["compile_seconds"] == 0.0 and lines[2] == "0.0"
    assert r2.history["total"][-1] != r.history["total"][-1]  # the new ratio did change it


def test_readme_batched_solve_example(capsys):
    ns: dict = {}
    exec(_snippet("Batched solve", "docs/guides/research/batched.md"), ns)  # noqa: S102
    results = ns["results"]
    assert len(results) == 3 and len(capsys.readouterr().out.splitlines()) == 3
    for r, t, w in zip(results, (0.5, 1.0, 2.0), (1.0, 10.0, 100.0)):
        # reference: the real root of d/dx [w (x - t)^2 + x^4] = 4x^3 + 2w x - 2w t, float64
        roots = np.roots([4.0, 0.0, 2.0 * w, -2.0 * w * t])
        x_star = float(roots[np.abs(roots.imag) < 1e-9].real[0])
        assert r.status in ("done", "converged") and 1 <= r.iterations <= 30
        np.testing.assert_allclose(r.x, x_star, rtol=1e-4)
        assert r.history[-1]["dist"] == pytest.approx(r.x.size * (x_star - t) ** 2, rel=1e-3)
