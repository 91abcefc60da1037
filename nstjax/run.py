"""One style-transfer run from a Config: wiring, progress, and the run record on disk."""

import csv
import io
import json
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import __version__, image, losses, solvers, weights
from nstjax.config import Config, dump
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


def spec_of(cfg: Config) -> losses.Spec:
    return losses.Spec(
        content_layers=tuple(cfg.loss.content_layers),
        style_layers=tuple(cfg.loss.style_layers),
        pooling=cfg.model.pooling,
        normalization=cfg.loss.normalization,
        precision=cfg.model.precision,
        remat=cfg.model.remat,
    )


def loss_weights(cfg: Config, spec: losses.Spec) -> dict:
    return losses.default_weights(spec, cfg.loss.style_weights, cfg.loss.style_to_content_ratio,
                                  cfg.loss.tv_weight, cfg.loss.content_weights)


def load_images(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Content at `image.size`; style resized to the content's size, as the post does."""
    mp = cfg.image.max_pixels
    content = image.load(cfg.content, cfg.image.size, cfg.image.resample, max_pixels=mp)
    h, w = content.shape[1:3]
    style = image.load(cfg.style, [w, h], cfg.image.resample, max_pixels=mp)
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


def build(cfg: Config, params: dict | None = None, winfo: dict | None = None) -> Problem:
    """Load images and weights, compute targets: the arrays a solve needs."""
    content, style = load_images(cfg)
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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def history_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
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
        except OSError as e:
            raise UserError(f"--out {out}: cannot create directory: {e.strerror}") from None
        return out
    parent = Path(parent)
    stem = f"{datetime.now():%Y%m%d-%H%M%S}-{_slug(Path(cfg.content).stem)}-" \
           f"{_slug(Path(cfg.style).stem)}"
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
    """SIGINT/SIGTERM set flag['signal']; the run stops after the current chunk."""
    old = {}

    def handler(signum, _frame):
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
    """Run one style transfer and write its run directory; returns where and what."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    problem = problem or build(cfg)
    d = make_run_dir(out, cfg, parent)
    write_atomic(d / "config.yaml", dump(cfg))
    s = cfg.solver.settings()
    chunk = chunk_size(cfg)
    args = (problem.params, problem.targets, problem.weights)
    record = start_record(cfg, problem)
    write_atomic(d / "run.json", json.dumps(record, indent=2))

    compiled, hit = (None, False)
    t = time.perf_counter()
    if s.name in solvers.COMPILED:
        compiled, hit = program(problem.spec, s, problem.x0, args, chunk)
    compile_s = 0.0 if hit else time.perf_counter() - t

    flag: dict = {}
    history: list[dict] = []
    total_steps = s.rounds if s.name == "scipy_lbfgsb" else s.maxiter
    bar = tqdm(total=total_steps, disable=quiet, unit="it", dynamic_ncols=True, file=sys.stderr)

    def on_chunk(x: np.ndarray, rows: list[dict]) -> bool:
        history.extend(rows)
        bar.update(len(rows))
        if rows:
            bar.set_postfix(loss=f"{rows[-1]['total']:.4g}")
        it = rows[-1]["iter"] if rows else 0
        every = cfg.output.save_every
        if every and it and it % every == 0 and it < total_steps:
            image.save(d / _image_name(cfg, f"iter_{it:06d}"), x, bits=cfg.output.bits)
        write_atomic(d / "history.csv", history_csv(history))
        write_atomic(d / "last.npy", _npy_bytes(x))
        return bool(flag.get("signal"))

    with stop_on_signals(flag):
        res = solvers.minimize(s, losses.objective(problem.spec), problem.x0, args, chunk=chunk,
                               on_chunk=on_chunk, compiled=compiled)
    bar.close()
    res.compile_seconds = max(res.compile_seconds, compile_s)
    if flag.get("signal") and res.status != "failed":
        res.status = "interrupted"
    record["signal"] = flag.get("signal")
    finish(d, cfg, res, record, t_start)
    return RunResult(d, res, record)


def start_record(cfg: Config, problem: Problem) -> dict:
    """The run.json fields known before solving."""
    return {"status": "running", "versions": versions(), "device": str(jax.devices()[0]),
            "platform": jax.default_backend(), **problem.info, "solver": cfg.solver.name,
            "started": datetime.now().isoformat(timespec="seconds")}


def finish(d: Path, cfg: Config, res: solvers.Result, record: dict, t_start: float) -> dict:
    """Write final image, history.csv and the completed run.json (last, so it marks completion)."""
    image.save(d / _image_name(cfg, "final"), res.x, bits=cfg.output.bits)
    write_atomic(d / "history.csv", history_csv(res.history))
    record.update(
        status=res.status, error=res.error,
        iterations=res.iterations, evaluations=res.evals,
        compile_seconds=round(res.compile_seconds, 4), solve_seconds=round(res.solve_seconds, 4),
        ms_per_evaluation=round(1e3 * res.solve_seconds / max(res.evals, 1), 4),
        wall_seconds=round(time.perf_counter() - t_start, 4),
        final_loss={k: res.history[-1][k] for k in ("total", "content", "style", "tv")},
        initial_loss={k: res.history[0][k] for k in ("total", "content", "style", "tv")},
        finished=datetime.now().isoformat(timespec="seconds"),
    )
    write_atomic(d / "run.json", json.dumps(record, indent=2))
    return record


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
