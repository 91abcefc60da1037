"""End to end: `nstjax run` at 32x32 with random weights writes a complete run directory."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from PIL import Image

from nstjax import cli, config, losses, problem, record, run

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def tiny_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "home"))
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump({
        "content": str(DEMO / "content.png"), "style": str(DEMO / "style.png"),
        "image": {"size": [32, 32]}, "model": {"weights": "random"},
        "solver": {"maxiter": 12}, "output": {"save_every": 5},
    }))
    return p


def _history(d: Path) -> list[dict]:
    with open(d / "history.csv") as f:
        return list(csv.DictReader(f))


def test_cli_run_writes_every_file(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "r1"
    assert cli.main(["run", str(tiny_cfg), "--out", str(out), "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.yaml", "final.png", "history.csv", "iter_000005.png",
                     "iter_000010.png", "last.npy", "run.json"]
    assert Image.open(out / "final.png").size == (32, 32)
    rows = _history(out)
    # the loss terms, each style layer's term (the post's five layers), seconds
    assert list(rows[0]) == ["iter", "total", "content", "style", "tv",
                             *(f"style/block{i}_conv2" for i in range(1, 6)), "seconds"]
    for r in rows:  # the layers' terms add up to the style term
        layers = sum(float(r[f"style/block{i}_conv2"]) for i in range(1, 6))
        assert layers == pytest.approx(float(r["style"]), rel=1e-5)
    assert [int(r["iter"]) for r in rows] == list(range(13))
    assert float(rows[-1]["total"]) < 0.5 * float(rows[0]["total"])
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "done" and rec["iterations"] == 12
    for key in ("nstjax", "jax", "jaxlib", "jaxopt", "optax"):
        assert rec["versions"][key]
    assert rec["weights"]["source"] == "random"
    assert rec["content_size"] == [32, 32]
    # `model.conv: auto` as resolved on this backend; at 32 px no layer repays Winograd
    assert rec["conv"] == ("winograd" if rec["platform"] == "cpu" else "direct")
    assert rec["winograd_layers"] == []
    assert rec["evaluations"] >= 12 and rec["compile_seconds"] >= 0 and rec["solve_seconds"] > 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["solver"]["maxiter"] == 12 and resolved["loss"]["normalization"] == "seed"
    assert resolved["model"]["conv"] == "auto"
    assert "done" in capsys.readouterr().out


def test_conv_algorithms_reach_the_same_loss(tiny_cfg, tmp_path, capsys):
    """Winograd and the direct convolution: the same problem, losses equal to float32 roundoff
    at the same images. (Trajectories are not compared: the first line search's trial steps
    amplify roundoff of 1e-7 in the gradient to percents in the iterates after one step.)"""
    final = {}
    for algo in ("direct", "winograd"):
        out = tmp_path / algo
        assert cli.main(["run", str(tiny_cfg), f"model.conv={algo}", "solver.maxiter=3",
                         "output.save_every=0", "--out", str(out), "--quiet"]) == 0
        rec = json.loads((out / "run.json").read_text())
        assert rec["conv"] == algo
        assert rec["winograd_layers"] == ([] if algo == "direct" else [  # 256+ channels
            "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2",
            "block4_conv3", "block5_conv1", "block5_conv2"])
        final[algo] = [float(r["total"]) for r in _history(out)], np.load(out / "last.npy")
    assert final["winograd"][0][0] == pytest.approx(final["direct"][0][0], rel=1e-5)
    p = problem.build(config.load(tmp_path / "direct" / "config.yaml"))
    fun = losses.objective(p.spec)
    direct = jax.jit(lambda x: fun(x, p.params, p.targets, p.weights)[0])
    for algo, (hist, x) in final.items():  # the direct loss at each run's last image
        assert hist[-1] < 0.5 * hist[0], algo
        assert float(direct(x)) == pytest.approx(hist[-1], rel=1e-5), algo


def test_run_dir_never_overwritten(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["run", str(tiny_cfg), "--out", str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    cfg = config.load(tiny_cfg, ["solver.maxiter=1"])
    dirs = {run.make_run_dir(None, cfg, tmp_path / "runs") for _ in range(3)}
    assert len(dirs) == 3


def test_seed_config_runs_scipy_scheme(tmp_path, monkeypatch):
    """The post's config, offline and tiny: scipy rounds with clipping between them."""
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "home"))
    out = tmp_path / "seed"
    code = cli.main(["run", str(CONFIGS / "runs" / "seed_keras.yaml"), "model.weights=random",
                     "image.size=[32,24]", "solver.rounds=3", "solver.maxfun=6",
                     "--out", str(out), "--quiet"])
    assert code == 0
    rows = _history(out)
    assert [int(r["iter"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["total"]) < float(rows[0]["total"])
    x = np.load(out / "last.npy")
    assert x.shape == (1, 24, 32, 3) and np.abs(x).max() <= 127.0


@pytest.mark.parametrize("solver", ["optax_lbfgs", "adam"])
def test_other_solvers_reduce_loss(tiny_cfg, tmp_path, solver):
    lr = ["solver.learning_rate=2.0"] if solver == "adam" else []  # Adam's key only
    shallow = ["loss.content_layers=[block1_conv2]", "loss.style_layers=[block1_conv1]",
               "loss.style_weights=[1]"]  # the solver is under test, not the network
    cfg = config.load(tiny_cfg, [f"solver.name={solver}", "solver.maxiter=8", *lr, *shallow])
    r = run.run(cfg, tmp_path / solver, quiet=True)
    h = r.result.history
    assert r.record["status"] == "done" and h[-1]["total"] < h[0]["total"]


def test_init_from_file_resumes_exactly(tiny_cfg, tmp_path):
    """init: a .npy in preprocessed space starts exactly where the last run ended."""
    cfg = config.load(tiny_cfg, ["solver.maxiter=3"])
    a = run.run(cfg, tmp_path / "a", quiet=True)
    cfg2 = config.load(tiny_cfg, ["solver.maxiter=0", f"init={tmp_path / 'a' / 'last.npy'}"])
    b = run.run(cfg2, tmp_path / "b", quiet=True)
    assert b.result.history[0]["total"] == pytest.approx(a.result.history[-1]["total"], rel=1e-6)


def test_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("content: a.png\nstyle: b.png\nloss:\n  style_wieghts: [1]\n")
    p = subprocess.run([sys.executable, "-m", "nstjax.cli", "run", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "loss.style_wieghts" in p.stderr and "style_weights" in p.stderr


def _strict_json(path: Path) -> dict:
    """run.json parsed as standard JSON: NaN/Infinity (not JSON) raise."""
    def bad(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=bad)


def test_sighup_is_an_interrupt(env, capsys, monkeypatch):
    """SIGHUP (terminal or ssh closed) stops the run as SIGTERM does: exit 129, status
    interrupted, final image = last.npy, solver state saved."""
    import os
    import signal

    from nstjax import image, solvers

    real = solvers.minimize

    def minimize(*a, on_chunk=None, **kw):
        def hangup(x, rows):
            os.kill(os.getpid(), signal.SIGHUP)
            return on_chunk(x, rows)

        return real(*a, on_chunk=hangup, **kw)

    monkeypatch.setattr(solvers, "minimize", minimize)
    code = cli.main(["run", "ok.yaml", "--out", "r", "--quiet", "--no-compile-cache"])
    assert code == 129, capsys.readouterr().err
    d = env / "r"
    rec = _strict_json(d / "run.json")
    assert rec["status"] == "interrupted" and rec["signal"] == signal.SIGHUP
    assert rec["iterations"] == 2 and (d / record.STATE_FILE).is_file()
    x = np.load(d / "last.npy")
    assert np.array_equal(np.asarray(Image.open(d / "final.png")), image.deprocess(x))
    assert not (d / "run.lock").exists()


def test_run_json_of_an_overflowing_run_is_standard_json(env, capsys):
    """A loss that is inf at the start: run.json has null plus the text, never bare Infinity."""
    code = cli.main(["run", "ok.yaml", "loss.style_weights=[1e38]", "--out", "r", "--quiet",
                     "--no-compile-cache"])
    assert code == 1, capsys.readouterr().err
    rec = _strict_json(env / "r" / "run.json")
    assert rec["status"] == "failed"
    assert rec["final_loss"]["total"] is None and rec["final_loss"]["total_text"] == "inf"
    assert rec["initial_loss"]["style"] is None and rec["initial_loss"]["style_text"] == "inf"


def test_cli_run_vgg19(tiny_cfg, tmp_path):
    out = tmp_path / "v19"
    assert cli.main(["run", str(tiny_cfg), "model.arch=vgg19", "loss.content_layers=[block2_conv1]",
                     "loss.style_layers=[block1_conv1, block3_conv4]",
                     "loss.style_weights=[1, 1]", "solver.maxiter=3", "output.save_every=0",
                     "--out", str(out), "--quiet"]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "done" and rec["arch"] == "vgg19"
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["arch"] == "vgg19"
    # VGG19's layer ran: its term is in the history.
    rows = _history(out)
    assert [k for k in rows[0] if k.startswith("style/")] == [
        "style/block1_conv1", "style/block3_conv4"]
    assert float(rows[-1]["total"]) < float(rows[0]["total"])
