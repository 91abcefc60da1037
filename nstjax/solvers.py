"""All solvers behind one entry point, `minimize`.

Compiled solvers (`lbfgs`, the default; `jaxopt_lbfgs`; `optax_lbfgs`; `adam`) are two pure
functions, `init(x0, args)` and `chunk(state, args, n, length)`: `chunk` runs a compiled
`lax.scan` of `length` steps, at most `n` iterations, and returns per-step loss terms, so the
host syncs once per chunk, and the state carries over exactly between chunks. A step is one
iteration, except for `lbfgs` (nstjax.lbfgs), whose step is one evaluation: an iteration when
its line search accepts the point (the trace's `accepted` flag). `scipy_lbfgsb` is the blog
post's own scheme (scipy `fmin_l_bfgs_b`, `maxfun` evaluations per round, clip to [-127, 127]
between rounds).

The objective contract, for every solver: `fun(x, *args) -> (total, terms)`, a pure JAX
function of the image-shaped float32 array `x` and any pytrees `args`; `total` is the scalar
to minimize and `terms` a flat dict of float32 scalars that includes `"total"` (each becomes a
history column: per-layer terms too). It is traced once per compiled program, so no Python
side effects; it must be differentiable in `x`.

The host loop over compiled chunks is `drive` (single solves and batched cells alike);
`nstjax.batch` maps `init`/`chunk` over cells for researchers' own batched objectives.
"""

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import lbfgs
from nstjax.errors import PluginError, user_code
from nstjax.tables import COMPILED_SOLVERS, DEFAULT_SOLVER, SOLVERS

COMPILED, NAMES, DEFAULT = COMPILED_SOLVERS, SOLVERS, DEFAULT_SOLVER

# The settings each solver reads (from reading its code above and below); any other solver key
# it would ignore, so config validation refuses it (`config.validate`, `solver.<key>`).
_LBFGS_KEYS = frozenset({"maxiter", "maxevals", "history_size", "maxls", "tol"})
USES: dict[str, frozenset[str]] = {
    "lbfgs": _LBFGS_KEYS,
    "jaxopt_lbfgs": _LBFGS_KEYS,
    "optax_lbfgs": _LBFGS_KEYS,
    "adam": frozenset({"maxiter", "maxevals", "tol", "learning_rate"}),
    "scipy_lbfgsb": frozenset({"maxevals", "history_size", "maxls", "rounds", "maxfun", "pgtol",
                               "factr"}),
}


@dataclass(frozen=True)
class Settings:
    """Solver settings. Tolerances are opt-in: by default every solver runs `maxiter`."""

    name: str = DEFAULT
    maxiter: int = 200
    maxevals: int = 0  # evaluation budget (0: none); a compiled solver's step may overshoot it
    history_size: int = 10  # L-BFGS solvers (scipy_lbfgsb: its m)
    maxls: int = 20  # L-BFGS line-search steps (scipy_lbfgsb too)
    tol: float = 0.0  # stop when |grad| <= tol * |grad at x0| (compiled solvers)
    learning_rate: float = 5.0  # adam
    rounds: int = 10  # scipy_lbfgsb
    maxfun: int = 20  # scipy_lbfgsb, evaluations per round
    pgtol: float = 0.0  # scipy_lbfgsb; scipy's default is 1e-5
    factr: float = 0.0  # scipy_lbfgsb; scipy's default is 1e7
    clip: float = 127.0  # scipy_lbfgsb, between rounds


class Status(str, enum.Enum):
    DONE = "done"  # ran maxiter iterations (or the evaluation budget)
    CONVERGED = "converged"  # tol reached, or no further decrease possible
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    RUNNING = "running"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class SolveState(NamedTuple):
    """What a compiled solver carries from chunk to chunk (a pytree: vmapped, saved, resumed).

    `opt` is the solver's own state (an `lbfgs.State`, jaxopt's or optax's); `terms` the loss
    terms at `x`; `gnorm`/`g0` the gradient norm now and at the start (for `tol`); `it`
    accepted iterations, `evals` evaluations; `done` (converged or out of budget) and
    `failed` (non-finite loss) stop the cell."""

    x: jax.Array
    opt: Any
    terms: dict
    gnorm: jax.Array
    g0: jax.Array
    it: jax.Array
    evals: jax.Array
    done: jax.Array
    failed: jax.Array


@dataclass
class Result:
    """What `minimize` returns.

    x: np.ndarray -- the final image (float32, x0's shape; the last finite iterate on failure).
    history: list[dict] -- one row per accepted iteration plus the start row: {"iter": int,
        every term of the objective (float), "seconds": float since the solve started}.
    evals: int -- objective evaluations; iterations: int -- accepted iterations (the state's
        count; rounds for scipy_lbfgsb).
    status: Status -- done, converged, failed or interrupted; error: str -- why it failed.
    compile_seconds, solve_seconds: float.
    state: the final solver state (compiled solvers with `keep_state=True`), for resuming.
    """

    x: np.ndarray
    history: list[dict] = field(default_factory=list)
    evals: int = 0
    iterations: int = 0
    status: Status = Status.DONE
    compile_seconds: float = 0.0
    solve_seconds: float = 0.0
    error: str = ""
    state: Any = None  # final solver state (compiled solvers, `keep_state=True`): for resuming


def _norm(g: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.vdot(a, a).real for a in jax.tree.leaves(g)))


def _jaxopt(s: Settings, fun: Callable):
    import jaxopt

    # jaxopt's zoom line search evaluates the objective at its start point every iteration only
    # to fill `aux` (its `init_state`, TODO there). Give it a placeholder `fun` for that, and the
    # real value and gradient for its steps: the placeholder surfaces only when the search fails
    # and keeps the start point, and then `step` keeps our terms. The other settings are the
    # ones `LBFGS(linesearch="zoom")` gives its line search.
    def placeholder(x, *args, **kwargs):
        _, aux = jax.eval_shape(fun, x, *args, **kwargs)
        return jnp.zeros((), x.dtype), jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux)

    search = jaxopt.ZoomLineSearch(fun=placeholder,
                                   value_and_grad=jax.value_and_grad(fun, has_aux=True),
                                   has_aux=True, maxiter=s.maxls, max_stepsize=1.0, jit=True,
                                   unroll=False)
    solver = jaxopt.LBFGS(fun=fun, has_aux=True, maxiter=max(s.maxiter, 1), tol=0.0,
                          history_size=s.history_size, maxls=s.maxls, linesearch=search,
                          linesearch_init="increase")

    def init(x, args):
        st = solver.init_state(x, *args)
        g = _norm(st.grad)
        # First step of unit length, as scipy's L-BFGS-B takes: jaxopt's default (gamma 1, step
        # <= 1) barely moves when gradients are tiny, as they are with the post's normalization.
        gamma = jnp.where(g > 0, 1.0 / g, 1.0).astype(st.gamma.dtype)
        return st._replace(gamma=gamma), st.aux, g, st.num_fun_eval

    def step(x, st, args, terms):
        x_new, new = solver.update(x, st, *args)
        same = jnp.all(x_new == x)
        terms = jax.tree.map(lambda a, b: jnp.where(same, a, b), terms, new.aux)
        # The placeholder call is counted in num_fun_eval: once per iteration.
        return x_new, new, terms, _norm(new.grad), new.num_fun_eval - st.num_fun_eval - 1

    return init, step


def _optax(s: Settings, fun: Callable):
    import optax

    if s.name == "adam":
        opt = optax.adam(s.learning_rate)
    else:
        ls = optax.scale_by_zoom_linesearch(max_linesearch_steps=s.maxls)
        opt = optax.lbfgs(memory_size=s.history_size, linesearch=ls)
    vg = jax.value_and_grad(fun, has_aux=True)

    def init(x, args):
        (_, terms), g = vg(x, *args)
        return (opt.init(x), g), terms, _norm(g), jnp.int32(1)

    def step(x, st, args, terms):
        ost, g = st
        n = jnp.int32(1)
        if s.name == "adam":
            upd, ost = opt.update(g, ost, x)
        else:
            upd, ost = opt.update(g, ost, x, value=terms["total"], grad=g,
                                  value_fn=lambda y: fun(y, *args)[0])
            n += jnp.int32(optax.tree_utils.tree_get(ost, "num_linesearch_steps"))
        x = optax.apply_updates(x, upd)
        (_, terms), g = vg(x, *args)
        return x, (ost, g), terms, _norm(g), n

    return init, step


def _steps(body: Callable, st: SolveState, length: int) -> tuple[SolveState, dict]:
    """`lax.scan(body, st, arange(length))` that ends after the first inactive step (inactive
    steps change nothing, and once inactive a cell stays so until the next chunk). Under vmap
    the loop runs while any lane is active: a scan would make lockstep lanes evaluate all
    `length` steps even when every cell finished early (measured 1.5x a sweep's time). Steps not
    run are inactive in the trace, their other entries those of the last step run."""
    _, out0 = jax.eval_shape(body, st, jnp.int32(0))
    buf = jax.tree.map(lambda a: jnp.zeros((length, *a.shape), a.dtype), out0)

    def step(c):
        i, st, tr, _ = c
        st, out = body(st, i)
        tr = jax.tree.map(lambda b, v: b.at[i].set(v), tr, out)
        return i + 1, st, tr, out["active"]

    i, st, tr, _ = jax.lax.while_loop(lambda c: (c[0] < length) & c[3], step,
                                      (jnp.int32(0), st, buf, jnp.bool_(True)))
    ran = jnp.arange(length) < i
    last = jax.tree.map(lambda b: b[jnp.maximum(i - 1, 0)], tr)
    tr = jax.tree.map(lambda b, v: jnp.where(ran.reshape((-1,) + (1,) * (b.ndim - 1)), b, v),
                      tr, last)
    return st, {**tr, "active": tr["active"] & ran, "accepted": tr["accepted"] & ran}


def _step_if(active: jax.Array, advance: Callable[[], SolveState], st: SolveState,
             lockstep: bool) -> SolveState:
    """advance() where `active`, else st. In lockstep (cells under `jax.vmap`) by a select:
    a `lax.cond` with a per-cell predicate broadcasts all its operands, the VGG params
    included, to every cell (a grouped convolution per layer: 6x the step time at 2 cells)."""
    if lockstep:
        return jax.tree.map(lambda a, b: jnp.where(active, a, b), advance(), st)
    return jax.lax.cond(active, advance, lambda: st)


def _make_lbfgs(s: Settings, fun: Callable, lazy: bool = False, lockstep: bool = False):
    """(init, chunk) of nstjax.lbfgs: a step is one evaluation, `n` caps accepted iterations.

    With `lazy`, init does not evaluate (its program holds no objective: quick to compile) and
    returns a state with evals == 0; the next chunk, even with n == 0, evaluates x0 first.
    With `lockstep` (for `jax.vmap` over cells), every step evaluates and inactive cells keep
    their state (see `_step_if`).
    """
    opts = lbfgs.Options(history_size=s.history_size, maxls=s.maxls)

    def outer(o: lbfgs.State, g0) -> SolveState:
        gn = lbfgs.norm(o.g)
        return SolveState(x=o.x, opt=o, terms=o.terms, gnorm=gn, g0=g0(gn), it=o.it,
                          evals=o.evals, done=o.stalled, failed=jnp.bool_(False))

    def init(x0, args) -> SolveState:
        o = (lbfgs.start if lazy else lbfgs.init)(fun, x0, args, opts)
        return outer(o, lambda gn: gn)

    def advance(st, args):
        new = outer(lbfgs.step(fun, st.opt, args, opts),
                    lambda gn: jnp.where(st.evals == 0, gn, st.g0))
        if s.tol > 0:
            new = new._replace(done=new.done | (new.opt.accepted & (new.gnorm <= s.tol * new.g0)))
        return new

    def chunk(st, args, n, length: int):
        it0 = st.it

        def body(st, i):
            active = ((st.it - it0 < n) | (st.evals == 0)) & ~st.done
            if s.maxevals > 0:
                active &= st.evals < s.maxevals
            st = _step_if(active, lambda: advance(st, args), st, lockstep)
            return st, {**st.terms, "it": st.it, "evals": st.evals, "active": active,
                        "accepted": active & st.opt.accepted, "failed": st.failed}

        return _steps(body, st, length)

    return init, chunk


def make(s: Settings, fun: Callable, *, lazy: bool = False, lockstep: bool = False):
    """Pure (init, chunk) for a compiled solver; jit, vmap and shard them as needed.

    `init(x0, args) -> state` and `chunk(state, args, n, length) -> (state, trace)`, `args`
    the tuple of `fun`'s arguments after x. The state is a `SolveState`; the trace holds per
    step every term and it, evals, active, accepted, failed. `chunk` scans `length` steps and
    stops after `n` iterations: for `lbfgs` a step is one evaluation, for the others one
    iteration. With `lazy` (`lbfgs` only), init does not evaluate x0: run `evaluate_start`
    before the loop.
    `lockstep`: for chunks mapped with `jax.vmap` over cells (see `_step_if`).
    """
    if s.name == "lbfgs":
        return _make_lbfgs(s, fun, lazy=lazy, lockstep=lockstep)
    if s.name == "jaxopt_lbfgs":
        init0, step0 = _jaxopt(s, fun)
    elif s.name in ("optax_lbfgs", "adam"):
        init0, step0 = _optax(s, fun)
    else:
        raise ValueError(f"not a compiled solver: {s.name!r}")

    def init(x0, args) -> SolveState:
        opt, terms, gnorm, evals = init0(x0, args)
        return SolveState(x=x0, opt=opt, terms=terms, gnorm=gnorm, g0=gnorm, it=jnp.int32(0),
                          evals=jnp.int32(evals), done=jnp.bool_(False), failed=jnp.bool_(False))

    def advance(st, args):
        x, opt, terms, gnorm, n = step0(st.x, st.opt, args, st.terms)
        bad = ~jnp.isfinite(terms["total"]) | ~jnp.all(jnp.isfinite(x))
        done = bad | (gnorm <= s.tol * st.g0) if s.tol > 0 else bad
        # A non-finite step is dropped: the state keeps the last finite image and terms.
        keep = st._replace(it=st.it + 1, evals=st.evals + n, done=done, failed=bad)
        new = keep._replace(x=x, opt=opt, terms=terms, gnorm=gnorm)
        return jax.lax.cond(bad, lambda: keep, lambda: new)

    def chunk(st, args, n, length: int):
        def body(st, i):
            active = (i < n) & ~st.done
            if s.maxevals > 0:
                active &= st.evals < s.maxevals
            st = _step_if(active, lambda: advance(st, args), st, lockstep)
            return st, {**st.terms, "it": st.it, "evals": st.evals, "active": active,
                        "accepted": active, "failed": st.failed}

        return _steps(body, st, length)

    return init, chunk


_FLAGS = ("it", "evals", "active", "accepted", "failed")


def rows_of(trace: dict, t0: float, *, start: float | None = None,
            evals0: int | None = None, end: float | None = None) -> list[dict]:
    """Host rows {iter, <every term>, seconds} of the accepted steps of one cell's trace.

    A step dropped for a non-finite loss or image gets no row: history holds finite steps only.
    `seconds` is the time since t0 at the chunk's `end` (default: now); given the chunk's
    `start` time and the evaluation count `evals0` before it, rows are placed within the chunk
    by their evaluation counts (evaluations take equal time).
    """
    trace = jax.device_get(trace)
    keys = [k for k in trace if k not in _FLAGS]
    t1 = time.perf_counter() if end is None else end
    keep = np.flatnonzero(trace.get("accepted", trace["active"]) & ~trace["failed"])

    def seconds(i) -> float:
        if start is None or evals0 is None:
            return t1 - t0
        n = int(trace["evals"][-1]) - evals0
        frac = (int(trace["evals"][i]) - evals0) / n if n > 0 else 1.0
        return start - t0 + (t1 - start) * frac

    return [{"iter": int(trace["it"][i]), **{k: float(trace[k][i]) for k in keys},
             "seconds": seconds(i)} for i in keep]


# ---------------------------------------------------------------- the host loop


class Chunk(NamedTuple):
    """What `drive` hands to `on_chunk` after each compiled chunk."""

    state: Any  # the solver state after the chunk (device arrays; batched: leading cell axis)
    trace: dict  # per-step values as numpy arrays, shape (steps,) or (cells, steps)
    start: float  # time.perf_counter() when the chunk was launched
    end: float  # ... and when its results were on the host
    evals0: np.ndarray  # evaluations before the chunk (per cell when batched)


def evaluate_start(chunk_c: Callable, st: Any, args: tuple) -> Any:
    """Evaluate x0 where a lazy `init` (lbfgs) left it unevaluated: one chunk with n = 0."""
    evals, done = np.asarray(st.evals), np.asarray(st.done)
    if np.any((evals == 0) & ~done):
        st, _ = chunk_c(st, args, np.zeros(evals.shape, np.int32))
    return st


def drive(chunk_c: Callable, st: Any, args: tuple, *, maxiter: int, chunk: int,
          maxevals: int = 0, first_chunk: int | None = None,
          on_chunk: Callable[[Chunk], bool | None] | None = None) -> tuple[Any, bool]:
    """The host loop over compiled chunks, for one solve or a batch of cells: (state, stopped).

    `chunk_c(state, args, n) -> (state, trace)` runs one compiled chunk; `n` (int32, one per
    cell when the state is batched) caps each cell's iterations in it. Chunks end at iteration
    multiples of `chunk` counted from the start (the first after `first_chunk` <= chunk), or
    earlier when the chunk's steps run out (`lbfgs`: a step is one evaluation). A cell is over
    after `maxiter` iterations, at `maxevals` evaluations (when > 0), when its state says
    `done` (converged, failed; batch padding starts done) or when a chunk evaluated nothing;
    the loop ends when every cell is over, or when `on_chunk` returns True (`stopped`).
    """
    it0 = np.asarray(st.it)
    first = min(first_chunk or chunk, chunk)
    over = np.zeros(it0.shape, bool)
    while True:
        its, evals = np.asarray(st.it) - it0, np.asarray(st.evals)
        over |= np.asarray(st.done) | (its >= maxiter)
        if maxevals > 0:
            over |= evals >= maxevals
        if over.all():
            return st, False
        k = np.where(its >= first, (its - first) // chunk + 1, 0)  # the next boundary
        n = np.where(over, 0, np.minimum(maxiter, first + k * chunk) - its).astype(np.int32)
        start = time.perf_counter()
        st, trace = chunk_c(st, args, n)
        trace = jax.device_get(trace)
        over |= np.asarray(st.evals) == evals
        if on_chunk is not None and on_chunk(Chunk(st, trace, start, time.perf_counter(),
                                                   evals)):
            return st, True


def status_of(st: Any) -> tuple[Status, str]:
    """(status, error) of a finished single-cell state: failed, converged or done."""
    if bool(st.failed):
        return Status.FAILED, f"loss became non-finite at iteration {int(st.it)}"
    return (Status.CONVERGED, "") if bool(st.done) else (Status.DONE, "")


class _OutOfEvaluations(Exception):
    """solver.maxevals reached inside a scipy_lbfgsb round."""


def _user_name(fun: Callable) -> str | None:
    """The name of an objective passed in by the user; None for nstjax's own (whose loss
    plugins report their errors themselves)."""
    if str(getattr(fun, "__module__", "")).startswith("nstjax"):
        return None
    return getattr(fun, "__qualname__", None) or type(fun).__name__


def users(fun: Callable, doing: str = "tracing the objective"):
    """`errors.user_code` around calls into an objective passed in by the user."""
    import contextlib

    name = _user_name(fun)
    return contextlib.nullcontext() if name is None else user_code(f"objective {name}", doing)


def check_start(fun: Callable, total: Any, where: str = "x0") -> None:
    """PluginError if a user objective's total at the start is not finite (one value, or one
    per cell): no solver can start from NaN or infinity, so the objective broke its rule."""
    name, t = _user_name(fun), np.asarray(total, np.float64)
    if name is not None and not np.isfinite(t).all():
        i = int(np.flatnonzero(~np.isfinite(t.ravel()))[0])
        cell = f" of cell {i}" if t.ndim else ""
        raise PluginError(f"objective {name}: returned a non-finite total ({t.ravel()[i]}) at "
                          f"{where}{cell}; the objective must be finite where the solve starts")


def _minimize_scipy(s: Settings, fun, x0, args, on_chunk, on_start=None,
                    on_counts=None) -> Result:
    from scipy.optimize import fmin_l_bfgs_b

    vg = jax.jit(jax.value_and_grad(fun, has_aux=True))
    shape = x0.shape
    t = time.perf_counter()
    with users(fun):
        vg.lower(x0, *args).compile()
    compile_s = time.perf_counter() - t
    evals = 0
    t0 = time.perf_counter()
    best: list = [np.inf, None]  # this round's lowest loss and its point (for the budget)

    def f(z):
        nonlocal evals
        if s.maxevals and evals >= s.maxevals:
            raise _OutOfEvaluations
        evals += 1
        (v, _), g = vg(jnp.asarray(z.reshape(shape), jnp.float32), *args)
        if float(v) < best[0]:
            best[:] = [float(v), z.copy()]
        return float(v), np.asarray(g, np.float64).ravel()

    def terms_at(z):
        (_, terms), _ = vg(jnp.asarray(z.reshape(shape), jnp.float32), *args)
        return {k: float(v) for k, v in terms.items()}

    x = np.asarray(x0, np.float64).ravel()
    res = Result(x=np.asarray(x0), compile_seconds=compile_s)
    res.history.append({"iter": 0, **terms_at(x), "seconds": 0.0})
    check_start(fun, res.history[0]["total"])
    rounds = s.rounds
    if on_start is not None and on_start(res.x, res.history[0]):
        res.status, rounds = Status.INTERRUPTED, 0
    for r in range(rounds):
        if s.maxevals and evals >= s.maxevals:
            break
        best[:] = [np.inf, None]
        try:
            x, _, _ = fmin_l_bfgs_b(f, x, m=s.history_size, maxls=s.maxls, maxfun=s.maxfun,
                                    pgtol=s.pgtol, factr=s.factr)
        except _OutOfEvaluations:  # the budget ran out inside the round: its best point
            x = x if best[1] is None else best[1]
        x = np.clip(x, -s.clip, s.clip)
        row = {"iter": r + 1, **terms_at(x), "seconds": time.perf_counter() - t0}
        if not np.isfinite(row["total"]):
            res.status, res.error = Status.FAILED, f"loss became {row['total']} in round {r + 1}"
            break
        res.history.append(row)
        res.x = x.reshape(shape).astype(np.float32)
        res.iterations = r + 1
        if on_counts is not None:
            on_counts(evals, time.perf_counter() - t0)
        if on_chunk is not None and on_chunk(res.x, [row]):
            res.status = Status.INTERRUPTED
            break
    res.evals = evals
    res.solve_seconds = time.perf_counter() - t0
    return res


def minimize(
    s: Settings,
    fun: Callable,
    x0: jax.Array,
    args: tuple,
    *,
    chunk: int = 50,
    on_chunk: Callable[[np.ndarray, list[dict]], bool | None] | None = None,
    compiled: tuple | None = None,
    on_start: Callable[[np.ndarray, dict], bool | None] | None = None,
    state0: Any = None,
    keep_state: bool = False,
    first_chunk: int | None = None,
    on_counts: Callable[[int, float], None] | None = None,
) -> Result:
    """Minimize fun(x, *args)[0] over x from x0 with solver `s.name`: the one entry point.

    `on_chunk(x, rows)` is called on the host after each chunk of iterations (progress,
    snapshots); if it returns True the solve stops there with status `interrupted`.
    `compiled` may pass ready (init, chunk) executables to skip compiling; without it the
    program is reused from an earlier call with the same `fun` object, settings (but
    `maxiter`), `chunk` and argument shapes (`cached_program`), else compiled and kept.
    `on_start(x0, row0)` is called once with the first history row, before any iteration; if it
    returns True the solve stops before the first chunk (status `interrupted`).
    `state0` (compiled solvers) continues from a saved state (from `keep_state=True`, which puts
    the final state in `Result.state`) instead of starting at x0; its `it` numbers the rows.
    `first_chunk` (<= chunk) shortens the first chunk, e.g. to realign snapshots on resume.
    `on_counts(evals, seconds)` is called after each chunk, before `on_chunk`, with the
    evaluations so far (the state's count) and the seconds since the solve started.
    Chunks are `chunk` iterations long; for `lbfgs`, `chunk` evaluations that end early at the
    iteration multiples of `chunk`. The solve stops after `s.maxiter` iterations, `s.maxevals`
    evaluations (when > 0) or at convergence.
    """
    if s.name == "scipy_lbfgsb":
        return _minimize_scipy(s, fun, x0, args, on_chunk, on_start, on_counts)
    t = time.perf_counter()
    hit = compiled is not None
    if compiled is None:
        with users(fun):
            compiled, hit = cached_program(s, fun, x0, args, chunk)
    init_c, chunk_c = compiled
    compile_s = 0.0 if hit else time.perf_counter() - t
    t0 = time.perf_counter()
    st = evaluate_start(chunk_c, init_c(x0, args) if state0 is None else state0, args)
    check_start(fun, st.terms["total"])
    res = Result(x=np.asarray(st.x), compile_seconds=compile_s)
    res.history.append({"iter": int(st.it), **{k: float(v) for k, v in st.terms.items()},
                        "seconds": 0.0})
    stopped = on_start is not None and bool(on_start(res.x, res.history[0]))

    def each(c: Chunk) -> bool:
        rows = rows_of(c.trace, t0, start=c.start, evals0=int(c.evals0), end=c.end)
        res.history += rows
        res.x = np.asarray(c.state.x)
        if on_counts is not None:
            on_counts(int(c.state.evals), c.end - t0)
        return on_chunk is not None and bool(on_chunk(res.x, rows))

    if not stopped:
        st, stopped = drive(chunk_c, st, args, maxiter=s.maxiter, chunk=chunk,
                            maxevals=s.maxevals, first_chunk=first_chunk, on_chunk=each)
    res.iterations, res.evals = int(st.it), int(st.evals)
    res.status, res.error = status_of(st)
    if stopped and res.status != Status.FAILED:
        res.status = Status.INTERRUPTED
    res.solve_seconds = time.perf_counter() - t0
    res.state = st if keep_state else None
    return res


_PROGRAMS: OrderedDict = OrderedDict()
PROGRAM_CACHE_SIZE = 8  # programs kept per process (least recently used dropped)


def cached_program(s: Settings, fun: Callable, x0, args, chunk: int) -> tuple[tuple, bool]:
    """(`compile_program`'s (init, chunk), reused?): kept per process, keyed by the objective
    function object itself (a new lambda or closure is a new program; data it closes over is
    baked in, so pass data as `args`), the settings but `maxiter`, `chunk`, and the tree,
    shapes, dtypes and shardings of `(x0, args)`."""
    leaves = jax.tree.leaves((x0, args))
    key = (fun, replace(s, maxiter=0), chunk, jax.tree.structure((x0, args)),
           tuple((jnp.shape(a), jnp.result_type(a), getattr(a, "weak_type", None),
                  getattr(a, "sharding", None)) for a in leaves))
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key], True
    _PROGRAMS[key] = compile_program(s, fun, x0, args, chunk)
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
        _PROGRAMS.popitem(last=False)
    return _PROGRAMS[key], False


def compile_program(s: Settings, fun: Callable, x0, args, chunk: int):
    """Ahead-of-time compiled (init, chunk) executables for these shapes, for `minimize`.

    For `lbfgs`, init is lazy (see `_make_lbfgs`): one program holds the objective, not two.
    """
    init, chunk_fn = make(s, fun, lazy=True)
    init_c = jax.jit(init).lower(x0, args).compile()
    st = jax.eval_shape(init, x0, args)
    chunk_j = jax.jit(chunk_fn, static_argnames=("length",), donate_argnums=(0,))
    chunk_c = chunk_j.lower(st, args, jnp.int32(chunk), length=chunk).compile()
    return init_c, chunk_c
