"""Coarse-to-fine runs: solve at each scale; the upsampled result is the next scale's x0.

Sizes come from `multiscale.sizes` (longer sides) or `factor` and `steps`; the last scale is
`image.size`. The solver restarts at each scale (L-BFGS history is tied to the image's shape).
One run directory: `scale{i}_final.*` for the coarser scales, `final.*`, snapshots
`scale{i}_iter_*`, history.csv with a `scale` column and iterations numbered on across scales
(each scale's first row is its start), run.json with a `scales` list. If a scale fails or the
run is interrupted, no finer scale runs and final.* is that scale's.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import record, solvers, watch, weights
from nstjax.config import Config, MultiscaleCfg
from nstjax.errors import UserError
from nstjax.problem import Problem, build, check_depth, load_content
from nstjax.runtime import DirLock, StopFlag
from nstjax.solvers import Status

COLUMNS = ("scale", *record.HISTORY_COLUMNS)


def scale_sizes(cfg: Config, final_wh: tuple[int, int]) -> list[tuple[int, int]]:
    """(W, H) of every scale, coarse to fine; the last is the final size (from image.size)."""
    ms = cfg.multiscale
    w, h = final_wh
    side = max(w, h)
    if ms.sizes is not None:
        longs = [float(s) for s in ms.sizes]
        if longs[-1] >= side:
            raise UserError(f"multiscale.sizes: {ms.sizes[-1]} is not below the final size {side}"
                            " (image.size is always the last scale): list only coarser sizes")
    else:
        longs = [side / ms.factor**k for k in range(ms.steps - 1, 0, -1)]
    sizes = [(max(1, round(w * s / side)), max(1, round(h * s / side))) for s in longs]
    sizes.append((w, h))
    for a, b in zip(sizes, sizes[1:]):
        if a == b:
            raise UserError(f"multiscale: two scales are both {a[0]}x{a[1]}; use a larger "
                            "multiscale.factor or fewer steps")
    check_depth(sizes[0], cfg.loss.content_layers + cfg.loss.style_layers,
                "multiscale: the coarsest scale is",
                "use larger multiscale.sizes, or a smaller factor or fewer steps")
    return sizes


def scale_iters(cfg: Config, n: int) -> list[int]:
    """Iterations (rounds for scipy_lbfgsb) per scale: multiscale.maxiter, or the solver's
    budget split evenly with the remainder going to the finest scales."""
    m = cfg.multiscale.maxiter
    if isinstance(m, list):
        return list(m)
    if m is not None:
        return [m] * n
    base, extra = divmod(record.steps(cfg.solver.settings()), n)
    return [base] * (n - extra) + [base + 1] * extra


def scale_config(cfg: Config, wh: tuple[int, int], iters: int) -> Config:
    """The single-scale config of one scale: image.size [W, H], its iterations, no multiscale."""
    key = "rounds" if cfg.solver.name == "scipy_lbfgsb" else "maxiter"
    return cfg.model_copy(update={
        "image": cfg.image.model_copy(update={"size": [wh[0], wh[1]]}),
        "solver": cfg.solver.model_copy(update={key: iters}),
        "multiscale": MultiscaleCfg(),
    })


def upsample(x: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a preprocessed (1, h, w, 3) image to (1, H, W, 3), in float."""
    return np.asarray(jax.image.resize(jnp.asarray(x), (1, wh[1], wh[0], 3), "bicubic"))


def run_multiscale(cfg: Config, d_out: Callable[[], Path | None], *, quiet: bool = False,
                   compile_fn: Callable = record.program,
                   recorder: type[record.Recorder] = record.Recorder,
                   on_progress: Callable | None = None,
                   ) -> tuple[Path | None, solvers.Result, record.Recorder]:
    """Solve `cfg` coarse to fine into the directory `d_out()` makes (called once the first
    scale is built; None with an in-memory `recorder`, which then takes no lock); returns
    (directory, result over all scales, the recorder: its record is run.json's).
    `on_progress`: as `run.stylize`'s."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    final = load_content(cfg)
    sizes = scale_sizes(cfg, (final.shape[2], final.shape[1]))
    iters = scale_iters(cfg, len(sizes))
    params, winfo = weights.load(cfg.model.weights, seed=cfg.seed, arch=cfg.model.arch)
    problem = build(scale_config(cfg, sizes[0], iters[0]), params, winfo)
    d = d_out()
    rec0 = {**record.start_record(cfg, problem), "content_size": list(sizes[-1]), "scales": []}
    bar = tqdm(total=sum(iters), disable=quiet, unit="it", dynamic_ncols=True, file=sys.stderr)
    rec = recorder(d, cfg, rec0, columns=COLUMNS, bar=bar, problem=problem)
    if on_progress is not None:
        rec.watchers.append(watch.Callback(on_progress))
    flag, errors = StopFlag(), []
    whole = solvers.Result(x=np.asarray(problem.x0))
    with flag.installed(), (DirLock(d) if d is not None else contextlib.nullcontext()):
        with record.guarded(flag, errors, cfg.image.size):
            rec.start()
            for i, (wh, n) in enumerate(zip(sizes, iters), 1):
                cfg_i = scale_config(cfg, wh, n)
                if i > 1:
                    problem = build(cfg_i, params, winfo)
                    problem.x0 = jnp.asarray(upsample(whole.x, wh))
                    rec.post, rec.problem = problem.post, problem
                res = _scale(rec, i, cfg_i, problem, flag, whole, compile_fn)
                if flag.stopped or res.status in (Status.FAILED, Status.INTERRUPTED):
                    break
                if i < len(sizes):
                    rec.save_image(f"scale{i}_final", res.x)
        crash = rec.close(whole, t_start, flag, errors[0] if errors else None)
    if crash is not None:
        raise crash
    return d, whole, rec


def _scale(rec: record.Recorder, i: int, cfg_i: Config, problem: Problem, flag: StopFlag,
           whole: solvers.Result, compile_fn: Callable) -> solvers.Result:
    """Solve scale `i` into the run's recorder and add its totals to `whole`."""
    s = cfg_i.solver.settings()
    it0 = whole.iterations
    rec.stage(total=record.steps(s), prefix=f"scale{i}_", offset=it0, base=it0,
              seconds=whole.solve_seconds, extra={"scale": i}, keep_start=True)
    res = record.solve(rec, problem, s, flag, chunk=record.chunk_size(cfg_i),
                       compile_fn=compile_fn)
    res.state = None
    whole.x, whole.status, whole.error = res.x, res.status, res.error
    whole.evals += res.evals
    whole.compile_seconds += res.compile_seconds
    whole.solve_seconds += res.solve_seconds
    whole.iterations += res.iterations
    rec.record["scales"].append({
        "scale": i, "size": [problem.content.shape[2], problem.content.shape[1]],
        "iterations": res.iterations, "evaluations": res.evals, "status": res.status,
        "compile_seconds": round(res.compile_seconds, 4),
        "solve_seconds": round(res.solve_seconds, 4),
        "initial_total": res.history[0]["total"], "final_total": res.history[-1]["total"]})
    return res
