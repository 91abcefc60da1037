"""`nstjax sweep`: ablations compiled once per structure group, batched with vmap, sharded.

A sweep file (YAML, usually in configs/sweeps/; format in `nstjax.sweep.spec` and `EPILOG`)
names a base config and the axes to vary.

Cells are grouped by structure, everything that shapes the compiled program: image shape,
layers, pooling, normalization, precision, solver settings, chunk length, weights. Cells of a
group differ only in numbers (loss weights, ratios, seeds, init), which are arguments of ONE
compiled program: the solver's `init` and `chunk` mapped over a batch of cells (x0, targets and
loss weights per cell; VGG params broadcast), the batch axis sharded over the local devices with
`shard_map`. On each device `lanes` cells run in lockstep under `jax.vmap` (L-BFGS loop and line
search included); further cells of the device's shard run one after another inside the same
program (`lax.map`). All batches of a group have one size (the last is padded), so the program
is compiled once; JAX's persistent compilation cache makes a rerun skip XLA compilation too.

Each cell writes a complete run directory under cells/ (built in the sweep's scratch space,
then renamed into place); the sweep directory gets sweep.json (which marks it as a sweep's),
summary.csv, contact_sheet.png and plots/<group>.png. A rerun skips cells whose run.json says
done/converged and whose config is unchanged; a cell whose settings changed runs into a new
directory `cells/<name>-<config hash>` and the old one is kept. A sweep writes only into a new
or empty directory or one a sweep of the same name wrote. A failed cell is recorded and the
others go on. With `jax.distributed`, each process runs a contiguous share of the cells
(ordered by group) and process 0 writes the summary.

Modules: `spec` (the file, dims, cells, names), `plan` (groups, batch layout, cost model, dry
run), `batched` (the group's compiled program, over the public `nstjax.batch`), `store` (the
directory on disk), `execute` (cells through `solvers.drive`, the host loop of single runs
too), `report` (summary, contact sheet, plots).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nstjax.sweep.execute import Outcome, init_distributed, run_sweep
from nstjax.sweep.plan import Group, dry_run, make_groups, owned
from nstjax.sweep.report import summarize
from nstjax.sweep.spec import Cell, Sweep, expand, load, parse_auto, safe_name
from nstjax.sweep.store import cell_dir

EPILOG = """\
sweep file format (YAML):

  name: ratio                       # optional (default: the file's stem)
  description: style/content ratio  # optional
  base: ../quickstart.yaml          # a config path (relative to this file) or an inline config
  set: {solver.maxiter: 50}         # fixed overrides for every cell (optional)
  pairs:                            # image pairs (optional), the first dim: content~style
    content: [photos/*.jpg]         # paths or globs, relative to this file
    style: [a.jpg, b.jpg]
    mode: cross                     # every content with every style; zip: i-th with i-th
  axes:                             # the cells are the product of the axes, in this order
    loss.style_to_content_ratio: [1, 5, 15]
    seed: [0, 1]
  zip:                              # keys that vary together (optional; a list of groups)
    - label: [deep, uniform]        # optional readable names for the zip's values
      loss.style_weights: [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
  sweep: {batch_size: auto, lanes: auto, compile_cache: true, label_metric: style}

Any config key can be an axis (dotted, as in `nstjax run` overrides). Results: <out>/cells/*
(run directories), summary.csv, contact_sheet.png, plots/. See docs/guides/sweeps.md.
"""

__all__ = ["Cell", "EPILOG", "Group", "Outcome", "Sweep", "add_arguments", "cell_dir", "dry_run",
           "expand", "load", "main", "make_groups", "owned", "run_sweep", "safe_name", "summarize"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `nstjax sweep`."""
    p.add_argument("sweep", help="sweep file (YAML), e.g. configs/sweeps/ablations/ratio.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    p.add_argument("--out", help="sweep directory (default: RUNS_DIR/sweeps/<name>); rerunning "
                   "into it resumes")
    p.add_argument("--runs-dir", default="runs", help="parent of the default sweep directory")
    p.add_argument("--dry-run", action="store_true",
                   help="print cells, groups, compilations and a time estimate; run nothing")
    p.add_argument("--summarize-only", action="store_true",
                   help="rebuild summary.csv, contact sheet and plots from the cell directories")
    p.add_argument("--batch-size", help="cells per compiled batch: auto or a number")
    p.add_argument("--lanes", help="cells per device solved in lockstep with vmap: auto or a "
                   "number (1: one after another inside the compiled program)")
    p.add_argument("--devices", type=int, help="use only the first N local devices")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--compile-cache", metavar="DIR", help="persistent compilation cache directory")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache")
    g = p.add_argument_group("several processes or hosts (jax.distributed)")
    g.add_argument("--coordinator", default=os.environ.get("NSTJAX_COORDINATOR"),
                   help="host:port of process 0 (env NSTJAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int,
                   default=_env_int("NSTJAX_NUM_PROCESSES"), help="env NSTJAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=_env_int("NSTJAX_PROCESS_ID"),
                   help="env NSTJAX_PROCESS_ID")
    g.add_argument("--distributed", action="store_true",
                   help="jax.distributed.initialize() with cluster auto-detection (SLURM, ...)")


FLAG_BOUNDS = {"devices": (1, 1 << 16), "num_processes": (1, 1 << 16),
               "process_id": (0, (1 << 16) - 1)}


def check_flags(a: argparse.Namespace) -> None:
    """Every flag with a number checked before anything runs: one line naming the flag."""
    from nstjax.errors import check_flags

    check_flags(a, FLAG_BOUNDS)
    for flag in ("batch_size", "lanes"):
        if getattr(a, flag):
            parse_auto(getattr(a, flag), f"--{flag.replace('_', '-')}")


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    try:
        return int(v) if v else None
    except ValueError:
        return None


def _cache_dir(sw: Sweep, a: argparse.Namespace) -> str | None | bool:
    if a.no_compile_cache:
        return False
    if a.compile_cache:
        return a.compile_cache
    c = sw.compile_cache
    if isinstance(c, str):
        p = Path(c).expanduser()
        return str(p if p.is_absolute() else sw.here / p)
    return None if c else False


def main(a: argparse.Namespace) -> int:
    """`nstjax sweep`: exit 0 when every cell finished, 1 if any failed, 130 if interrupted."""
    import jax

    from nstjax import costs, runtime
    from nstjax.sweep import store

    check_flags(a)
    sw = load(a.sweep, list(a.overrides))
    batch = parse_auto(a.batch_size, "--batch-size") if a.batch_size else sw.batch_size
    lanes = parse_auto(a.lanes, "--lanes") if a.lanes else sw.lanes
    cells = expand(sw)
    groups = make_groups(sw, cells)
    out = Path(a.out) if a.out else Path(a.runs_dir) / "sweeps" / sw.name
    if a.summarize_only:
        store.check_owned(out, sw)
        store.locate(out, cells)
        for p in summarize(out, sw, cells, groups):
            print(p)
        return 0
    if a.dry_run:
        from nstjax import record

        record.announce_plugins(record.plugins(c.cfg for c in cells if c.cfg is not None))
        devices = jax.local_devices()[: a.devices]
        print(dry_run(sw, cells, groups, out, devices, batch, lanes, a.num_processes or 1))
        return 0
    process, count = init_distributed(a)
    cache = _cache_dir(sw, a)
    if cache is not False:
        runtime.use_compile_cache(None if cache is None else True, cache)
    devices = jax.local_devices()[: a.devices]
    o = run_sweep(sw, cells, groups, out, devices=devices, batch=batch, lanes=lanes, quiet=a.quiet,
                  process=process, count=count)
    age = costs.process_age()
    if count == 1 and age is not None and o.batch_seconds and not o.interrupted:
        costs.record_overhead(devices[0].platform, age - o.batch_seconds)  # for --dry-run
    n_done = len(o.ran) - len(set(o.failed) & set(o.ran))
    msg = (f"sweep {sw.name}: {n_done} ran, {len(o.failed)} failed, {len(o.skipped)} finished "
           f"already; {o.compilations} compilation(s) ({o.compile_seconds:.1f} s), solve "
           f"{o.solve_seconds:.1f} s, wall {o.wall_seconds:.1f} s -> {out}/summary.csv")
    print(msg, file=sys.stderr if o.exit_code else sys.stdout)
    return o.exit_code
