"""nstjax.lbfgs (the one-evaluation-per-step L-BFGS) against scipy's L-BFGS-B and float64 numpy
references, and the `lbfgs` solver of nstjax.solvers; the jaxopt `aux` fix.

scipy's references run in float64 on numpy formulas of the same problems (no nstjax code), with
m=10 like ours.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from nstjax import lbfgs, losses, solvers

F32 = jnp.float32

# --------------------------------------------------------------------------- problems

N_Q = 30
_rng = np.random.default_rng(0)
_Q, _ = np.linalg.qr(_rng.standard_normal((N_Q, N_Q)))
A = ((_Q * np.logspace(0, 3, N_Q)) @ _Q.T).astype(np.float32)  # condition number 1e3
A = (A + A.T) / 2
B = _rng.standard_normal(N_Q).astype(np.float32)
A64, B64 = A.astype(np.float64), B.astype(np.float64)
X_STAR = np.linalg.solve(A64, B64)


def quad(x, a, b, scale):
    v = x.reshape(-1)
    f = scale * (0.5 * v @ a @ v - b @ v)
    return f, {"total": f}


def quad64(v):
    return 0.5 * v @ A64 @ v - B64 @ v, A64 @ v - B64


def rosen(x, scale):
    p = x.reshape(-1, 2)
    f = scale * jnp.sum(100.0 * (p[:, 1] - p[:, 0] ** 2) ** 2 + (1.0 - p[:, 0]) ** 2)
    return f, {"total": f}


def rosen64(v):
    p = v.reshape(-1, 2)
    f = np.sum(100.0 * (p[:, 1] - p[:, 0] ** 2) ** 2 + (1.0 - p[:, 0]) ** 2)
    g = np.empty_like(p)
    g[:, 0] = -400.0 * p[:, 0] * (p[:, 1] - p[:, 0] ** 2) - 2.0 * (1.0 - p[:, 0])
    g[:, 1] = 200.0 * (p[:, 1] - p[:, 0] ** 2)
    return f, g.ravel()


QARGS = (jnp.asarray(A), jnp.asarray(B), F32(1.0))
X0_Q = np.random.default_rng(1).standard_normal((1, 5, 2, 3)).astype(np.float32)  # image-like


def rosen_x0(n):
    return np.tile(np.float32([-1.2, 1.0]), n // 2)


def scipy_run(fg, x0, **kw):
    x, f, info = scipy.optimize.fmin_l_bfgs_b(fg, np.asarray(x0, np.float64).ravel(), m=10,
                                              maxfun=100_000, **kw)
    return x, f, info


# --------------------------------------------------------------------------- against scipy


def test_quadratic_condition_1e3_matches_scipy():
    g0 = np.abs(quad64(X0_Q.ravel().astype(np.float64))[1]).max()
    x_ref, _, info = scipy_run(quad64, X0_Q, pgtol=1e-3 * g0, factr=0.0)
    err_ref = np.linalg.norm(x_ref - X_STAR) / np.linalg.norm(X_STAR)
    assert err_ref < 0.05 and info["nit"] > 50  # a hard problem for m=10
    st = lbfgs.minimize(quad, jnp.asarray(X0_Q), QARGS, maxiter=info["nit"])
    assert st.x.shape == X0_Q.shape and st.x.dtype == np.float32
    x = np.asarray(st.x, np.float64).ravel()
    assert np.linalg.norm(x - X_STAR) / np.linalg.norm(X_STAR) < 1.5 * err_ref
    assert np.abs(quad64(x)[1]).max() <= 2e-3 * g0
    assert int(st.it) == info["nit"] and not bool(st.stalled)
    assert int(st.evals) <= 1.3 * info["funcalls"]
    # Run on, it gets as close as float32 values of f allow (the loss has roundoff of ~1e-5
    # here), then stops, `stalled`, rather than loop.
    st = lbfgs.minimize(quad, jnp.asarray(X0_Q), QARGS, maxiter=1000)
    assert bool(st.stalled) and int(st.evals) < 1000
    assert np.linalg.norm(np.asarray(st.x).ravel() - X_STAR) < 1e-2 * np.linalg.norm(X_STAR)


@pytest.mark.parametrize("n", [2, 100])
def test_rosenbrock_matches_scipy(n):
    x_ref, f_ref, info = scipy_run(rosen64, rosen_x0(n))
    assert np.allclose(x_ref, 1.0, atol=1e-3)
    st = lbfgs.minimize(rosen, jnp.asarray(rosen_x0(n)), (F32(1.0),), maxiter=info["nit"])
    np.testing.assert_allclose(np.asarray(st.x), 1.0, atol=5e-3)
    assert rosen64(np.asarray(st.x, np.float64))[0] < 1e-5
    assert int(st.evals) <= 1.3 * info["funcalls"]
    # Half way, both have made comparable progress from f0 = 24.2 n / 2.
    half = info["nit"] // 2
    _, f_half, info_half = scipy_run(rosen64, rosen_x0(n), maxiter=half, pgtol=0.0, factr=0.0)
    st = lbfgs.minimize(rosen, jnp.asarray(rosen_x0(n)), (F32(1.0),), maxiter=half)
    assert float(st.f) < 10 * f_half + 1e-3
    assert int(st.evals) <= 1.3 * info_half["funcalls"]


# --------------------------------------------------------------------------- scale invariance


@pytest.mark.parametrize("scale", [1e-10, 1e10, 2.0**-34, 2.0**33])
def test_scale_invariance(scale):
    """f * 1e-10 and f * 1e10 take the same iterates as f, up to float32 roundoff; scaled by
    a power of two (exact in floating point), bit for bit the same."""
    exact = np.log2(scale) == int(np.log2(scale))
    cases = [(quad, X0_Q, QARGS, 25), (rosen, rosen_x0(2), (F32(1.0),), 25)]
    if exact:  # (100-d Rosenbrock amplifies roundoff too much for the inexact scales)
        cases.append((rosen, rosen_x0(100), (F32(1.0),), 40))
    for fun, x0, args, its in cases:
        ref = lbfgs.minimize(fun, jnp.asarray(x0), args, maxiter=its)
        got = lbfgs.minimize(fun, jnp.asarray(x0), (*args[:-1], F32(scale)), maxiter=its)
        assert int(got.evals) == int(ref.evals) and int(got.it) == its
        if exact:
            np.testing.assert_array_equal(np.asarray(got.x), np.asarray(ref.x))
        else:  # roundoff, amplified by the condition number 1e3 of `quad` over 25 iterations
            np.testing.assert_allclose(np.asarray(got.x), np.asarray(ref.x), atol=2e-3)
            assert float(got.f) / scale == pytest.approx(float(ref.f), rel=2e-2)
        # ... and moved: no stall on gradients of ~1e-10.
        assert np.abs(np.asarray(got.x) - x0).max() > 0.1


# --------------------------------------------------------------------------- lanes, NaN, counts


def test_vmap_lanes_equal_single_runs():
    """Three Rosenbrock lanes from different starts, stepped in lockstep (one evaluation per
    step per lane, lanes at different iterations): each equals its own run, bit for bit."""
    x0s = np.stack([rosen_x0(20), 0.5 * rosen_x0(20), rosen_x0(20) + 0.3]).astype(np.float32)
    opts, args = lbfgs.Options(), (F32(1.0),)

    def run(x0, steps):
        st = lbfgs.init(rosen, x0, args, opts)
        return jax.lax.fori_loop(0, steps, lambda i, st: lbfgs.step(rosen, st, args, opts), st)

    lanes = jax.jit(jax.vmap(run, in_axes=(0, None)), static_argnums=1)(jnp.asarray(x0s), 40)
    assert lanes.evals.tolist() == [41, 41, 41]
    assert len(set(lanes.it.tolist())) > 1
    for i, x0 in enumerate(x0s):
        one = jax.jit(run, static_argnums=1)(jnp.asarray(x0), 40)
        assert int(lanes.it[i]) == int(one.it) > 20
        np.testing.assert_array_equal(np.asarray(lanes.x[i]), np.asarray(one.x))


def ball(x, r):
    """A quadratic whose value is NaN outside the ball |x| <= r; its minimum lies inside."""
    v = x.reshape(-1)
    f = 0.5 * v @ v - v @ jnp.full_like(v, 0.05)
    f = jnp.where(jnp.sqrt(v @ v) > r, jnp.nan, f)
    return f, {"total": f}


def test_nan_trial_point_halves_the_step():
    x0 = jnp.zeros((1, 2, 2, 3), F32)  # -g / |g| is the unit vector along (1, ..., 1)
    st = lbfgs.init(ball, x0, (F32(0.7),))
    assert float(st.t) == 1.0  # the first trial, at distance 1, is outside: NaN
    st = lbfgs.step(ball, st, (F32(0.7),))
    assert not bool(st.accepted) and float(st.t) == 0.5 and bool(st.bracketed)
    assert int(st.evals) == 2 and np.all(np.asarray(st.x) == 0.0)
    end = lbfgs.minimize(ball, x0, (F32(0.7),), maxiter=3)
    np.testing.assert_allclose(np.asarray(end.x), 0.05, atol=1e-5)  # the true minimum


def _count(jaxpr, names=("sin", "cos")) -> int:
    """Equations with primitive `names`, in the jaxpr and all its sub-jaxprs."""
    n = 0
    for eq in jaxpr.eqns:
        n += eq.primitive.name in names
        for p in eq.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    n += _count(sub.jaxpr, names)
                elif isinstance(sub, jcore.Jaxpr):
                    n += _count(sub, names)
    return n


def sines(x, w):
    f = jnp.sum(w * jnp.sin(x)) + 0.5 * jnp.sum(x * x)
    return f, {"total": f}


def test_one_evaluation_per_step():
    x0, args = jnp.ones((3, 4), F32), (F32(2.0),)
    single = _count(jax.make_jaxpr(jax.value_and_grad(sines, has_aux=True))(x0, *args).jaxpr)
    assert single == 2  # sin forward, cos backward
    # One call site in the compiled chunk of the `lbfgs` solver (jaxopt's has several).
    s = solvers.Settings(name="lbfgs", maxiter=10)
    sites = {}
    for name in ("lbfgs", "jaxopt_lbfgs"):
        init, chunk = solvers.make(dataclasses.replace(s, name=name), sines)
        st = jax.eval_shape(init, x0, args)
        sites[name] = _count(jax.make_jaxpr(chunk, static_argnums=3)(st, args, jnp.int32(5),
                                                                     5).jaxpr)
    assert sites["lbfgs"] == single < sites["jaxopt_lbfgs"]
    # compile_program's init for lbfgs is lazy: no objective in it (the chunk evaluates x0).
    lazy_init, _ = solvers._make_lbfgs(s, sines, lazy=True)
    assert _count(jax.make_jaxpr(lazy_init)(x0, args).jaxpr) == 0
    # Un-jitted: each step calls the objective exactly once.
    calls = []

    def counted(x, w):
        calls.append(1)
        return sines(x, w)

    st = lbfgs.init(counted, x0, args)  # (plus a call for the shapes of the terms)
    assert int(st.evals) == 1
    for k in range(4):
        n = len(calls)
        st = lbfgs.step(counted, st, args)
        assert len(calls) == n + 1 and int(st.evals) == k + 2


# --------------------------------------------------------------------------- through solvers


def _qfun(x, a, b):
    return quad(x, a, b, F32(1.0))


QARGS2 = (jnp.asarray(A), jnp.asarray(B))


def test_solver_chunks_change_nothing_and_rows_are_iterations():
    s = solvers.Settings(name="lbfgs", maxiter=40)
    runs = {}
    for chunk in (3, 50):
        seen = []
        res = solvers.minimize(s, _qfun, jnp.asarray(X0_Q), QARGS2, chunk=chunk,
                               on_chunk=lambda x, rows, seen=seen: seen.append(rows))
        runs[chunk] = (res, seen)
        assert res.status == solvers.Status.DONE == "done"
        assert [r["iter"] for r in res.history] == list(range(41))
        assert res.iterations == 40 and res.evals > 41
        secs = [r["seconds"] for r in res.history]
        assert secs == sorted(secs)
    (a, seen_a), (b, _) = runs[3], runs[50]
    np.testing.assert_array_equal(a.x, b.x)
    assert [r["total"] for r in a.history] == [r["total"] for r in b.history]
    assert a.evals == b.evals
    # chunk=3: chunks of 3 evaluations, each ending at an iteration multiple of 3 at the latest.
    assert all(len(rows) <= 3 for rows in seen_a) and len(seen_a) >= a.evals // 3
    ends = {rows[-1]["iter"] for rows in seen_a if rows}
    assert set(range(3, 40, 3)) <= ends
    # The rows hold the terms of the iterates (float64 check of the last).
    assert a.history[-1]["total"] == pytest.approx(quad64(a.x.ravel().astype(np.float64))[0],
                                                   rel=1e-5)


def test_lazy_program_equals_eager_init():
    """minimize (compile_program: lazy init, x0 evaluated by the first chunk) takes the same
    iterates as make's eager init driving the chunk by hand, with the same counts."""
    s = solvers.Settings(name="lbfgs", maxiter=25)
    res = solvers.minimize(s, _qfun, jnp.asarray(X0_Q), QARGS2, chunk=10)
    init, chunk = solvers.make(s, _qfun)
    st = jax.jit(init)(jnp.asarray(X0_Q), QARGS2)
    assert int(st.evals) == 1 and res.history[0]["total"] == float(st.terms["total"])
    assert float(st.g0) == pytest.approx(np.linalg.norm(quad64(X0_Q.ravel())[1]), rel=1e-5)
    st, _ = jax.jit(chunk, static_argnums=3)(st, QARGS2, jnp.int32(25), 200)
    np.testing.assert_array_equal(res.x, np.asarray(st.x))
    assert res.evals == int(st.evals) and res.iterations == int(st.it) == 25


def test_solver_resume_equals_uninterrupted_and_maxevals():
    s = solvers.Settings(name="lbfgs", maxiter=30)
    whole = solvers.minimize(s, _qfun, jnp.asarray(X0_Q), QARGS2, chunk=7)
    first = solvers.minimize(dataclasses.replace(s, maxiter=12), _qfun, jnp.asarray(X0_Q),
                             QARGS2, chunk=7, keep_state=True)
    rest = solvers.minimize(dataclasses.replace(s, maxiter=18), _qfun, jnp.asarray(X0_Q),
                            QARGS2, chunk=7, state0=first.state)
    np.testing.assert_array_equal(rest.x, whole.x)
    assert rest.iterations == whole.iterations == 30 and rest.evals == whole.evals
    hist = first.history + rest.history[1:]
    assert [(r["iter"], r["total"]) for r in hist] == [(r["iter"], r["total"])
                                                      for r in whole.history]
    # An evaluation budget ends the solve with status done, mid-way.
    budget = solvers.minimize(dataclasses.replace(s, maxevals=20), _qfun, jnp.asarray(X0_Q),
                              QARGS2, chunk=7)
    assert budget.evals == 20 and budget.status == "done" and budget.iterations < 20
    assert [r["total"] for r in budget.history] == [r["total"] for r in
                                                    whole.history[:budget.iterations + 1]]
    jo = solvers.minimize(dataclasses.replace(s, name="jaxopt_lbfgs", maxevals=20), _qfun,
                          jnp.asarray(X0_Q), QARGS2, chunk=7)
    assert 20 <= jo.evals < 20 + s.maxls and jo.iterations < 20 and jo.status == "done"


def test_status_is_a_string():
    assert solvers.Status.CONVERGED == "converged" and f"{solvers.Status.FAILED}" == "failed"
    assert str(solvers.Status.RUNNING) == "running" and "lbfgs" in solvers.COMPILED
    assert json.dumps({"s": solvers.Status.DONE}) == '{"s": "done"}'


# --------------------------------------------------------------------------- jaxopt aux fix


def test_jaxopt_aux_fix_same_iterates_fewer_evaluations():
    """solvers' jaxopt against jaxopt as it comes (same settings and first step): the same
    iterates, one evaluation per iteration fewer, and the counts are the real ones (a host
    callback counts executed evaluations)."""
    import jaxopt

    its, x0r, args = 25, jnp.asarray(rosen_x0(20)), (F32(1.0),)
    raw = jaxopt.LBFGS(fun=rosen, has_aux=True, maxiter=its, tol=0.0, history_size=10, maxls=20,
                       linesearch="zoom", linesearch_init="increase")

    @jax.jit
    def run_raw(x, w):
        st = raw.init_state(x, w)
        st = st._replace(gamma=1.0 / jnp.sqrt(jnp.vdot(st.grad, st.grad)))
        return jax.lax.fori_loop(0, its, lambda i, c: tuple(raw.update(*c, w)), (x, st))

    x_raw, st_raw = run_raw(x0r, *args)
    # One forward call site fewer in the update (sin: forward only; cos: backward).
    x0, w = jnp.ones((3, 4), F32), F32(2.0)
    fixed = solvers._jaxopt(solvers.Settings(history_size=10, maxls=20), sines)[1]
    raw_s = jaxopt.LBFGS(fun=sines, has_aux=True, maxiter=its, tol=0.0, history_size=10,
                         maxls=20, linesearch="zoom", linesearch_init="increase")
    st0 = raw_s.init_state(x0, w)
    before = jax.make_jaxpr(lambda x, st: raw_s.update(x, st, w))(x0, st0).jaxpr
    after = jax.make_jaxpr(lambda x, st: fixed(x, st, (w,), {"total": w}))(x0, st0).jaxpr
    assert _count(before, ("sin",)) - _count(after, ("sin",)) == 1
    assert _count(before, ("cos",)) == _count(after, ("cos",))
    count = []

    def counted(x, w):
        jax.debug.callback(lambda: count.append(1))
        return rosen(x, w)

    s = solvers.Settings(name="jaxopt_lbfgs", maxiter=its)
    res = solvers.minimize(s, rosen, x0r, args, chunk=its)
    np.testing.assert_array_equal(res.x, np.asarray(x_raw))  # bit for bit
    assert res.evals == int(st_raw.num_fun_eval) - its
    # Real evaluations, counted when they run (init's included).
    counted_res = solvers.minimize(s, counted, x0r, args, chunk=its)
    assert len(count) == counted_res.evals == res.evals
    # The rows' terms are those of the returned iterates (float64 reference).
    assert res.history[-1]["total"] == pytest.approx(rosen64(res.x.astype(np.float64))[0],
                                                     rel=1e-4, abs=1e-6)

    count.clear()
    res = solvers.minimize(dataclasses.replace(s, name="lbfgs"), counted, x0r, args, chunk=its)
    assert len(count) == res.evals


# --------------------------------------------------------------------------- tiny VGG loss


def test_tiny_vgg_loss_matches_scipy(vgg_params):
    """32x32, the post's layers, random weights: after the same number of iterations, our loss
    is within 1% of scipy's L-BFGS-B (m=10) driving the same value_and_grad."""
    spec = losses.Spec()
    rng = np.random.default_rng(5)
    content = jnp.asarray(rng.uniform(-100, 100, (1, 32, 32, 3)), F32)
    style = jnp.asarray(rng.uniform(-100, 100, (1, 32, 32, 3)), F32)
    tgt = losses.targets(vgg_params, content, style, spec)
    w = losses.default_weights(spec, [1.0] * 5, 1e3, tv=1e-3)
    fun = losses.objective(spec)
    args = (vgg_params, tgt, w)
    its = 30
    vg = jax.jit(jax.value_and_grad(lambda x: fun(x, *args)[0]))

    def fg(z):
        v, g = vg(jnp.asarray(z.reshape(content.shape), F32))
        return float(v), np.asarray(g, np.float64).ravel()

    _, f_ref, info = scipy_run(fg, content, maxiter=its, pgtol=0.0, factr=0.0)
    assert info["nit"] == its
    res = solvers.minimize(solvers.Settings(name="lbfgs", maxiter=its), fun, content, args,
                           chunk=its)
    f0 = res.history[0]["total"]
    assert res.iterations == its and f_ref < 0.5 * f0
    assert res.history[-1]["total"] <= 1.01 * f_ref
    assert res.evals <= 1.3 * info["funcalls"]
