"""nstjax: neural style transfer (Gatys et al. 2015) in JAX.

    import nstjax
    r = nstjax.stylize("configs/quickstart.yaml", ["solver.maxiter=50"])  # writes nothing
    r.image.save("out.png")

Submodules load on first use (`nstjax.solvers`, `nstjax.losses`, ...): `import nstjax` itself
imports neither JAX nor any other dependency.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

SUBMODULES = ("batch", "bench", "bench_torch", "cli", "config", "errors", "image", "keras_h5",
              "lbfgs", "losses", "metrics", "multiscale", "problem", "race", "record", "results",
              "run", "runtime", "solvers", "sweep", "tblog", "vgg16", "watch", "weights")
__all__ = ["__version__", "stylize", *SUBMODULES]

def __getattr__(name: str):  # PEP 562: submodules on first use
    if name in SUBMODULES:
        return importlib.import_module(f"nstjax.{name}")
    if name == "stylize":
        return importlib.import_module("nstjax.run").stylize
    raise AttributeError(f"module 'nstjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
