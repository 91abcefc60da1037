"""The run directory: its format, a `Recorder` that writes it as a solve goes, and `solve`, the
one loop that turns solver chunks into it (single runs, multi-scale runs and sweep cells).

A run directory holds `config.yaml`, `run.json` (status `running` until the end, then `done`,
`converged`, `failed` or `interrupted`, written last; with `loss.kind` and `metrics`, the
reference evaluation of the saved final image), `history.csv` (iter, total, content, style,
tv, every further term of the objective sorted, e.g. `style/<layer>`, then seconds), `last.npy`
(the newest image, preprocessed float32), snapshots `[<prefix>]iter_NNNNNN.<fmt>`,
`final.<fmt>` and, for a compiled solver stopped by a signal, `solver_state.npz`. While a
process writes it, it holds `run.lock` (see `runtime.DirLock`).

Recorder API (all files are written atomically; `d` exists):

    rec = Recorder(d, cfg, record, problem=problem)  # record: the run.json fields so far
    rec.start()                     # config.yaml, run.json (status running)
    rec.stage(total=n)              # before each solve: snapshot prefix, iteration offsets
    rec.first(row)                  # the start row, unless history goes on from earlier rows
    rec.add(x, rows)                # after each chunk: rows, snapshot, last.npy, history, watchers
    rec.close(res, t_start, flag, crash)  # last.npy, final image, history, run.json; -> crash
    rec.write_record()              # run.json as it is now (e.g. after adding fields)

`solve(rec, problem, settings, flag, chunk=...)` runs one solve through a Recorder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import sys
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nstjax import image, losses, metrics, solvers, vgg16, watch
from nstjax.config import Config, dump
from nstjax.errors import PluginError, UserError, one_line
from nstjax.rundir import check_out, make_run_dir  # noqa: F401 - re-exported
from nstjax.runtime import StopFlag, npy_bytes, npy_header, versions, write_atomic
from nstjax.solvers import Status

HISTORY_COLUMNS = ("iter", "total", "content", "style", "tv", "seconds")
STATE_FILE = "solver_state.npz"
FINISHED = (Status.DONE, Status.CONVERGED)
RESUMABLE = (Status.INTERRUPTED, Status.FAILED, Status.RUNNING)
_PROGRAMS: dict = {}


# ---------------------------------------------------------------- formats


def history_columns(rows: list[dict], base: tuple[str, ...] = HISTORY_COLUMNS) -> tuple[str, ...]:
    """`base` (e.g. iter, total, content, style, tv, seconds) with every other key of the rows
    (the objective's further terms, e.g. `style/<layer>`), sorted, before `seconds`."""
    head = tuple(c for c in base if c != "seconds")
    extra = sorted({k for r in rows for k in r} - set(base))
    return (*head, *extra, *(("seconds",) if "seconds" in base else ()))


def history_csv(rows: list[dict], columns: tuple[str, ...] | None = None) -> str:
    """history.csv: `columns`, by default HISTORY_COLUMNS and every further term of the rows."""
    columns = columns or history_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def read_history(path: Path) -> list[dict]:
    """history.csv rows as dicts (iter an int, the rest floats); [] if there is none."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{k: int(v) if k == "iter" else float(v) for k, v in r.items()} for r in rows]
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable history ({e}); cannot resume") from None


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float as null; in a dict, key `k` also gets `k_text` ("nan",
    "inf", "-inf"), so run.json stays standard JSON and keeps what happened."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k] = json_safe(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[f"{k}_text"] = str(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def record_json(record: dict) -> str:
    return json.dumps(json_safe(record), indent=2, default=str, allow_nan=False)


def plugins(cfgs) -> list[dict]:
    """The plugin files the configs import (`loss.plugins`, `eval.plugins`): for run.json,
    each {"key", "ref", "path", "sha256"} (sha256 of the code as imported), once per file."""
    from nstjax import kinds

    out: dict[tuple, dict] = {}
    for cfg in cfgs:
        for key, refs in (("loss.plugins", cfg.loss.plugins), ("eval.plugins", cfg.eval.plugins)):
            for ref in refs:
                path, sha = kinds.plugin_file(ref) or (None, None)
                out.setdefault((key, ref), {"key": key, "ref": ref, "path": path, "sha256": sha})
    return list(out.values())


def announce_plugins(found: list[dict]) -> None:
    """One stderr line per imported plugin file: a config's plugins are code it runs."""
    for p in found:
        sha = (p["sha256"] or "unknown")[:16]
        print(f"nstjax: {p['key']}: imported {p['path'] or p['ref']} (sha256 {sha}...; "
              "plugin code runs with your permissions)", file=sys.stderr)


def start_record(cfg: Config, problem, announce: bool = True) -> dict:
    """The run.json fields known before solving; with `announce`, the config's plugin files
    are printed (one line each)."""
    import jax

    found = plugins([cfg])
    if announce:
        announce_plugins(found)
    return {"status": Status.RUNNING.value, "versions": versions(), "device": str(jax.devices()[0]),
            "plugins": found,
            "platform": jax.default_backend(),
            "arch": cfg.model.arch, "conv": vgg16.resolve_conv(cfg.model.conv),
            "winograd_layers": _winograd(cfg, problem),
            **problem.info, "solver": cfg.solver.name,
            "started": datetime.now().isoformat(timespec="seconds"), "pid": os.getpid(),
            "host": platform.node()}


def _winograd(cfg: Config, problem) -> list[str]:
    """The layers that run as Winograd at the content size (the solve's)."""
    w, h = problem.info["content_size"]
    order = vgg16.names(cfg.model.arch)
    last = max(order.index(n) for n in problem.spec.layers)
    return vgg16.winograd_layers(cfg.model.conv, cfg.model.precision, (h, w), order[: last + 1])


def _losses(row: dict) -> dict:
    """Every term of a history row (not iter, scale, seconds)."""
    return {k: v for k, v in row.items() if k not in ("iter", "scale", "seconds")}


def as_user_error(e: BaseException, size) -> BaseException:
    """Out-of-memory errors as a one-line UserError with what to change; others unchanged."""
    text = str(e)
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        return UserError(f"out of memory at image size {size} ({first}); lower image.size, or "
                         "set model.remat: true or model.precision: bfloat16")
    return e


# ---------------------------------------------------------------- the recorder


class Stage(NamedTuple):
    """How one solve's rows and snapshots are placed in the run's history."""

    total: int = 0  # iterations of this solve: no snapshot at the last one (final.* is it)
    prefix: str = ""  # snapshot names: f"{prefix}iter_{k:06d}"
    offset: int = 0  # added to the solver's row numbers
    base: int = 0  # snapshot k = (shifted) iter - base
    seconds: float = 0.0  # added to the rows' seconds
    extra: dict = {}  # more columns, e.g. {"scale": 2}
    keep_start: bool = False  # record the start row even after earlier rows (a new scale)

    def snapshot(self, every: int, rows: list[dict]) -> str | None:
        """The stem of the snapshot due after `rows` (every `every` iterations), or None."""
        k = rows[-1]["iter"] - self.base if rows else 0
        return f"{self.prefix}iter_{k:06d}" if every and k and k % every == 0 \
            and k < self.total else None

    def last(self, rows: list[dict]) -> bool:
        """Whether `rows` end at the stage's last iteration (its image is the final one)."""
        return bool(rows) and self.total > 0 and rows[-1]["iter"] - self.base >= self.total


class Recorder:
    """Writes one run directory (see the module docstring for the API)."""

    def __init__(self, d: Path, cfg: Config, record: dict, *, post: Callable | None = None,
                 columns: tuple[str, ...] = HISTORY_COLUMNS, history: list[dict] = (),
                 bar: Any = None, problem: Any = None, watchers: list | None = None):
        self.d, self.cfg, self.record, self.columns = Path(d), cfg, record, columns
        # `problem` (a problem.Problem) gives post and the params the final metrics use;
        # without it they are loaded again from the config at the end.
        self.problem = problem
        self.post = post if post is not None or problem is None else problem.post
        self.history, self.bar = [dict(r) for r in history], bar
        self.x: np.ndarray | None = None  # the newest image written to last.npy
        self.now = Stage()
        # Counts of earlier sessions (resume) when run.json is to keep running totals after each
        # chunk (see `checkpoint`); None: run.json is written at the start and the end only.
        self.carry: dict | None = None
        self.t_start = time.perf_counter()
        self.watchers = watch.for_run(self.d, cfg) if watchers is None else list(watchers)

    def image_path(self, stem: str) -> Path:
        return self.d / f"{stem}.{self.cfg.output.format}"

    def visible(self, x) -> np.ndarray:
        """The image to save for x: `post(x)` (content mask, colour) if set, else x."""
        return self.post(np.asarray(x)) if self.post is not None else np.asarray(x)

    def save_image(self, stem: str, x) -> None:
        image.save(self.image_path(stem), self.visible(x), bits=self.cfg.output.bits)

    def write_record(self) -> None:
        write_atomic(self.d / "run.json", record_json(self.record))

    def write_history(self) -> None:
        cols = history_columns(self.history, self.columns)
        write_atomic(self.d / "history.csv", history_csv(self.history, cols))

    def start(self) -> None:
        write_atomic(self.d / "config.yaml", dump(self.cfg))
        self.write_record()

    def stage(self, **kw) -> Stage:
        self.now = Stage(**kw)
        return self.now

    def shift(self, rows: list[dict]) -> list[dict]:
        s = self.now
        return [{**r, **s.extra, "iter": r["iter"] + s.offset, "seconds": r["seconds"] + s.seconds}
                for r in rows]

    def first(self, row: dict) -> None:
        if not self.history or self.now.keep_start:
            self.history.append(self.shift([row])[0])
            self.write_history()
            watch.rows(self.watchers, self.history[-1:])

    def progress(self, rows: list[dict]) -> list[dict]:
        """The rows in the run's numbering, counted on the progress bar."""
        rows = self.shift(rows)
        if self.bar is not None:
            self.bar.update(len(rows))
            if rows:
                self.bar.set_postfix(loss=f"{rows[-1]['total']:.4g}")
        return rows

    def add(self, x, rows: list[dict]) -> list[dict]:
        rows = self.progress(rows)
        stem = self.now.snapshot(self.cfg.output.save_every, rows)
        if stem:
            self.save_image(stem, x)
        # last.npy before history.csv: killed in between, a resume repeats no work it counted.
        self.x = np.asarray(x)
        write_atomic(self.d / "last.npy", npy_bytes(x))
        self.history.extend(rows)
        self.write_history()
        # watchers get the image on snapshot steps and at the last iteration (final.png)
        due = stem or self.now.last(rows)
        watch.rows(self.watchers, rows, self.visible(x) if due else None, bool(stem))
        return rows

    def checkpoint(self, evals: int, solve_seconds: float, compile_seconds: float) -> None:
        """run.json (still `running`) with the totals so far, after a chunk's history: a killed
        process's work is then on disk and a resume adds up across every session."""
        if self.carry is None:
            return
        c = self.carry
        self.record.update(
            iterations=self.history[-1]["iter"] - self.now.base if self.history else 0,
            evaluations=int(c.get("evals", 0) + evals),
            solve_seconds=round(c.get("solve_seconds", 0.0) + solve_seconds, 4),
            compile_seconds=round(c.get("compile_seconds", 0.0) + compile_seconds, 4),
            wall_seconds=round(time.perf_counter() - self.t_start, 4))
        self.write_record()

    def finish(self, res: solvers.Result, t_start: float) -> dict:
        """Final image, history.csv and the completed run.json (last: it marks completion), with
        `metrics`: the reference evaluation (config `eval:`) of the saved final image."""
        self.save_image("final", res.x)
        self.write_history()
        self.record["loss"] = {"kind": self.cfg.loss.kind, "plugins": list(self.cfg.loss.plugins),
                               "options": dict(self.cfg.loss.options),
                               "style_norm": self.cfg.loss.style_norm}
        self.record["metrics"] = self.final_metrics(res.x)
        self.record.update(
            status=Status(res.status).value, error=res.error,
            iterations=res.iterations, evaluations=res.evals,
            compile_seconds=round(res.compile_seconds, 4),
            solve_seconds=round(res.solve_seconds, 4),
            ms_per_evaluation=round(1e3 * res.solve_seconds / max(res.evals, 1), 4),
            wall_seconds=round(time.perf_counter() - t_start, 4),
            final_loss=_losses(self.history[-1]) if self.history else None,
            initial_loss=_losses(self.history[0]) if self.history else None,
            finished=datetime.now().isoformat(timespec="seconds"),
        )
        watch.close(self.watchers, json_safe(self.record), self.visible(res.x))
        self.write_record()
        return self.record

    def _metric_failed(self, e: Exception) -> None:
        print(f"warning: {self.d}: {one_line(e)} (left out of run.json metrics)",
              file=sys.stderr)

    def final_metrics(self, x) -> dict | None:
        """`metrics.evaluate` of the final image as saved (controls applied; an 8-bit file read
        back, so quantized as saved), or None (with a warning on stderr) if it cannot be
        scored."""
        from nstjax import problem as problem_mod

        try:
            if self.cfg.output.bits == 8:
                saved = image.load(self.image_path("final"), None, max_pixels=None)
            else:
                saved = self.visible(x)
            with metrics.isolated(self.cfg.eval.plugins):  # this run's metric plugins only
                return problem_mod.final_metrics(self.cfg, saved, self.problem,
                                                 self._metric_failed)
        except Exception as e:  # noqa: BLE001 - the run itself is complete; say why, go on
            print(f"warning: {self.d}: no metrics ({one_line(e)})", file=sys.stderr)
            return None

    def settle(self, res: solvers.Result, flag: StopFlag,
               crash: BaseException | None = None) -> None:
        """The run's final status from the signal flag and the crash; from here on signals wait."""
        flag.finishing = True
        if self.bar is not None:
            self.bar.close()
        res.history = self.history
        if flag.stopped and res.status != Status.FAILED:
            res.status = Status.INTERRUPTED
        if crash is not None:
            res.status, res.error = Status.FAILED, one_line(crash)
        self.record["signal"] = flag.signum

    def close(self, res: solvers.Result, t_start: float, flag: StopFlag,
              crash: BaseException | None = None) -> BaseException | None:
        """End the run whatever happened: status from the flag and the crash, then last.npy,
        final image, history, run.json and (stopped by a signal) the solver state. Returns the
        error to raise (the crash, or a failed write), if any."""
        self.settle(res, flag, crash)
        try:
            write_atomic(self.d / "last.npy", npy_bytes(res.x))
            self.finish(res, t_start)
            save_state(self.d, self.cfg, res)
        except UserError as e:  # e.g. the disk filled up: keep what is written, say so
            self.record.update(status=Status.FAILED.value, error=str(e))
            with suppress(UserError):
                self.write_record()
            crash = crash or e
        res.state = None  # on disk if needed; do not hold the device memory
        return crash


@contextmanager
def guarded(flag: StopFlag, errors: list, size=None):
    """Catch what ends a solve early: a second signal or a KeyboardInterrupt (stop now:
    interrupted) or an exception, SystemExit included (appended to `errors`, out-of-memory
    errors as a UserError: failed, re-raised once the directory is complete)."""
    try:
        yield
    except KeyboardInterrupt:
        flag.stop()
    except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded in run.json, then re-raised
        errors.append(as_user_error(e, size))


# ---------------------------------------------------------------- solving


def chunk_size(cfg: Config) -> int:
    """Iterations per compiled chunk: chunks end where a snapshot (`output.save_every`) or a
    progress update (`output.progress_every`) is due: their gcd when both are set, else the one
    set, else min(maxiter, 25)."""
    every = [n for n in (cfg.output.save_every, cfg.output.progress_every) if n]
    if every:
        return math.gcd(*every)
    return min(max(cfg.solver.maxiter, 1), 25)


def program(spec: losses.Spec, s: solvers.Settings, x0, args, chunk: int):
    """Compiled (init, chunk) for these shapes, reused by later runs in this process."""
    import jax

    s = replace(s, maxiter=0)  # not part of a compiled program: runs of any length share it
    # The kind's functions are in the key: a kind registered again never reuses a stale program.
    key = (spec, losses.kind(spec.kind), s, chunk, jax.tree.structure(args),
           tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves((x0, args))))
    hit = key in _PROGRAMS
    if not hit:
        _PROGRAMS[key] = solvers.compile_program(s, losses.objective(spec), x0, args, chunk)
    return _PROGRAMS[key], hit


def steps(s: solvers.Settings) -> int:
    """The solver's own count: rounds for scipy_lbfgsb, else iterations."""
    return s.rounds if s.name == "scipy_lbfgsb" else s.maxiter


def solve(rec: Recorder, problem, s: solvers.Settings, flag: StopFlag, *, chunk: int,
          done: int = 0, state0=None, compile_fn: Callable = program) -> solvers.Result:
    """Solve `problem` from `problem.x0`, recording into `rec` under its current stage.

    `done` iterations were made before (resume): the solve makes `steps(s) - done` more, rows
    numbered on, chunks aligned so snapshots stay where they would have been. A signal stops
    it after the current chunk; a non-finite loss at the start image fails it at once.
    """
    args = (problem.params, problem.targets, problem.weights)
    compiled, compile_s = None, 0.0
    if s.name in solvers.COMPILED:
        t = time.perf_counter()
        compiled, hit = compile_fn(problem.spec, s, problem.x0, args, chunk)
        compile_s = 0.0 if hit else time.perf_counter() - t
    bad: list[float] = []

    def on_start(x, row: dict) -> bool:
        if done:  # rows continue the run's own numbering
            rec.now = rec.now._replace(offset=done - row["iter"])
        rec.first(row)
        if not np.isfinite(row["total"]):  # e.g. overflowing loss weights: no step can help
            if not (k := losses.kind(problem.spec.kind)).builtin:
                raise PluginError(f"{k.label}: terms() returned a non-finite total "
                                  f"({row['total']}) at the initial image; it must be finite")
            bad.append(row["total"])
            return True
        return flag.stopped

    counts = [0, 0.0]

    def on_counts(evals: int, seconds: float) -> None:
        counts[:] = [evals, seconds]

    def on_chunk(x, rows: list[dict]) -> bool:
        rec.add(x, rows)
        rec.checkpoint(counts[0], counts[1], compile_s)  # after history.csv: never ahead of it
        return flag.stopped

    key = "rounds" if s.name == "scipy_lbfgsb" else "maxiter"
    res = solvers.minimize(replace(s, **{key: max(steps(s) - done, 0)}),
                           losses.objective(problem.spec), problem.x0, args, chunk=chunk,
                           on_chunk=on_chunk, on_start=on_start, compiled=compiled,
                           state0=state0, keep_state=s.name in solvers.COMPILED,
                           first_chunk=chunk - done % chunk, on_counts=on_counts)
    res.compile_seconds = max(res.compile_seconds, compile_s)
    res.iterations = rec.history[-1]["iter"] - rec.now.base if rec.history else done
    if bad:
        res.status, res.error = Status.FAILED, f"loss is {bad[0]} at the start image"
    return res


# ---------------------------------------------------------------- solver state


def save_state(d: Path, cfg: Config, res: solvers.Result) -> None:
    """solver_state.npz (the state pytree's leaves and a JSON meta; no pickle) when interrupted.

    Without it (host solver, a hard stop, a killed process) a resume restarts the solver's
    memory (L-BFGS history, Adam moments) from the last image.
    """
    import jax

    path = d / STATE_FILE
    if res.status != Status.INTERRUPTED or res.state is None:
        with suppress(OSError):
            path.unlink(missing_ok=True)  # a stale state is never resumed from
        return
    leaves = [np.asarray(v) for v in jax.tree.leaves(res.state)]
    meta = {"solver": cfg.solver.name, "iteration": res.iterations, "leaves": len(leaves)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{f"leaf_{i:04d}": v for i, v in enumerate(leaves)})
    try:
        write_atomic(path, buf.getvalue())
    except UserError as e:  # optional: a resume then restarts the solver's memory
        print(f"warning: {e}; a resume will restart the solver state", file=sys.stderr)


def _member(z: zipfile.ZipFile, name: str, shape: tuple, dtype) -> np.ndarray:
    """One `.npy` member, its header checked against `shape`/`dtype` before any data is read."""
    info = z.getinfo(f"{name}.npy")
    with z.open(info) as f:
        got = npy_header(f)
        if got != (tuple(shape), np.dtype(dtype)):
            raise ValueError(f"{name} declares {got[0]} {got[1]}, expected {shape} {dtype}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if info.file_size != f.tell() + nbytes:
            raise ValueError(f"{name} is {info.file_size} bytes, not a {shape} {dtype} array")
        return np.frombuffer(f.read(nbytes), np.dtype(dtype)).reshape(shape)


def load_state(d: Path, cfg: Config, problem, done: int):
    """The saved solver state if it matches this solver, its shapes and iteration `done`; else
    None (with a warning where the file exists but does not fit). No data is read unless every
    member's header declares the shape and dtype the solver's state has."""
    import jax
    import jax.numpy as jnp

    path = d / STATE_FILE
    if cfg.solver.name not in solvers.COMPILED or not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("meta.npy")
            if info.file_size > 10_000:
                raise ValueError(f"meta is {info.file_size} bytes")
            with z.open(info) as f:
                meta = json.loads(np.lib.format.read_array(f, allow_pickle=False).tobytes())
            if meta.get("solver") != cfg.solver.name or meta.get("iteration") != done:
                return None
            init, _ = solvers.make(cfg.solver.settings(), losses.objective(problem.spec))
            ref = jax.eval_shape(init, problem.x0,
                                 (problem.params, problem.targets, problem.weights))
            flat = jax.tree.leaves(ref)
            if meta.get("leaves") != len(flat):
                raise ValueError(f"{meta.get('leaves')} leaves, the solver has {len(flat)}")
            leaves = []
            for i, a in enumerate(flat):
                v = _member(z, f"leaf_{i:04d}", a.shape, a.dtype)
                leaves.append(jnp.asarray(v.item()) if a.weak_type else jnp.asarray(v))
        return jax.tree.unflatten(jax.tree.structure(ref), leaves)
    except (OSError, ValueError, KeyError, TypeError, EOFError, AttributeError,
            zipfile.BadZipFile) as e:
        print(f"warning: {path}: not used ({str(e)[:200]}); the solver state restarts",
              file=sys.stderr)
        return None


# ---------------------------------------------------------------- resume checks

# run.json fields a resume reads, and the types they must have.
_RECORD_TYPES: dict[str, tuple] = {
    "status": (str,), "pid": (int,), "host": (str,), "weights": (dict,),
    "evaluations": (int,), "solve_seconds": (int, float), "compile_seconds": (int, float),
    "wall_seconds": (int, float), "resumed": (list,),
}


def read_record(d: Path) -> dict:
    """run.json of `d`, its fields of the types a resume relies on (null where optional)."""
    path = d / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:200]}); cannot resume") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: holds a {type(record).__name__}, not a JSON object; "
                        "cannot resume")
    for key, types in _RECORD_TYPES.items():
        v = record.get(key)
        if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise UserError(f"{path}: field {key!r} is {json.dumps(v)[:60]}, not {want}; "
                            "fix or remove it to resume")
    return record


def read_last(path: Path, hw_max: int) -> np.ndarray:
    """last.npy as a finite float32 (1, H, W, 3) array with H*W <= hw_max, checked from its
    header before any data is read."""
    if not path.is_file():
        raise UserError(f"{path.parent}: no last.npy to resume from; start a new run")
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f)
            start = f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:200]}); cannot resume") from None
    ok = (dtype == np.float32 and len(shape) == 4 and shape[0] == 1 and shape[3] == 3
          and 0 < shape[1] * shape[2] <= hw_max)
    if not ok:
        raise UserError(f"{path}: declares a {dtype} array of shape {shape}, not a float32 "
                        "(1, H, W, 3) image of this run's size; cannot resume")
    if path.stat().st_size != start + 12 * shape[1] * shape[2]:
        raise UserError(f"{path}: is {path.stat().st_size} bytes, not the {shape} array its "
                        "header declares; cannot resume")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable ({str(e)[:200]}); cannot resume") from None
    if not np.isfinite(x).all():
        raise UserError(f"{path}: holds non-finite values; cannot resume")
    return x
