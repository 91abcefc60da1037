"""`run` and `resume`: wiring from a Config to a finished run directory.

problem.build makes the arrays, record.solve runs the solver into a record.Recorder (the run
directory), multiscale runs coarse to fine; this module picks, locks and hands over.
"""

import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nstjax import multiscale, record, solvers
from nstjax.config import Config, merge, parse_overrides, read_yaml, validate
from nstjax.errors import UserError
from nstjax.problem import Problem, build
from nstjax.record import (  # noqa: F401 - compat
    HISTORY_COLUMNS,
    STATE_FILE,
    check_out,
    chunk_size,
    make_run_dir,
    read_history,
    start_record,
)
from nstjax.runtime import (
    DirLock,
    StopFlag,
    enable_compile_cache,  # noqa: F401 - compat (cli.py)
    signal_exit_code,
)
from nstjax.solvers import Status

program = record.program  # tests patch run.program; `_solve` looks it up here at call time


@dataclass
class RunResult:
    dir: Path
    result: solvers.Result
    record: dict

    @property
    def exit_code(self) -> int:
        """0 done/converged, 1 failed, 128+signal when stopped by SIGTERM/SIGHUP, 130 else."""
        sig, status = self.record.get("signal"), self.record["status"]
        if sig in (signal.SIGTERM, signal.SIGHUP):
            return signal_exit_code(sig)
        return {"done": 0, "converged": 0, "interrupted": 130}.get(str(status), 1)


def run(cfg: Config, out: str | Path | None = None, *, quiet: bool = False,
        parent: str | Path = "runs", problem: Problem | None = None) -> RunResult:
    """Run one style transfer and write its run directory; returns where and what.

    Bad input raises UserError before the run directory exists. Once it exists, the run ends
    with run.json, the final image, last.npy and history.csv whatever happens.
    """
    t_start = time.perf_counter()
    check_out(out, parent)
    if problem is None and cfg.multiscale.count:
        d, res, rec = multiscale.run_multiscale(
            cfg, lambda: make_run_dir(out, cfg, parent), quiet=quiet, compile_fn=program)
        return RunResult(d, res, rec)
    problem = problem or _build_or_oom(cfg)
    d = make_run_dir(out, cfg, parent)
    with DirLock(d):
        return _solve(d, cfg, problem, start_record(cfg, problem), t_start, quiet=quiet)


def _build_or_oom(cfg: Config) -> Problem:
    try:
        return build(cfg)
    except (MemoryError, RuntimeError) as e:
        raise record.as_user_error(e, cfg.image.size) from None


def _solve(d: Path, cfg: Config, problem: Problem, rec0: dict, t_start: float, *,
           quiet: bool = False, prior: list[dict] | None = None, state0=None,
           carry: dict | None = None) -> RunResult:
    """Solve into run directory `d`, continuing after `prior` history rows (for resume).

    The directory always ends complete: a signal stops after the current chunk (a second one
    at the next return to Python, with the last chunk's image) with status `interrupted`; a
    non-finite loss ends `failed` with the last finite image; any exception marks the run
    `failed` (image, history, last.npy written) and is then re-raised.
    """
    from tqdm.auto import tqdm

    s = cfg.solver.settings()
    done = prior[-1]["iter"] if prior else 0
    bar = tqdm(total=record.steps(s), initial=done, disable=quiet, unit="it",
               dynamic_ncols=True, file=sys.stderr)
    rec = record.Recorder(d, cfg, rec0, post=problem.post, history=prior or (), bar=bar)
    rec.stage(total=record.steps(s), seconds=prior[-1]["seconds"] if prior else 0.0)
    flag, errors, res = StopFlag(), [], None
    with flag.installed():
        with record.guarded(flag, errors, cfg.image.size):
            rec.start()
            res = record.solve(rec, problem, s, flag, chunk=chunk_size(cfg), done=done,
                               state0=state0, compile_fn=program)
        if res is None:  # stopped or crashed before the solver returned
            res = solvers.Result(x=np.asarray(problem.x0) if rec.x is None else rec.x,
                                 status=Status.INTERRUPTED)
            res.iterations = rec.history[-1]["iter"] if rec.history else done
        for k, v in (carry or {}).items():  # totals of earlier sessions (resume)
            setattr(res, k, getattr(res, k) + v)
        crash = rec.close(res, t_start, flag, errors[0] if errors else None)
    if crash is not None:
        raise crash
    return RunResult(d, res, rec.record)


# ---------------------------------------------------------------- resume


def _alive(rec: dict) -> bool:
    """Whether the process that wrote a `running` run.json still runs (on this host)."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0 or rec.get("host") != platform.node():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _check_dir(d: Path) -> None:
    if not d.is_dir():
        raise UserError(f"{d}: no such run directory")
    for name in ("config.yaml", "run.json"):
        if not (d / name).is_file():
            raise UserError(f"{d}: not a run directory (no {name}); give a directory made by "
                            "`nstjax run`")


def _resumable(d: Path, overrides: list[str]) -> tuple[dict, Config]:
    """run.json and the config (with solver./output. overrides) of a run that can resume."""
    rec = record.read_record(d)
    status = rec.get("status")
    if status in record.FINISHED:
        raise UserError(f"{d}: the run has finished (status {status}); nothing to resume; start "
                        f"a new run (init: {d}/last.npy) to go further")
    if status == Status.RUNNING and _alive(rec):
        raise UserError(f"{d}: the run is still going (pid {rec['pid']}); stop it first")
    if status not in record.RESUMABLE:
        raise UserError(f"{d}: run.json has status {status!r}; only interrupted, failed or "
                        "killed runs can be resumed")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(("solver.", "output.")):
            raise UserError(f"resume: {key} cannot change when resuming, only solver.* and "
                            "output.* settings can; start a new run instead")
    cfg_path = d / "config.yaml"
    cfg = validate(merge(read_yaml(cfg_path), parse_overrides(list(overrides))), str(cfg_path))
    if cfg.multiscale.count:
        raise UserError(f"{d}: a multi-scale run cannot be resumed; start a new run instead")
    return rec, cfg


def resume(run_dir: str | Path, overrides: list[str] = (), *, quiet: bool = False) -> RunResult:
    """Continue an interrupted, failed or killed run in its own directory, to its iteration count.

    Holds the directory's lock throughout (a second resume is refused, naming this pid). Starts
    from last.npy and continues history.csv's numbering; the solver's state is restored from
    solver_state.npz where it was saved (a stop between chunks), else restarts. Only `solver.*`
    and `output.*` may be overridden (e.g. a higher solver.maxiter). run.json gets a `resumed`
    entry per session and, at the end, totals over all sessions. Nothing in the directory
    changes before every file has been checked.
    """
    t_start = time.perf_counter()
    d = Path(run_dir)
    _check_dir(d)
    with DirLock(d):
        rec, cfg = _resumable(d, list(overrides))
        history = read_history(d / "history.csv")
        done = history[-1]["iter"] if history else 0
        x = record.read_last(d / "last.npy", cfg.image.max_pixels)
        problem = _build_or_oom(cfg.model_copy(update={"init": "noise"}))  # x0 is last.npy
        if x.shape != tuple(problem.content.shape):
            raise UserError(f"{d / 'last.npy'}: holds an image of shape {x.shape}, the run needs "
                            f"{tuple(problem.content.shape)}; cannot resume")
        old = (rec.get("weights") or {}).get("sha256")
        new = (problem.info.get("weights") or {}).get("sha256")
        if old and new and old != new:
            raise UserError(f"model.weights {cfg.model.weights} changed since the run started "
                            f"(sha256 {new[:12]}..., was {old[:12]}...); cannot resume")
        problem.x0 = jnp.asarray(x)
        state0 = record.load_state(d, cfg, problem, done)
        carry = {"evals": 0 if state0 else rec.get("evaluations") or 0,  # a state counts them
                 "solve_seconds": rec.get("solve_seconds") or 0.0,
                 "compile_seconds": rec.get("compile_seconds") or 0.0}
        t_start -= rec.get("wall_seconds") or 0.0
        for k in ("error", "signal", "finished"):
            rec.pop(k, None)
        rec.update(status=Status.RUNNING.value, pid=os.getpid(), host=platform.node())
        rec.setdefault("resumed", []).append({
            "at": datetime.now().isoformat(timespec="seconds"), "from_iteration": done,
            "overrides": list(overrides), "solver_state": "restored" if state0 else "restarted"})
        return _solve(d, cfg, problem, rec, t_start, quiet=quiet, prior=history, state0=state0,
                      carry=carry)
