"""`run`, `resume` and `stylize`: wiring from a Config to a finished run (directory).

problem.build makes the arrays, record.solve runs the solver into a record.Recorder (the run
directory, or memory for `stylize`), multiscale runs coarse to fine; this module picks, locks
and hands over.
"""

import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from nstjax import image, multiscale, record, solvers, tblog, watch
from nstjax.config import Config, apply_overrides, parse_overrides, read_yaml, validate
from nstjax.errors import UserError, one_line
from nstjax.problem import Problem, build
from nstjax.record import (
    check_out,
    chunk_size,
    make_run_dir,
    read_history,
    start_record,
)
from nstjax.runtime import (
    DirLock,
    StopFlag,
    signal_exit_code,
    use_compile_cache,
)
from nstjax.solvers import Status


class NotStarted(UserError):
    """A run's first files could not be written; its directory holds nothing of it."""


program = record.program  # tests patch run.program; `_solve` looks it up here at call time


@dataclass
class RunResult:
    """What `run` and `resume` return.

    dir: Path -- the run directory; result: solvers.Result -- x (float32, preprocessed space,
    before colour controls), history rows, status, counts, timings; record: dict -- run.json.
    """

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
        parent: str | Path = "runs", problem: Problem | None = None,
        on_progress: Callable | None = None) -> RunResult:
    """Run one style transfer and write its run directory; returns where and what.

    Bad input raises UserError before the run directory exists. Once it exists, the run ends
    with run.json, the final image, last.npy and history.csv whatever happens.
    `on_progress`: as `stylize`'s.
    """
    t_start = time.perf_counter()
    check_out(out, parent)
    tblog.check([cfg])
    if problem is None and cfg.multiscale.count:
        d, res, rec = multiscale.run_multiscale(
            cfg, lambda: make_run_dir(out, cfg, parent), quiet=quiet, compile_fn=program,
            on_progress=on_progress)
        return RunResult(d, res, rec.record)
    problem = problem or _build_or_oom(cfg)
    existed = out is not None and Path(out).exists()
    d = make_run_dir(out, cfg, parent)
    try:
        with DirLock(d):
            return _solve(d, cfg, problem, start_record(cfg, problem), t_start, quiet=quiet,
                          on_progress=on_progress, claimed=True)
    except NotStarted as e:  # nothing of the run is left: a rerun finds `d` free
        if not existed:
            with suppress(OSError):
                d.rmdir()
        raise UserError(str(e)) from None


def _build_or_oom(cfg: Config) -> Problem:
    try:
        return build(cfg)
    except (MemoryError, RuntimeError) as e:
        raise record.as_user_error(e, cfg.image.size) from None


def _solve(d: Path | None, cfg: Config, problem: Problem, rec0: dict, t_start: float, *,
           quiet: bool = False, prior: list[dict] | None = None, state0=None,
           carry: dict | None = None, on_progress: Callable | None = None,
           claimed: bool = False) -> RunResult:
    """Solve into run directory `d` (None: into memory, no file), continuing after `prior`
    history rows (for resume).

    The directory always ends complete: a signal stops after the current chunk (a second one
    at the next return to Python, with the last chunk's image) with status `interrupted`; a
    non-finite loss ends `failed` with the last finite image; any exception marks the run
    `failed` (image, history, last.npy written) and is then re-raised. If config.yaml and
    run.json cannot be written at the start (a full disk), nothing runs: a directory just
    `claimed` by `run` loses its files again (NotStarted), a resumed one keeps its own.
    """
    from tqdm.auto import tqdm

    s = cfg.solver.settings()
    done = prior[-1]["iter"] if prior else 0
    bar = tqdm(total=record.steps(s), initial=done, disable=quiet, unit="it",
               dynamic_ncols=True, file=sys.stderr)
    make = record.Recorder if d is not None else _Memory
    watchers = (watch.for_run(d, cfg) if d is not None else []) \
        + ([watch.Callback(on_progress)] if on_progress is not None else [])
    rec = make(d, cfg, rec0, problem=problem, history=prior or (), bar=bar, watchers=watchers)
    rec.stage(total=record.steps(s), seconds=prior[-1]["seconds"] if prior else 0.0)
    rec.carry, rec.t_start = dict(carry or {}), t_start  # running totals in run.json
    flag, errors, res = StopFlag(), [], None
    with flag.installed():
        try:
            rec.start()
        except UserError as e:
            bar.close()
            if claimed:  # a directory just claimed: remove what the run wrote, run.json too
                for name in ("config.yaml", "run.json"):
                    with suppress(OSError):
                        (d / name).unlink()
                raise NotStarted(str(e)) from None
            raise
        with record.guarded(flag, errors, cfg.image.size):
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
    if pid == os.getpid():  # this process, which holds the lock now: its run ended (a failed
        return False  # write left run.json `running`)
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
    cfg = validate(apply_overrides(read_yaml(cfg_path), parse_overrides(list(overrides))),
                   str(cfg_path))
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
        tblog.check([cfg])
        history = read_history(d / "history.csv")
        done = history[-1]["iter"] if history else 0
        if done == 0 and not (d / "last.npy").exists():
            # Nothing saved past the start (e.g. the disk filled before the first image was
            # written): the run starts over from its config's init, in its own directory.
            return _solve(d, cfg, _build_or_oom(cfg), _restart(rec), t_start, quiet=quiet)
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


def _restart(rec: dict) -> dict:
    """run.json of a run that starts over in its directory (see `resume`)."""
    for k in ("error", "signal", "finished"):
        rec.pop(k, None)
    rec.update(status=Status.RUNNING.value, pid=os.getpid(), host=platform.node())
    rec.setdefault("resumed", []).append({
        "at": datetime.now().isoformat(timespec="seconds"), "from_iteration": 0,
        "overrides": [], "solver_state": "restarted"})
    return rec


# ---------------------------------------------------------------- in memory


class _Memory(record.Recorder):
    """A Recorder that keeps the history and record in memory and writes no file (every
    method that writes is overridden; it has no directory)."""

    def __init__(self, d: None, *args, **kw):
        kw.setdefault("watchers", [])  # only a callback: no directory for TensorBoard
        super().__init__(Path("<memory>"), *args, **kw)

    def start(self) -> None:
        pass

    def write_record(self) -> None:
        pass

    def write_history(self) -> None:
        pass

    def save_image(self, stem: str, x) -> None:
        pass

    def final_metrics(self, x) -> dict | None:
        # As Recorder.final_metrics, on the pixels final.png would hold (8-bit) instead of the
        # file read back.
        from nstjax import problem as problem_mod

        shown = self.visible(x)
        saved = image.preprocess(image.deprocess(shown)) if self.cfg.output.bits == 8 else shown
        try:
            return problem_mod.final_metrics(self.cfg, saved, self.problem,
                                             self._metric_failed)
        except Exception as e:  # noqa: BLE001 - as in Recorder: say why, go on
            print(f"warning: no metrics ({one_line(e)})", file=sys.stderr)
            return None

    def add(self, x, rows: list[dict]) -> list[dict]:
        rows = self.progress(rows)
        self.x = np.asarray(x)
        self.history.extend(rows)
        snap = self.now.snapshot(self.cfg.output.save_every, rows)
        due = snap or self.now.last(rows)
        watch.rows(self.watchers, rows, self.visible(x) if due else None, bool(snap))
        return rows

    def close(self, res: solvers.Result, t_start: float, flag: StopFlag,
              crash: BaseException | None = None) -> BaseException | None:
        self.settle(res, flag, crash)
        self.finish(res, t_start)  # the record's final fields; the writes are no-ops here
        res.state = None
        return crash


@dataclass
class Result:
    """What `stylize` returns.

    image: PIL.Image.Image -- the result as 8-bit RGB with colour controls applied: the pixels
        `nstjax run` saves as final.png for the same config.
    array: np.ndarray -- the optimized image, float32 (1, H, W, 3) in preprocessed (VGG, BGR,
        mean-subtracted) space, before colour controls: what last.npy holds; a valid `init`.
    history: dict[str, np.ndarray] -- history.csv's columns ("iter" int64, the rest float64:
        total, content, style, tv, every term of the objective, seconds).
    record: dict -- what run.json holds (status, iterations, evaluations, timings, losses...).
    result: solvers.Result -- the solver's own result (history rows as dicts).
    dir: Path | None -- the run directory when `out` was given, else None.
    """

    image: Image.Image
    array: np.ndarray
    history: dict[str, np.ndarray]
    record: dict
    result: solvers.Result
    dir: Path | None = None


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: np.array([r.get(k, np.nan) for r in rows],
                        np.int64 if k in ("iter", "scale") else np.float64) for k in keys}


def _config(cfg_or_path: Config | str | Path, overrides) -> Config:
    from nstjax import config

    if isinstance(overrides, str):
        raise UserError(f"stylize: overrides must be a list of 'key=value' strings, not one "
                        f"string; write [{overrides[:60]!r}]")
    if not isinstance(cfg_or_path, (Config, str, Path)):
        raise UserError(f"stylize: takes a Config or a YAML file path, not a "
                        f"{type(cfg_or_path).__name__}; for a dict use nstjax.config.validate(d)")
    if isinstance(cfg_or_path, Config):
        if not overrides:
            return cfg_or_path
        raw = apply_overrides(cfg_or_path.model_dump(), parse_overrides(list(overrides)))
        return validate(raw, "overrides")
    return config.load(cfg_or_path, list(overrides))


def stylize(cfg_or_path: Config | str | Path, overrides: list[str] | tuple = (),
            out: str | Path | None = None, *, quiet: bool = False,
            compile_cache: bool | None = None,
            on_progress: Callable[[watch.Progress], object] | None = None) -> Result:
    """Run one style transfer in memory: no file is written unless `out` is given (then `out`
    becomes a normal run directory, as `nstjax run --out` makes).

    `cfg_or_path`: a Config or a YAML file; `overrides`: dotted `key=value` strings. Compiled
    programs are reused within the process (per loss kind and settings, solver settings but
    maxiter, shapes and chunk), so a second call with other weights or images of the same
    size compiles nothing. JAX's persistent compilation cache (under the cache directory) is on
    unless `compile_cache=False` or NSTJAX_COMPILE_CACHE=0. Progress is a tqdm.auto bar
    (a widget in notebooks), off with `quiet`. Ctrl-C stops after the current chunk (status
    interrupted). Bad input raises UserError.

    `on_progress(p)` is called once per history row with a `watch.Progress` (iteration, scale,
    losses, seconds, and on snapshot steps, every `output.save_every` iterations, the image as
    uint8 RGB). It is user code: an exception from it, SystemExit included, ends the run
    `failed` (a complete directory with `out`) and is then re-raised; KeyboardInterrupt ends it
    `interrupted`, as Ctrl-C does. `output.tensorboard`
    needs `out` (in memory nothing is written).

    Multi-scale configs run in memory too (with `out`, `.image` is read back from final.*).
    """
    t_start = time.perf_counter()
    cfg = _config(cfg_or_path, overrides)
    if on_progress is not None:
        watch.Callback(on_progress)  # not callable: UserError before any work
    use_compile_cache(compile_cache)
    if cfg.multiscale.count:
        return _multiscale(cfg, out, quiet, on_progress)
    if out is not None:
        check_out(out)  # before loading anything
        tblog.check([cfg])
    elif cfg.output.tensorboard:
        print("warning: output.tensorboard: stylize without out= writes no files, no events "
              "either", file=sys.stderr)
    problem = _build_or_oom(cfg)
    if out is not None:
        r = run(cfg, out, quiet=quiet, problem=problem, on_progress=on_progress)
    else:
        rec0 = start_record(cfg, problem)
        r = _solve(None, cfg, problem, rec0, t_start, quiet=quiet, on_progress=on_progress)
    x = np.asarray(r.result.x, np.float32)
    shown = problem.post(x) if problem.post is not None else x
    return Result(Image.fromarray(image.deprocess(shown), "RGB"), x,
                  _columns(r.result.history), r.record, r.result, r.dir)


def _multiscale(cfg: Config, out: str | Path | None, quiet: bool,
                on_progress: Callable | None = None) -> Result:
    """A multi-scale run: into `out` through `run`, else in memory (an in-memory recorder)."""
    if out is not None:
        r = run(cfg, out, quiet=quiet, on_progress=on_progress)
        with Image.open(r.dir / f"final.{cfg.output.format}") as im:
            img = im.convert("RGB")
        return Result(img, np.asarray(r.result.x, np.float32), _columns(r.result.history),
                      r.record, r.result, r.dir)
    _, res, rec = multiscale.run_multiscale(cfg, lambda: None, quiet=quiet, compile_fn=program,
                                            recorder=_Memory, on_progress=on_progress)
    x = np.asarray(res.x, np.float32)
    return Result(Image.fromarray(image.deprocess(rec.visible(x)), "RGB"), x,
                  _columns(res.history), rec.record, res, None)
