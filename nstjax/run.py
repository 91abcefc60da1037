"""One style-transfer run from a Config: wiring, progress, and the run record on disk."""

import csv
import io
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import __version__, image, losses, solvers, weights
from nstjax.config import Config, dump, merge, parse_overrides, read_yaml, validate
from nstjax.errors import UserError

HISTORY_COLUMNS = ("iter", "total", "content", "style", "tv", "seconds")
_PROGRAMS: dict = {}


@dataclass
class Problem:
    """Everything a solve needs, as arrays: built once per run (or per sweep cell)."""

    spec: losses.Spec
    params: dict
    content: jax.Array  # (1,H,W,3) preprocessed
    style: jax.Array
    targets: dict
    weights: dict
    x0: jax.Array
    info: dict  # weights source, sizes
    post: Callable[[np.ndarray], np.ndarray] | None = None  # x -> the image to save (controls)


def spec_of(cfg: Config) -> losses.Spec:
    return losses.Spec(
        content_layers=tuple(cfg.loss.content_layers),
        style_layers=tuple(cfg.loss.style_layers),
        pooling=cfg.model.pooling,
        normalization=cfg.loss.normalization,
        precision=cfg.model.precision,
        remat=cfg.model.remat,
        style_masks=len(cfg.styles) if cfg.masks.style else 0,
        content_mask=cfg.masks.content is not None,
    )


def loss_weights(cfg: Config, spec: losses.Spec) -> dict:
    return losses.default_weights(spec, cfg.loss.style_weights, cfg.loss.style_to_content_ratio,
                                  cfg.loss.tv_weight, cfg.loss.content_weights)


def load_images(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Content at `image.size`; style resized to the content's size, as the post does."""
    mp = cfg.image.max_pixels
    content = image.load(cfg.content, cfg.image.size, cfg.image.resample, max_pixels=mp)
    h, w = content.shape[1:3]
    style = image.load(cfg.styles[0], [w, h], cfg.image.resample, max_pixels=mp)
    return content, style


def initial_image(cfg: Config, content: np.ndarray, style: np.ndarray) -> jax.Array:
    """x0: `noise` (the post's uniform(-2.5, 2.5)/100 from the seed), `content`, `style`, a file."""
    if cfg.init == "noise":
        key = jax.random.key(cfg.seed)
        return jax.random.uniform(key, content.shape, jnp.float32, -2.5, 2.5) / 100.0
    if cfg.init == "content":
        return jnp.asarray(content)
    if cfg.init == "style":
        return jnp.asarray(style)
    h, w = content.shape[1:3]
    x0 = image.load(cfg.init, [w, h], cfg.image.resample, max_pixels=cfg.image.max_pixels)
    if x0.shape != content.shape:
        raise UserError(f"init: {cfg.init} has shape {x0.shape[1:3]}, the run needs {(h, w)}")
    return jnp.asarray(x0)


_targets_jit = jax.jit(losses.targets, static_argnums=(3,))


def check_depth(cfg: Config, hw: tuple[int, int]) -> None:
    """Refuse a size at which the deepest loss layer would have no pixels (after its pools)."""
    deepest = max(cfg.loss.content_layers + cfg.loss.style_layers, key=lambda n: int(n[5]))
    need = 2 ** (int(deepest[5]) - 1)
    if min(hw) < need:
        raise UserError(
            f"the images are {hw[1]}x{hw[0]} pixels but layer {deepest} needs at least {need} "
            "on each side; raise image.size or use an image with a less extreme aspect ratio")


def build(cfg: Config, params: dict | None = None, winfo: dict | None = None) -> Problem:
    """Load images and weights, compute targets: the arrays a solve needs."""
    from nstjax import controls  # controls imports this module

    if controls.active(cfg):
        return controls.build(cfg, params, winfo)
    content, style = load_images(cfg)
    check_depth(cfg, content.shape[1:3])
    if params is None:
        params, winfo = weights.load(cfg.model.weights, seed=cfg.seed)
    params = jax.tree.map(jnp.asarray, params)
    spec = spec_of(cfg)
    tgt = _targets_jit(params, jnp.asarray(content), jnp.asarray(style), spec)
    info = {"weights": winfo, "content_size": [content.shape[2], content.shape[1]]}
    return Problem(spec, params, jnp.asarray(content), jnp.asarray(style), tgt,
                   loss_weights(cfg, spec), initial_image(cfg, content, style), info)


def chunk_size(cfg: Config) -> int:
    n = max(cfg.solver.maxiter, 1)
    return cfg.output.save_every if cfg.output.save_every else min(n, 25)


def program(spec: losses.Spec, s: solvers.Settings, x0, args, chunk: int):
    """Compiled (init, chunk) for these shapes, reused by later runs in this process."""
    s = replace(s, maxiter=0)  # not part of a compiled program: runs of any length share it
    key = (spec, s, chunk, jax.tree.structure(args),
           tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves((x0, args))))
    hit = key in _PROGRAMS
    if not hit:
        _PROGRAMS[key] = solvers.compile_program(s, losses.objective(spec), x0, args, chunk)
    return _PROGRAMS[key], hit


# ---------------------------------------------------------------- run directory


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary name in the same directory, then rename."""
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C: never leave the temporary file behind
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def history_csv(rows: list[dict], columns: tuple[str, ...] = HISTORY_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _slug(text: str) -> str:
    s = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in text)
    return s.strip("-")[:40] or "run"


def make_run_dir(out: str | Path | None, cfg: Config, parent: str | Path = "runs") -> Path:
    """A new run directory: `out` if it is absent or empty, else a unique name under `parent`."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"--out {out} exists and is not empty: pick a new directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            # Claimed by creating run.json exclusively: two runs given one --out never share it.
            fd = os.open(out / "run.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise UserError(f"--out {out} exists and is not empty: pick a new directory") from None
        except OSError as e:
            raise UserError(f"--out {out}: cannot create directory: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write('{"status": "starting"}\n')
        return out
    parent = Path(parent)
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{_slug(Path(cfg.content).stem)}-" \
           f"{_slug(Path(cfg.styles[0]).stem)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(10_000):
            d = parent / (stem if i == 0 else f"{stem}-{i}")
            try:
                d.mkdir()  # atomic: two runs at once never share a directory
                return d
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"cannot create a run directory in {parent}: {e.strerror}") from None
    raise UserError(f"no free run directory name under {parent}")


def check_out(out: str | Path | None, parent: str | Path = "runs") -> None:
    """Fail fast, before loading images or weights, where no run directory could be made."""
    target = Path(out) if out is not None else Path(parent)
    what = "--out" if out is not None else "--runs-dir"
    if out is not None and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {target} exists and is not empty: pick a new directory")
    probe = target.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {target}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {target}: {probe} is not writable (permission denied); "
                        "pick another directory")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"nstjax": __version__, "python": platform.python_version()}
    for name in ("jax", "jaxlib", "jaxopt", "optax", "numpy", "scipy", "pillow", "h5py"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@contextmanager
def stop_on_signals(flag: dict):
    """SIGINT/SIGTERM set flag['signal']; the run stops after the current chunk.

    A compiled chunk cannot be interrupted: a second signal raises KeyboardInterrupt when
    control is back in Python (after that chunk, or inside a host-side solver), unless
    flag['finishing'] is set (the final files are being written; signals are then ignored).
    """
    old = {}

    def handler(signum, _frame):
        if flag.get("finishing"):
            return
        if flag.get("signal"):  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        flag["signal"] = signum

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers
        pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


@dataclass
class RunResult:
    dir: Path
    result: solvers.Result
    record: dict

    @property
    def exit_code(self) -> int:
        return {"done": 0, "converged": 0, "failed": 1, "interrupted": 130}.get(
            self.record["status"], 1) if self.record.get("signal") != signal.SIGTERM else 143


def _image_name(cfg: Config, stem: str) -> str:
    return f"{stem}.{cfg.output.format}"


def run(cfg: Config, out: str | Path | None = None, *, quiet: bool = False,
        parent: str | Path = "runs", problem: Problem | None = None) -> RunResult:
    """Run one style transfer and write its run directory; returns where and what.

    Bad input raises UserError before the run directory exists. Once it exists, the run ends
    with run.json, the final image, last.npy and history.csv whatever happens (see `_solve`).
    """
    t_start = time.perf_counter()
    check_out(out, parent)
    if problem is None and cfg.multiscale.count:
        from nstjax import controls  # controls imports this module

        return controls.run_multiscale(cfg, out, quiet=quiet, parent=parent)
    problem = problem or _build_or_oom(cfg)
    d = make_run_dir(out, cfg, parent)
    return _solve(d, cfg, problem, start_record(cfg, problem), t_start, quiet=quiet)


def _build_or_oom(cfg: Config) -> Problem:
    try:
        return build(cfg)
    except (MemoryError, RuntimeError) as e:
        raise _as_user_error(e, cfg.image.size) from None


def _as_user_error(e: BaseException, size) -> BaseException:
    """Out-of-memory errors as a one-line UserError with what to change; others unchanged."""
    text = str(e)
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
        return UserError(f"out of memory at image size {size} ({first}); lower image.size, or "
                         "set model.remat: true or model.precision: bfloat16")
    return e


def _one_line(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _solve(d: Path, cfg: Config, problem: Problem, record: dict, t_start: float, *,
           quiet: bool = False, prior: list[dict] | None = None, state0=None,
           carry: dict | None = None) -> RunResult:
    """Solve into run directory `d`, continuing after `prior` history rows (for resume).

    The directory always ends complete: SIGINT/SIGTERM stop after the current chunk (a second
    signal stops at the next return to Python, with the last chunk's image) with status
    `interrupted`; a non-finite loss ends `failed` with the last finite image; any exception
    marks the run `failed` (image, history, last.npy written) and is then re-raised.
    """
    from tqdm.auto import tqdm

    s = cfg.solver.settings()
    scipy = s.name == "scipy_lbfgsb"
    total_steps = s.rounds if scipy else s.maxiter
    history: list[dict] = [dict(r) for r in prior or ()]
    done0 = history[-1]["iter"] if history else 0
    s_now = replace(s, **{"rounds" if scipy else "maxiter": max(total_steps - done0, 0)})
    chunk = chunk_size(cfg)
    args = (problem.params, problem.targets, problem.weights)
    t_prev = history[-1]["seconds"] if history else 0.0
    flag: dict = {}
    last = {"x": np.asarray(problem.x0), "offset": 0}
    bar = tqdm(total=total_steps, initial=done0, disable=quiet, unit="it", dynamic_ncols=True,
               file=sys.stderr)

    def on_start(x: np.ndarray, row: dict) -> bool:
        last["offset"] = done0 - row["iter"]  # rows continue the run's iteration numbers
        if not history:
            history.append(row)
            write_atomic(d / "history.csv", history_csv(history))
        if not np.isfinite(row["total"]):  # e.g. overflowing loss weights: no step can help
            last["bad_start"] = row["total"]
            return True
        return bool(flag.get("signal"))

    def on_chunk(x: np.ndarray, rows: list[dict]) -> bool:
        rows = [{**r, "iter": r["iter"] + last["offset"], "seconds": r["seconds"] + t_prev}
                for r in rows]
        bar.update(len(rows))
        if rows:
            bar.set_postfix(loss=f"{rows[-1]['total']:.4g}")
        it = rows[-1]["iter"] if rows else 0
        every = cfg.output.save_every
        if every and it and it % every == 0 and it < total_steps:
            image.save(d / _image_name(cfg, f"iter_{it:06d}"), visible(problem, x),
                       bits=cfg.output.bits)
        # last.npy before history.csv: killed in between, a resume repeats no work it counted.
        write_atomic(d / "last.npy", _npy_bytes(x))
        last["x"] = x
        history.extend(rows)
        write_atomic(d / "history.csv", history_csv(history))
        return bool(flag.get("signal"))

    res, crash, compile_s = None, None, 0.0
    with stop_on_signals(flag):
        try:
            write_atomic(d / "config.yaml", dump(cfg))
            write_atomic(d / "run.json", json.dumps(record, indent=2))
            compiled = None
            if s.name in solvers.COMPILED:
                t = time.perf_counter()
                compiled, hit = program(problem.spec, s, problem.x0, args, chunk)
                compile_s = 0.0 if hit else time.perf_counter() - t
            res = solvers.minimize(s_now, losses.objective(problem.spec), problem.x0, args,
                                   chunk=chunk, on_chunk=on_chunk, on_start=on_start,
                                   compiled=compiled, state0=state0, keep_state=not scipy,
                                   first_chunk=chunk - done0 % chunk)  # snapshots stay aligned
        except KeyboardInterrupt:  # a second signal: stop now, with the last chunk's image
            flag.setdefault("signal", signal.SIGINT)
        except Exception as e:  # recorded in run.json, then re-raised below
            crash = _as_user_error(e, cfg.image.size)
        flag["finishing"] = True  # from here on, signals are ignored: finishing is quick
        bar.close()
        if res is None:
            res = solvers.Result(x=last["x"], status="interrupted")
        res.history = history
        res.iterations = history[-1]["iter"] if history else done0
        res.compile_seconds = max(res.compile_seconds, compile_s)
        for k, v in (carry or {}).items():  # totals of earlier sessions (resume)
            setattr(res, k, getattr(res, k) + v)
        if flag.get("signal") and res.status != "failed":
            res.status = "interrupted"
        if "bad_start" in last:
            res.status, res.error = "failed", f"loss is {last['bad_start']} at the start image"
        if crash is not None:
            res.status, res.error = "failed", _one_line(crash)
        record["signal"] = flag.get("signal")
        try:
            write_atomic(d / "last.npy", _npy_bytes(res.x))
            finish(d, cfg, res, record, t_start, post=problem.post)
            _save_state(d, cfg, res)
        except UserError as e:  # e.g. the disk filled up: keep what is written, say so
            record.update(status="failed", error=str(e))
            with suppress(UserError):
                write_atomic(d / "run.json", json.dumps(record, indent=2))
            crash = crash or e
        res.state = None  # on disk if needed; do not hold the device memory
    if crash is not None:
        raise crash
    return RunResult(d, res, record)


def start_record(cfg: Config, problem: Problem) -> dict:
    """The run.json fields known before solving."""
    return {"status": "running", "versions": versions(), "device": str(jax.devices()[0]),
            "platform": jax.default_backend(), **problem.info, "solver": cfg.solver.name,
            "started": datetime.now().isoformat(timespec="seconds"), "pid": os.getpid(),
            "host": platform.node()}


def visible(problem: Problem, x: np.ndarray) -> np.ndarray:
    """The image to save for x: `problem.post(x)` (content mask, colour) if set, else x."""
    return problem.post(np.asarray(x)) if problem.post is not None else x


def finish(d: Path, cfg: Config, res: solvers.Result, record: dict, t_start: float, *,
           post: Callable[[np.ndarray], np.ndarray] | None = None,
           columns: tuple[str, ...] = HISTORY_COLUMNS) -> dict:
    """Write final image, history.csv and the completed run.json (last, so it marks completion)."""
    x = post(np.asarray(res.x)) if post is not None else res.x
    image.save(d / _image_name(cfg, "final"), x, bits=cfg.output.bits)
    write_atomic(d / "history.csv", history_csv(res.history, columns))
    record.update(
        status=res.status, error=res.error,
        iterations=res.iterations, evaluations=res.evals,
        compile_seconds=round(res.compile_seconds, 4), solve_seconds=round(res.solve_seconds, 4),
        ms_per_evaluation=round(1e3 * res.solve_seconds / max(res.evals, 1), 4),
        wall_seconds=round(time.perf_counter() - t_start, 4),
        final_loss=_losses(res.history[-1]) if res.history else None,
        initial_loss=_losses(res.history[0]) if res.history else None,
        finished=datetime.now().isoformat(timespec="seconds"),
    )
    write_atomic(d / "run.json", json.dumps(record, indent=2))
    return record


def _losses(row: dict) -> dict:
    return {k: row[k] for k in ("total", "content", "style", "tv")}


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, np.float32), allow_pickle=False)
    return buf.getvalue()


def enable_compile_cache(path: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (default: `<cache dir>/jax`)."""
    path = Path(path) if path else weights.cache_dir() / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


# ---------------------------------------------------------------- resume

STATE_FILE = "solver_state.npz"
RESUMABLE = ("interrupted", "failed", "running")


def _save_state(d: Path, cfg: Config, res: solvers.Result) -> None:
    """solver_state.npz (the state pytree's leaves and a JSON meta; no pickle) when interrupted.

    Without it (host solver, a hard stop, a killed process) a resume restarts the solver's
    memory (L-BFGS history, Adam moments) from the last image.
    """
    path = d / STATE_FILE
    if res.status != "interrupted" or res.state is None:
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


def _state_leaf(ref, v: np.ndarray) -> jax.Array:
    if v.shape != ref.shape or v.dtype != ref.dtype:
        raise ValueError(f"leaf {v.shape} {v.dtype} is not {ref.shape} {ref.dtype}")
    if ref.weak_type:  # scalars the compiled program takes weakly typed
        out = jnp.asarray(v.item())
        if out.dtype != ref.dtype:
            raise ValueError(f"weak leaf {out.dtype} is not {ref.dtype}")
        return out
    return jnp.asarray(v)


def _load_state(d: Path, cfg: Config, problem: Problem, done: int):
    """The saved solver state if it matches this solver, its shapes and iteration `done`."""
    import zipfile

    path = d / STATE_FILE
    if cfg.solver.name not in solvers.COMPILED or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            leaves = [z[f"leaf_{i:04d}"] for i in range(int(meta["leaves"]))]
        if meta.get("solver") != cfg.solver.name or meta.get("iteration") != done:
            return None
        init, _ = solvers.make(cfg.solver.settings(), losses.objective(problem.spec))
        ref = jax.eval_shape(init, problem.x0, (problem.params, problem.targets, problem.weights))
        flat = jax.tree.leaves(ref)
        if len(flat) != len(leaves):
            return None
        return jax.tree.unflatten(jax.tree.structure(ref),
                                  [_state_leaf(a, v) for a, v in zip(flat, leaves)])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


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


def _alive(record: dict) -> bool:
    """Whether the process that wrote a `running` run.json still runs (on this host)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0 or record.get("host") != platform.node():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _resumable(d: Path, overrides: list[str]) -> tuple[dict, Config]:
    """run.json and the config (with solver./output. overrides) of a run that can resume."""
    if not d.is_dir():
        raise UserError(f"{d}: no such run directory")
    for name in ("config.yaml", "run.json"):
        if not (d / name).is_file():
            raise UserError(f"{d}: not a run directory (no {name}); give a directory made by "
                            "`nstjax run`")
    try:
        record = json.loads((d / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{d / 'run.json'}: unreadable ({e}); cannot resume") from None
    status = record.get("status") if isinstance(record, dict) else None
    if status in ("done", "converged"):
        raise UserError(f"{d}: the run has finished (status {status}); nothing to resume; start "
                        f"a new run (init: {d}/last.npy) to go further")
    if status == "running" and _alive(record):
        raise UserError(f"{d}: the run is still going (pid {record['pid']}); stop it first")
    if status not in RESUMABLE:
        raise UserError(f"{d}: run.json has status {status!r}; only interrupted, failed or "
                        "killed runs can be resumed")
    for item in overrides:
        key = item.partition("=")[0].strip()
        if not key.startswith(("solver.", "output.")):
            raise UserError(f"resume: {key} cannot change when resuming, only solver.* and "
                            "output.* settings can; start a new run instead")
    cfg_path = d / "config.yaml"
    cfg = validate(merge(read_yaml(cfg_path), parse_overrides(list(overrides))), str(cfg_path))
    if getattr(getattr(cfg, "multiscale", None), "count", 0):
        raise UserError(f"{d}: a multi-scale run cannot be resumed; start a new run instead")
    return record, cfg


def _read_last(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path.parent}: no last.npy to resume from; start a new run")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable ({e}); cannot resume") from None
    if x.dtype != np.float32 or x.ndim != 4 or not np.isfinite(x).all():
        raise UserError(f"{path}: holds a {x.dtype} array of shape {x.shape}, not a finite "
                        "float32 image; cannot resume")
    return x


def resume(run_dir: str | Path, overrides: list[str] = (), *, quiet: bool = False) -> RunResult:
    """Continue an interrupted, failed or killed run in its own directory, to its iteration count.

    Starts from last.npy and continues history.csv's numbering; the solver's state is restored
    from solver_state.npz where it was saved (a stop between chunks), else restarts. Only
    `solver.*` and `output.*` may be overridden (e.g. a higher solver.maxiter). run.json gets a
    `resumed` entry per session and, at the end, totals over all sessions.
    """
    t_start = time.perf_counter()
    d = Path(run_dir)
    record, cfg = _resumable(d, list(overrides))
    history = read_history(d / "history.csv")
    done = history[-1]["iter"] if history else 0
    x = _read_last(d / "last.npy")
    problem = _build_or_oom(cfg.model_copy(update={"init": "noise"}))  # x0 is last.npy
    if x.shape != tuple(problem.content.shape):
        raise UserError(f"{d / 'last.npy'}: holds an image of shape {x.shape}, the run needs "
                        f"{tuple(problem.content.shape)}; cannot resume")
    old = (record.get("weights") or {}).get("sha256")
    new = (problem.info.get("weights") or {}).get("sha256")
    if old and new and old != new:
        raise UserError(f"model.weights {cfg.model.weights} changed since the run started "
                        f"(sha256 {new[:12]}..., was {old[:12]}...); cannot resume")
    problem.x0 = jnp.asarray(x)
    state0 = _load_state(d, cfg, problem, done)
    carry = {"evals": 0 if state0 else record.get("evaluations") or 0,  # a state counts them
             "solve_seconds": record.get("solve_seconds") or 0.0,
             "compile_seconds": record.get("compile_seconds") or 0.0}
    t_start -= record.get("wall_seconds") or 0.0
    for k in ("error", "signal", "finished"):
        record.pop(k, None)
    record.update(status="running", pid=os.getpid(), host=platform.node())
    record.setdefault("resumed", []).append({
        "at": datetime.now().isoformat(timespec="seconds"), "from_iteration": done,
        "overrides": list(overrides), "solver_state": "restored" if state0 else "restarted"})
    return _solve(d, cfg, problem, record, t_start, quiet=quiet, prior=history, state0=state0,
                  carry=carry)
