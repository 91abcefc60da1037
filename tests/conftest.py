"""Shared test settings and float64 numpy references (independent of nstjax's own code)."""

from __future__ import annotations

import csv
import errno
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import nstjax  # noqa: F401 - bound now, from the tree under test, before a test changes cwd

# Implicit rank promotion is an easy source of silent shape bugs. "raise" is too strict for
# nstjax: vgg16._conv adds the (c,) bias to (N, h, w, c) activations, a legitimate broadcast,
# so surface promotions as warnings instead.
jax.config.update("jax_numpy_rank_promotion", "warn")
# Extra internal consistency checks while tracing; cheap at the tiny sizes used here.
jax.config.update("jax_enable_checks", True)
# Sweeps record measured costs (nstjax.costs); the tests' go to a file of their own.
os.environ["NSTJAX_COSTS"] = str(Path(tempfile.mkdtemp(prefix="nstjax-costs-")) / "costs.json")
# One persistent compilation cache for the session, this process and the commands it starts
# (JAX reads the variables at import): the tests compile the same tiny programs many times.
# A command's own cache (NSTJAX_HOME) still takes over in a child that turns it on.
_JAX_CACHE = tempfile.mkdtemp(prefix="nstjax-test-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(autouse=True)
def _metric_registry():
    """A test's registered metrics (its own or a plugin's) never reach the next test."""
    from nstjax import metrics

    saved = dict(metrics._METRICS)
    yield
    metrics._METRICS.clear()
    metrics._METRICS.update(saved)


# --------------------------------------------------------------------------- numpy VGG16


def np_conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """3x3 stride-1 'SAME' cross-correlation (Keras/TF Conv2D) + bias, NHWC x HWIO, float64."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]), np.float64)
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("nhwc,co->nhwo", xp[:, dy : dy + h, dx : dx + w], kernel[dy, dx])
    return out + np.asarray(bias, np.float64)[None, None, None, :]


def np_pool2x2(x: np.ndarray, pooling: str) -> np.ndarray:
    """2x2 stride-2 'VALID' pooling written as loops: odd sizes drop the last row/column."""
    n, h, w, c = x.shape
    out = np.zeros((n, h // 2, w // 2, c), np.float64)
    reduce = np.max if pooling == "max" else np.mean
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i, j] = reduce(x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2], axis=(1, 2))
    return out


def np_vgg16(params: dict, x: np.ndarray, last: str, pooling: str = "avg",
             names: list[str] | None = None) -> dict:
    """All activations {name: float64 (N,h,w,c)} of the VGG16 conv stack (or of the conv layers
    `names`, in order) up to layer `last`."""
    from nstjax.vgg16 import CONVS

    h = np.asarray(x, np.float64)
    acts = {}
    prev_block = 1
    for name in names or [n for n, _, _ in CONVS]:
        blk = int(name[len("block")])
        if blk != prev_block:
            h = np_pool2x2(h, pooling)
            prev_block = blk
        h = np.maximum(np_conv3x3_same(h, params[name]["kernel"], params[name]["bias"]), 0.0)
        acts[name] = h
        if name == last:
            break
    return acts


@pytest.fixture(scope="session")
def vgg_params() -> dict:
    """Random VGG16 params with the real shapes (He-normal kernels); biases made nonzero so a
    dropped or misplaced bias shows. Device arrays, so that eager calls do not copy them."""
    from nstjax.weights import random_params

    params = random_params(0)
    rng = np.random.default_rng(123)
    for p in params.values():
        p["bias"] = (0.1 * rng.standard_normal(p["bias"].shape)).astype(np.float32)
    return jax.tree.map(jax.numpy.asarray, params)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# --------------------------------------------------------------------------- the tiny run

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
# The smallest real run: 32x32, random weights, one VGG layer, Adam. The in-process runs of the
# CLI tests use these settings, so their compiled program is shared.
TINY = {
    "content": str(DEMO / "content.png"),
    "style": str(DEMO / "style.png"),
    "image": {"size": [32, 32]},
    "model": {"weights": "random"},
    "loss": {"content_layers": ["block1_conv1"], "style_layers": ["block1_conv1"],
             "style_weights": [1.0]},
    "solver": {"name": "adam", "learning_rate": 1.0, "maxiter": 6},
    "output": {"save_every": 2},
}


def write_tiny(path: Path, **changes) -> Path:
    """TINY as YAML at `path`, with changes by key (`solver__maxiter=3`; None deletes)."""
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        *parents, last = key.split("__")
        d = raw
        for p in parents:
            d = d.setdefault(p, {})
        if value is None:
            d.pop(last, None)
        else:
            d[last] = value
    path.write_text(yaml.safe_dump(raw))
    return path


def quiet_cli(capsys, *argv: str) -> tuple[int, str]:
    """`nstjax argv --quiet --no-compile-cache` in-process: (exit status, stderr)."""
    from nstjax import cli

    code = cli.main([*argv, "--quiet", "--no-compile-cache"])
    return code, capsys.readouterr().err


def history(d: Path) -> list[dict]:
    """A run directory's history.csv as float rows."""
    with open(d / "history.csv") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def record(d: Path) -> dict:
    """A run directory's run.json."""
    return json.loads((d / "run.json").read_text())


def after_chunks(monkeypatch, n: int, action) -> None:
    """Call `action()` inside the n-th on_chunk callback of each later `solvers.minimize`."""
    from nstjax import solvers

    real = solvers.minimize

    def minimize(*a, on_chunk=None, **kw):
        count = [0]

        def wrapped(x, rows):
            count[0] += 1
            if count[0] == n:
                action()
            return on_chunk(x, rows)

        return real(*a, on_chunk=wrapped, **kw)

    monkeypatch.setattr(solvers, "minimize", minimize)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """cwd = tmp_path, caches under it, no network, and the tiny config as `ok.yaml`."""
    from nstjax import weights

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NSTJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def offline(url, timeout):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(weights, "_urlopen", offline)
    write_tiny(tmp_path / "ok.yaml")
    return tmp_path
