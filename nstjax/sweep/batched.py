"""The compiled program of a group of cells (JAX only, no files).

The solver's `init` and `chunk` are mapped over a batch of cells (x0, targets and loss weights
per cell; VGG params broadcast), the batch axis sharded over the local devices with `shard_map`.
On each device `lanes` cells run in lockstep under `jax.vmap`; further cells of the device's
shard run one after another inside the same program (`lax.map`). Padding cells start done.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nstjax.sweep.plan import Group

def _map(f, xs, lanes: int, n: int):
    """f over the leading axis of xs: vmap in groups of `lanes`, the groups one after another."""
    import jax

    if lanes <= 1:
        return jax.lax.map(f, xs)  # no vmap: the solver's branches stay real branches
    if lanes >= n:
        return jax.vmap(f)(xs)
    return jax.lax.map(f, xs, batch_size=lanes)


def compile_group(g: Group, mesh, xb, argsb, lanes: int) -> tuple:
    """AOT-compiled batched (init, chunk) for a group: the batch axis sharded over `mesh`.

    Each device runs its shard independently (shard_map): `lanes` cells at a time under vmap,
    the rest of its cells in a loop inside the same program. VGG params are replicated.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from nstjax import losses, solvers

    # maxiter is no part of the program (chunks take their length): reruns of any length share it
    init, chunk = solvers.make(replace(g.settings, maxiter=0), losses.objective(g.spec))
    local = xb.shape[0] // mesh.size

    def init1(x0, params, tgt, w, live):
        # Padding cells start done: inside lax.map their chunks skip all work.
        st = init(x0, (params, tgt, w))
        return {**st, "done": st["done"] | ~live}

    def local_init(x0s, args, live):
        params, tgts, ws = args
        return _map(lambda a: init1(a[0], params, *a[1:]), (x0s, tgts, ws, live), lanes, local)

    def local_chunk(sts, args, n):
        params, tgts, ws = args
        return _map(lambda a: chunk(a[0], (params, a[1], a[2]), n, g.chunk), (sts, tgts, ws),
                    lanes, local)

    b, r = P("cells"), P()
    specs = (r, b, b)
    # check_vma off: jaxopt's cond branches mix per-device and replicated values.
    sm_init = jax.shard_map(local_init, mesh=mesh, in_specs=(b, specs, b), out_specs=b,
                            check_vma=False)
    sm_chunk = jax.shard_map(local_chunk, mesh=mesh, in_specs=(b, specs, r), out_specs=b,
                             check_vma=False)
    bs, rs = NamedSharding(mesh, b), NamedSharding(mesh, r)
    arg_sh = (rs, bs, bs)
    live = jax.ShapeDtypeStruct(xb.shape[:1], jnp.bool_, sharding=bs)
    init_c = jax.jit(sm_init, in_shardings=(bs, arg_sh, bs), out_shardings=bs).lower(
        xb, argsb, live).compile()
    st = jax.eval_shape(sm_init, xb, argsb, live)
    n = jax.ShapeDtypeStruct((), jnp.int32)
    chunk_c = jax.jit(sm_chunk, in_shardings=(bs, arg_sh, rs), out_shardings=bs,
                      donate_argnums=(0,)).lower(st, argsb, n).compile()
    return init_c, chunk_c


_PROGRAMS: dict[tuple, tuple] = {}  # compiled group programs of this process


@contextlib.contextmanager
def _counting(event: str):
    """Count a jax.monitoring event while the block runs (e.g. persistent-cache hits)."""
    import jax

    seen: list[str] = []

    def listener(name: str, **_kw) -> None:
        if name == event:
            seen.append(name)

    jax.monitoring.register_event_listener(listener)
    try:
        yield seen
    finally:
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_listener(listener)


def program(g: Group, mesh, xb, argsb, lanes: int) -> tuple[tuple, float, bool]:
    """(init, chunk) compiled for this group and these argument shapes, reused across batches
    and sweeps of this process; with the seconds spent compiling (0.0 when reused) and whether
    the XLA binaries came from JAX's persistent compilation cache."""
    import jax

    key = (g.spec, replace(g.settings, maxiter=0), g.chunk, g.hw, lanes,
           tuple(d.id for d in mesh.devices.flat),
           jax.tree.structure(argsb),
           tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves((xb, argsb))))
    if key in _PROGRAMS:
        return _PROGRAMS[key], 0.0, False
    t = time.perf_counter()
    with _counting("/jax/compilation_cache/cache_hits") as hits:
        _PROGRAMS[key] = compile_group(g, mesh, xb, argsb, lanes)
    return _PROGRAMS[key], time.perf_counter() - t, bool(hits)


def stack(probs: list, b: int, mesh) -> tuple:
    """Batch inputs (x0s, (params, targets, weights), live) for `b` cells sharded over `mesh`;
    the batch is padded with copies of the last problem (marked not live)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sh = NamedSharding(mesh, P("cells"))
    pad = probs + [probs[-1]] * (b - len(probs))

    def stacked(*a):
        return jax.device_put(np.stack([np.asarray(x) for x in a]), sh)

    xb = stacked(*[p.x0 for p in pad])
    tgt = jax.tree.map(stacked, *[p.targets for p in pad])
    w = jax.tree.map(stacked, *[p.weights for p in pad])
    live = jax.device_put(np.arange(b) < len(probs), sh)
    return xb, (probs[0].params, tgt, w), live

