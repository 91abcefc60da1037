"""Running sweeps: reruns (finished cells skipped, failed or unfinished ones rerun), failing cells,
two processes, resume after SIGKILL, and data safety: nothing the sweep did not write, and no
finished cell, is ever changed or removed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from sweep_helpers import (
    DEMO,
    base_config,
    child_env,
    copy_of,
    prepared,
    summary,
    tree,
    write_sweep,
)
from sweep_helpers import ratio_sweep as _ratio_sweep

from nstjax import cli, sweep


@pytest.fixture(scope="module")
def ratio_sweep(tmp_path_factory):
    return _ratio_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One NSTJAX_HOME (and persistent compilation cache) for this module's subprocesses."""
    return tmp_path_factory.mktemp("home")


def test_rerun_skips_finished_and_reruns_failed_or_changed(ratio_sweep, tmp_path):
    p, cells, outs = ratio_sweep
    out = copy_of(outs[1].out, tmp_path / "out")
    d1, d5 = (sweep.cell_dir(out, c) for c in cells[:2])
    rec = json.loads((d1 / "run.json").read_text())
    rec["status"] = "failed"
    (d1 / "run.json").write_text(json.dumps(rec))  # a failed cell reruns
    (d5 / "run.json").unlink()  # an unfinished one too
    stale = out / ".partial" / "ratio-15.tmp-99999"  # left by a killed run
    stale.mkdir()
    (stale / "last.npy").write_bytes(b"x")
    users = out / "cells" / ".ratio-15.tmp-99999"  # not the sweep's: kept
    users.mkdir()
    carried = out / ".partial" / "ratio-15.old-99998"  # died carrying a user's file: kept
    carried.mkdir()
    (carried / "notes.txt").write_text("mine")
    before = (sweep.cell_dir(out, cells[2]) / "run.json").read_text()
    sw, cells2, groups = prepared(p)
    o = sweep.run_sweep(sw, cells2, groups, out, lanes=1, quiet=True)
    assert sorted(o.ran) == ["ratio-1", "ratio-5"] and o.skipped == ["ratio-15"]
    assert o.compilations == 0  # the program of this process is reused
    assert (sweep.cell_dir(out, cells[2]) / "run.json").read_text() == before
    assert not stale.exists() and users.is_dir()
    assert (carried / "notes.txt").read_text() == "mine"
    assert {r["status"] for r in summary(out).values()} == {"done"}
    # A changed config (here: more iterations) is not "finished": every cell runs, into a new
    # directory, since the old ones hold other settings.
    sw, cells3, groups = prepared(p, ["solver.maxiter=7"])
    text = sweep.dry_run(sw, cells3, groups, out, jax.local_devices(), None, None)
    assert text.count("(to run in cells/ratio-") == 3
    assert "has other settings: solver.maxiter" in text


def test_changed_settings_keep_finished_cells_and_user_files(ratio_sweep, tmp_path, capsys):
    p, cells, outs = ratio_sweep
    out = copy_of(outs[1].out, tmp_path / "out")
    (out / "cells" / "ratio-1" / "notes.txt").write_text("mine")
    (out / "mine.txt").write_text("mine")
    before = tree(out / "cells")
    args = ["sweep", str(p), "--out", str(out), "--quiet", "--no-compile-cache"]
    assert cli.main([*args, "loss.tv_weight=0.5"]) == 0
    assert "0 finished already" in capsys.readouterr().out
    assert {k: v for k, v in tree(out / "cells").items() if k in before} == before
    assert (out / "mine.txt").read_text() == "mine"
    rows = summary(out)
    for c in cells:
        d = out / rows[c.name]["dir"]
        assert d.name.startswith(f"{c.name}-") and d.parent == out / "cells"
        rec = json.loads((d / "run.json").read_text())
        assert rec["status"] == "done" and rec["sweep"]["dir"] == d.name
        assert "tv_weight: 0.5" in (d / "config.yaml").read_text()
    # Back to the first settings: the original cells are found again, nothing reruns.
    after = tree(out / "cells")
    assert cli.main(args) == 0
    assert "3 finished already" in capsys.readouterr().out
    assert tree(out / "cells") == after
    assert [summary(out)[c.name]["dir"] for c in cells] == [f"cells/{c.name}" for c in cells]


def test_unreadable_run_json_reruns_with_a_warning(ratio_sweep, tmp_path, capsys):
    p, cells, outs = ratio_sweep
    out = copy_of(outs[1].out, tmp_path / "out")
    d = out / "cells" / "ratio-5"
    (d / "run.json").write_text("[]")
    (d / "notes.txt").write_text("mine")
    (out / "cells" / "ratio-15" / "run.json").write_text("{garbage")
    assert cli.main(["sweep", str(p), "--out", str(out), "--no-compile-cache"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"nstjax: warning: {d / 'run.json'}: not a run record; the cell runs again" in err
    assert json.loads((d / "run.json").read_text())["status"] == "done"
    assert (d / "notes.txt").read_text() == "mine"  # carried into the rerun's directory
    assert {r["status"] for r in summary(out).values()} == {"done"}


def test_a_sweep_writes_only_into_its_own_directory(tmp_path, capsys):
    p = write_sweep(tmp_path / "s.yaml", axes={"seed": [0, 1]})
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.csv").write_text("mine")
    (foreign / "sweep.json").write_text('{"mine": true}')
    before = tree(foreign)
    for extra in ([], ["--summarize-only"]):
        assert cli.main(["sweep", str(p), "--out", str(foreign), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not a sweep directory" in err, err
        assert tree(foreign) == before and sorted(os.listdir(foreign)) == ["summary.csv",
                                                                           "sweep.json"]
    # Another sweep's directory is refused too (by name), as is a missing one.
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json").write_text(json.dumps({"format": "nstjax-sweep/1", "name": "x"}))
    assert cli.main(["sweep", str(p), "--out", str(other), "--summarize-only"]) == 2
    assert "holds the sweep 'x', not 's'" in capsys.readouterr().err
    assert cli.main(["sweep", str(p), "--out", str(tmp_path / "nope"), "--summarize-only"]) == 2
    assert not (tmp_path / "nope").exists()


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
        assert "waiting for the other processes failed" not in se, se[-3000:]  # the barrier
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


@pytest.mark.parametrize("sig, code", [(signal.SIGHUP, 129)])
def test_a_signal_stops_the_sweep_with_complete_cells(tmp_path, home, sig, code):
    """SIGHUP (a closed terminal) stops like SIGTERM: after the current chunk, every cell of
    the batch written as interrupted (final image, last.npy, signal), the summary written."""
    p = write_sweep(tmp_path / "h.yaml",
                    base=base_config(solver={"name": "adam", "maxiter": 100000,
                                             "learning_rate": 1}),
                    axes={"loss.style_to_content_ratio": [1, 2]})
    out = tmp_path / "out"
    pr = subprocess.Popen([sys.executable, "-m", "nstjax.cli", "sweep", str(p), "--out",
                           str(out), "--quiet", "--batch-size", "2"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=child_env(home))
    deadline = time.monotonic() + 600
    while pr.poll() is None and time.monotonic() < deadline:
        hist = list((out / ".partial").glob("ratio-1.tmp-*/history.csv"))
        if hist and len(hist[0].read_text().splitlines()) > 2:
            break
        time.sleep(0.05)
    pr.send_signal(sig)
    _, err = pr.communicate(timeout=600)
    assert pr.returncode == code, err[-3000:]
    assert "Traceback" not in err
    for name in ("ratio-1", "ratio-2"):
        d = out / "cells" / name
        rec = json.loads((d / "run.json").read_text())
        assert rec["status"] == "interrupted" and rec["signal"] == sig
        assert 0 < rec["iterations"] < 100000 and (d / "final.png").is_file()
        assert (d / "last.npy").is_file()
    assert {r["status"] for r in summary(out).values()} == {"interrupted"}
    assert not [d for d in (out / ".partial").iterdir() if d.name.startswith("ratio-")]


def test_host_cells_run_as_nstjax_run_and_keep_user_files(tmp_path, capsys):
    """A host-side solver's cells run one by one through `run.run`; rerunning a failed one
    replaces its directory but keeps the files a user added to it."""
    base = base_config(image={"size": [32, 24]},
                       solver={"name": "scipy_lbfgsb", "rounds": 2, "maxfun": 3})
    del base["solver"]["maxiter"]  # scipy_lbfgsb counts rounds; a set maxiter is refused
    p = write_sweep(tmp_path / "h.yaml", base=base, axes={"loss.style_to_content_ratio": [1, 5]})
    out = tmp_path / "out"
    args = ["sweep", str(p), "--out", str(out), "--quiet", "--no-compile-cache"]
    assert cli.main(args) == 0
    d = out / "cells" / "ratio-1"
    rec = json.loads((d / "run.json").read_text())
    assert rec["status"] == "done" and rec["sweep"]["batch"] == "1/1" and rec["iterations"] > 0
    assert (d / "final.png").is_file() and not (d / "run.lock").exists()
    rec["status"] = "failed"
    (d / "run.json").write_text(json.dumps(rec))
    (d / "notes.txt").write_text("mine")
    kept = tree(out / "cells" / "ratio-5")
    assert cli.main(args) == 0
    assert "1 ran, 0 failed, 1 finished already" in capsys.readouterr().out
    assert json.loads((d / "run.json").read_text())["status"] == "done"
    assert (d / "notes.txt").read_text() == "mine"
    assert tree(out / "cells" / "ratio-5") == kept


@pytest.mark.parametrize("order", ["plugin-first", "plugin-last"])
def test_cells_see_only_their_own_loss_plugins(tmp_path, order):
    """A cell whose config lacks the plugin of its loss.kind fails (unknown kind) whether or
    not another cell of the sweep imported that plugin before it; the other cell runs."""
    plug = str(DEMO.parent / "plugins" / "centered_gram.py")
    plugins = [[plug], []] if order == "plugin-first" else [[], [plug]]
    p = write_sweep(tmp_path / "plug.yaml", set={"solver.maxiter": 2},
                    zip=[{"label": ["a", "b"], "loss.kind": ["centered_gram"] * 2,
                          "loss.plugins": plugins}])
    sw, cells, groups = prepared(p)
    with_plugin = {c.name: bool(c.raw["loss"]["plugins"]) for c in cells}
    o = sweep.run_sweep(sw, cells, groups, tmp_path / "out", lanes=1, quiet=True)
    rows = summary(tmp_path / "out")
    for name, has in with_plugin.items():
        assert rows[name]["status"] == ("done" if has else "failed"), (order, rows[name])
    bad = next(c for c in cells if not with_plugin[c.name])
    err = json.loads((sweep.cell_dir(tmp_path / "out", bad) / "run.json").read_text())["error"]
    assert "loss.kind" in err and "centered_gram" in err
    assert o.failed == [bad.name]


@pytest.mark.parametrize("order", ["plugin-first", "plugin-last"])
def test_cells_see_only_their_own_metric_plugins(tmp_path, order):
    """eval.plugins are per cell like loss.plugins: a cell naming a metric its config does not
    import is refused in either order, and two cells whose plugins register the same metric
    name each score with their own plugin's function."""
    one = tmp_path / "one.py"
    two = tmp_path / "two.py"
    for f, v in ((one, 1.0), (two, 2.0)):
        f.write_text("from nstjax import metrics\n"
                     f"metrics.register('mine', lambda inp: {v}, replace=True)\n")
    plugins = [[str(one)], []] if order == "plugin-first" else [[], [str(one)]]
    p = write_sweep(tmp_path / "m.yaml", set={"eval.metrics": ["mine"]},
                    zip=[{"label": ["a", "b"], "eval.plugins": plugins}])
    cells = sweep.expand(sweep.load(p))
    for c in cells:
        if c.raw["eval"]["plugins"]:
            assert c.cfg is not None and not c.error
        else:
            assert c.cfg is None and "eval.metrics: unknown metric 'mine'" in c.error

    p = write_sweep(tmp_path / "n.yaml", set={"solver.maxiter": 2, "eval.metrics": ["mine"]},
                    zip=[{"label": ["a", "b"], "eval.plugins": [[str(one)], [str(two)]]}])
    sw, cells, groups = prepared(p)
    sweep.run_sweep(sw, cells, groups, tmp_path / "out", lanes=1, quiet=True)
    got = {c.name: json.loads((sweep.cell_dir(tmp_path / "out", c) / "run.json").read_text())
           ["metrics"] for c in cells}
    assert got == {"plugins-a": {"mine": 1.0}, "plugins-b": {"mine": 2.0}}


def test_report_page_is_rewritten_after_each_group(tmp_path, monkeypatch):
    """report.html and summary.csv are current after every group, not only at the end: after
    the first of two groups its cells show their status and the second group's are pending.
    The groups' solving is replaced by failing their cells (no compilation needed)."""
    import nstjax.sweep.execute as execute
    import nstjax.sweep.report as sweep_report

    p = write_sweep(tmp_path / "two.yaml", axes={"image.size": [[32, 32], [32, 24]],
                                                 "seed": [0, 1]})
    sw, cells, groups = prepared(p)
    assert len(groups) == 2
    out = tmp_path / "out"

    def fake_group(self, g, todo, share=None):
        for c in todo:
            self.write_failed(c, f"not run in {g.name}", g)

    pages: list[tuple[str, dict]] = []

    def spy(out_dir, sw_, cells_):
        real(out_dir, sw_, cells_)
        pages.append(((out_dir / "report.html").read_text(), summary(out_dir)))

    real = sweep_report.progress
    monkeypatch.setattr(execute.Runner, "run_group", fake_group)
    monkeypatch.setattr(sweep_report, "progress", spy)
    sweep.run_sweep(sw, cells, groups, out, quiet=True)
    assert len(pages) == 2
    first, second = pages
    g0 = {c.name for c in groups[0].cells}
    for c in cells:
        row = re.search(rf'<tr id="cell-{c.name}">.*?</tr>', first[0]).group(0)
        want = "failed" if c.name in g0 else "pending"
        assert f'class="t s-{want}"' in row, (c.name, row)
        assert first[1][c.name]["status"] == want
        assert second[1][c.name]["status"] == "failed"
    assert not [f for f in out.iterdir() if f.name.startswith(".report.html")]


def test_a_sweep_over_the_backbone(tmp_path, capsys):
    # A style layer past block3: VGG19's network differs there (block3_conv4 comes first).
    base = base_config(solver={"maxiter": 2}, loss={
        "style_layers": ["block1_conv1", "block4_conv1"], "style_weights": [0.5, 0.5]})
    p = write_sweep(tmp_path / "arch.yaml", base=base, axes={"model.arch": ["vgg16", "vgg19"]})
    out = tmp_path / "out"
    assert cli.main(["sweep", str(p), "--out", str(out), "--quiet"]) == 0
    assert "2 compilation(s)" in capsys.readouterr().out  # one program per arch
    rows = summary(out)
    assert sorted(rows) == ["arch-vgg16", "arch-vgg19"], sorted(rows)
    for name, row in rows.items():
        assert row["status"] == "done"
        rec = json.loads((out / "cells" / name / "run.json").read_text())
        assert rec["arch"] == name.removeprefix("arch-")
    assert rows["arch-vgg16"]["total"] != rows["arch-vgg19"]["total"]
