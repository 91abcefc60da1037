"""nstjax.solvers on small problems with known answers (numpy.linalg.solve, scipy L-BFGS-B).

All problems are one objective whose pieces are switched by arguments (a convex quadratic, the
extended Rosenbrock function, a scale, a region where the value turns non-finite), so each
solver's program is compiled once and reused across tests via `minimize(..., compiled=)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from nstjax import solvers

SHAPE = (1, 4, 5, 3)  # x is image-shaped, like the real problem
N = int(np.prod(SHAPE))
F32 = jnp.float32

_rng = np.random.default_rng(0)
_Q, _ = np.linalg.qr(_rng.standard_normal((N, N)))
A = (_Q * np.linspace(1.0, 10.0, N)) @ _Q.T  # SPD, condition number 10
A = (A + A.T) / 2
B = _rng.standard_normal(N)
A32, B32 = A.astype(np.float32), B.astype(np.float32)
# Reference solution from the float32 data the solvers see, solved in float64.
X_STAR = np.linalg.solve(A32.astype(np.float64), B32.astype(np.float64))
K = int(np.argmax(X_STAR))  # the coordinate that the non-finite region watches


def fun(x, p):
    """scale * (wq * quadratic + wr * rosenbrock), replaced by `val` where x[K] > t."""
    v = x.reshape(-1)
    quad = 0.5 * v @ p["A"] @ v - p["b"] @ v
    pairs = v.reshape(-1, 2)
    rosen = jnp.sum(100.0 * (pairs[:, 1] - pairs[:, 0] ** 2) ** 2 + (1.0 - pairs[:, 0]) ** 2)
    total = p["scale"] * (p["wq"] * quad + p["wr"] * rosen)
    total = jnp.where(p["e"] @ v > p["t"], p["val"], total)
    return total, {"total": total, "quad": quad, "rosen": rosen}


def problem(**kw) -> dict:
    p = {"A": A32, "b": B32, "scale": 1.0, "wq": 1.0, "wr": 0.0, "t": 1e30, "val": 0.0,
         "e": np.eye(N)[K]}
    p.update(kw)
    return {k: jnp.asarray(v, F32) for k, v in p.items()}


# float64 numpy references of the same functions


def quad64(x, b=B32) -> float:
    v = np.asarray(x, np.float64).ravel()
    return 0.5 * v @ A32.astype(np.float64) @ v - np.asarray(b, np.float64) @ v


def quad_min64(b=B32) -> float:
    return quad64(np.linalg.solve(A32.astype(np.float64), np.asarray(b, np.float64)), b)


def rosen64(v):
    pr = np.asarray(v, np.float64).reshape(-1, 2)
    return float(np.sum(100.0 * (pr[:, 1] - pr[:, 0] ** 2) ** 2 + (1.0 - pr[:, 0]) ** 2))


def rosen_grad64(v):
    pr = np.asarray(v, np.float64).reshape(-1, 2)
    g = np.empty_like(pr)
    g[:, 0] = -400.0 * pr[:, 0] * (pr[:, 1] - pr[:, 0] ** 2) - 2.0 * (1.0 - pr[:, 0])
    g[:, 1] = 200.0 * (pr[:, 1] - pr[:, 0] ** 2)
    return g.ravel()


X0 = np.zeros(SHAPE, np.float32)
X0_RAND = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
X0_ROSEN = np.tile(np.float32([-1.2, 1.0]), N // 2).reshape(SHAPE)  # the classic start

LBFGS = ("jaxopt_lbfgs", "lbfgs", "optax_lbfgs")
MAXITER = 100
SETTINGS = {
    "jaxopt_lbfgs": solvers.Settings(name="jaxopt_lbfgs", maxiter=MAXITER),
    "lbfgs": solvers.Settings(name="lbfgs", maxiter=MAXITER),
    "optax_lbfgs": solvers.Settings(name="optax_lbfgs", maxiter=MAXITER),
    "adam": solvers.Settings(name="adam", maxiter=300, learning_rate=0.05),
}

_PROGRAMS: dict = {}


def solve(s: solvers.Settings, p: dict, x0=X0, chunk: int | None = None, **kw):
    """minimize with a program compiled once per (settings, chunk length) for the module."""
    chunk = chunk or s.maxiter
    if s.name == "scipy_lbfgsb":
        return solvers.minimize(s, fun, jnp.asarray(x0), (p,), chunk=chunk, **kw)
    key = (s, chunk)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = solvers.compile_program(s, fun, jnp.asarray(X0), (problem(),), chunk)
    return solvers.minimize(s, fun, jnp.asarray(x0), (p,), chunk=chunk, compiled=_PROGRAMS[key],
                            **kw)


def finished(res, name: str) -> bool:
    """Ran all MAXITER iterations, or (`lbfgs`) stopped early, converged to float32 resolution:
    no decrease left to find along -g."""
    if name == "lbfgs" and res.status == "converged":
        return 1 <= res.iterations <= MAXITER
    return res.status == "done" and res.iterations == MAXITER


def check_history(res, n_iter: int, x0=X0):
    """Rows iter 0..n, one per iteration plus the start, each with the objective's terms."""
    assert [r["iter"] for r in res.history] == list(range(n_iter + 1))
    assert res.iterations == n_iter
    for r in res.history:
        assert {"total", "quad", "rosen", "seconds"} <= set(r)
        assert np.isfinite(r["total"])
    assert res.history[0]["quad"] == pytest.approx(quad64(x0), rel=1e-5, abs=1e-6)
    # The last row describes the returned x.
    assert res.history[-1]["quad"] == pytest.approx(quad64(res.x), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("name", [*LBFGS, "adam"])
def test_quadratic_matches_linear_solve(name):
    s = SETTINGS[name]
    res = solve(s, problem(), X0_RAND)
    assert finished(res, name) if name != "adam" else res.status == "done"
    assert res.x.shape == SHAPE and res.x.dtype == np.float32
    check_history(res, res.iterations, X0_RAND)
    assert res.evals >= res.iterations
    err = np.linalg.norm(res.x.ravel() - X_STAR) / np.linalg.norm(X_STAR)
    assert err < (1e-3 if name == "adam" else 1e-4)
    # Loss values in the history decrease overall and reach the true minimum.
    assert res.history[-1]["total"] == pytest.approx(quad_min64(), rel=1e-5)
    if name != "adam":
        totals = [r["total"] for r in res.history]
        assert all(b <= a + 1e-5 * abs(a) for a, b in zip(totals, totals[1:]))  # monotone


@pytest.mark.parametrize("name", LBFGS)
def test_rosenbrock_matches_scipy(name):
    ref = scipy.optimize.minimize(rosen64, X0_ROSEN.ravel().astype(np.float64), jac=rosen_grad64,
                                  method="L-BFGS-B", options={"maxiter": 1000})
    assert ref.success and np.allclose(ref.x, 1.0, atol=1e-3)
    res = solve(SETTINGS[name], problem(wq=0.0, wr=1.0), X0_ROSEN)
    assert finished(res, name)
    np.testing.assert_allclose(res.x.ravel(), ref.x, atol=5e-3)
    assert res.history[-1]["rosen"] < 1e-4 * res.history[0]["rosen"]


def test_scipy_lbfgsb_rounds_quadratic_and_rosenbrock():
    s = solvers.Settings(name="scipy_lbfgsb", rounds=5, maxfun=30)
    res = solve(s, problem(), X0_RAND)
    assert res.status == "done"
    check_history(res, 5, X0_RAND)  # one row per round
    assert np.linalg.norm(res.x.ravel() - X_STAR) / np.linalg.norm(X_STAR) < 1e-3
    assert res.evals >= 5

    ref = scipy.optimize.minimize(rosen64, X0_ROSEN.ravel().astype(np.float64), jac=rosen_grad64,
                                  method="L-BFGS-B")
    res = solve(s, problem(wq=0.0, wr=1.0), X0_ROSEN)
    np.testing.assert_allclose(res.x.ravel(), ref.x, atol=5e-3)

    # Fewer evaluations per round: stops short of the minimum.
    short = solve(solvers.Settings(name="scipy_lbfgsb", rounds=1, maxfun=3), problem(), X0_RAND)
    check_history(short, 1, X0_RAND)
    assert short.history[-1]["total"] - quad_min64() > 1e-2


@pytest.mark.parametrize("maxevals", [1, 3, 25])
def test_scipy_lbfgsb_honours_maxevals(maxevals):
    """solver.maxevals is a budget for scipy_lbfgsb too (it used to run rounds x maxfun):
    exactly that many evaluations, ending at the lowest point evaluated."""
    s = solvers.Settings(name="scipy_lbfgsb", rounds=5, maxfun=20, maxevals=maxevals)
    res = solve(s, problem(), X0_RAND)
    free = solve(solvers.Settings(name="scipy_lbfgsb", rounds=5, maxfun=20), problem(), X0_RAND)
    assert free.evals > 25 and res.evals == maxevals
    assert res.history[-1]["total"] <= res.history[0]["total"]
    assert res.history[-1]["quad"] == pytest.approx(quad64(res.x, B32), rel=1e-5)


def test_scipy_lbfgsb_honours_history_size_and_maxls():
    """history_size and maxls reach scipy (its m and maxls): the same iterates as scipy's own
    L-BFGS-B with maxcor=m, maxls on Rosenbrock."""
    s = solvers.Settings(name="scipy_lbfgsb", rounds=1, maxfun=15000, history_size=3, maxls=5)
    ref = scipy.optimize.minimize(rosen64, X0_ROSEN.ravel().astype(np.float64), jac=rosen_grad64,
                                  method="L-BFGS-B", options={"maxcor": 3, "maxls": 5})
    default = scipy.optimize.minimize(rosen64, X0_ROSEN.ravel().astype(np.float64),
                                      jac=rosen_grad64, method="L-BFGS-B")
    res = solve(s, problem(wq=0.0, wr=1.0), X0_ROSEN)
    assert ref.nfev != default.nfev  # the settings matter for this problem
    assert abs(res.evals - ref.nfev) <= max(3, ref.nfev // 10)


def test_scipy_lbfgsb_clips_between_rounds():
    b = 500.0 * B32  # the unconstrained minimum lies far outside [-127, 127]
    x_star = np.linalg.solve(A32.astype(np.float64), b.astype(np.float64))
    assert np.abs(x_star).max() > 127
    res = solve(solvers.Settings(name="scipy_lbfgsb", rounds=3, maxfun=20), problem(b=b))
    assert np.abs(res.x).max() == pytest.approx(127.0)
    assert res.history[-1]["quad"] == pytest.approx(quad64(res.x, b), rel=1e-5)


# --------------------------------------------------------------------------- chunks and stops


@pytest.mark.parametrize("name", LBFGS)
def test_chunking_does_not_change_the_result(name):
    s = SETTINGS[name]
    whole = solve(s, problem(), X0_RAND, chunk=MAXITER)
    calls = []
    pieces = solve(s, problem(), X0_RAND, chunk=7,
                   on_chunk=lambda x, rows: calls.append([r["iter"] for r in rows]))
    np.testing.assert_array_equal(pieces.x, whole.x)
    assert [r["total"] for r in pieces.history] == [r["total"] for r in whole.history]
    assert pieces.evals == whole.evals and pieces.iterations == whole.iterations
    assert finished(whole, name)
    assert sum(calls, []) == list(range(1, whole.iterations + 1))
    if name == "lbfgs":  # chunks of 7 evaluations, ending at iteration multiples of 7 at most
        assert all(len(c) <= 7 for c in calls) and len(calls) >= pieces.evals // 7
        assert {7 * k for k in range(1, whole.iterations // 7)} <= {c[-1] for c in calls if c}
        return
    # on_chunk sees each chunk's rows: 14 full chunks of 7 and a last one of 2.
    assert [len(c) for c in calls] == [7] * 14 + [2]
    assert calls[0] == list(range(1, 8)) and calls[-1] == [99, 100]


@pytest.mark.parametrize("name", LBFGS)
def test_on_chunk_true_interrupts(name):
    s = SETTINGS[name]
    seen = []

    def on_chunk(x, rows):
        seen.append(np.array(x))
        return len(seen) == 2

    res = solve(s, problem(), X0_RAND, chunk=7, on_chunk=on_chunk)
    assert res.status == "interrupted"
    assert len(seen) == 2
    n = 14 if name != "lbfgs" else res.history[-1]["iter"]  # lbfgs: 14 evaluations
    assert 4 <= n <= 14
    check_history(res, n, X0_RAND)
    np.testing.assert_array_equal(res.x, seen[-1])
    whole = solve(s, problem(), X0_RAND, chunk=MAXITER)
    assert [r["total"] for r in res.history] == [r["total"] for r in whole.history[:n + 1]]


@pytest.mark.parametrize("name", ["jaxopt_lbfgs", "lbfgs"])
def test_tol_stops_early_converged(name):
    s = solvers.Settings(name=name, maxiter=MAXITER, tol=1e-3)
    res = solve(s, problem(), X0_RAND)
    assert res.status == "converged"
    assert 1 <= res.iterations < MAXITER
    check_history(res, res.iterations, X0_RAND)

    def grad_norm(x):
        v = np.asarray(x, np.float64).ravel()
        return np.linalg.norm(A32.astype(np.float64) @ v - B32)

    assert grad_norm(res.x) <= 1e-3 * grad_norm(X0_RAND) * 1.01
    # It stopped at the first such iterate: one iteration fewer (same program, the iteration
    # count is the host's) is not converged yet.
    fewer = dataclasses.replace(s, maxiter=res.iterations - 1)
    prev = solvers.minimize(fewer, fun, jnp.asarray(X0_RAND), (problem(),), chunk=MAXITER,
                            compiled=_PROGRAMS[(s, MAXITER)])
    assert prev.status == "done" and prev.iterations == res.iterations - 1
    assert grad_norm(prev.x) > 1e-3 * grad_norm(X0_RAND)


# --------------------------------------------------------------------------- tiny gradients


@pytest.mark.parametrize("scale", [1e-9, 1e-12])
@pytest.mark.parametrize("name", LBFGS)
def test_tiny_gradients_still_make_progress(name, scale):
    """The post's normalization makes losses and gradients tiny: default settings must still
    move x and cut the loss by a large factor within 30 iterations. (At 1e-12, jaxopt's own
    first step, of length |g|, would leave x unchanged in float32: this needs the unit-length
    first step that solvers._jaxopt sets up.)"""
    p = problem(scale=scale)
    res = solve(SETTINGS[name], p, X0_RAND)
    gap0 = quad64(X0_RAND) - quad_min64()
    row30 = res.history[min(30, len(res.history) - 1)]  # lbfgs may converge before
    assert row30["iter"] == min(30, res.iterations)
    assert row30["total"] == pytest.approx(scale * row30["quad"], rel=1e-5)
    assert (row30["quad"] - quad_min64()) < 1e-4 * gap0
    assert np.abs(res.x - X0_RAND).max() > 0.1
    assert np.linalg.norm(res.x.ravel() - X_STAR) / np.linalg.norm(X_STAR) < 1e-3


def test_scipy_pgtol_default_does_not_move_on_tiny_gradients():
    """scipy's default pgtol=1e-5 stops at once when every gradient component is below it, as
    in the post; pgtol=0 (our default) moves."""
    p = problem(scale=1e-9)
    stuck = solve(solvers.Settings(name="scipy_lbfgsb", rounds=2, maxfun=20, pgtol=1e-5), p,
                  X0_RAND)
    np.testing.assert_array_equal(stuck.x, X0_RAND)
    assert len({r["total"] for r in stuck.history}) == 1
    moved = solve(solvers.Settings(name="scipy_lbfgsb", rounds=2, maxfun=20), p, X0_RAND)
    gap0 = quad64(X0_RAND) - quad_min64()
    assert quad64(moved.x) - quad_min64() < 1e-2 * gap0


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("name", "val"),
    [("adam", np.nan), ("adam", -np.inf), ("jaxopt_lbfgs", -np.inf), ("optax_lbfgs", -np.inf),
     ("scipy_lbfgsb", -np.inf)],
)
def test_non_finite_loss_fails_with_last_finite_x(name, val):
    """The objective turns non-finite once x[K] passes half way to its optimum. Line searches
    reject NaN and +inf trial points (see the next test), so they are given -inf, which passes
    the sufficient-decrease test."""
    s = SETTINGS.get(name) or solvers.Settings(name=name, rounds=5)
    t = np.float32(X_STAR[K] / 2)
    res = solve(s, problem(t=t, val=val), X0)
    assert res.status == "failed"
    assert "non-finite" in res.error or str(val) in res.error
    assert np.all(np.isfinite(res.x))
    assert res.x.ravel()[K] <= t
    total, _ = fun(jnp.asarray(res.x), problem(t=t, val=val))
    assert np.isfinite(float(total))
    # History holds the finite steps only, the last of them being the returned x.
    assert [r["iter"] for r in res.history] == list(range(len(res.history)))
    assert all(np.isfinite(r["total"]) for r in res.history)
    assert res.history[-1]["total"] == pytest.approx(float(total), rel=1e-6)
    if name == "adam":
        assert res.iterations > 3  # it failed after some good steps
        assert res.iterations == len(res.history)  # ... and the failed one has no row


@pytest.mark.parametrize(
    ("name", "val"), [*((n, np.nan) for n in LBFGS), ("lbfgs", -np.inf), ("lbfgs", np.inf)])
def test_lbfgs_line_search_stays_out_of_nan_region(name, val):
    """(`lbfgs` treats any non-finite value, -inf included, as a point to back away from.)"""
    t = np.float32(X_STAR[K] / 2)
    res = solve(SETTINGS[name], problem(t=t, val=val), X0)
    assert finished(res, name)
    assert np.all(np.isfinite(res.x)) and res.x.ravel()[K] <= t
    assert res.history[-1]["total"] < res.history[0]["total"]


# --------------------------------------------------------------------------- batched solves


@pytest.mark.parametrize(("name", "lanes"), [("lbfgs", 1), ("lbfgs", 3), ("jaxopt_lbfgs", 3),
                                             ("adam", 2)])
def test_batched_solve_equals_single_runs(name, lanes):
    """3 cells of different problems (own b and weights per cell, A shared) in one program equal
    3 single `minimize` runs: iterations, evaluations, every history row, the final x. (Adam
    with 2 lanes over 3 cells: a vmapped pair, then the remaining cell, in one program.)"""
    from nstjax import batch

    s = dataclasses.replace(SETTINGS[name], maxiter=12)
    cells = [problem(), problem(b=-B32, wq=2.0), problem(wq=0.0, wr=1.0)]
    x0s = [X0_RAND, X0, X0_ROSEN]
    singles = [solve(s, p, x0, chunk=5) for p, x0 in zip(cells, x0s)]
    shared = {"A": cells[0]["A"]}

    def fun_b(x, a, p):
        return fun(x, {**p, **a})

    per = {k: jnp.stack([p[k] for p in cells]) for k in cells[0] if k != "A"}
    seen = []
    got = batch.minimize_batched(s, fun_b, jnp.asarray(np.stack(x0s)), (shared, per),
                                 in_axes=(None, 0), lanes=lanes, chunk=5,
                                 on_chunk=lambda c: seen.append(np.asarray(c.trace["it"])))
    assert len(got) == 3 and all(r.status == "done" for r in got)
    assert seen[0].shape == (3, 5)  # per cell, per step
    for r, ref in zip(got, singles):
        assert r.iterations == ref.iterations == 12  # exactly maxiter, each at its own pace
        assert r.evals == ref.evals
        assert [h["iter"] for h in r.history] == list(range(13))
        np.testing.assert_allclose([h["total"] for h in r.history],
                                   [h["total"] for h in ref.history], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(r.x, ref.x, rtol=2e-5, atol=2e-5)
        secs = [h["seconds"] for h in r.history]
        assert secs == sorted(secs) and len(set(secs[1:])) > 3  # placed within chunks


@pytest.mark.parametrize("name", ["lbfgs", "adam"])
def test_lockstep_lanes_share_the_params(name):
    """Under vmap over cells, a lockstep chunk never copies the (shared) network params per
    cell: a `lax.cond` with a per-cell predicate broadcasts its operands, so the convolution
    becomes a per-cell (grouped) one. Checked on the compiled program: no kernel-sized array
    with a lane axis; without lockstep there is one (the check can fail)."""
    from nstjax import vgg16

    lanes, kernel = 3, jnp.ones((3, 3, 4, 4), jnp.float32)

    def fun(x, k):
        y = vgg16.conv(x, k, "highest")
        return jnp.sum(y * y), {"total": jnp.sum(y * y)}

    x0 = jnp.ones((lanes, 1, 6, 6, 4), jnp.float32)

    def program_text(lockstep: bool) -> str:
        init, chunk = solvers.make(solvers.Settings(name=name, maxiter=3), fun,
                                   lockstep=lockstep)
        st = jax.eval_shape(jax.vmap(init, in_axes=(0, None)), x0, (kernel,))
        f = jax.vmap(lambda s_, k: chunk(s_, (k,), jnp.int32(2), 2), in_axes=(0, None))
        return jax.jit(f).lower(st, kernel).compile().as_text()

    per_lane = (f"f32[{lanes},3,3,4,4]", f"f32[3,3,4,{lanes},4]", f"f32[3,3,{lanes},4,4]")
    assert not any(s in program_text(True) for s in per_lane)
    assert any(s in program_text(False) for s in per_lane)


def _raises(x, p):
    raise RuntimeError("my bug")


def _wrong_type(x, p):
    return "not a loss"


def _no_terms(x, p):
    return jnp.sum(x * x)  # a bare scalar: minimize needs (total, terms)


@pytest.mark.parametrize("name", [*SETTINGS, "scipy_lbfgsb"])
@pytest.mark.parametrize("bad", [_raises, _wrong_type, _no_terms])
def test_a_broken_user_objective_is_one_plugin_error(name, bad):
    """Every solver x an objective that raises or returns the wrong type: one line naming the
    function (errors.PluginError, a UserError), not a traceback from inside JAX."""
    from nstjax.errors import PluginError

    with pytest.raises(PluginError, match=f"objective {bad.__name__}: tracing the objective "
                       "failed: ") as e:
        solvers.minimize(solvers.Settings(name=name, maxiter=2, rounds=1), bad,
                         jnp.ones(SHAPE), (problem(),), chunk=2)
    assert "\n" not in str(e.value)


def test_a_broken_user_objective_in_the_batch_api():
    from nstjax import batch
    from nstjax.errors import PluginError

    with pytest.raises(PluginError, match="objective _raises: .*RuntimeError: my bug"):
        batch.minimize_batched(solvers.Settings(name="adam", maxiter=2), _raises,
                               jnp.ones((2, *SHAPE)),
                               (jax.tree.map(lambda v: jnp.stack([v, v]), problem()),), chunk=2)


def test_minimize_reuses_its_program_for_the_same_objective_and_shapes():
    """Without `compiled=`, a second minimize with the same function object, settings but
    maxiter, chunk and shapes traces nothing (a Python counter in the objective counts its
    traces) and gives the same iterates; another shape or another function object compiles."""
    traces = [0]

    def counted(x, p):
        traces[0] += 1
        return fun(x, p)

    s = solvers.Settings(name="lbfgs", maxiter=4)
    x0 = jnp.zeros(SHAPE, F32)
    a = solvers.minimize(s, counted, x0, (problem(),), chunk=2)
    n = traces[0]
    assert n > 0 and a.compile_seconds > 0
    b = solvers.minimize(dataclasses.replace(s, maxiter=6), counted, x0, (problem(scale=2.0),),
                         chunk=2)
    assert traces[0] == n and b.compile_seconds == 0.0 and b.iterations == 6
    c = solvers.minimize(s, counted, x0, (problem(),), chunk=2)
    np.testing.assert_array_equal(c.x, a.x)
    assert traces[0] == n
    solvers.minimize(s, counted, jnp.zeros((1, 2, 10, 3), F32), (problem(),), chunk=2)
    assert traces[0] > n  # another shape: a new program
    m = traces[0]
    solvers.minimize(s, lambda x, p: counted(x, p), x0, (problem(),), chunk=2)
    assert traces[0] > m  # another function object: a new program
    assert len(solvers._PROGRAMS) <= solvers.PROGRAM_CACHE_SIZE


# ------------------------------------------------- every solver x every solver key: used or refused

# A value other than the default for each solver key of the config schema.
CHANGED = {"maxiter": 2, "maxevals": 3, "history_size": 1, "maxls": 1, "tol": 1e3,
           "learning_rate": 0.01, "rounds": 1, "maxfun": 3, "pgtol": 1e3, "factr": 1e15}
SHORT = dict(maxiter=6, rounds=2, maxfun=8)  # the baseline: a few steps of every solver
TABLE = [(n, k) for n in solvers.NAMES for k in CHANGED]


def test_the_table_covers_every_solver_key():
    from nstjax import config

    assert set(CHANGED) == set(config.SolverCfg.model_fields) - {"name"}
    assert set(solvers.USES) == set(solvers.NAMES)
    assert all(u <= set(CHANGED) for u in solvers.USES.values())


def _signature(r) -> tuple:
    return r.evals, r.iterations, str(r.status), np.asarray(r.x).tobytes()


@pytest.mark.parametrize(("name", "key"), [t for t in TABLE if t[1] in solvers.USES[t[0]]])
def test_every_used_key_changes_the_run(name, key):
    """Rosenbrock from the classic start: changing the key changes what the solver does
    (its evaluations, iterations, status or iterate); a key it ignored would change nothing."""
    p = problem(wq=0.0, wr=1.0)
    base_s = solvers.Settings(name=name, **SHORT)
    base = solve(base_s, p, X0_ROSEN, chunk=4)
    changed = solvers.Settings(name=name, **{**SHORT, key: CHANGED[key]})
    kw = {"compiled": _PROGRAMS[(base_s, 4)]} if key == "maxiter" and name != "scipy_lbfgsb" else {}
    r = (solvers.minimize(changed, fun, jnp.asarray(X0_ROSEN), (p,), chunk=4, **kw) if kw
         else solve(changed, p, X0_ROSEN, chunk=4))
    assert _signature(r) != _signature(base), f"{name} ignores {key}"


@pytest.mark.parametrize(("name", "key"), [t for t in TABLE if t[1] not in solvers.USES[t[0]]])
def test_every_ignored_key_is_refused_in_one_line(name, key, tmp_path, capsys):
    from nstjax import cli, config
    from nstjax.errors import UserError

    raw = {"content": "c.png", "style": "s.png", "solver": {"name": name, key: CHANGED[key]}}
    with pytest.raises(UserError) as e:
        config.validate(raw)
    msg = str(e.value)
    assert f"solver.{key}" in msg and name in msg and "\n" not in msg
    users = [n for n in solvers.NAMES if key in solvers.USES[n]]
    assert all(u in msg.split("used by")[1] for u in users)
    # Its default, written out (as every dumped config.yaml does), is fine.
    default = config.SolverCfg.model_fields[key].default
    assert config.validate({**raw, "solver": {"name": name, key: default}}).solver.name == name
    f = tmp_path / "c.yaml"
    f.write_text("content: c.png\nstyle: s.png\n")
    assert cli.main(["config", "show", str(f), f"solver.name={name}",
                     f"solver.{key}={CHANGED[key]}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"solver.{key}" in err and "Traceback" not in err


def _nan_total(x, p):
    t = jnp.sum(x * x) * jnp.nan
    return t, {"total": t}


@pytest.mark.parametrize("name", [*SETTINGS, "scipy_lbfgsb"])
def test_a_user_objective_non_finite_at_x0_is_one_plugin_error(name):
    """Every solver x an objective returning NaN where the solve starts: a PluginError naming
    it and the rule (no solver can start from NaN), not a `failed` result."""
    from nstjax.errors import PluginError

    with pytest.raises(PluginError, match=r"objective _nan_total: returned a non-finite total "
                       r"\(nan\) at x0; the objective must be finite") as e:
        solvers.minimize(solvers.Settings(name=name, maxiter=2, rounds=1), _nan_total,
                         jnp.ones(SHAPE), (problem(),), chunk=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", [_raises, _wrong_type, _no_terms, _nan_total])
def test_every_broken_user_objective_in_the_batch_api(bad):
    """The batch API x an objective that raises, returns the wrong type or NaN: PluginError
    naming it (NaN: and the cell)."""
    from nstjax import batch
    from nstjax.errors import PluginError

    rule = "cell 0" if bad is _nan_total else "tracing the objective failed"
    with pytest.raises(PluginError, match=f"objective {bad.__name__}: .*{rule}") as e:
        batch.minimize_batched(solvers.Settings(name="adam", maxiter=2), bad,
                               jnp.ones((2, *SHAPE)),
                               (jax.tree.map(lambda v: jnp.stack([v, v]), problem()),), chunk=2)
    assert "\n" not in str(e.value)
