"""The cost cache behind `nstjax sweep --dry-run`: round trips, nearest-layout scaling, broken
files ignored, the estimate written out from a fake cost file (measured groups from it, the rest
from the model, said per group), and what a real sweep records (its evaluation counts as
run.json has them). No timing is asserted."""

from __future__ import annotations

import json
import re

import jax
import pytest
from sweep_helpers import base_config, prepared, write_sweep
from sweep_helpers import ratio_sweep as _ratio_sweep

from nstjax import costs, record
from nstjax.sweep import plan


@pytest.fixture(scope="module")
def ratio_sweep(tmp_path_factory):
    return _ratio_sweep(tmp_path_factory)


def test_round_trip_and_nearest_layout(tmp_path):
    f = tmp_path / "costs.json"
    costs.record_batch("k", "g0", 4, 4, compile_s=7.0, warm=False, solve_s=12.0, evals=60,
                       iterations=50, cell_s=0.5, p=f)
    costs.record_batch("k", "g0", 4, 4, compile_s=2.0, warm=True, solve_s=12.0, evals=60,
                       iterations=50, cell_s=0.5, p=f)
    costs.record_batch("k", "g0", 4, 4, compile_s=0.0, warm=False, solve_s=6.0, evals=60,
                       iterations=50, cell_s=0.5, p=f)  # reused program: compiles kept
    doc = costs.load(f)
    m = costs.lookup(doc, "k", 4, 4)
    assert (m.compile_s, m.compile_warm_s, m.eval_s, m.evals_per_iter, m.cell_s) == \
        (7.0, 2.0, 0.1, 1.2, 0.5)
    assert m.compile(warm=True) == 2.0 and m.compile(warm=False) == 7.0 and m.scale == 1.0
    m8 = costs.lookup(doc, "k", 8, 8)  # another batch size: linear in the batch
    assert m8.layout == (4, 4) and m8.scale == 2.0 and m8.eval_s == pytest.approx(0.2)
    assert costs.lookup(doc, "other", 4, 4) is None
    costs.record_overhead("cpu", 3.5, p=f)
    assert costs.overhead(costs.load(f), "cpu") == 3.5
    assert costs.overhead(costs.load(f), "gpu") is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"version": 99, "programs": {}}'])
def test_broken_or_foreign_files_are_ignored(tmp_path, text):
    f = tmp_path / "costs.json"
    f.write_text(text)
    assert costs.load(f)["programs"] == {}
    costs.record_overhead("cpu", 1.0, p=f)  # and rewritten
    assert json.loads(f.read_text())["version"] == costs.VERSION


def test_program_key_ignores_maxiter_only(tmp_path):
    sw, cells, groups = prepared(write_sweep(tmp_path / "s.yaml",
                                             axes={"solver.maxiter": [30, 40]}))  # chunk 25
    key = groups[0].key
    sw2, _, groups2 = prepared(write_sweep(tmp_path / "t.yaml", axes={"model.pooling": ["max"]}))
    k1 = costs.program_key(key, "cpu", "cpu", 1)
    assert k1 == costs.program_key(groups[-1].key, "cpu", "cpu", 1) and key != groups[-1].key
    assert k1 != costs.program_key(groups2[0].key, "cpu", "cpu", 1)
    assert k1 != costs.program_key(key, "cpu", "cpu", 2)


def test_dry_run_estimates_from_a_fake_cost_file(tmp_path, monkeypatch):
    """Group avg measured (fake numbers), group max not: the estimate adds the measured
    compile (warm), batches x (maxiter x evals per iteration + 1) x eval_s, cells x cell_s,
    the overhead and the model's part for the other group, as the formula says."""
    f = tmp_path / "costs.json"
    monkeypatch.setenv("NSTJAX_COSTS", str(f))
    p = write_sweep(tmp_path / "s.yaml", axes={"loss.style_to_content_ratio": [1, 5, 15],
                                               "model.pooling": ["avg", "max"]})
    sw, cells, groups = prepared(p)
    devices = jax.local_devices()
    avg, mx = groups
    b, k, nb = plan.layout(avg, 3, devices, None, None, "cpu", share=3)
    key = costs.program_key(avg.key, "cpu", devices[0].device_kind, len(devices))
    costs.record_batch(key, avg.name, b, k, compile_s=40.0, warm=False, solve_s=500.0,
                       evals=1000, iterations=800, cell_s=2.0, p=f)
    costs.record_batch(key, avg.name, b, k, compile_s=10.0, warm=True, solve_s=500.0,
                       evals=1000, iterations=800, cell_s=2.0, p=f)
    costs.record_overhead("cpu", 6.0, p=f)
    model = plan.estimate([mx], [c for c in cells if c.key == mx.key], devices, None, None,
                          "cpu")
    text = plan.dry_run(sw, cells, groups, tmp_path / "o", devices, None, None)
    assert re.search(rf"{avg.name}: estimated from measured \d{{4}}-", text), text
    assert f"{mx.name}: estimated from model" in text
    assert "measured costs where cached, a rough model for the rest" in text
    steps = record.steps(avg.settings)  # 6 iterations of the tiny base
    solve = nb * (steps * 1000 / 800 + 1) * 0.5 + 3 * 2.0
    m = re.search(r"~(\d+) s compiling \+ ~(\d+) s solving \+ ~6 s start-up and summaries = "
                  r"~(\d+) s", text)
    assert m, text
    assert int(m[1]) == round(10.0 + model["compile_s"])  # the warm compile, the model's
    assert model["compile_s"] == plan.MODEL_COMPILE_S["cpu"]
    assert int(m[2]) == pytest.approx(solve + model["solve_s"], abs=1)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("conv", ["direct", "winograd"])
def test_model_flops_are_forward_and_input_gradient(tmp_path, conv):
    """One evaluation at 32x32 up to block3_conv1, counted by hand: 2 x 9 x H x W x Cin x Cout
    per convolution for the forward and as much again for the input gradient; under
    `model.conv: winograd` block3_conv1 (256 channels, 16 tiles) is the only Winograd layer."""
    base = base_config(model={"weights": "random", "conv": conv},
                       loss={"style_layers": ["block1_conv1", "block3_conv1"],
                             "style_weights": [0.5, 0.5]})
    _, _, groups = prepared(write_sweep(tmp_path / "s.yaml", base=base))
    wino = plan.WINOGRAD_COST if conv == "winograd" else 1.0
    layers = [(32, 3, 64, 1), (32, 64, 64, 1), (16, 64, 128, 1), (16, 128, 128, 1),
              (8, 128, 256, wino)]
    want = sum(2 * 2 * 9 * s * s * ci * co * k for s, ci, co, k in layers)
    assert plan.eval_flops(groups[0]) == pytest.approx(want, rel=1e-12)


def test_a_sweep_records_its_batches(ratio_sweep):
    """The fixture's sweep (3 cells, lanes 1: batches of 1, and lanes 3: one batch of 3) left
    both layouts in the cost file, evaluations per iteration as its cells' run.json count
    them."""
    _, cells, outs = ratio_sweep
    doc = costs.load()
    sw, _, groups = prepared(_)
    g = groups[0]
    dev = jax.local_devices()
    key = costs.program_key(g.key, dev[0].platform, dev[0].device_kind, len(dev))
    layouts = doc["programs"][key]["layouts"]
    for lanes, o in outs.items():
        b, k, _ = plan.layout(g, 3, dev, None, lanes, dev[0].platform, share=3)
        entry = layouts[f"{b},{k}"]
        evals = [json.loads((o.out / "cells" / c.name / "run.json").read_text())["evaluations"]
                 for c in cells]
        want = evals[-1] if b == 1 else max(evals)  # the last batch's (its slowest cell's)
        assert entry["evals_per_iter"] == pytest.approx(want / g.settings.maxiter)
        assert entry["eval_s"] > 0 and entry["cell_s"] >= 0
        assert "compile_s" in entry or "compile_warm_s" in entry
