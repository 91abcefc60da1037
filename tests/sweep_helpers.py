"""Shared pieces of the `nstjax sweep` tests: a tiny base config (32x32, random weights, two VGG
layers, few steps), sweep files, and one ratio sweep run once per session (its program is then
in this process's cache, so later tests on the same base compile nothing)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import yaml

from nstjax import config, sweep

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
_RATIO: dict = {}


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
    return sw, cells, sweep.make_groups(sw, cells)


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


def ratio_sweep(tmp_path_factory):
    """3 ratios run batched in-process (1 CPU device, lanes 1) and vmapped (lanes 3), once per
    session: (sweep file, cells, {lanes: Outcome}). Tests that change a sweep directory work
    on a copy (`copy_of`)."""
    if not _RATIO:
        tmp = tmp_path_factory.mktemp("ratio")
        p = write_sweep(tmp / "ratio.yaml", axes={"loss.style_to_content_ratio": [1, 5, 15]})
        sw, cells, groups = prepared(p)
        outs = {lanes: sweep.run_sweep(sw, cells, groups, tmp / f"lanes{lanes}", lanes=lanes,
                                       quiet=True) for lanes in (1, 3)}
        _RATIO["value"] = (p, cells, outs)
    return _RATIO["value"]


def copy_of(out: Path, dest: Path) -> Path:
    shutil.copytree(out, dest, symlinks=True)
    return dest


def tree(d: Path) -> dict[str, tuple[int, int]]:
    """Every file under d: relative path -> (size, mtime_ns)."""
    return {str(f.relative_to(d)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(d.rglob("*")) if f.is_file()}
