"""nstjax.record: the run-directory format and the Recorder (without a solver: rows by hand)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from nstjax import config, image, record, runtime, solvers
from nstjax.errors import UserError


def cfg(**output):
    return config.validate({**TINY, "output": {"save_every": 2, **output}})


def row(it: int, total: float, seconds: float = 0.0) -> dict:
    return {"iter": it, "total": total, "content": 1.0, "style": 2.0, "tv": 3.0,
            "seconds": seconds}


def test_json_safe_writes_null_and_the_text():
    rec = {"a": math.nan, "b": {"total": math.inf, "x": 1.5}, "c": [-math.inf, 2], "d": "s"}
    out = json.loads(record.record_json(rec), parse_constant=lambda c: pytest.fail(c))
    assert out == {"a": None, "a_text": "nan", "b": {"total": None, "total_text": "inf",
                                                      "x": 1.5}, "c": [None, 2], "d": "s"}


def test_history_round_trip(tmp_path):
    rows = [row(0, 1 / 3), row(1, 0.25, 0.5)]
    (tmp_path / "h.csv").write_text(record.history_csv(rows))
    back = record.read_history(tmp_path / "h.csv")
    assert [r["iter"] for r in back] == [0, 1] and back[0]["total"] == pytest.approx(1 / 3, 1e-8)
    assert record.read_history(tmp_path / "none.csv") == []
    (tmp_path / "bad.csv").write_text("iter,total\nx,1\n")
    with pytest.raises(UserError, match="unreadable history"):
        record.read_history(tmp_path / "bad.csv")


def test_recorder_two_stages_number_on_and_snapshot_per_stage(tmp_path):
    """Two stages as a multi-scale run makes them: rows numbered on, each stage's start row
    kept, snapshots named per stage at its own even iterations but not at its last."""
    c = cfg()
    rec = record.Recorder(tmp_path, c, {"status": "running"}, columns=("scale",
                          *record.HISTORY_COLUMNS))
    rec.start()
    x = np.zeros((1, 8, 8, 3), np.float32)
    rec.stage(total=4, prefix="scale1_", extra={"scale": 1}, keep_start=True)
    rec.first(row(0, 9.0))
    for k in (2, 4):
        rec.add(x + k, [row(k - 1, 10.0 - k, 0.1 * k), row(k, 9.0 - k, 0.1 * k)])
    rec.stage(total=2, prefix="scale2_", offset=4, base=4, seconds=0.4, extra={"scale": 2},
              keep_start=True)
    rec.first(row(0, 5.0))
    rec.add(x + 7, [row(1, 4.0, 0.1), row(2, 3.0, 0.2)])
    got = [(r["scale"], r["iter"], r["total"]) for r in rec.history]
    assert got == [(1, 0, 9.0), (1, 1, 8.0), (1, 2, 7.0), (1, 3, 6.0), (1, 4, 5.0),
                   (2, 4, 5.0), (2, 5, 4.0), (2, 6, 3.0)]
    assert rec.history[-1]["seconds"] == pytest.approx(0.6)
    assert sorted(p.name for p in tmp_path.glob("scale*")) == ["scale1_iter_000002.png"]
    np.testing.assert_array_equal(np.load(tmp_path / "last.npy"), x + 7)
    res = solvers.Result(x=x + 7, iterations=6, evals=6)
    crash = rec.close(res, 0.0, runtime.StopFlag())
    assert crash is None
    out = json.loads((tmp_path / "run.json").read_text())
    assert out["status"] == "done" and out["iterations"] == 6 and out["signal"] is None
    assert out["initial_loss"]["total"] == 9.0 and out["final_loss"]["total"] == 3.0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "final.png")), image.deprocess(x + 7))
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == \
        "scale,iter,total,content,style,tv,seconds"
    assert not (tmp_path / record.STATE_FILE).exists()


def test_close_after_a_signal_and_a_crash(tmp_path):
    c = cfg()
    rec = record.Recorder(tmp_path, c, {"status": "running"})
    rec.start()
    flag = runtime.StopFlag()
    flag.stop(15)
    x = np.ones((1, 4, 4, 3), np.float32)
    assert rec.close(solvers.Result(x=x), 0.0, flag) is None
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "interrupted"
    boom = ValueError("boom\nmore")
    assert rec.close(solvers.Result(x=x), 0.0, runtime.StopFlag(), boom) is boom
    out = json.loads((tmp_path / "run.json").read_text())
    assert out["status"] == "failed" and out["error"] == "ValueError: boom"


def test_read_record_types(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed", "evaluations": True}))
    with pytest.raises(UserError, match="'evaluations' is true, not int"):
        record.read_record(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed", "wall_seconds": 2,
                                                   "weights": None}))
    assert record.read_record(tmp_path)["wall_seconds"] == 2


def test_read_last_checks_the_header_first(tmp_path):
    p = tmp_path / "last.npy"
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 3)).astype(np.float32)
    np.save(p, x)
    np.testing.assert_array_equal(record.read_last(p, 24), x)
    with pytest.raises(UserError, match="declares"):
        record.read_last(p, 23)  # more pixels than the run may have
    p.write_bytes(p.read_bytes()[:-4])
    with pytest.raises(UserError, match="not the .* array its header declares"):
        record.read_last(p, 24)
    np.save(p, x.astype(np.float64))
    with pytest.raises(UserError, match="float64"):
        record.read_last(p, 24)


def test_history_has_every_term_column_in_order(tmp_path):
    rows = [{**row(0, 1.0), "style/b": 0.5, "style/a": 0.25, "content/z": 1.0}]
    assert record.history_columns(rows) == (
        "iter", "total", "content", "style", "tv", "content/z", "style/a", "style/b", "seconds")
    assert record.history_columns(rows, ("scale", *record.HISTORY_COLUMNS))[:2] == (
        "scale", "iter")
    text = record.history_csv(rows)
    assert text.splitlines()[0] == "iter,total,content,style,tv,content/z,style/a,style/b,seconds"
    (tmp_path / "h.csv").write_text(text)
    assert record.read_history(tmp_path / "h.csv")[0]["style/a"] == 0.25


@pytest.mark.parametrize("save,progress,maxiter,want", [
    (0, 0, 100, 25), (0, 0, 7, 7), (10, 0, 100, 10), (0, 4, 100, 4), (10, 4, 100, 2),
    (6, 9, 100, 3), (10, 10, 100, 10)])
def test_chunk_ends_at_snapshots_and_progress(save, progress, maxiter, want):
    c = config.validate({**TINY, "output": {"save_every": save, "progress_every": progress},
                         "solver": {**TINY["solver"], "maxiter": maxiter}})
    assert record.chunk_size(c) == want


def test_program_cache_key_has_the_kinds_functions(monkeypatch):
    """A kind registered again under the same name compiles anew (never a stale program)."""
    import jax.numpy as jnp

    from nstjax import losses

    compiled = []
    monkeypatch.setattr(record, "_PROGRAMS", {})
    monkeypatch.setattr(solvers, "compile_program",
                        lambda s, fun, x0, args, chunk: compiled.append(fun) or ("p", fun))

    def terms(scale):
        return lambda params, x, tgt, w, spec: {"total": scale * jnp.sum(x ** 2)}

    def targets(params, cx, sx, spec):
        return {}

    spec = losses.Spec(kind="t_reckind")
    s = solvers.Settings(name="adam")
    x0 = jnp.ones((1, 2, 2, 3))
    losses.register("t_reckind", targets=targets, terms=terms(1.0), replace=True)
    (_, f1), hit1 = record.program(spec, s, x0, ({}, {}, {}), 5)
    _, hit2 = record.program(spec, s, x0, ({}, {}, {}), 5)
    losses.register("t_reckind", targets=targets, terms=terms(3.0), replace=True)
    (_, f3), hit3 = record.program(spec, s, x0, ({}, {}, {}), 5)
    assert (hit1, hit2, hit3) == (False, True, False) and len(compiled) == 2
    assert float(f1(x0, {}, {}, {})[0]) == 12.0 and float(f3(x0, {}, {}, {})[0]) == 36.0


def test_progress_every_flushes_rows_between_snapshots(env, monkeypatch):
    """save_every 4, progress_every 2: history.csv is written every 2 iterations, snapshots
    only at 4 (a real tiny run through the CLI)."""
    from nstjax import cli

    seen = []
    real = record.Recorder.add

    def add(self, x, rows):
        out = real(self, x, rows)
        seen.append(len(record.read_history(self.d / "history.csv")))
        return out

    monkeypatch.setattr(record.Recorder, "add", add)
    assert cli.main(["run", "ok.yaml", "output.save_every=4", "output.progress_every=2",
                     "solver.maxiter=6", "--out", "r", "--quiet", "--no-compile-cache"]) == 0
    assert seen == [3, 5, 7]  # the start row, then 2 more rows per chunk
    assert sorted(p.name for p in (env / "r").glob("iter_*")) == ["iter_000004.png"]
