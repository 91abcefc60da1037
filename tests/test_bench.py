"""Smoke tests of `nstjax bench` (tiny sizes, no timing assertions) and its argument checks."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from nstjax import bench, cli

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    # One precision, `highest`, whose program PyTorch's check reuses: compiles dominate (~30 s).
    argv = ["bench", "--sizes", "32x32", "--precisions", "highest", "--iters", "2",
            "--repeats", "2", "--chunk", "1", "--out", str(out), "--quiet"]
    if HAS_TORCH:
        argv += ["--compare-torch", "--torch-threads", "1"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ms/eval" in printed and "32x32" in printed and f"wrote {out}" in printed

    rep = json.loads(out.read_text())
    assert rep["schema"] == bench.SCHEMA
    for key in ("created", "versions", "platform", "device", "settings", "results", "torch"):
        assert key in rep
    assert rep["settings"]["sizes"] == ["32x32"] and rep["settings"]["iters"] == 2
    assert [r["precision"] for r in rep["results"]] == ["highest"]
    for r in rep["results"]:
        assert (r["width"], r["height"], r["pixels"]) == (32, 32, 1024)
        for key in ("compile_seconds", "ms_per_eval", "ms_per_eval_min", "evals_per_second",
                    "loss", "grad_norm", "program_bytes"):
            assert _positive(r[key]), (key, r[key])
        assert r["repeats"] == 2
        assert r["gflop_per_eval"] is None or _positive(r["gflop_per_eval"])
        assert r["peak_memory_bytes"] is None or _positive(r["peak_memory_bytes"])
        s = r["solve"]
        assert s["iterations"] == 2 and s["evaluations"] >= 2 and s["status"] == "done"
        for key in ("compile_seconds", "solve_seconds", "ms_per_eval", "ms_per_iteration",
                    "evals_per_iteration"):
            assert _positive(s[key]), (key, s[key])
        assert math.isfinite(s["final_loss"]) and s["final_loss"] < s["initial_loss"]
        assert s["host_transfer_ops"] == []  # no host round trips inside a compiled chunk
    assert cli.main(["bench", "--table", str(out), "--markdown"]) == 0
    assert "| size | precision |" in capsys.readouterr().out
    if HAS_TORCH:
        (t,) = rep["torch"]
        assert t["match"] and t["loss_rel_diff"] <= bench.MATCH_RTOL, t
        assert t["jax_highest_loss"] == rep["results"][0]["loss"]
        assert _positive(t["ms_per_eval"]) and t["solve"]["iterations"] == 2
        assert t["solve"]["final_loss"] < t["solve"]["initial_loss"]  # PyTorch's L-BFGS moves
        assert all(_positive(r["torch_speedup"]) for r in rep["results"])


@pytest.mark.parametrize(("argv", "needle"), [
    (["--sizes", "512by384"], "--sizes"),
    (["--sizes", "8x8"], "--sizes"),
    (["--precisions", "fp16"], "--precisions"),
    (["--repeats", "0"], "--repeats"),
])
def test_bench_bad_arguments(argv: list[str], needle: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", *argv, "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nstjax: error:") and needle in err
    assert not (tmp_path / "b.json").exists()


# Every numeric flag x just out of range on each side (the schema's bounds), and sizes whose
# allocation no machine has: one line naming the flag, exit 2, nothing measured or written.
_OUT_OF_RANGE = [([f"--{n.replace('_', '-')}", str(v)], f"--{n.replace('_', '-')}")
                 for n, (lo, hi) in bench.FLAG_BOUNDS.items() for v in (lo - 1, hi + 1)]


@pytest.mark.parametrize(("argv", "needle"), [
    *_OUT_OF_RANGE,
    (["--sizes", "200000x200000"], "--sizes"),
    (["--sizes", "65536x65536"], "--sizes"),
    (["--race-iters", "0"], "--race-iters"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_flags_out_of_range(argv: list[str], needle: str, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", *argv, "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("nstjax: error:") and needle in err, err
    assert not (tmp_path / "b.json").exists()


def test_bench_out_is_never_overwritten_unasked(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "b.json"
    out.write_text("mine")
    for extra in ([], ["--race", "x.yaml"]):
        assert cli.main(["bench", "--sizes", "16x16", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "exists" in err and "--force" in err and out.read_text() == "mine"


def test_compare_torch_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert cli.main(["bench", "--sizes", "32x32", "--compare-torch",
                     "--out", str(tmp_path / "b.json")]) == 2
    assert "needs PyTorch" in capsys.readouterr().err


def test_parse_sizes() -> None:
    assert bench.parse_sizes("512x384, 4k,512x384") == [(512, 384), (3840, 2160)]
    assert bench.parse_precisions("bfloat16,default") == ["bfloat16", "default"]


def test_bench_times_a_plugin_loss_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`--loss-kind` with `--loss-plugin`: the timed program is the plugin's objective."""
    plugin = Path(__file__).parents[1] / "configs" / "plugins" / "adain_loss.py"
    out = tmp_path / "bench.json"
    argv = ["bench", "--sizes", "32x32", "--precisions", "highest", "--iters", "0",
            "--repeats", "1", "--out", str(out), "--quiet", "--loss-plugin", str(plugin),
            "--loss-kind", "adain"]
    assert cli.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["loss"]["kind"] == "adain"
    (adain,) = rep["results"]
    assert cli.main([*argv[:-2], "--loss-kind", "gram", "--force"]) == 0  # replaces out
    (gram,) = json.loads(out.read_text())["results"]
    # Same images, same x0: a different objective gives a different loss.
    assert np.isfinite(adain["loss"]) and not np.isclose(adain["loss"], gram["loss"])
    assert cli.main([*argv[:-2], "--loss-kind", "nope", "--force"]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main([*argv, "--compare-torch", "--force"]) == 2
    assert "Gram loss only" in capsys.readouterr().err


def test_bench_memory_reports_the_solver_chunk(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """--memory: XLA's memory analysis of the solver chunk; its arguments hold at least the
    VGG16 kernels the loss reaches (float32, direct convolutions: as is and transposed) and the
    image, and at most those plus the L-BFGS history and the targets; --table prints a saved
    report again."""
    from nstjax import vgg16, weights

    out = tmp_path / "mem.json"
    assert cli.main(["bench", "--memory", "--sizes", "32x24", "--precisions", "default",
                     "--out", str(out), "--quiet"]) == 0
    assert "program MiB" in capsys.readouterr().out
    (r,) = json.loads(out.read_text())["memory"]
    assert (r["size"], r["precision"], r["conv"], r["solver"]) == ("32x24", "default", "direct",
                                                                  "lbfgs")
    assert r["program_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                  - r["alias_bytes"])
    params = weights.random_params(0)
    last = vgg16.NAMES.index("block5_conv2")  # the post's deepest layer
    # Each kernel twice (as is and transposed for the backward pass, `vgg16.prepare`).
    kernels = sum(4 * (2 * params[n]["kernel"].size + params[n]["bias"].size)
                  for n in vgg16.NAMES[: last + 1] if n in params)
    img = 4 * 32 * 24 * 3
    grams = 4 * sum(c * c for c in (64, 128, 256, 512, 512))
    assert kernels + img <= r["argument_bytes"] <= kernels + 30 * img + 2 * grams + 2**16
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    assert cli.main(["bench", "--table", str(out), "--markdown"]) == 0
    assert "| 32x24 | default | no |" in capsys.readouterr().out
