"""L-BFGS whose compiled step performs exactly one value-and-gradient evaluation.

The line search is a state machine around that evaluation: each `step` evaluates the trial
point x + t d, then either accepts it (strong Wolfe, c1=1e-4, c2=0.9; or Hager & Zhang's
approximate Wolfe conditions when f changed by less than its roundoff), stores the pair s, y and
takes the next direction from the two-loop recursion, which needs no evaluation; or it picks the
next trial t: cubic or quadratic interpolation inside a bracket, cubic extrapolation while the
slope is still negative, bisection towards the last good point after a NaN/inf value. After
`maxls` trials without acceptance it accepts the best sufficient-decrease point seen, if any,
else it clears the memory and restarts along -g (and reports `stalled` if that was already the
direction). Under `jax.vmap` every lane evaluates once per step and nothing else branches.

Scale-free: the first step (and every restart) has unit length along -g, like scipy's L-BFGS-B,
later steps start at t = 1 with the gamma = s.y / y.y scaling; pairs with s.y <= eps |s| |y|
are skipped (a relative test); dot products of gradient-like vectors with themselves are taken
after dividing by their largest entry, so f * 1e-10 and f * 1e10 take the same iterates.

`init` evaluates x0; `start` makes a state whose first `step` does (a program holding `start`
has no objective in it: one compiled copy of the objective per solve instead of two).
`fun(x, *args) -> (total, terms)`, terms a dict of scalars; x a float array of any shape.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Options:
    history_size: int = 10
    maxls: int = 20  # trials per line search before the fallback
    c1: float = 1e-4  # sufficient decrease
    c2: float = 0.9  # curvature (strong Wolfe)
    flat: float = 1e-6  # relative change of f within roundoff (approximate Wolfe)


class State(NamedTuple):
    x: jax.Array  # last accepted point, its value, gradient and terms
    f: jax.Array
    g: jax.Array
    terms: dict
    d: jax.Array  # search direction from x
    dg0: jax.Array  # slope g.d at x (negative)
    t: jax.Array  # the next trial step
    lo_t: jax.Array  # best sufficient-decrease point of this line search (0: x itself)
    lo_f: jax.Array
    lo_dg: jax.Array
    lo_g: jax.Array
    lo_terms: dict
    hi_t: jax.Array  # the other end of the bracket, once `bracketed`
    hi_f: jax.Array  # inf after a non-finite trial: bisect
    hi_dg: jax.Array
    bracketed: jax.Array
    ls: jax.Array  # trials so far in this line search
    S: jax.Array  # (m, *x.shape) the stored pairs s, y, newest first (slot 0)
    Y: jax.Array
    rho: jax.Array  # (m,) 1 / s.y
    k: jax.Array  # pairs stored since the last reset
    gamma: jax.Array
    it: jax.Array  # accepted iterations
    evals: jax.Array
    accepted: jax.Array  # the last step accepted a point
    stalled: jax.Array  # no decrease found along -g with an empty memory: nothing more to do
    pending: jax.Array  # from `start`: the next step evaluates x itself


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.vdot(a, b).real


def norm(a: jax.Array) -> jax.Array:
    """Euclidean norm without under/overflow of the squares (gradients of ~1e-20 or ~1e20)."""
    m = jnp.max(jnp.abs(a))
    safe = jnp.where(m > 0, m, 1.0)
    return jnp.where(m > 0, safe * jnp.sqrt(_dot(a / safe, a / safe)), 0.0)


def _select(c: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda u, v: jnp.where(c, u, v), a, b)


def cubic_min(t1, f1, g1, t2, f2, g2) -> jax.Array:
    """Minimizer of the cubic through (t1, f1, slope g1) and (t2, f2, g2); NaN if none."""
    theta = 3.0 * (f1 - f2) / (t2 - t1) + g1 + g2
    s = jnp.maximum(jnp.maximum(jnp.abs(theta), jnp.abs(g1)), jnp.abs(g2))
    s = jnp.where(s > 0, s, 1.0)
    rad = (theta / s) ** 2 - (g1 / s) * (g2 / s)
    gam = s * jnp.sqrt(jnp.where(rad >= 0, rad, jnp.nan))
    gam = jnp.where(t2 < t1, -gam, gam)
    p = gam - g1 + theta
    q = gam - g1 + gam + g2
    return t1 + p / q * (t2 - t1)


def quad_min(t1, f1, g1, t2, f2) -> jax.Array:
    """Minimizer of the quadratic through (t1, f1, slope g1) and (t2, f2)."""
    return t1 + g1 / ((f1 - f2) / (t2 - t1) + g1) / 2.0 * (t2 - t1)


def _next_in_bracket(lo_t, lo_f, lo_dg, hi_t, hi_f, hi_dg) -> jax.Array:
    a, b = jnp.minimum(lo_t, hi_t), jnp.maximum(lo_t, hi_t)
    w = b - a
    tc = cubic_min(lo_t, lo_f, lo_dg, hi_t, hi_f, hi_dg)
    tq = quad_min(lo_t, lo_f, lo_dg, hi_t, hi_f)
    mid = 0.5 * (a + b)
    inside = lambda u: jnp.isfinite(u) & (u > a) & (u < b)  # noqa: E731
    tn = jnp.where(inside(tc), tc, jnp.where(inside(tq), tq, mid))
    tn = jnp.where(jnp.isfinite(hi_f), tn, mid)  # hi is a non-finite point: bisect
    return jnp.clip(tn, a + 0.1 * w, b - 0.1 * w)


def _next_outside(t0, f0, g0, t1, f1, g1) -> jax.Array:
    lower, upper = t1 + 1.1 * (t1 - t0), t1 + 4.0 * (t1 - t0)
    tc = cubic_min(t0, f0, g0, t1, f1, g1)
    return jnp.clip(jnp.where(jnp.isfinite(tc) & (tc > t1), tc, upper), lower, upper)


def _push(buf: jax.Array, v: jax.Array) -> jax.Array:
    """The buffer with v in slot 0 and the oldest entry dropped."""
    return jnp.concatenate([v[None].astype(buf.dtype), buf[:-1]])


def _two_loop(g, S, Y, rho, k, gamma) -> jax.Array:
    """-H g for the inverse-Hessian approximation of the stored pairs."""
    m = S.shape[0]
    n = jnp.minimum(k, m)

    def back(j, c):
        q, alpha = c
        a = jnp.where(j < n, rho[j] * _dot(S[j], q), 0.0)
        return q - a * Y[j], alpha.at[j].set(a)

    q, alpha = jax.lax.fori_loop(0, m, back, (g, jnp.zeros((m,), g.dtype)))
    r = gamma * q

    def forward(jj, r):
        j = m - 1 - jj
        b = rho[j] * _dot(Y[j], r)
        return r + jnp.where(j < n, alpha[j] - b, 0.0) * S[j]

    return -jax.lax.fori_loop(0, m, forward, r)


def _new_search(st: State, x, f, g, terms, S, Y, rho, k, gamma) -> State:
    """State for a line search from the accepted point x (from -g/|g| with t = 1 if k == 0)."""
    gn = norm(g)
    steepest = -g / jnp.where(gn > 0, gn, 1.0)
    d_q = _two_loop(g, S, Y, rho, k, gamma)
    dg_q = _dot(g, d_q)
    use_q = (k > 0) & (dg_q < 0) & jnp.isfinite(dg_q)
    k = jnp.where(use_q, k, 0)  # not a descent direction: restart without memory
    d = jnp.where(use_q, d_q, steepest)
    dg0 = jnp.where(use_q, dg_q, -gn)
    one = jnp.ones((), f.dtype)
    return st._replace(x=x, f=f, g=g, terms=terms, d=d, dg0=dg0, t=one, lo_t=0 * one, lo_f=f,
                       lo_dg=dg0, lo_g=g, lo_terms=terms, hi_t=0 * one, hi_f=jnp.inf * one,
                       hi_dg=0 * one, bracketed=jnp.bool_(False), ls=jnp.int32(0), S=S, Y=Y,
                       rho=rho, k=k, gamma=gamma)


def start(fun: Callable, x0: jax.Array, args: tuple, opts: Options = Options()) -> State:
    """A state at x0 not evaluated yet: its first `step` evaluates x0 (and is no iteration).
    A program made of `start` compiles without the objective in it."""
    _, terms = jax.eval_shape(fun, x0, *args)
    terms = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), terms)
    m = opts.history_size
    z = jnp.zeros((), x0.dtype)
    zx = jnp.zeros_like(x0)
    return State(x=x0, f=z, g=zx, terms=terms, d=zx, dg0=z, t=z, lo_t=z, lo_f=z, lo_dg=z, lo_g=zx,
                 lo_terms=terms, hi_t=z, hi_f=z, hi_dg=z, bracketed=jnp.bool_(False),
                 ls=jnp.int32(0), S=jnp.zeros((m, *x0.shape), x0.dtype),
                 Y=jnp.zeros((m, *x0.shape), x0.dtype), rho=jnp.zeros((m,), x0.dtype),
                 k=jnp.int32(0), gamma=jnp.ones((), x0.dtype), it=jnp.int32(0),
                 evals=jnp.int32(0), accepted=jnp.bool_(False), stalled=jnp.bool_(False),
                 pending=jnp.bool_(True))


def init(fun: Callable, x0: jax.Array, args: tuple, opts: Options = Options()) -> State:
    """Evaluate at x0 (the one evaluation of `init`) and set up the first line search."""
    return step(fun, start(fun, x0, args, opts), args, opts)


def step(fun: Callable, st: State, args: tuple, opts: Options = Options()) -> State:
    """One evaluation at x + t d, then accept or choose the next trial step. A stalled state
    stays as it is (it still evaluates, so that vmapped lanes stay in lockstep)."""
    x_t = jnp.where(st.pending, st.x, st.x + st.t * st.d)
    (f_t, terms_t), g_t = jax.value_and_grad(fun, has_aux=True)(x_t, *args)
    dg_t = _dot(g_t, st.d)
    finite = jnp.isfinite(f_t) & jnp.isfinite(dg_t)
    armijo = finite & (f_t <= st.f + opts.c1 * st.t * st.dg0)
    wolfe = armijo & (jnp.abs(dg_t) <= -opts.c2 * st.dg0)
    # Near the minimum, f's float32 roundoff hides any decrease: accept on the slope alone
    # (Hager & Zhang's approximate Wolfe conditions) when f has not risen beyond roundoff.
    flat = finite & (f_t <= st.f + opts.flat * jnp.abs(st.f))
    wolfe |= flat & (dg_t >= opts.c2 * st.dg0) & (dg_t <= (2 * opts.c1 - 1) * st.dg0)
    high = ~armijo | (f_t >= st.lo_f)  # the minimum lies below t: t becomes hi
    low = ~wolfe & ~high  # a better point with the slope still too steep: t becomes lo

    # Bracket update (Nocedal & Wright's zoom, in one-trial steps).
    side = jnp.where(st.bracketed, st.hi_t - st.lo_t, 1.0)
    lo_to_hi = low & (dg_t * side >= 0)
    hi_t = jnp.where(high, st.t, jnp.where(lo_to_hi, st.lo_t, st.hi_t))
    hi_f = jnp.where(high, jnp.where(finite, f_t, jnp.inf), jnp.where(lo_to_hi, st.lo_f, st.hi_f))
    hi_dg = jnp.where(high, jnp.where(finite, dg_t, 0.0), jnp.where(lo_to_hi, st.lo_dg, st.hi_dg))
    bracketed = st.bracketed | high | lo_to_hi
    lo_t = jnp.where(low, st.t, st.lo_t)
    lo_f = jnp.where(low, f_t, st.lo_f)
    lo_dg = jnp.where(low, dg_t, st.lo_dg)
    lo_g = jnp.where(low, g_t, st.lo_g)
    lo_terms = _select(low, terms_t, st.lo_terms)
    t_next = jnp.where(bracketed, _next_in_bracket(lo_t, lo_f, lo_dg, hi_t, hi_f, hi_dg),
                       _next_outside(st.lo_t, st.lo_f, st.lo_dg, st.t, f_t, dg_t))
    ls = st.ls + 1
    searching = st._replace(t=t_next, lo_t=lo_t, lo_f=lo_f, lo_dg=lo_dg, lo_g=lo_g,
                            lo_terms=lo_terms, hi_t=hi_t, hi_f=hi_f, hi_dg=hi_dg,
                            bracketed=bracketed, ls=ls)

    # Acceptance: the Wolfe point, or after maxls trials the best sufficient-decrease point;
    # failing both, a restart along -g from x without memory (`stalled` if that was the
    # direction already). A stalled state stays as it is.
    # A pending state takes the trial (x itself) as its start point.
    live = ~st.stalled
    take_t = wolfe | st.pending
    give_up = live & ~take_t & (ls >= opts.maxls)
    take_lo = give_up & (lo_t > 0)
    accept = live & ~st.pending & (wolfe | take_lo)
    restart = give_up & ~take_lo
    x_n = jnp.where(take_t, x_t, jnp.where(take_lo, st.x + lo_t * st.d, st.x))
    f_n = jnp.where(take_t, f_t, lo_f)  # (lo is x itself when lo_t = 0)
    g_n = jnp.where(take_t, g_t, lo_g)
    terms_n = _select(take_t, terms_t, lo_terms)
    s = x_n - st.x
    y = g_n - st.g
    my = jnp.max(jnp.abs(y))
    y_hat = y / jnp.where(my > 0, my, 1.0)
    sy_hat = _dot(s, y_hat)
    yy_hat = _dot(y_hat, y_hat)  # in [1, size]; s is in x's units: neither under/overflows
    eps = jnp.finfo(st.f.dtype).eps
    good = accept & (my > 0) & jnp.isfinite(sy_hat)
    good &= sy_hat > eps * jnp.sqrt(_dot(s, s) * yy_hat)
    # Newest pair first at a fixed slot: under vmap a per-lane ring index would turn every
    # buffer access into a gather/scatter (measured 3.8x the step time at 2 lanes).
    S = jnp.where(good, _push(st.S, s), st.S)
    Y = jnp.where(good, _push(st.Y, y), st.Y)
    rho = jnp.where(good, _push(st.rho, 1.0 / (sy_hat * my)), st.rho)
    gamma = jnp.where(good, sy_hat / (my * yy_hat), st.gamma)
    gamma = jnp.where(restart | st.pending, 1.0, gamma)
    k = jnp.where(restart | st.pending, 0, st.k + good.astype(jnp.int32))
    nxt = _new_search(st, x_n, f_n, g_n, terms_n, S, Y, rho, k, gamma)
    searching = searching._replace(S=S, Y=Y, rho=rho)
    frozen = st._replace(S=S, Y=Y, rho=rho)
    new = _select(accept | restart | st.pending, nxt, _select(live, searching, frozen))
    return new._replace(it=st.it + accept.astype(jnp.int32), evals=st.evals + 1,
                        accepted=accept, stalled=st.stalled | (restart & (st.k == 0)),
                        pending=jnp.bool_(False))


def _run(fun, opts, x0, args, maxiter, maxevals) -> State:
    st = init(fun, x0, args, opts)
    go = lambda st: (st.it < maxiter) & (st.evals < maxevals) & ~st.stalled  # noqa: E731
    return jax.lax.while_loop(go, lambda st: step(fun, st, args, opts), st)


_run = jax.jit(_run, static_argnums=(0, 1))


def minimize(fun: Callable, x0: jax.Array, args: tuple = (), opts: Options = Options(), *,
             maxiter: int = 100, maxevals: int = 10_000) -> State:
    """A plain jitted loop of `step` until `maxiter` accepted iterations, `maxevals`
    evaluations or a stall (nstjax.solvers drives `step` in chunks instead). Compiled once per
    (fun, opts, shapes): the limits are arguments."""
    return _run(fun, opts, x0, args, jnp.int32(maxiter), jnp.int32(maxevals))
