"""The compiled group program: batched cells (lanes 1 and 3) equal single `nstjax run` runs, and
sharded over 4 CPU devices equals unsharded."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sweep_helpers import child_env
from sweep_helpers import ratio_sweep as _ratio_sweep

from nstjax import run, sweep

RUN_FILES = {"config.yaml", "run.json", "history.csv", "final.png", "last.npy"}


@pytest.fixture(scope="module")
def ratio_sweep(tmp_path_factory):
    return _ratio_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One NSTJAX_HOME (and persistent compilation cache) for this module's subprocesses."""
    return tmp_path_factory.mktemp("home")


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
            # lbfgs (the default): a chunk step is one evaluation, yet each cell makes exactly
            # maxiter iterations, however many evaluations its line searches take
            assert rec["solver"] == "lbfgs"
            assert rec["status"] == "done" and rec["iterations"] == 6
            assert rec["evaluations"] == single.record["evaluations"] > 6
            assert rec["sweep"]["lanes"] == lanes and rec["sweep"]["group"] == "g0"
            err = np.max(np.abs(x - ref)) / np.max(np.abs(ref))
            assert err < 1e-4, (lanes, c.name, err)
            np.testing.assert_allclose(rec["final_loss"]["total"],
                                       single.record["final_loss"]["total"], rtol=1e-4)
            with open(d / "history.csv") as f:
                assert len(list(csv.DictReader(f))) == 7


SCRIPT = """
import json, sys, numpy as np
from pathlib import Path
from nstjax import sweep
sw = sweep.load(sys.argv[1]); cells = sweep.expand(sw); groups = sweep.make_groups(sw, cells)
import jax
o = sweep.run_sweep(sw, cells, groups, sys.argv[2], lanes=1, quiet=True)
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


def test_lbfgs_cells_keep_their_own_iteration_count_and_snapshots(tmp_path):
    """lbfgs in lockstep: cells needing different numbers of evaluations each make exactly
    maxiter iterations, with snapshots at the save_every multiples, as single runs do; each
    chunk's rows get seconds placed by the cell's evaluations (not all the chunk's end)."""
    from PIL import Image
    from sweep_helpers import prepared, write_sweep

    p = write_sweep(tmp_path / "snap.yaml", axes={"loss.style_to_content_ratio": [1, 30]},
                    set={"output.save_every": 3, "solver.maxiter": 7})
    sw, cells, groups = prepared(p)
    o = sweep.run_sweep(sw, cells, groups, tmp_path / "out", lanes=2, quiet=True)
    assert o.exit_code == 0 and o.compilations == 1
    evals = set()
    for c in cells:
        d = sweep.cell_dir(o.out, c)
        x, rec = _final(d)
        assert rec["sweep"]["lanes"] == 2 and rec["solver"] == "lbfgs"
        assert rec["status"] == "done" and rec["iterations"] == 7
        evals.add(rec["evaluations"])
        assert sorted(f.name for f in d.glob("iter_*")) == ["iter_000003.png", "iter_000006.png"]
        with open(d / "history.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["iter"]) for r in rows] == list(range(8))
        secs = [float(r["seconds"]) for r in rows]
        assert secs == sorted(secs) and len(set(secs)) == len(secs)
        single = run.run(c.cfg, tmp_path / c.name, quiet=True)
        assert single.record["evaluations"] == rec["evaluations"]
        for name in ("iter_000003.png", "iter_000006.png", "final.png"):
            a = np.asarray(Image.open(d / name), np.int16)
            b = np.asarray(Image.open(tmp_path / c.name / name), np.int16)
            assert np.abs(a - b).max() <= 1, name
    assert len(evals) == 2  # the two cells did need different numbers of evaluations
