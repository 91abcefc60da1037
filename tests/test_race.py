"""`nstjax bench --race`: time to reach the peer's loss. The pure parts always; the whole race
(PyTorch eager + scipy L-BFGS-B against an `nstjax run`) at 32x32 when PyTorch is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from nstjax import cli, race
from nstjax.errors import UserError

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_reach_takes_the_first_row_at_or_below_the_target():
    row = {"compile_seconds": 2.0,
           "trace": [(1, 0.5, 3.0, 2), (2, 1.0, 1.5, 3), (3, 1.5, 1.0, 4), (4, 2.0, 0.5, 5)]}
    assert race.reach(row, 1.0) == {"reach_iter": 3, "reach_seconds": 3.5, "reach_evals": 4}
    assert race.reach(row, 0.1)["reach_iter"] is None


def test_parse_variant():
    assert race.parse_variant("warm") == ("warm compile cache", [], True)
    assert race.parse_variant("c2f:multiscale.sizes=[64,128];solver.maxls=5") == (
        "c2f", ["multiscale.sizes=[64,128]", "solver.maxls=5"], False)
    with pytest.raises(UserError, match="--variant"):
        race.parse_variant("nolabel")


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (pip install torch)")
def test_race_against_pytorch_and_scipy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture):
    from conftest import write_tiny

    monkeypatch.chdir(tmp_path)
    cfg = write_tiny(tmp_path / "tiny.yaml")
    out = tmp_path / "race.json"
    code = cli.main(["bench", "--race", str(cfg), "--race-iters", "4", "--race-solvers", "lbfgs",
                     "--torch-threads", "1", "--out", str(out), "--quiet"])
    assert code == 0
    rep = json.loads(out.read_text())
    peer, ours = rep["rows"]
    assert peer["solver"] == "pytorch+scipy_lbfgsb" and peer["iterations"] == 4
    assert rep["target_loss"] == peer["final_loss"] < peer["initial_loss"]
    # The same loss on both sides: both start from the same image.
    assert np.isclose(ours["initial_loss"], peer["initial_loss"], rtol=1e-4)
    assert ours["solver"] == "lbfgs" and ours["iterations"] == 5  # iters + iters // 4
    assert ours["evaluations"] >= ours["iterations"]
    assert "| pytorch+scipy_lbfgsb | 4 |" in capsys.readouterr().out


def test_lanes_runs_the_sweep_once_per_lane_count(tmp_path: Path):
    from conftest import write_tiny

    base = write_tiny(tmp_path / "tiny.yaml", solver__name="lbfgs", solver__learning_rate=None,
                      solver__maxiter=2, output__save_every=None)
    sweep = tmp_path / "four.yaml"
    sweep.write_text(f"base: {base}\naxes:\n  loss.style_to_content_ratio: [1, 2, 3, 4]\n")
    rows = race.lanes(str(sweep), [], widths=(1, 4), quiet=True)
    assert [(r["lanes"], r["cells"], r["failed"]) for r in rows] == [(1, 4, 0), (4, 4, 0)]
    assert all(r["solve_seconds"] > 0 and r["process_seconds"] >= r["sweep_wall_seconds"]
               for r in rows)
    table = race.lanes_table(rows)
    assert table.splitlines()[2].startswith("| 1 | 4 |") and "| 1.00 |" in table
