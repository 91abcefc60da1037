"""Batched solves: one compiled program runs a solver on many cells (problems of one shape).

A cell is an x0 and its own arguments; arguments marked `None` in `in_axes` are shared by all
cells (e.g. network weights). The solver's `init` and `chunk` (nstjax.solvers) are mapped over
the leading cell axis, which is sharded over the devices of a 1-D `mesh` with `shard_map`. On
each device `lanes` cells run in lockstep under `jax.vmap`; the device's further cells run one
after another inside the same program (`lax.map`), so a batch larger than what fits in memory
at once still compiles once. Lanes evaluate both sides of the solver's branches (vmap turns a
`cond` into a `select`): with one lane, skipped work is really skipped.

    init, chunk = compile_batched(settings, fun, xb, argsb, in_axes=(None, 0), lanes=2)
    results = minimize_batched(settings, fun, xb, argsb, in_axes=(None, 0), compiled=...)

`fun(x, *args) -> (total, terms)` is the single-cell objective (see nstjax.solvers). The host
loop is `solvers.drive`, as for single solves: each cell stops at its own `maxiter`
iterations, `maxevals` evaluations or convergence, and every result equals what
`solvers.minimize` gives for that cell alone (to float32 reassociation under vmap).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nstjax import solvers
from nstjax.errors import UserError


def _map(f: Callable, xs: Any, lanes: int, n: int) -> Any:
    """f over the leading axis of xs: vmap in groups of `lanes`, the groups one after another."""
    if lanes <= 1:
        return jax.lax.map(f, xs)  # no vmap: the solver's branches stay real branches
    if lanes >= n:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=lanes)


def _axes(in_axes: int | None | Sequence[int | None], nargs: int) -> tuple:
    axes = tuple(in_axes) if isinstance(in_axes, (list, tuple)) else (in_axes,) * nargs
    if len(axes) != nargs or any(a not in (0, None) for a in axes):
        raise ValueError(f"in_axes must be 0 or None per argument ({nargs}), got {in_axes!r}")
    return axes


def default_mesh() -> Mesh:
    """A one-device mesh (the first local device) with the axis "cells"."""
    return Mesh(np.array(jax.local_devices()[:1]), ("cells",))


def make_batched(s: solvers.Settings, fun: Callable, *, in_axes: int | None | Sequence = 0,
                 nargs: int, lanes: int = 1, local: int, length: int
                 ) -> tuple[Callable, Callable]:
    """Pure per-device (init, chunk) over `local` cells, for use inside `shard_map`.

    `init(xb, argsb, live) -> state` (cells not `live` start done: they are padding);
    `chunk(state, argsb, n) -> (state, trace)` with `n` (int32, per cell) capping each cell's
    iterations, `length` steps per chunk. `lbfgs`'s init is lazy (see `solvers.evaluate_start`).
    """
    init, chunk = solvers.make(s, fun, lazy=True, lockstep=lanes > 1)
    axes = _axes(in_axes, nargs)

    def split(args):
        return (tuple(a if ax is None else None for a, ax in zip(args, axes)),
                tuple(a if ax == 0 else None for a, ax in zip(args, axes)))

    def join(shared, mine):
        return tuple(b if ax is None else m for b, m, ax in zip(shared, mine, axes))

    def init_b(xb, argsb, live):
        shared, per = split(argsb)

        def one(c):
            x0, mine, ok = c
            st = init(x0, join(shared, mine))
            return st._replace(done=st.done | ~ok)

        return _map(one, (xb, per, live), lanes, local)

    def chunk_b(sts, argsb, n):
        shared, per = split(argsb)
        return _map(lambda c: chunk(c[0], join(shared, c[1]), c[2], length), (sts, per, n),
                    lanes, local)

    return init_b, chunk_b


def compile_batched(s: solvers.Settings, fun: Callable, xb, argsb: tuple, *,
                    in_axes: int | None | Sequence = 0, lanes: int = 1, mesh: Mesh | None = None,
                    chunk: int = 50) -> tuple[Callable, Callable]:
    """AOT-compiled batched (init, chunk) for these shapes, the cell axis sharded over `mesh`.

    `xb`: the cells' x0 stacked, shape (cells, *x.shape); `argsb`: the arguments of `fun`
    after x, each with a leading cell axis where `in_axes` says 0, as is where None.
    The number of cells must be a multiple of the mesh's size (pad: see `pad`). Returns
    `init(xb, argsb, live) -> state` and `chunk(state, argsb, n) -> (state, trace)` (the
    state is donated), ready for `solvers.drive`. `s.maxiter` is no part of the program.
    """
    mesh = mesh or default_mesh()
    name = mesh.axis_names[0]
    cells = xb.shape[0]
    if cells % mesh.size:
        raise ValueError(f"{cells} cells do not split over {mesh.size} devices; pad the batch")
    axes = _axes(in_axes, len(argsb))
    init_b, chunk_b = make_batched(replace(s, maxiter=0), fun, in_axes=axes, nargs=len(argsb),
                                   lanes=lanes, local=cells // mesh.size, length=chunk)
    b, r = P(name), P()
    specs = tuple(r if ax is None else b for ax in axes)
    # check_vma off: jaxopt's cond branches mix per-device and replicated values.
    sm_init = jax.shard_map(init_b, mesh=mesh, in_specs=(b, specs, b), out_specs=b,
                            check_vma=False)
    sm_chunk = jax.shard_map(chunk_b, mesh=mesh, in_specs=(b, specs, b), out_specs=b,
                             check_vma=False)
    bs, rs = NamedSharding(mesh, b), NamedSharding(mesh, r)
    arg_sh = tuple(rs if ax is None else bs for ax in axes)
    live = jax.ShapeDtypeStruct((cells,), jnp.bool_, sharding=bs)
    init_c = jax.jit(sm_init, in_shardings=(bs, arg_sh, bs), out_shardings=bs).lower(
        xb, argsb, live).compile()
    st = jax.eval_shape(sm_init, xb, argsb, live)
    n = jax.ShapeDtypeStruct((cells,), jnp.int32, sharding=bs)
    chunk_c = jax.jit(sm_chunk, in_shardings=(bs, arg_sh, bs), out_shardings=bs,
                      donate_argnums=(0,)).lower(st, argsb, n).compile()
    return init_c, chunk_c


def put(mesh: Mesh, xb, argsb: tuple, in_axes: int | None | Sequence = 0) -> tuple:
    """(xb, argsb) placed on `mesh` as `compile_batched`'s programs take them."""
    axes = _axes(in_axes, len(argsb))
    bs, rs = NamedSharding(mesh, P(mesh.axis_names[0])), NamedSharding(mesh, P())
    return (jax.device_put(xb, bs),
            tuple(jax.device_put(a, rs if ax is None else bs) for a, ax in zip(argsb, axes)))


def pad(cells: int, multiple: int) -> int:
    """The batch size for `cells` cells on `multiple` devices (round up)."""
    return -(-cells // multiple) * multiple


def minimize_batched(s: solvers.Settings, fun: Callable, xb, argsb: tuple, *,
                     in_axes: int | None | Sequence = 0, lanes: int = 1,
                     mesh: Mesh | None = None, chunk: int = 50, live=None,
                     compiled: tuple | None = None,
                     on_chunk: Callable[[solvers.Chunk], bool | None] | None = None,
                     ) -> list[solvers.Result]:
    """Minimize `fun` for every cell of a batch; one `solvers.Result` per live cell.

    Arguments as for `compile_batched` (`compiled` passes its programs to skip compiling);
    `live` (bool per cell, default all) marks padding cells, which do no work and get no
    result. `on_chunk(chunk)` sees each chunk's batched state and trace; True stops all cells
    (status interrupted). Each result's history has a row per accepted iteration, its seconds
    placed within each chunk by the cell's evaluation count.
    """
    if s.name not in solvers.COMPILED:
        raise ValueError(f"not a compiled solver: {s.name!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise UserError(f"minimize_batched: chunk must be an integer >= 1 (iterations per "
                        f"compiled chunk), got {chunk!r}")
    mesh = mesh or default_mesh()
    t = time.perf_counter()
    with solvers.users(fun):
        init_c, chunk_c = compiled or compile_batched(s, fun, xb, argsb, in_axes=in_axes,
                                                      lanes=lanes, mesh=mesh, chunk=chunk)
    compile_s = 0.0 if compiled else time.perf_counter() - t
    cells = xb.shape[0]
    live = np.ones(cells, bool) if live is None else np.asarray(live, bool)
    xb, argsb = put(mesh, xb, argsb, in_axes)
    live_d = jax.device_put(live, NamedSharding(mesh, P(mesh.axis_names[0])))
    t0 = time.perf_counter()
    st = solvers.evaluate_start(chunk_c, init_c(xb, argsb, live_d), argsb)
    terms0 = jax.device_get(st.terms)
    solvers.check_start(fun, np.where(live, terms0["total"], 0.0))
    it0 = np.asarray(st.it)
    hist = [[{"iter": int(it0[i]), **{k: float(v[i]) for k, v in terms0.items()},
              "seconds": 0.0}] for i in range(cells)]

    def each(c: solvers.Chunk) -> bool:
        for i in np.flatnonzero(live):
            hist[i] += solvers.rows_of({k: v[i] for k, v in c.trace.items()}, t0, start=c.start,
                                       evals0=int(c.evals0[i]), end=c.end)
        return on_chunk is not None and bool(on_chunk(c))

    st, stopped = solvers.drive(chunk_c, st, argsb, maxiter=s.maxiter, chunk=chunk,
                                maxevals=s.maxevals, on_chunk=each)
    solve_s = time.perf_counter() - t0
    fin = jax.device_get(st._replace(opt=None, terms=None))  # per-cell scalars and x
    out = []
    for i in np.flatnonzero(live):
        one = jax.tree.map(lambda v, i=i: v[i], fin)
        res = solvers.Result(x=np.asarray(one.x), history=hist[i], evals=int(one.evals),
                             iterations=int(one.it), compile_seconds=compile_s,
                             solve_seconds=solve_s)
        res.status, res.error = solvers.status_of(one)
        if stopped and res.status != solvers.Status.FAILED:
            res.status = solvers.Status.INTERRUPTED
        out.append(res)
    return out
