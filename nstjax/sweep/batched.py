"""The compiled program of a group of cells (JAX only, no files).

`nstjax.batch` maps the solver's `init` and `chunk` over a batch of cells (x0, targets and loss
weights per cell; VGG params shared), the batch axis sharded over the local devices; `lanes`
cells per device run in lockstep under `jax.vmap`, the rest of a device's cells one after
another in the same program. Padding cells start done. This module adds the group's cache of
compiled programs and the stacking of built problems into a batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nstjax.sweep.plan import Group

def compile_group(g: Group, mesh, xb, argsb, lanes: int) -> tuple:
    """AOT-compiled batched (init, chunk) for a group (`nstjax.batch.compile_batched`): the
    cell axis sharded over `mesh`, VGG params replicated, targets and loss weights per cell."""
    from nstjax import batch, losses

    # maxiter is no part of the program (chunks take their length): reruns of any length share it
    return batch.compile_batched(replace(g.settings, maxiter=0), losses.objective(g.spec), xb,
                                 argsb, in_axes=(None, 0, 0), lanes=lanes, mesh=mesh,
                                 chunk=g.chunk)


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

    from nstjax import losses

    # The kind's functions are in the key: one name may be another plugin's in another group.
    key = (g.spec, losses.kind(g.spec.kind), replace(g.settings, maxiter=0), g.chunk, g.hw, lanes,
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

