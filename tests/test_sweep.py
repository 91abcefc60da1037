"""`nstjax sweep`: expansion, names, grouping, batched == one by one, sharding, resume, failures,
and the two-process split. Tiny problems: 32x32, random weights, two VGG layers, few steps."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from nstjax import cli, config, run, sweep
from nstjax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RUN_FILES = {"config.yaml", "run.json", "history.csv", "final.png", "last.npy"}


def base_config(**extra) -> dict:
    """A tiny, well-conditioned problem (init from the content image)."""
    cfg = {"content": str(DEMO / "content.png"), "style": str(DEMO / "style.png"),
           "init": "content", "image": {"size": [32, 32]}, "model": {"weights": "random"},
           "loss": {"content_layers": ["block2_conv1"],
                    "style_layers": ["block1_conv1", "block2_conv1"], "style_weights": [0.5, 0.5]},
           "solver": {"maxiter": 6}}
    return config.merge(cfg, extra)


def write_sweep(path: Path, **doc) -> Path:
    doc.setdefault("base", base_config())
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def prepared(path: Path, overrides=()):
    sw = sweep.load(path, list(overrides))
    cells = sweep.expand(sw)
    return sw, cells, sweep.plan(sw, cells)


def summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="") as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


def child_env(tmp: Path, devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["NSTJAX_HOME"] = str(tmp)
    env["PYTHONPATH"] = str(ROOT)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One NSTJAX_HOME (and persistent compilation cache) for this module's subprocesses."""
    return tmp_path_factory.mktemp("home")


# ---------------------------------------------------------------- sweep files, cells, names


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
        "solver.name": ["jaxopt_lbfgs", "scipy_lbfgsb"], "solver.maxiter": [6, 7]}))
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


def test_dry_run_prints_plan(tmp_path, capsys):
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.style_to_content_ratio": [1, 5, 15],
                                               "model.pooling": ["avg", "max"]})
    assert cli.main(["sweep", str(p), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "6 cell(s), 2 group(s)" in out and "compilations: 2" in out
    assert "ratio-5__pool-max" in out and "estimate (rough model" in out
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- running


@pytest.fixture(scope="module")
def ratio_sweep(tmp_path_factory):
    """3 ratios run batched in-process (1 CPU device, lanes 1) and vmapped (lanes 3)."""
    tmp = tmp_path_factory.mktemp("ratio")
    p = write_sweep(tmp / "ratio.yaml", axes={"loss.style_to_content_ratio": [1, 5, 15]})
    sw, cells, groups = prepared(p)
    outs = {}
    for lanes in (1, 3):
        outs[lanes] = sweep.execute(sw, cells, groups, tmp / f"lanes{lanes}", lanes=lanes,
                                    quiet=True)
    return p, cells, outs


def _final(d: Path) -> tuple[np.ndarray, dict]:
    return np.load(d / "last.npy"), json.loads((d / "run.json").read_text())


def test_batched_cells_equal_single_runs(ratio_sweep, tmp_path):
    p, cells, outs = ratio_sweep
    for o in outs.values():
        assert o.compilations == 1 and o.exit_code == 0 and sorted(o.ran) == sorted(
            c.name for c in cells)
    for c in cells:
        single = run.run(c.cfg, tmp_path / c.name, quiet=True)
        ref = np.asarray(single.result.x)
        for lanes, o in outs.items():
            d = sweep.cell_dir(o.out, c)
            assert RUN_FILES <= {f.name for f in d.iterdir()}
            x, rec = _final(d)
            assert rec["status"] == "done" and rec["iterations"] == 6
            assert rec["sweep"]["lanes"] == lanes and rec["sweep"]["group"] == "g0"
            err = np.max(np.abs(x - ref)) / np.max(np.abs(ref))
            assert err < 1e-4, (lanes, c.name, err)
            np.testing.assert_allclose(rec["final_loss"]["total"],
                                       single.record["final_loss"]["total"], rtol=1e-4)
            with open(d / "history.csv") as f:
                assert len(list(csv.DictReader(f))) == 7


def test_summary_contact_sheet_and_plots(ratio_sweep):
    from PIL import Image

    p, cells, outs = ratio_sweep
    out = outs[1].out
    rows = summary(out)
    assert list(rows) == ["ratio-1", "ratio-5", "ratio-15"]
    r = rows["ratio-5"]
    assert r["loss.style_to_content_ratio"] == "5" and r["status"] == "done"
    assert r["group"] == "g0" and int(r["iterations"]) == 6 and int(r["evaluations"]) >= 6
    assert float(r["total"]) > 0 and float(r["solve_seconds"]) > 0
    compile_s = [float(rows[c]["compile_seconds"]) for c in rows]
    assert compile_s[0] > 0 and compile_s[1:] == [0, 0]  # one compilation, reused
    assert Image.open(out / "contact_sheet.png").size[0] > 3 * 100
    assert Image.open(out / "plots" / "g0.png").size[0] > 300
    plan = json.loads((out / "sweep.json").read_text())
    assert [g["name"] for g in plan["groups"]] == ["g0"] and len(plan["cells"]) == 3


def test_rerun_skips_finished_and_reruns_failed_or_changed(ratio_sweep):
    p, cells, outs = ratio_sweep
    out = outs[1].out
    d1, d5 = (sweep.cell_dir(out, c) for c in cells[:2])
    rec = json.loads((d1 / "run.json").read_text())
    rec["status"] = "failed"
    (d1 / "run.json").write_text(json.dumps(rec))  # a failed cell reruns
    (d5 / "run.json").unlink()  # an unfinished one too
    stale = out / "cells" / ".ratio-15.tmp-99999"  # left by a killed run
    stale.mkdir()
    before = (sweep.cell_dir(out, cells[2]) / "run.json").read_text()
    sw, cells2, groups = prepared(p)
    o = sweep.execute(sw, cells2, groups, out, lanes=1, quiet=True)
    assert sorted(o.ran) == ["ratio-1", "ratio-5"] and o.skipped == ["ratio-15"]
    assert o.compilations == 0  # the program of this process is reused
    assert (sweep.cell_dir(out, cells[2]) / "run.json").read_text() == before
    assert not stale.exists()
    assert {r["status"] for r in summary(out).values()} == {"done"}
    # A changed config (here: more iterations) is not "finished": every cell reruns.
    sw, cells3, groups = prepared(p, ["solver.maxiter=7"])
    assert sweep.dry_run(sw, cells3, groups, out, sweep_devices(), None, None).count(
        "(to run)") == 3


def sweep_devices():
    import jax

    return jax.local_devices()


def test_failing_cells_do_not_stop_the_others(tmp_path, capsys):
    p = write_sweep(tmp_path / "f.yaml",
                    base=base_config(solver={"name": "adam", "maxiter": 4, "learning_rate": 1}),
                    axes={"loss.tv_weight": [0, 1.0e38],
                          "style": [str(DEMO / "style.png"), str(tmp_path / "missing.png")]})
    out = tmp_path / "out"
    assert cli.main(["sweep", str(p), "--out", str(out), "--quiet", "--no-compile-cache"]) == 1
    rows = summary(out)
    ok, inf = rows["tv-0__style-style"], rows["tv-1e38__style-style"]
    assert ok["status"] == "done" and float(ok["total"]) > 0
    assert inf["status"] == "failed" and "non-finite" in inf["error"]
    for name in ("tv-0__style-missing", "tv-1e38__style-missing"):
        assert rows[name]["status"] == "failed" and "missing.png" in rows[name]["error"]
        rec = json.loads((out / "cells" / name / "run.json").read_text())
        assert rec["status"] == "failed" and (out / "cells" / name / "config.yaml").is_file()
    assert "1 ran" in capsys.readouterr().err


# ---------------------------------------------------------------- several devices and processes


SCRIPT = """
import json, sys, numpy as np
from pathlib import Path
from nstjax import sweep
sw = sweep.load(sys.argv[1]); cells = sweep.expand(sw); groups = sweep.plan(sw, cells)
import jax
o = sweep.execute(sw, cells, groups, sys.argv[2], lanes=1, quiet=True)
rec = json.loads((sweep.cell_dir(o.out, cells[0]) / "run.json").read_text())
print(json.dumps({"devices": len(jax.local_devices()), "compilations": o.compilations,
                  "batch": rec["sweep"]["batch_size"], "ran": sorted(o.ran)}))
"""


def test_sharded_equals_unsharded(ratio_sweep, tmp_path, home):
    p, cells, outs = ratio_sweep
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(p), str(tmp_path / "s4")],
                       capture_output=True, text=True, env=child_env(home, 4), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["devices"] == 4 and info["batch"] == 4 and info["compilations"] == 1
    for c in cells:
        a, rec = _final(tmp_path / "s4" / "cells" / c.name)
        b, _ = _final(sweep.cell_dir(outs[1].out, c))
        assert rec["sweep"]["devices"] == 4
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_cells(tmp_path, home):
    p = write_sweep(tmp_path / "mp.yaml",
                    base=base_config(solver={"name": "adam", "maxiter": 3, "learning_rate": 1}),
                    axes={"model.pooling": ["avg", "max"], "loss.style_to_content_ratio": [1, 5]})
    out = tmp_path / "out"
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nstjax.cli", "sweep", str(p), "--out", str(out), "--quiet",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(home))
        for i in range(2)]
    results = [pr.communicate(timeout=600) for pr in procs]
    for pr, (_, se) in zip(procs, results):
        assert pr.returncode == 0, se[-3000:]
    by_process: dict[int, list[str]] = {0: [], 1: []}
    for d in (out / "cells").iterdir():
        assert not d.name.startswith(".")
        rec = json.loads((d / "run.json").read_text())
        assert rec["status"] == "done"
        by_process[rec["sweep"]["process"]].append(d.name)
    assert sorted(by_process[0] + by_process[1]) == sorted(summary(out))
    assert len(by_process[0]) == len(by_process[1]) == 2
    assert {summary(out)[n]["group"] for n in by_process[0]} != {
        summary(out)[n]["group"] for n in by_process[1]}  # contiguous: one group each
    assert {r["status"] for r in summary(out).values()} == {"done"}


def test_resume_after_a_killed_sweep(tmp_path, home):
    p = write_sweep(tmp_path / "k.yaml",
                    base=base_config(solver={"name": "adam", "maxiter": 300,
                                             "learning_rate": 1}),
                    axes={"loss.style_to_content_ratio": [1, 2, 3, 4, 5]},
                    sweep={"batch_size": 1})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nstjax.cli", "sweep", str(p), "--out", str(out), "--quiet"]
    pr = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=child_env(home))
    first = out / "cells" / "ratio-1"
    deadline = time.monotonic() + 600
    while not first.exists() and pr.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    pr.send_signal(signal.SIGKILL)
    pr.communicate()
    done = sorted(d.name for d in (out / "cells").iterdir() if not d.name.startswith("."))
    assert "ratio-1" in done and len(done) < 5, done
    started = json.loads((first / "run.json").read_text())["started"]
    mtime = (first / "run.json").stat().st_mtime_ns
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(home), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done)} finished already" in r.stdout
    assert (first / "run.json").stat().st_mtime_ns == mtime  # not rerun
    assert json.loads((first / "run.json").read_text())["started"] == started
    assert sorted(os.listdir(out / "cells")) == [f"ratio-{i}" for i in range(1, 6)]
    assert {r["status"] for r in summary(out).values()} == {"done"}


@pytest.mark.parametrize("name, cells, groups", [
    ("ratio", 8, 1), ("pooling", 2, 2), ("content_layer", 2, 2), ("style_weights", 6, 1)])
def test_shipped_sweeps_plan(name, cells, groups):
    sw, c, g = prepared(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    assert (len(c), len(g)) == (cells, groups)
    assert all(x.cfg is not None and x.cfg.model.weights == "hed" for x in c)
